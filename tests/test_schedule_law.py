"""The loss-curve law: its areas against a direct computation, the fit recovering a known
law from runs whose losses follow it, predictions for other schedules, and the command."""

import json

import numpy as np
import pytest
import yaml
from conftest import TINY, figure_panels

from jaxtrain.config.files import load_config
from jaxtrain.optim.schedules import lr_per_step
from jaxtrain.tools.schedule_law import Law, annealing_areas, fit, load_curve

TRUE = Law(L0=1.5, A=0.9, alpha=0.45, C=0.35)


def test_annealing_areas_match_the_sums_written_out():
    lrs = np.array([1.0, 1.0, 0.8, 0.5, 0.5, 0.1])
    s1, s2 = annealing_areas(lrs, 0.9, np.arange(1, 7))
    np.testing.assert_allclose(s1, np.cumsum(lrs))
    drops = [0.0, 0.0, 0.2, 0.3, 0.0, 0.4]  # eta_{i-1} - eta_i
    m = [sum(0.9 ** (i - k) * drops[k] for k in range(i + 1)) for i in range(6)]
    np.testing.assert_allclose(s2, np.cumsum(m))
    assert annealing_areas(np.full(5, 0.3), 0.999, np.arange(1, 6))[1].tolist() == [0.0] * 5  # no annealing


def write_run(directory, sets, law=TRUE, noise=0.0):
    """A workdir whose logged training losses follow `law` (plus seeded noise)."""
    cfg = load_config(TINY, ["train.steps=400", "schedule.warmup_steps=20", "optimizer.lr=0.01", *sets])
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    lrs, rng = lr_per_step(cfg), np.random.default_rng(len(sets))
    s1, s2 = annealing_areas(lrs, 0.999, np.arange(1, 400))
    losses = law.L0 + law.A * s1 ** -law.alpha - law.C * s2 + noise * rng.standard_normal(399)
    rows = [{"step": s + 1, "loss": float(losses[s - 1])} for s in range(1, 400, 5)]  # s updates before the loss
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_the_fit_recovers_the_law_and_predicts_other_schedules(tmp_path):
    constant = write_run(tmp_path / "constant", ["schedule.name=constant"])
    cosine = write_run(tmp_path / "cosine", ["schedule.name=cosine", "schedule.final_lr_fraction=0"])
    law = fit([load_curve(constant), load_curve(cosine)])
    assert (law.L0, law.A, law.alpha, law.C) == pytest.approx((TRUE.L0, TRUE.A, TRUE.alpha, TRUE.C), rel=0.02)
    wsd = load_curve(write_run(tmp_path / "wsd", ["schedule.name=wsd", "schedule.decay_shape=1-sqrt"]))
    np.testing.assert_allclose(law.predict(wsd, wsd.steps), wsd.losses, atol=2e-3)


def test_the_command_reports_errors_on_logged_runs_and_predicts_configs(tmp_path, capsys):
    from conftest import cli_in_process

    runs = [write_run(tmp_path / n, [f"schedule.name={n}"], noise=0.01) for n in ("constant", "cosine", "wsd")]
    config = tmp_path / "power.yaml"
    config.write_text((tmp_path / "wsd" / "config.yaml").read_text().replace("name: wsd", "name: power"))
    status, out, err = cli_in_process(capsys, "fit-schedule-law", str(runs[0]), str(runs[1]),
                                      "--predict", str(runs[2]), str(config), "--out", str(tmp_path / "law"))
    assert status == 0, err
    predicted = {r["run"]: r for r in json.loads((tmp_path / "law" / "schedule_law.json").read_text())["predicted"]}
    assert predicted["wsd"]["mean_abs_error"] < 0.02  # the noise level
    power_line = next(line for line in out.splitlines() if line.startswith("predicted power:"))
    assert "mean_abs_error" not in predicted["power"] and "logged" not in power_line
    assert "predicted wsd: final loss predicted" in out
    (panel,) = figure_panels(tmp_path / "law" / "schedule_law.png")  # the law's curve for each run
    assert [label.split(" (")[0] for label in panel["curves"]] == [runs[0].name, runs[1].name, "wsd", "power"]
    assert panel["title"].startswith("L = ") and all(n > 1 for n in panel["curves"].values())
    status, _, err = cli_in_process(capsys, "fit-schedule-law", str(tmp_path / "nothing"))
    assert status == 2 and "nothing" in err and err.count("\n") == 1
