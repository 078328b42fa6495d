"""`jaxtrain data prepare` on several workers: the same store for 1 worker, 2 workers and
Ray; a SIGKILL leaves nothing a run accepts and the rerun resumes to the same bytes; a
worker's memory does not grow with its unit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import REPO
from jaxtrain.config.errors import DataError
from jaxtrain.data import token_store, units
from jaxtrain.data.plan import make_plan
from jaxtrain.data.prepare import prepare
from jaxtrain.data.records import Fields

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for split in ("train", "val")
            for p in sorted((path / split).rglob("*")) if p.is_file()}


def _records(package: str, copies: int = 1) -> list[dict]:
    return [{"text": p.read_text(encoding="utf-8"), "id": f"{copy}/{p.relative_to(STDLIB)}"}
            for copy in range(copies) for p in sorted((STDLIB / package).glob("*.py"))]


def _jsonl_zst(path: Path, records: list[dict]) -> None:
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Text files, jsonl.zst shards and a parquet file of many row groups (about 20 units),
    and a BPE tokenizer file (workers receive it as JSON)."""
    root = tmp_path_factory.mktemp("mixed")
    corpus = root / "in"
    shutil.copytree(STDLIB / "json", corpus / "text" / "json", ignore=shutil.ignore_patterns("__pycache__"))
    for i, package in enumerate(("email", "asyncio", "importlib")):
        _jsonl_zst(corpus / f"shard{i}.jsonl.zst", _records(package))
    pq.write_table(pa.Table.from_pylist(_records("logging") + _records("xml/dom")), corpus / "t.parquet",
                   row_group_size=2)
    prepare([f"{STDLIB}/json/*.py"], str(root / "bpe"), "bpe:300", val_fraction=0.2)
    return corpus, str(root / "bpe" / "tokenizer.json")


@pytest.mark.slow
def test_one_worker_two_workers_and_ray_write_the_same_store(mixed, tmp_path):
    pytest.importorskip("ray")
    corpus, tokenizer = mixed
    common = dict(val_fraction=0.2, id_field="id", text_field="text")
    one = prepare([str(corpus)], str(tmp_path / "one"), tokenizer, workers=1, **common)
    assert one["units"] >= 10
    two = prepare([str(corpus)], str(tmp_path / "two"), tokenizer, workers=2, **common)
    ray = prepare([str(corpus)], str(tmp_path / "ray"), tokenizer, workers=2, engine="ray", **common)
    reference = store_files(tmp_path / "one")
    assert store_files(tmp_path / "two") == reference and store_files(tmp_path / "ray") == reference
    assert one["content_sha256"] == two["content_sha256"] == ray["content_sha256"]
    assert one["splits"] == two["splits"] == ray["splits"]
    assert (tmp_path / "one" / "tokenizer.json").read_bytes() == (tmp_path / "ray" / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob(".*")) and not (tmp_path / "two" / "units").exists()  # nothing staged is left


