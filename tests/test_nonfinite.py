"""train.on_nonfinite: `halt` stops before checkpointing a non-finite step and exits 3
naming it; `skip` drops exactly that update and counts it. Non-finite values are injected
for real: a token id outside the vocabulary (its embedding lookup fills with NaN) at the
step level, and a learning rate of 1e30 (params overflow, the next gradients are NaN) in
whole runs resumed from a good checkpoint."""

import shutil

import jax
import numpy as np
import pytest

from conftest import TINY, cli_in_process, final_params
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import sharding
from jaxtrain.run.checkpoint import Checkpointer
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import read_metrics

pytestmark = pytest.mark.slow


def all_finite(tree) -> bool:
    return all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(jax.device_get(tree)))


def test_skip_drops_exactly_the_nonfinite_update():
    cfg = load_config(TINY, ["train.on_nonfinite=skip"])
    spec = ts.model_spec(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    steps = ts.build_steps(cfg, spec, mesh)
    batch = jax.random.randint(jax.random.PRNGKey(0), (16, 65), 0, 256)
    poisoned = batch.at[3, 7].set(10**6)  # out of the vocabulary: a NaN embedding row
    state, metrics = steps.train(steps.init(), batch, cfg.optimizer.lr)
    assert int(metrics[ts.NONFINITE]) == 0
    before = jax.device_get((state.params, state.opt_state))  # the step donates its input
    state, metrics = steps.train(state, poisoned, cfg.optimizer.lr)
    assert int(metrics[ts.NONFINITE]) == 1 and not np.isfinite(float(metrics["loss"]))
    for got, want in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state))),
                         jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(state.step) == 2  # the batch is consumed and the schedule moves on
    state, metrics = steps.train(state, batch, cfg.optimizer.lr)
    assert int(metrics[ts.NONFINITE]) == 0 and all_finite(state.params)


@pytest.fixture(scope="module")
def good_until_20(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("good_until_20")
    run(load_config(TINY), workdir, stop_after=20, console=False)
    return workdir


def test_halt_exits_naming_the_step_and_leaves_the_last_good_checkpoint(good_until_20, tmp_path, capsys):
    workdir = shutil.copytree(good_until_20, tmp_path / "run")
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir),
                                    "--set", "optimizer.lr=1e30")
    assert status == 3, err
    assert err.count("\n") == 1 and err.startswith("jaxtrain: error: step 22: grad_norm is nan"), err
    ckpt = Checkpointer(workdir / "checkpoints", load_config(TINY).checkpoint, read_only=True)
    assert ckpt.all_steps() == [10, 20]
    ckpt.close()
    assert all_finite(final_params(workdir))


def test_skip_continues_counts_and_never_saves_a_nonfinite_state(good_until_20, tmp_path, capsys):
    workdir = shutil.copytree(good_until_20, tmp_path / "run")
    status, _, err = cli_in_process(capsys, "train", str(TINY), "--workdir", str(workdir),
                                    "--set", "optimizer.lr=1e30", "--set", "train.on_nonfinite=skip")
    assert status == 0, err
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if r["step"] > 20]
    # step 21 (good params) moves them to ~1e30; every step after has NaN gradients: skipped
    assert [r["skipped_steps"] for r in rows] == [r["step"] - 21 for r in rows]
    assert all_finite(final_params(workdir, 40))
