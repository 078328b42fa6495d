"""`jaxtrain data bench DIR --config CONFIG`: how fast the input pipeline delivers, and
whether its memory stays flat, next to how fast the config's train step consumes.

The pipeline is the run's own (`pipeline.TrainBatches` over the prepared dataset at DIR,
with the config's seq_len, batch size, packing and read threads, as process 0 of 1).
After `warmup` batches it is drained for `seconds`; the resident set size is sampled ten
times along the way. Then, in the same process, the compiled train step of the same
config is timed by `jaxtrain bench` (unless `train=False`), and the report gives

    ratio = pipeline tokens/s / train-step tokens/s

(the pipeline must be far ahead of the model for the input never to stall a step).
"""

from __future__ import annotations

import time
from typing import Any

from jaxtrain.config.schema import Config
from jaxtrain.data import pipeline
from jaxtrain.data.sources import open_sources


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_pipeline(cfg: Config, seconds: float = 20.0, warmup: int = 20) -> dict[str, Any]:
    batches = pipeline.TrainBatches(cfg, open_sources(cfg))
    for _ in range(warmup):
        next(batches)
    rss, count = [_rss_bytes()], 0
    started = time.perf_counter()
    next_sample = started + seconds / 10
    while (now := time.perf_counter()) - started < seconds:
        next(batches)
        count += 1
        if now >= next_sample:
            rss.append(_rss_bytes())
            next_sample += seconds / 10
    elapsed = time.perf_counter() - started
    rss.append(_rss_bytes())
    tokens = count * cfg.train.batch_size * cfg.data.seq_len
    return {"pipeline_tokens_per_s": tokens / elapsed, "batches": count, "seconds": elapsed,
            "rss_bytes_samples": rss, "rss_growth_bytes": rss[-1] - rss[0],
            "rss_growth_after_first_tenth_bytes": rss[-1] - rss[1],  # once the chunk cache is warm
            "read_threads": cfg.data.read_threads, "packing": cfg.data.packing}


def bench_data(cfg: Config, seconds: float = 20.0, train: bool = True, train_steps: int = 10) -> dict[str, Any]:
    report = {"dataset": [s.path for s in cfg.data.sources], "batch_size": cfg.train.batch_size,
              "seq_len": cfg.data.seq_len, **bench_pipeline(cfg, seconds)}
    if train:
        from jaxtrain.tools.bench import bench

        step = bench(cfg, steps=train_steps)
        report["train_tokens_per_s"] = step["tokens_per_s"]
        report["ratio"] = report["pipeline_tokens_per_s"] / step["tokens_per_s"]
    return report
