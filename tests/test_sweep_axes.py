"""`jaxtrain sweep --equal-tokens`: a batch-size grid on tiny.yaml where every run trains on
the config's token budget, warms up over the same tokens, and the optimum's drift along
batch size and the law's fit are reported; bad budgets are one line before anything trains."""

import json

import pytest

from conftest import TINY, cli_in_process, figure_panels, logged_rows

pytestmark = pytest.mark.slow

# budget: 8 steps x 16 x 64 = 8192 tokens; warmup 2 steps of the config's batch = 2048 tokens
BASE = ["--set", "train.steps=8", "--set", "train.eval_every=100", "--set", "train.log_every=1",
        "--set", "schedule.warmup_steps=2", "--set", "checkpoint.every_steps=100"]


def test_an_equal_token_batch_sweep_derives_each_runs_steps(tmp_path, capsys):
    out = tmp_path / "s"
    status, stdout, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "train.batch_size=8,32",
                                         "--grid", "optimizer.lr=0.003,0.01", "--curves", "train.batch_size",
                                         "--equal-tokens", "--fit", "lr~batch", *BASE, "--out", str(out))
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["equal_tokens"] == 8192 and results["curve"] == "train.batch_size"
    for row in results["runs"]:
        batch = row["train.batch_size"]
        assert (row["steps"], row["tokens"]) == (8192 // (batch * 64), 8192)
        workdir = out / "runs" / f"batch_size={batch},lr={row['optimizer.lr']}"
        rows = logged_rows(workdir)
        assert rows[-1]["step"] == row["steps"] and rows[-1]["tokens"] == 8192
        schedule = json.loads((workdir / "result.json").read_text())["config"]["schedule"]
        assert (schedule["warmup_steps"], schedule["warmup_tokens"]) == (0, 2048)
        peak_at = min(r["tokens"] for r in rows if "lr" in r and r["lr"] == pytest.approx(row["optimizer.lr"]))
        assert peak_at == 2048  # the warmup ends at the same tokens at either batch (in steps: 1024 vs 4096)
    (drift,) = results["drift"]
    assert (drift["from"], drift["to"]) == (8, 32)
    assert drift["steps_per_doubling"] == pytest.approx(drift["drift_steps"] / 2)
    assert "per doubling" in stdout
    (fit,) = results["fits"]  # 2 lr values: every optimum at an edge, so the law is not fitted
    assert fit["law"] == "lr~batch" and "cannot determine 2 parameters" in fit["error"]
    assert "lr~batch: not fitted" in stdout and (out / "fits.png").is_file()


@pytest.mark.parametrize("grid, culprit", [
    (["--grid", "train.batch_size=8,24"], "train.batch_size=24: the budget of 8,192 tokens (8 steps x 16 x 64) "
                                          "is not a whole number of 1,536-token steps"),
    (["--grid", "train.batch_size=8,16", "--grid", "train.steps=4,8"], "--equal-tokens derives train.steps"),
    (["--grid", "model.d_model=32,64"], "--equal-tokens: no --grid key changes the tokens per step"),
])
def test_a_budget_the_grid_cannot_keep_is_one_line_and_nothing_trains(tmp_path, capsys, grid, culprit):
    status, _, err = cli_in_process(capsys, "sweep", str(TINY), *grid, "--grid", "optimizer.lr=0.003,0.01",
                                    "--equal-tokens", *BASE, "--out", str(tmp_path / "s"))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert culprit in err
    assert not (tmp_path / "s").exists()


def test_a_weight_decay_axis_reports_its_drift_per_doubling_in_the_figure(tmp_path, capsys):
    out = tmp_path / "wd"
    status, stdout, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "optimizer.weight_decay=0.05,0.2",
                                         "--grid", "optimizer.lr=0.003,0.01", "--curves", "optimizer.weight_decay",
                                         *BASE, "--set", "train.steps=3", "--set", "schedule.warmup_steps=1",
                                         "--out", str(out))
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["equal_tokens"] is None and results["fits"] == []
    assert all((r["steps"], r["tokens"]) == (3, 3 * 16 * 64) for r in results["runs"])
    (drift,) = results["drift"]
    assert drift["steps_per_doubling"] == pytest.approx(drift["drift_steps"] / 2)  # 0.05 -> 0.2: two doublings
    (panel,) = figure_panels(out / "sweep.png")
    assert panel["curves"] == {"weight_decay=0.05": 2, "weight_decay=0.2": 2}
    assert f"({drift['steps_per_doubling']:+.2f} per doubling of weight_decay)" in panel["title"]
    assert not (out / "fits.png").exists()
