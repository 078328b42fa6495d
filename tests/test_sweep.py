"""`jaxtrain sweep`: a grid of real short runs, the results table, fits and plots."""

import csv
import json
import math

import numpy as np
import pytest

from conftest import TINY, cli_in_process, figure_panels, run_in_process
from jaxtrain.tools.sweep import analyse, fit_optimum

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