def _prepare_command(corpus: Path, out: Path, tokenizer: str) -> list[str]:
    return [sys.executable, "-m", "jaxtrain", "data", "prepare", "--input", str(corpus), "--out", str(out),
            "--tokenizer", tokenizer, "--workers", "2", "--id-field", "id"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_a_killed_prepare_leaves_nothing_train_accepts_and_the_rerun_resumes(mixed, tmp_path):
    _, tokenizer = mixed
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, package in enumerate(("email", "asyncio", "importlib", "logging", "unittest", "concurrent/futures")):
        _jsonl_zst(corpus / f"shard{i}.jsonl.zst", _records(package, copies=2))
    reference = prepare([str(corpus)], str(tmp_path / "reference"), tokenizer, id_field="id")
    out = tmp_path / "ds"
    staged = tmp_path / ".ds.tmp-staging" / "units"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_prepare_command(corpus, out, tokenizer), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (staged.is_dir() and any(p.name.isdigit() for p in staged.iterdir())) and time.time() < deadline:
        assert proc.poll() is None, "the prepare ended before a unit was staged"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # the driver only: its pool workers must notice and end
    proc.wait()
    deadline = time.time() + 20
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    orphaned = _group_alive(proc.pid)
    if orphaned:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not orphaned, "pool workers outlived their SIGKILLed prepare by 20 s"
    assert not (out / "metadata.json").exists(), "finished before the kill: make the corpus larger"
    for candidate in [out, *tmp_path.glob(".ds.*"), staged]:
        if candidate.exists():
            with pytest.raises(DataError, match="not a prepared dataset|no metadata.json"):
                token_store.open_store(candidate)
    done = subprocess.run(_prepare_command(corpus, out, tokenizer), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["resumed_units"] >= 1 and "resumed" in done.stdout
    assert store_files(out) == store_files(tmp_path / "reference")
    assert meta["content_sha256"] == reference["content_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in", "reference"]  # no staging, no units left


def test_staged_units_of_another_plan_are_not_reused(mixed, tmp_path):
    """A unit staged for other flags (here another val fraction) is cleared, not merged."""
    corpus, _ = mixed
    plan = make_plan([(str(corpus), str(corpus / "shard0.jsonl.zst"))])
    job = units.Job(str(tmp_path / "units"), "plan-a", 0.5, Fields(id="id"), units.TokenizerSpec("byte"), "uint8")
    info = units.run_unit(job, plan[0])
    assert units.finished(job.directory, 0, "plan-a") == info
    with open(tmp_path / "units" / "0" / "train.tokens", "r+b") as f:
        f.truncate(10)  # a short file (a machine crash after the rename): not finished
    assert units.finished(job.directory, 0, "plan-a") is None
    assert units.run_unit(job, plan[0]) == info and units.finished(job.directory, 0, "plan-a") == info  # redone
    (tmp_path / "units" / "3.tmp-1-abc").mkdir()  # a killed worker's unfinished unit
    assert units.clear_stale(job.directory, "plan-b") == 0 and not list((tmp_path / "units").iterdir())


def test_a_workers_memory_does_not_grow_with_its_unit(tmp_path, monkeypatch):
    """tracemalloc (numpy's buffers included) over the map of a 2.6 MB and a 10.6 MB jsonl unit:
    one batch is held, not the unit; the merge reads a unit back in slices."""
    records = _records("email") + _records("asyncio")
    peaks = {}
    for copies in (3, 12):
        path = tmp_path / f"c{copies}.jsonl"
        path.write_bytes(b"".join(json.dumps({**r, "id": f"{c}{r['id']}"}).encode() + b"\n"
                                  for c in range(copies) for r in records))
        job = units.Job(str(tmp_path / f"units{copies}"), "p", 0.1, Fields(id="id"), units.TokenizerSpec("byte"),
                        "uint8")
        tracemalloc.start()
        info = units.run_unit(job, make_plan([(str(tmp_path), str(path))])[0])
        peaks[copies] = (tracemalloc.get_traced_memory()[1], path.stat().st_size)
        tracemalloc.stop()
        assert info["splits"]["train"]["documents"] == copies * len(records) - info["splits"]["val"]["documents"]
    (small, small_size), (big, big_size) = peaks[3], peaks[12]
    assert big_size > 10e6 and big < small * 1.3 + (1 << 20) and big < big_size / 2, peaks
    monkeypatch.setattr(units, "_READ_TOKENS", 10_000)
    slices = list(units.read_tokens(str(tmp_path / "units12"), 0, "train", "uint8"))
    assert len(slices) > 100 and max(len(s) for s in slices) == 10_000


@pytest.mark.slow
def test_the_throughput_script_runs_end_to_end_at_a_tiny_size(tmp_path):
    """docs/data/prepare_throughput.py at 1 MB (the lead runs it at 1.1 GB with Ray too; the
    Ray engine's store is tested above, and each of its runs here would cost ~10 s of start-up)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIZE_MB": "1", "SHARDS": "4", "TOKENIZER": "byte",
           "ENGINES": "1,all", "OUT": str(tmp_path / "table.md"), "WORK": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO / "docs" / "data" / "prepare_throughput.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in (tmp_path / "table.md").read_text().splitlines() if " MB, 4 shards" in line]
    assert [row[2].strip() for row in rows] == ["local, 1 worker", f"local, {os.cpu_count()} workers"] * 2
    assert rows[0][3] == rows[1][3] != rows[2][3] == rows[3][3]  # tokens: per corpus, whatever the workers
    assert all(float(row[5].replace(",", "")) > 0 and row[6].strip().endswith("MiB") for row in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]  # the corpora and stores removed
