"""`jaxtrain sweep --branch-horizons`: a train.steps grid as one long WSD run plus cooldown
branches; the branched 16-step run equals the 16-step run trained from scratch, and the
horizons a branch cannot reproduce are refused before anything trains."""

import functools
import json
import math

import pytest

from conftest import TINY, assert_same_params, cli_in_process, final_params, logged_rows
from jaxtrain.config.files import load_config
from jaxtrain.run.loop import run
from jaxtrain.tools import horizons
from jaxtrain.tools.sweep import run_point

pytestmark = pytest.mark.slow

# WSD with the last 25% decaying: the 16-step run decays from step 12, the 32-step one from 24
SETTINGS = ["schedule.name=wsd", "schedule.decay_fraction=0.25", "schedule.warmup_steps=2",
            "train.log_every=1", "train.eval_every=100", "optimizer.lr=0.003"]
SETS = [arg for s in SETTINGS for arg in ("--set", s)]


def test_a_branched_horizon_equals_the_full_run_at_its_budget(tmp_path, capsys):
    out = tmp_path / "s"
    status, stdout, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "train.steps=16,32",
                                         "--grid", "optimizer.lr=0.003", "--branch-horizons", *SETS,
                                         "--out", str(out))
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["branch_horizons"] is True
    rows = {r["train.steps"]: r for r in results["runs"]}
    assert (rows[32]["branched_from"], rows[32]["branch_step"]) == (None, None)
    assert (rows[16]["branched_from"], rows[16]["branch_step"]) == ("steps=32,lr=0.003", 12)
    long, branch = out / "runs" / "steps=32,lr=0.003", out / "runs" / "steps=16,lr=0.003"
    lineage = json.loads((branch / "lineage.json").read_text())
    assert (lineage["parent"], lineage["step"], lineage["decay_steps"]) == (str(long), 12, 4)
    assert json.loads((long / "result.json").read_text())["config"]["checkpoint"]["every_steps"] == 4  # gcd(12, 32)
    assert stdout.index("steps=32,lr=0.003:") < stdout.index("steps=16,lr=0.003:")  # the long run first

    full = tmp_path / "full16"  # the 16-step run from scratch, with the config's own checkpoints
    run(load_config(TINY, [*SETTINGS, "train.steps=16"]), full, console=False)
    want = {r["step"]: r for r in logged_rows(full) if "loss" in r}
    got = {r["step"]: r for r in logged_rows(branch) if "loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-7), step
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
    assert rows[16]["val_loss"] == pytest.approx(logged_rows(full)[-1]["val_loss"], rel=1e-6)
    assert_same_params(final_params(branch, 16), final_params(full, 16), rtol=1e-6)
    trained = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    again = cli_in_process(capsys, "sweep", str(TINY), "--grid", "train.steps=16,32", "--grid", "optimizer.lr=0.003",
                           "--branch-horizons", *SETS, "--out", str(out))
    assert again[0] == 0, again[2]  # the long run and the branch read back, nothing trained again
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == trained
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


def test_a_branch_the_long_run_never_saved_counts_as_diverged_and_is_not_recorded(tmp_path):
    """The long run halted (non-finite) before the branch step: nothing to train from."""
    cfg = load_config(TINY, [*SETTINGS, "train.steps=16"])
    (tmp_path / "long" / "checkpoints" / "8").mkdir(parents=True)  # saved up to step 8 only
    write = functools.partial(horizons._write_branch, tmp_path / "long", 12, 4, tmp_path / "short", cfg)
    assert write() is False
    result = run_point({"train.steps": 16}, cfg, tmp_path / "short", tmp_path / "replaced", prepare=write)
    assert result["diverged"] and math.isnan(result["val_loss"]) and result["seconds"] == 0.0
    assert not (tmp_path / "short").exists()  # a rerun tries again


@pytest.mark.parametrize("sets, culprit", [
    (["schedule.name=cosine"], "schedule.name is 'cosine'; only a 'wsd' or 'power' run branches"),
    (["schedule.warmup_steps=0", "schedule.warmup_fraction=0.1"], "schedule.warmup_fraction=0.1 stretches"),
    # a 15-step decay of the 16-step run would start at step 1, inside the 2-step warmup
    (["schedule.decay_steps=15"], "train.steps=16 branches from the 32-step run at step 1: still in the "
                                  "parent's warmup (2 steps)"),
])
def test_a_horizon_no_branch_can_reproduce_is_one_line_and_nothing_trains(tmp_path, capsys, sets, culprit):
    extra = [arg for s in sets for arg in ("--set", s)]
    status, _, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "train.steps=16,32",
                                    "--grid", "optimizer.lr=0.003", "--branch-horizons", *SETS, *extra,
                                    "--out", str(tmp_path / "s"))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert culprit in err
    assert not (tmp_path / "s").exists()


def test_branching_needs_a_grid_over_the_horizon(tmp_path, capsys):
    status, _, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "optimizer.lr=0.003,0.01",
                                    "--grid", "model.d_model=32,64", "--branch-horizons", *SETS,
                                    "--out", str(tmp_path / "s"))
    assert status == 2 and "--branch-horizons: needs --grid train.steps=" in err
