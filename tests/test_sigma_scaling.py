"""sigma_max/<role> and sigma_ratio/<role> (run/telemetry.py): the top singular value of each
role's matrices against numpy's SVD, the reference scale sqrt(eta_R/lambda_R) * d^0.75 of
Fan et al. 2025 from the table, and both logged by a run at its telemetry steps."""

import math

import jax
import numpy as np
import pytest

from conftest import TINY, cli_in_process, figure_panels, final_params, logged_rows
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model.parametrization import path_str
from jaxtrain.run import telemetry
from jaxtrain.run.loop import run

LR, WD, WIDTH = 3e-3, 0.1, 64  # tiny.yaml's lr and d_model, the default weight decay


def known_matrix(rng, rows, cols, top):
    """A (rows, cols) matrix with singular values top, top/2, then at most top/3."""
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    k = min(rows, cols)
    s = np.concatenate([[top, top / 2], np.linspace(top / 3, top / 30, k - 2)])
    return ((u[:, :k] * s) @ v[:, :k].T).astype(np.float32)


def matrices(params, table):
    """role -> every matrix of the role as (fan_in, fan_out), each layer of a stacked weight."""
    out = {}
    for key_path, value in jax.tree_util.tree_leaves_with_path(params):
        rule = table.rules[path_str(key_path)]
        fan_in = math.prod(rule.shape[:rule.fan_in_dims])
        out.setdefault(rule.role, []).extend(np.asarray(value).reshape(-1, fan_in, math.prod(rule.shape) // fan_in))
    return out


def test_sigma_max_of_each_role_is_numpys_top_singular_value_of_the_stored_weights():
    """Under muP the readout's forward multiplier (1/2 here) is not in it: Fan et al.'s
    steady state is of the parameter AdamW moves and decays."""
    cfg = load_config(TINY, ["parametrization.name=mup", "parametrization.d0=32"])
    spec = ts.model_spec(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), spec.abstract_params)
    planted = {"embed": known_matrix(rng, 256, WIDTH, 5.0), "lm_head": known_matrix(rng, WIDTH, 256, 7.0)}
    wq = np.array({path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}["blocks.attn.wq"])
    wq[1] = known_matrix(rng, WIDTH, WIDTH, 3.0).reshape(wq.shape[1:])  # layer 1 of the stack
    planted["blocks.attn.wq"] = wq
    params = jax.tree_util.tree_map_with_path(lambda p, x: planted.get(path_str(p), x), params)
    got = jax.device_get(jax.jit(lambda p: telemetry.role_sigma_max(p, spec.table, 20))(params))
    assert set(got) == {"sigma_max/embedding", "sigma_max/hidden", "sigma_max/readout"}  # no vector role
    for role, top in matrices(params, spec.table).items():
        if role != "vector":
            exact = max(np.linalg.svd(m, compute_uv=False)[0] for m in top)
            assert got[f"sigma_max/{role}"] == pytest.approx(exact, rel=1e-5), role
    assert got["sigma_max/hidden"] == pytest.approx(3.0, rel=1e-5)
    assert got["sigma_max/readout"] == pytest.approx(7.0, rel=1e-5)


@pytest.mark.parametrize("sets, expected", [
    ([], {"hidden": math.sqrt(LR / WD)}),
    # muP at m = 4: eta_R = eta / 4, lambda_R = lambda * 4^0.5 (parametrization.gamma)
    (["parametrization.name=mup", "parametrization.d0=16"], {"hidden": math.sqrt(LR / 4 / (WD * 2))}),
    # independent decay: the coupled coefficient applied is lambda / eta
    (["optimizer.weight_decay_mode=independent", "optimizer.weight_decay=1e-4"],
     {"hidden": math.sqrt(LR / (1e-4 / LR))}),
    # the same under muP at m = 4: lambda_R = lambda / eta * 4^0.5, eta_R = eta / 4
    (["parametrization.name=mup", "parametrization.d0=16", "optimizer.weight_decay_mode=independent",
      "optimizer.weight_decay=1e-4"], {"hidden": math.sqrt(LR / 4 / (1e-4 / LR * 2))}),
    (["parametrization.decay_vector_like=true"], {r: math.sqrt(LR / WD) for r in ("embedding", "hidden", "readout")}),
    (["optimizer.weight_decay=0"], {}),
])
def test_the_reference_scale_is_sqrt_eta_over_lambda_times_width_to_three_quarters(sets, expected):
    cfg = load_config(TINY, sets)
    scale = telemetry.sigma_reference(cfg, ts.model_spec(cfg).table)
    assert scale == pytest.approx({r: v * WIDTH**0.75 for r, v in expected.items()}, rel=1e-12)


@pytest.mark.slow
def test_a_run_logs_sigma_at_its_telemetry_steps_and_plot_draws_the_ratio(tmp_path, capsys):
    workdir = tmp_path / "run"
    cfg = load_config(TINY, ["train.steps=6", "train.log_every=3", "train.eval_every=6", "schedule.warmup_steps=1",
                             "diagnostics.telemetry_every=3", "diagnostics.power_iterations=300",
                             "checkpoint.every_steps=6"])
    run(cfg, workdir, console=False)
    rows = [r for r in logged_rows(workdir) if "sigma_max/hidden" in r]
    assert [r["step"] for r in rows] == [3, 6]
    reference = math.sqrt(LR / WD) * WIDTH**0.75
    for row in rows:
        assert row["sigma_ratio/hidden"] == pytest.approx(row["sigma_max/hidden"] / reference, rel=1e-6)
        assert "sigma_ratio/embedding" not in row and row["sigma_max/embedding"] > 0
    exact = max(np.linalg.svd(m, compute_uv=False)[0]
                for m in matrices(final_params(workdir, 6), ts.model_spec(cfg).table)["hidden"])
    assert rows[-1]["sigma_max/hidden"] == pytest.approx(exact, rel=1e-4)  # the params after step 6's update
    status, _, err = cli_in_process(capsys, "plot", str(workdir), "--out", str(tmp_path / "sigma.png"),
                                    "--metric", "sigma_ratio/*")
    assert status == 0, err
    (panel,) = figure_panels(tmp_path / "sigma.png")
    assert panel["title"] == "sigma_ratio/hidden" and panel["curves"] == {"run": 2}
