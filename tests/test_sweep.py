"""`jaxtrain sweep`: a grid of real short runs, the results table, fits and plots."""

import csv
import json
import math
import shutil

import numpy as np
import pytest

from conftest import TINY, cli_in_process, figure_panels, logged_rows, run_in_process
from jaxtrain.tools.sweep import analyse, fit_optimum, parse_grid, sweep

pytestmark = pytest.mark.slow


def test_parabola_fit_recovers_an_off_grid_optimum():
    xs = [2.0**k for k in range(-8, -1)]
    losses = [(math.log2(x) + 4.3) ** 2 * 0.1 + 2.0 for x in xs]
    fit = fit_optimum(xs, losses)
    assert fit["method"] == "parabola" and fit["opt_log2"] == pytest.approx(-4.3)
    assert not fit["at_edge"]
    edge = fit_optimum(xs, list(range(len(xs))))  # monotone: best point is the grid edge
    assert edge["at_edge"] and edge["opt_log2"] == -8


def test_drift_is_measured_in_grid_steps():
    runs = [{"lr": 2.0**k, "w": w, "val_loss": (k + 3 + (w == 2)) ** 2, "diverged": False}
            for w in (1, 2) for k in range(-7, 0)]
    drift = analyse(runs, "lr", "w", [])["drift"][0]
    assert drift["drift_steps"] == pytest.approx(-1.0)


def test_lr_sensitivity_caps_at_the_initial_loss_and_counts_diverged_runs_there():
    runs = [{"lr": 2.0**k, "w": 1, "val_loss": loss, "diverged": diverged}
            for k, (loss, diverged) in enumerate([(3.0, False), (2.0, False), (7.0, False), (math.nan, True)])]
    curve = analyse(runs, "lr", "w", [], loss_at_init=5.5)["optima"][0]
    assert curve["lr_sensitivity"] == pytest.approx((3.0 + 2.0 + 5.5 + 5.5) / 4 - 2.0)


def test_sweep_runs_the_grid_records_divergence_and_resumes(tmp_path, capsys):
    args = ["sweep", str(TINY), "--grid", "model.d_model=32,64", "--grid", "optimizer.lr=0.003,0.03,3000",
            "--set", "train.steps=12", "--set", "train.eval_every=12", "--set", "schedule.warmup_steps=2",
            "--set", "optimizer.clip_norm=0", "--out", str(tmp_path)]
    proc = run_in_process(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 6 and results["curve"] == "model.d_model"
    by_lr = {(r["model.d_model"], r["optimizer.lr"]): r for r in results["runs"]}
    assert all(by_lr[w, 3000]["diverged"] for w in (32, 64))  # recorded, not dropped
    assert not any(by_lr[w, lr]["diverged"] for w in (32, 64) for lr in (0.003, 0.03))
    for w in (32, 64):
        assert by_lr[w, 0.03]["val_loss"] < by_lr[w, 0.003]["val_loss"]  # 12 steps: bigger LR learns faster
    optima = {o["model.d_model"]: o["optimum"] for o in results["optima"]}
    assert all(np.isclose(optima[w]["opt"], 0.03) for w in (32, 64))
    with (tmp_path / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    (panel,) = figure_panels(tmp_path / "sweep.png")  # a curve per width over its finite runs
    assert panel["curves"] == {"d_model=32": 2, "d_model=64": 2} and panel["x"] == "log2(lr)"
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    again = run_in_process(capsys, *args)  # every run is read back from its result.json, none retrained
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()} == finished
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]


def test_bad_grid_key_fails_before_any_run(tmp_path, capsys):
    status, _, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "model.widht=32,64",
                                    "--grid", "optimizer.lr=0.01,0.1", "--out", str(tmp_path / "s"))
    assert status == 2 and "model.widht" in err
    assert not (tmp_path / "s" / "runs").exists()


