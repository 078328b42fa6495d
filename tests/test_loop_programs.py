"""The tools compile the training loop's own programs: `jaxtrain bench` and `dry-run
--compile` the train step with the batch the loop feeds (under data.packing: tokens and
segment ids), `jaxtrain eval` the loop's evaluation with its layout constraints (the same
collectives, read off the compiled HLO)."""

import re

import jax
import numpy as np

from conftest import TINY, run_in_process
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import sharding
from jaxtrain.tools import bench, communication, dry_run, evaluate_checkpoint, hlo_collectives
from jaxtrain.tools.saved_run import SavedRun

PACKED = ["data.packing=true"]


def entry_parameters(hlo: str) -> list[str]:
    """Types of the compiled program's ENTRY parameters, e.g. 's32[2,65]'."""
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[:entry.index("\n}")]
    return re.findall(r"= (\w+\[[\d,]*\])\S* parameter\(\d+\)", entry)


def batch_parameters(hlo: str, cfg) -> int:
    """How many ENTRY parameters are per-device (B/8, T+1) int32 rows: 1 token array, or 2
    (tokens and segment ids) under packing. The tests run on 8 devices, batch over all."""
    rows = f"s32[{cfg.train.batch_size // 8},{cfg.data.seq_len + 1}]"
    return entry_parameters(hlo).count(rows)


def test_bench_times_the_packed_step_on_packed_rows(capsys, tmp_path):
    cfg = load_config(TINY, PACKED)
    hlo = tmp_path / "step.hlo"
    result = run_in_process(capsys, "bench", str(TINY), "--steps", "1", "--warmup", "0",
                            "--set", *PACKED, "--hlo-out", str(hlo))
    assert result.returncode == 0, result.stderr
    assert batch_parameters(hlo.read_text(), cfg) == 2

    # the concrete batch: the pipeline's structure, several documents in a row
    batch = bench._synthetic(cfg, ts.abstract_batch(cfg, sharding.make_mesh(cfg.mesh)))
    assert sorted(batch) == ["segment_ids", "tokens"]
    segments = np.asarray(batch["segment_ids"])
    assert segments.shape == (cfg.train.batch_size, cfg.data.seq_len + 1)
    assert (segments[:, 0] == 1).all() and (np.diff(segments, axis=1) >= 0).all()
    assert (segments[:, -1] > 1).any()  # rows of several documents
    plain = bench._synthetic(load_config(TINY), ts.abstract_batch(load_config(TINY), sharding.make_mesh(cfg.mesh)))
    assert isinstance(plain, jax.Array) and plain.shape == segments.shape


def test_dry_run_compile_counts_the_packed_step(monkeypatch):
    compiled = []

    def keep(cfg, mesh, real=communication.compiled_step):
        compiled.append(real(cfg, mesh))
        return compiled[-1]

    monkeypatch.setattr(communication, "compiled_step", keep)
    for overrides, expected in ((PACKED, 2), ([], 1)):
        cfg = load_config(TINY, overrides)
        plan = dry_run.dry_run(cfg, devices=8, compile_step=True)
        assert sum(plan["communication"]["compiled"]["bytes_by_kind"].values()) > 0
        assert batch_parameters(compiled[-1].as_text(), cfg) == expected, overrides


def test_eval_compiles_the_loops_evaluation(monkeypatch, tmp_path):
    """On fsdp=4 x tensor=2, `jaxtrain eval`'s program moves the bytes the loop's does."""
    cfg = load_config(TINY, ["mesh.fsdp=4", "mesh.tensor=2"])
    mesh = sharding.make_mesh(cfg.mesh)
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    params = steps.init().params
    seen = []

    class Spy(evaluate_checkpoint.Evaluator):
        def __init__(self, evaluate, *args):
            super().__init__(evaluate, *args)
            seen.append(self)

    monkeypatch.setattr(evaluate_checkpoint, "Evaluator", Spy)
    run = SavedRun(tmp_path, cfg, spec, mesh, 0, (0,), {"tokens": 0}, params)
    assert np.isfinite(evaluate_checkpoint.evaluate_run(run)["val_loss"])
    (evaluator,) = seen
    batch = evaluator.batches[0][0]
    collectives = lambda evaluate: hlo_collectives.bytes_by_kind(evaluate.lower(params, batch).compile().as_text())
    loop = collectives(steps.evaluate)
    assert sum(loop.values()) > 0
    assert collectives(evaluator.evaluate) == loop
