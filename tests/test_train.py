"""End-to-end runs of the tiny config: learning, exact resume, logs, workdir safety."""

import json

import jax
import numpy as np
import pytest

from conftest import TINY, run_in_process
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import sharding
from jaxtrain.run.checkpoint import Checkpointer
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import TIMING_KEYS, read_metrics
from jaxtrain.run.workdir import Layout

pytestmark = pytest.mark.slow


def final_state(cfg, workdir):
    """(state, data, meta) of the newest checkpoint, restored into the target the library's
    own compiled boundary gives (what a resume restores into)."""
    steps = ts.build_steps(cfg, ts.model_spec(cfg), sharding.make_mesh(cfg.mesh))
    ckpt = Checkpointer(Layout(workdir).checkpoints, cfg.checkpoint)
    try:
        return ckpt.restore(ckpt.latest_step(), steps.abstract_state())
    finally:
        ckpt.close()


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `directory`, read by TensorBoard's own
    reader (every scalar kept: no sampling)."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cfg = load_config(TINY)
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return cfg, workdir, run(cfg, workdir)


def test_loss_decreases_and_beats_the_unigram_baseline(uninterrupted):
    cfg, workdir, result = uninterrupted
    rows = read_metrics(workdir / "metrics.jsonl")
    assert result.step == cfg.train.steps and rows[-1]["step"] == cfg.train.steps
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert rows[-1]["loss"] < result.unigram_entropy


def test_metrics_rows_and_tensorboard(uninterrupted):
    cfg, workdir, _ = uninterrupted
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, cfg.train.steps + 1, 5))
    for row in rows:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec"} <= row.keys()
        assert row["tokens"] == row["step"] * cfg.train.batch_size * cfg.data.seq_len
        assert np.isfinite(row["loss"]) and row["tokens_per_sec"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    scalars = tensorboard_scalars(workdir / "tb")  # TensorBoard holds the same numbers
    assert scalars["loss"] == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    assert scalars["val_loss"] == {r["step"]: pytest.approx(r["val_loss"], rel=1e-6) for r in rows if "val_loss" in r}
    assert load_config(workdir / "config.yaml") == cfg  # the run's record reads back as its config
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)  # every 10 steps, newest 3 kept
    assert ckpt.all_steps() == [20, 30, 40]
    ckpt.close()


def test_interrupted_and_resumed_run_is_bitwise_identical(uninterrupted, tmp_path):
    cfg, ref_dir, _ = uninterrupted
    first = run(cfg, tmp_path, stop_after=25)  # between the evaluations at 20 and 40
    assert first.step == 25 and first.resumed_from is None
    logged = {r["step"]: r for r in read_metrics(ref_dir / "metrics.jsonl")}
    assert first.val_step == 20 and first.val_loss == logged[20]["val_loss"]  # not reported as step 25's
    second = run(cfg, tmp_path)
    assert second.resumed_from == 25 and second.step == second.val_step == cfg.train.steps
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == \
        without_timing(read_metrics(ref_dir / "metrics.jsonl"))
    ref_state, ref_data, ref_meta = final_state(cfg, ref_dir)
    state, data, meta = final_state(cfg, tmp_path)
    assert data == ref_data and meta["tokens"] == ref_meta["tokens"]
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_a_different_model_is_refused_and_harmless(uninterrupted, capsys):
    _, workdir, _ = uninterrupted
    run_files = lambda: {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    before = run_files()  # refused in preflight, before the workdir is owned: not even the lock file changes
    proc = run_in_process(capsys, "train", str(TINY), "--workdir", str(workdir), "--set", "model.d_model=128")
    assert proc.returncode == 2
    assert "'model.d_model'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert run_files() == before


def test_resume_with_a_different_parametrization_table_names_the_difference(tmp_path, capsys, monkeypatch):
    """With config.yaml gone, the config in the checkpoint's meta guards the resume; and the
    table stored there refuses a table computed otherwise for the same config (another
    version's rule), naming the parameter."""
    import dataclasses

    from jaxtrain.model import parametrization

    cfg = load_config(TINY, ["train.steps=10"])
    run(cfg, tmp_path)
    (tmp_path / "config.yaml").unlink()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    proc = run_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path), "--set", "train.steps=10",
                          "--set", "parametrization.name=ntk")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "'parametrization.name'" in proc.stderr and "holds a run with 'sp'" in proc.stderr, proc.stderr
    rule = parametrization._rule

    def doubled_hidden_init(cfg, role, *args):  # the same config, the hidden init std computed twice as large
        computed = rule(cfg, role, *args)
        return dataclasses.replace(computed, init_std=2 * computed.init_std) if role == "hidden" else computed

    monkeypatch.setattr(parametrization, "_rule", doubled_hidden_init)
    proc = run_in_process(capsys, "train", str(TINY), "--workdir", str(tmp_path), "--set", "train.steps=20")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "parametrization table differs" in proc.stderr and ".init_std: checkpoint has" in proc.stderr, proc.stderr
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    assert after == before
    table = json.loads((tmp_path / "parametrization.json").read_text())
    assert table["name"] == "sp" and table["rules"]["lm_head"]["role"] == "readout"


def test_workdir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    from jaxtrain import cli

    target = tmp_path / "not_a_dir"
    target.write_text("keep me")
    assert cli.main(["train", str(TINY), "--workdir", str(target)]) == 2
    assert "not_a_dir: exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"
