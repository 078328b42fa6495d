"""Top singular values and sharpness: checked against exact linear algebra, then in a run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxtrain.config.files import load_config
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import read_metrics
from jaxtrain.run.telemetry import sharpness, top_singular_value


def test_power_iteration_finds_the_top_singular_value():
    matrix = jax.random.normal(jax.random.PRNGKey(0), (48, 80))
    exact = np.linalg.svd(np.asarray(matrix), compute_uv=False)[0]
    assert float(top_singular_value(matrix, 200)) == pytest.approx(exact, rel=1e-3)


def test_sharpness_is_the_top_hessian_eigenvalue():
    q = jax.random.normal(jax.random.PRNGKey(1), (12, 12))
    hessian = q @ q.T + jnp.diag(jnp.arange(12.0))  # symmetric positive definite
    loss = lambda p: 0.5 * p["x"] @ hessian @ p["x"] + jnp.sum(p["x"])
    estimate = sharpness(loss, {"x": jnp.zeros(12)}, 300, jax.random.PRNGKey(2))
    assert float(estimate) == pytest.approx(float(jnp.linalg.eigvalsh(hessian)[-1]), rel=1e-3)


@pytest.mark.slow
def test_diagnostics_are_logged_only_at_their_interval(tmp_path):
    cfg = load_config(TINY, ["train.steps=20", "diagnostics.every_steps=10", "diagnostics.sharpness=true",
                             "diagnostics.power_iterations=4",
                             "train.log_every=4"])
    run(cfg, tmp_path, console=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    with_diag = [r["step"] for r in rows if "sharpness" in r]
    assert with_diag == [10, 20] and [r["step"] for r in rows] == [4, 8, 10, 12, 16, 20]
    row = rows[-1]
    svs = {k: v for k, v in row.items() if k.startswith("sv/")}
    assert "sv/lm_head" in svs and "sv/blocks.1.mlp.w_down" in svs and "sv/final_norm.scale" not in svs
    assert all(np.isfinite(v) and v > 0 for v in svs.values())
    assert np.isfinite(row["sharpness"]) and row["sharpness"] > 0
