"""`jaxtrain sweep --fit` and the drift along any curve axis, on synthetic sweep results
(no training): the law's exponents and standard errors, the cells it leaves out, and the
one-line refusals before anything trains."""

import math

import numpy as np
import pytest

from conftest import TINY, cli_in_process
from jaxtrain.config.errors import UserError
from jaxtrain.tools.optimum_law import check_law, fit_law, least_squares_power_law, parse_law
from jaxtrain.tools.sweep import analyse

LRS = [2.0**k for k in np.arange(-14, -1, 0.5)]  # grid step 0.5 in log2
KEYS = ["optimizer.lr", "train.batch_size", "train.steps"]


def synthetic_runs(log2_opt, seq_len=64, curvature=0.05):
    """Sweep rows whose val loss is a parabola in log2(lr) with its vertex at log2_opt(B, T):
    the sweep's parabola fit through three grid points finds that vertex exactly."""
    runs = []
    for batch in (8, 16, 32, 64):
        for steps in (100, 400, 1600):
            tokens = steps * batch * seq_len
            opt = log2_opt(batch, tokens)
            for lr in LRS:
                runs.append({"optimizer.lr": lr, "train.batch_size": batch, "train.steps": steps, "steps": steps,
                             "tokens": tokens, "val_loss": 2.0 + curvature * (math.log2(lr) - opt) ** 2,
                             "diverged": False})
    return runs


def test_the_fit_recovers_known_exponents_through_the_sweeps_own_optima():
    law = lambda b, t: -10 - 0.5 * math.log2(b) + 0.3 * math.log2(t)
    analysis = analyse(synthetic_runs(law), "optimizer.lr", "train.batch_size", ["train.steps"])
    assert all(not c["optimum"]["at_edge"] for c in analysis["optima"])
    assert {c["tokens"] for c in analysis["optima"]} == {s * b * 64 for s in (100, 400, 1600) for b in (8, 16, 32, 64)}
    fit = fit_law(parse_law("lr~batch,tokens", "optimizer.lr", KEYS), analysis["optima"])
    assert fit["n"] == 12 and fit["excluded"] == []
    assert fit["a"] == pytest.approx(2.0**-10, rel=1e-9)
    assert fit["exponents"]["train.batch_size"] == pytest.approx(-0.5, abs=1e-9)
    assert fit["exponents"]["tokens"] == pytest.approx(0.3, abs=1e-9)
    assert fit["exponent_se"]["tokens"] == pytest.approx(0.0, abs=1e-9)  # an exact law leaves no residual
    assert max(abs(c["fitted_log2"] - c["opt_log2"]) for c in fit["cells"]) < 1e-9


def test_standard_errors_are_the_spread_of_the_estimates_over_noise_draws():
    """OLS standard errors against a Monte Carlo: 4000 noisy copies of one design."""
    rng = np.random.default_rng(0)
    c = np.log2([[b, t] for b in (8, 16, 32, 64) for t in (1e5, 4e5, 1.6e6)])
    truth = np.array([-6.0, -0.5, 0.3])
    clean = truth[0] + c @ truth[1:]
    draws = [least_squares_power_law(clean + rng.normal(0, 0.3, len(clean)), c) for _ in range(4000)]
    spread = np.std([d["beta"] for d in draws], axis=0)
    typical_se = np.sqrt(np.mean(np.square([d["se"] for d in draws]), axis=0))
    np.testing.assert_allclose(typical_se, spread, rtol=0.05)
    np.testing.assert_allclose(np.mean([d["beta"] for d in draws], axis=0), truth, atol=0.02)
    exact = least_squares_power_law(clean[[0, 3, 1]], c[[0, 3, 1]])  # n = p: no residual to estimate them from
    assert exact["se"] == [None, None, None] and exact["residual_std_log2"] is None


def test_optima_at_the_grid_edge_or_diverged_are_left_out_and_listed():
    law = lambda b, t: -10 - 0.5 * math.log2(b) + 0.3 * math.log2(t)
    runs = synthetic_runs(law)
    for r in runs:
        if r["train.batch_size"] == 8 and r["train.steps"] == 100:
            r["val_loss"] = 2.0 - math.log2(r["optimizer.lr"])  # best at the largest lr: at the edge
        if r["train.batch_size"] == 64 and r["train.steps"] == 1600:
            r["diverged"] = True
    analysis = analyse(runs, "optimizer.lr", "train.batch_size", ["train.steps"], loss_at_init=5.0)
    fit = fit_law(parse_law("lr~batch,tokens", "optimizer.lr", KEYS), analysis["optima"])
    assert sorted(e["reason"] for e in fit["excluded"]) == ["at_edge", "diverged"]
    assert fit["n"] == 10 and fit["exponents"]["train.batch_size"] == pytest.approx(-0.5, abs=1e-9)
    too_few = fit_law(parse_law("lr~batch,tokens", "optimizer.lr", KEYS), analysis["optima"][:2])
    assert "cannot determine 3 parameters" in too_few["error"]


def test_drift_per_doubling_along_weight_decay_is_in_grid_steps():
    """Any numeric curve axis: the optimum falls 0.25 log2 (half a grid step) per doubling of lambda."""
    opt = lambda wd: -6 + 0.25 * math.log2(wd / 0.05)
    runs = [{"optimizer.lr": lr, "optimizer.weight_decay": wd, "val_loss": (math.log2(lr) - opt(wd)) ** 2,
             "diverged": False} for wd in (0.05, 0.1, 0.2, 0.4) for lr in LRS]
    (drift,) = analyse(runs, "optimizer.lr", "optimizer.weight_decay", [])["drift"]
    assert drift["steps_per_doubling"] == pytest.approx(0.5)
    assert drift["drift_steps"] == pytest.approx(1.5) and (drift["from"], drift["to"]) == (0.05, 0.4)
    named = [{**r, "optimizer.weight_decay": {0.05: "a", 0.1: "b", 0.2: "c", 0.4: "d"}[r["optimizer.weight_decay"]]}
             for r in runs]
    assert analyse(named, "optimizer.lr", "optimizer.weight_decay", [])["drift"][0]["steps_per_doubling"] is None


@pytest.mark.parametrize("text, culprit", [("lr~batchsize", "'batchsize' is not a --grid key"),
                                           ("steps~batch", "the fitted optimum is the sweep's x axis"),
                                           ("lr~batch,batch", "each covariate once"),
                                           ("lr", "expected TARGET~COVARIATE")])
def test_a_law_naming_what_the_sweep_lacks_is_refused(text, culprit):
    with pytest.raises(UserError, match=culprit):
        parse_law(text, "optimizer.lr", KEYS)


def test_a_covariate_that_does_not_vary_is_refused_before_training():
    law = parse_law("lr~batch,tokens", "optimizer.lr", KEYS)
    cells = [{"train.batch_size": b, "tokens": 4096} for b in (8, 16)]
    with pytest.raises(UserError, match="cannot determine 3 parameters"):
        check_law(law, cells)
    check_law(law, [{"train.batch_size": b, "tokens": t} for b, t in ((8, 4096), (16, 4096), (8, 8192))])


def test_a_bad_fit_flag_is_one_line_and_nothing_trains(tmp_path, capsys):
    status, _, err = cli_in_process(capsys, "sweep", str(TINY), "--grid", "optimizer.lr=0.01,0.03",
                                    "--grid", "model.d_model=32,64", "--fit", "lr~batch", "--out", str(tmp_path / "s"))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "--fit lr~batch: 'batch' is not a --grid key" in err
    assert not (tmp_path / "s").exists()