def test_grid_values_are_numbers_wherever_python_reads_numbers():
    """YAML 1.1 reads `1e-3` as a string: the documented grid form once trained every run
    and then failed in the analysis's log2."""
    lr, name, flag = parse_grid(["optimizer.lr=1e-3,3E-4,1_000,2.5", "parametrization.name=sp,mup",
                                 "model.qk_norm=true,false"])
    assert lr.values == (0.001, 0.0003, 1000, 2.5) and type(lr.values[2]) is int
    assert name.values == ("sp", "mup") and flag.values == (True, False)


def test_a_non_numeric_x_axis_is_refused_before_anything_trains(tmp_path, capsys):
    status, _, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "parametrization.name=sp,mup",
                                    "--grid", "optimizer.lr=1e-3,3e-3", "--x", "parametrization.name",
                                    *SMALL, "--out", str(tmp_path / "s"))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "--grid parametrization.name=sp: the sweep's x axis takes positive numbers" in err
    assert not (tmp_path / "s" / "runs").exists()


# The smallest sweep: 2 runs of 3 steps.
SMALL = ["--set", "train.steps=3", "--set", "train.eval_every=3", "--set", "train.log_every=1",
         "--set", "schedule.warmup_steps=1", "--set", "checkpoint.every_steps=3"]
GRID = ["--grid", "optimizer.lr=0.01,0.03", "--grid", "model.d_model=32"]


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """A finished 2-run sweep (train.steps=3); tests work on copies."""
    out = tmp_path_factory.mktemp("sweep")
    sweep(str(TINY), parse_grid(GRID[1::2]), out, overrides=SMALL[1::2], log=lambda _: None)
    return out


def _copy(small_sweep, tmp_path):
    shutil.copytree(small_sweep, tmp_path / "s")
    return tmp_path / "s"


def _files(directory):
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_a_rerun_with_changed_settings_trains_again_and_keeps_the_old_runs(small_sweep, tmp_path, capsys):
    out = _copy(small_sweep, tmp_path)
    before = json.loads((out / "results.json").read_text())["runs"]
    args = ["sweep", str(TINY), *GRID, *SMALL, "--set", "train.steps=5", "--set", "train.eval_every=5",
            "--out", str(out)]
    status, stdout, err = cli_in_process(capsys, *args)
    assert status == 0, err
    assert stdout.count("trained with another config, train.steps (3 -> 5)") == 2
    runs = json.loads((out / "results.json").read_text())["runs"]
    for run, old in zip(runs, before, strict=True):
        workdir = out / "runs" / f"lr={run['optimizer.lr']},d_model=32"
        assert logged_rows(workdir)[-1]["step"] == 5 and run["val_loss"] != old["val_loss"]
        assert json.loads((workdir / "result.json").read_text())["config"]["train"]["steps"] == 5
    replaced = sorted((out / "replaced").iterdir())
    assert [p.name.split("@")[0] for p in replaced] == ["lr=0.01,d_model=32", "lr=0.03,d_model=32"]
    assert all(logged_rows(p)[-1]["step"] == 3 for p in replaced)  # moved aside, not deleted
    trained = _files(out / "runs")
    status, stdout, _ = cli_in_process(capsys, *args)  # the same config again: every run reused
    assert status == 0 and "another config" not in stdout
    assert _files(out / "runs") == trained and len(list((out / "replaced").iterdir())) == 2


def test_an_empty_result_file_means_the_run_is_not_done(small_sweep, tmp_path, capsys):
    """A sweep cut off while writing result.json left it empty: the run resumes from its
    final checkpoint and its result is the same."""
    out = _copy(small_sweep, tmp_path)
    before = json.loads((out / "results.json").read_text())["runs"]
    torn = out / "runs" / "lr=0.03,d_model=32" / "result.json"
    torn.write_text("")
    status, stdout, err = cli_in_process(capsys, "sweep", str(TINY), *GRID, *SMALL, "--out", str(out))
    assert status == 0, err
    assert f"{torn}: unreadable, the run is not done; resuming it" in stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in runs] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in before]
    assert json.loads(torn.read_text())["val_loss"] == before[1]["val_loss"]
    assert not list(out.rglob("*.tmp"))
