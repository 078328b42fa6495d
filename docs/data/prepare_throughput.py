"""Throughput and memory of `jaxtrain data prepare` on a jsonl.zst corpus, one worker vs
every core vs Ray, at two corpus sizes (memory should not grow with the corpus).

    python docs/data/prepare_throughput.py                  # ~1.1 GB and ~275 MB corpora (run on a quiet machine)
    SIZE_MB=20 python docs/data/prepare_throughput.py       # a quick end-to-end check

Environment: SIZE_MB (the large corpus, uncompressed text; the small one is a quarter of
it; default 1100), SHARDS (default 32), TOKENIZER (default bpe:8192), WORK (scratch
directory, default a temporary one, removed after), OUT (the markdown table, default
docs/data/prepare_throughput.md), ENGINES (which runs, default 1,all,ray: one worker,
every core, Ray), RAY_WORKERS (default 2), JAXTRAIN (the command, default
this interpreter's `-m jaxtrain`).

The corpus: the Python standard library's .py files, repeated until SIZE_MB, each copy with
distinct ids (`COPY/RELATIVE_PATH`), dealt round-robin into SHARDS jsonl.zst files. Each run
is timed end to end (listing, BPE training, map, merge, commit); tokens/s counts the
store's tokens (train + val) over that time. Peak RSS is sampled every 0.1 s over the
whole process tree of the command (driver, pool workers; Ray's raylet and workers, which a
local `ray.init()` starts as the driver's descendants), as the largest single process and
as the sum.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096


def build_corpus(directory: Path, size_mb: float, shards: int) -> int:
    """SHARDS jsonl.zst files of at least SIZE_MB of text; returns the text's bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            sources.append((str(path.relative_to(stdlib)), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    directory.mkdir(parents=True)
    writers = [zstandard.ZstdCompressor(level=3).stream_writer(open(directory / f"shard{i:03d}.jsonl.zst", "wb"))
               for i in range(shards)]
    total, n = 0, 0
    while total < size_mb * 1_000_000:
        copy = n // len(sources)
        relative, text = sources[n % len(sources)]
        writers[n % shards].write(json.dumps({"id": f"{copy}/{relative}", "text": text}).encode() + b"\n")
        total += len(text.encode())
        n += 1
    for writer in writers:
        writer.close()
    return total


def _tree(root: int) -> list[int]:
    """The pids of `root` and all its descendants (Linux /proc)."""
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                frontier += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def run(command: list[str]) -> dict:
    """Wall time and peak RSS (largest process, whole tree) of a command."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_one = peak_sum = 0
    while proc.poll() is None:
        sizes = [_rss(pid) for pid in _tree(proc.pid)]
        peak_one, peak_sum = max(peak_one, max(sizes, default=0)), max(peak_sum, sum(sizes))
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{shlex.join(command)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return {"seconds": time.perf_counter() - started, "peak_one": peak_one, "peak_sum": peak_sum,
            "summary": out.strip()}


def main() -> None:
    size_mb = float(os.environ.get("SIZE_MB", "1100"))
    shards = int(os.environ.get("SHARDS", "32"))
    tokenizer = os.environ.get("TOKENIZER", "bpe:8192")
    ray_workers = os.environ.get("RAY_WORKERS", "2")
    jaxtrain = shlex.split(os.environ.get("JAXTRAIN", f"{sys.executable} -m jaxtrain"))
    out_page = Path(os.environ.get("OUT", REPO / "docs" / "data" / "prepare_throughput.md"))
    cores = str(os.cpu_count() or 1)
    engines = os.environ.get("ENGINES", "1,all,ray").split(",")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("WORK")) as work:
        for size in (size_mb / 4, size_mb):
            corpus = Path(work) / f"corpus{size}"
            text_bytes = build_corpus(corpus, size, shards)
            runs = {"1": ("local, 1 worker", ["--workers", "1"]),
                    "all": (f"local, {cores} workers", ["--workers", cores]),
                    "ray": (f"ray, {ray_workers} workers", ["--engine", "ray", "--workers", ray_workers])}
            for label, flags in (runs[name] for name in engines):
                out = Path(work) / f"store{size}-{len(rows)}"
                result = run([*jaxtrain, "data", "prepare", "--input", str(corpus), "--out", str(out),
                              "--tokenizer", tokenizer, "--id-field", "id", *flags])
                meta = json.loads((out / "metadata.json").read_text())
                tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
                rows.append(f"| {text_bytes / 1e6:,.1f} MB, {shards} shards | {label} | {tokens:,} | "
                            f"{result['seconds']:.1f} s | {tokens / result['seconds']:,.0f} | "
                            f"{result['peak_one'] / 2**20:,.0f} MiB | {result['peak_sum'] / 2**20:,.0f} MiB |")
                print(rows[-1], flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    header = (f"`jaxtrain data prepare --tokenizer {tokenizer}` on jsonl.zst shards of the standard library "
              f"(docs/data/prepare_throughput.py, {cores} cores, {time.strftime('%Y-%m-%d')}):\n\n"
              "| corpus (text) | engine | tokens | time | tokens/s | peak RSS, largest process "
              "| peak RSS, all processes |\n"
              "|---|---|---|---|---|---|---|\n")
    out_page.write_text(header + "\n".join(rows) + "\n")
    print(f"wrote {out_page}")


if __name__ == "__main__":
    main()
