"""`jaxtrain bench`: compile and time the real train step, report throughput and MFU.

The step is the one `jaxtrain train` runs (same model, parametrization table, optimizer,
shardings, donation, microbatching, and under data.packing the same packed batch: tokens
and segment ids, `step.Steps.compile_train`), fed one fixed batch of random tokens already
on the devices (under packing, random documents packed into rows by the pipeline's own
reader), so the number measures the compiled step and nothing else (the data pipeline has
its own benchmark). Timing starts after `warmup` steps and ends when the last step's
result is ready:

    step_time = wall(steps) / steps        tokens/s = batch * seq_len / step_time
    MFU = model FLOPs per token * tokens/s / (peak FLOP/s of all devices)

On CPU the peak is the measured matmul rate of the whole machine (simulated devices share
its cores); on accelerators it is the table in `accelerators.py` times the device count.
Memory is the devices' peak bytes in use where the runtime reports it, else the process's
peak resident set size.

With `optimizer.name: muon` the same config is also timed with AdamW in the same process,
alternating the two (`adamw_step_time_s`, `step_time_ratio_vs_adamw` = Muon / AdamW), so
the ratio compares runs on one machine in one state.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtrain import step as ts
from jaxtrain.config.schema import Config
from jaxtrain.data import pipeline
from jaxtrain.data.token_store import TokenSplit
from jaxtrain.model import sharding
from jaxtrain.model.execution import compute_dtype_name
from jaxtrain.run.preflight import preflight
from jaxtrain.tools import accelerators, flops, hlo_collectives


def _peak_memory() -> tuple[int, str]:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if all("peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use (max over devices)"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process peak RSS"


BENCH_LR = np.float32(1e-3)  # any rate: the step's cost does not depend on it
# mean length of the synthetic packed documents: any length, the step's cost does not depend
# on where the document boundaries fall (attention is masked, never skipped)
SYNTHETIC_DOC_TOKENS = 32


def _compiled_step(cfg: Config, mesh) -> tuple[Any, ts.TrainState, ts.Batch, float]:
    """(compiled step, initial state, device batch, compile seconds), once `cfg` passes the
    checks `jaxtrain train` makes (bench reads no data: it times synthetic tokens)."""
    steps = ts.build_steps(cfg, preflight(cfg, mesh), mesh)
    started = time.perf_counter()
    compiled = steps.compile_train()
    compile_s = time.perf_counter() - started
    return compiled, steps.init(), _synthetic(cfg, steps.abstract_arguments()[1]), compile_s


def _synthetic(cfg: Config, batch: ts.Batch) -> ts.Batch:
    """A batch of random documents read the way the training pipeline reads its windows
    (`pipeline.ReadWindows`: tokens, and under data.packing the segment ids of documents
    of random lengths, mean SYNTHETIC_DOC_TOKENS), on the shardings of `batch`."""
    rows, length = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, rows * length + 1)
    starts = np.cumsum(rng.geometric(1 / SYNTHETIC_DOC_TOKENS, tokens.size))  # lengths >= 1
    doc_starts = np.concatenate([[0], starts[starts < tokens.size], [tokens.size]])
    split = TokenSplit(tokens, doc_starts, "synthetic")
    local = pipeline.ReadWindows([split], length, cfg.data.packing)((np.zeros(rows, int), np.arange(rows)))
    return jax.tree.map(lambda a, b: jax.device_put(a, b.sharding), local, batch)


def _timed(step, state, batch, steps: int, warmup: int) -> tuple[Any, float, dict]:
    """(state, seconds per step after `warmup` untimed steps, last metrics)."""
    for _ in range(warmup):
        state, metrics = step(state, batch, BENCH_LR)
    jax.block_until_ready(state)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, BENCH_LR)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - started) / steps, metrics


def _adamw_twin(cfg: Config) -> Config:
    return cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"name": "adamw", "adam_lr": None})})


def _versus_adamw(cfg: Config, mesh, compiled, state, batch, steps: int, warmup: int) -> dict[str, Any]:
    """Muon and its AdamW twin timed in turns (three rounds each; the median of each)."""
    twin, twin_state, twin_batch, _ = _compiled_step(_adamw_twin(cfg), mesh)
    times: dict[str, list[float]] = {"muon": [], "adamw": []}
    for _ in range(3):
        state, seconds, _ = _timed(compiled, state, batch, steps, warmup)
        times["muon"].append(seconds)
        twin_state, seconds, _ = _timed(twin, twin_state, twin_batch, steps, warmup)
        times["adamw"].append(seconds)
    muon, adamw = float(np.median(times["muon"])), float(np.median(times["adamw"]))
    return {"muon_step_time_s": muon, "adamw_step_time_s": adamw, "step_time_ratio_vs_adamw": muon / adamw}


def bench(cfg: Config, steps: int = 10, warmup: int = 2, hlo_out: Path | None = None) -> dict[str, Any]:
    """Time `steps` train steps after `warmup`; the one-line report as a dict. `hlo_out`:
    where to write the compiled step's HLO text (its collective bytes are in the report)."""
    mesh = sharding.make_mesh(cfg.mesh)
    step, state, batch, compile_s = _compiled_step(cfg, mesh)
    hlo = step.as_text()
    if hlo_out is not None:
        hlo_out.write_text(hlo)
    state, step_time, metrics = _timed(step, state, batch, steps, warmup)
    versus = _versus_adamw(cfg, mesh, step, state, batch, steps, warmup) if cfg.optimizer.name == "muon" else {}

    devices = mesh.devices.flatten().tolist()
    dtype = compute_dtype_name(cfg.model, devices[0].platform)
    peak, peak_source = accelerators.peak_flops(devices[0], dtype)
    if devices[0].platform != "cpu":
        peak *= len(devices)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_per_token = flops.model_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_s = tokens_per_step / step_time
    memory, memory_source = _peak_memory()
    return {
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time,
        "model_flops_per_token": flops_per_token,
        "mfu": flops_per_token * tokens_per_s / peak,
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        "compile_s": compile_s,
        "collective_bytes_per_device": hlo_collectives.bytes_by_kind(hlo),
        "peak_memory_bytes": memory,
        "memory_source": memory_source,
        "loss": float(metrics["loss"]),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "mesh": dict(mesh.shape),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "optimizer": cfg.optimizer.name,
        **versus,
        "config": {"model": cfg.model.model_dump(mode="json"), "compute_dtype": dtype,
                   "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
                   "microbatches": cfg.train.microbatches, "parametrization": cfg.parametrization.name,
                   "steps": steps, "warmup": warmup},
    }
