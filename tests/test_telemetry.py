"""Stability telemetry: what the telemetry step reports equals the same quantities computed
directly, the update is the plain step's, and a run logs it only at its interval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxtrain import sharding
from jaxtrain import train_step as ts
from jaxtrain.config_file import load_config
from jaxtrain.metrics import read_metrics
from jaxtrain.train import run

ROLES = ("embedding", "hidden", "readout", "vector")


def test_telemetry_matches_direct_computation_and_leaves_the_update_alone():
    cfg = load_config(TINY, ["model.qk_norm=true"])
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, sharding.make_mesh(cfg.mesh))
    batch = jax.random.randint(jax.random.PRNGKey(0), (16, 65), 0, 256)
    before = jax.device_get(steps.init(cfg, spec).params)
    plain, _ = steps.train(steps.init(cfg, spec), batch, cfg.optimizer.lr)
    watched, metrics = steps.train_telemetry(steps.init(cfg, spec), batch, cfg.optimizer.lr)
    after = jax.device_get(watched.params)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(jax.device_get(plain.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    metrics = jax.device_get(metrics)

    @jax.jit  # the direct computation, compiled once instead of run op by op
    def direct(params, tokens):
        model = ts.bind_model(spec, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, full, chunked = model.embed_tokens(tokens), [], []
        for block in map(model.layer, range(cfg.model.n_layers)):
            full.append(jnp.max(block.attn.logits(block.attn_norm(x), positions)))  # whole (T, T) at once
            chunked.append(block.attn.max_logit(block.attn_norm(x), positions, chunk=16))
            x, _ = block(x, positions, None)
        return full, chunked, jax.nn.logsumexp(model(tokens), axis=-1)

    full, chunked, log_z = jax.device_get(direct(before, batch[:, :-1]))
    for i, (whole, in_chunks) in enumerate(zip(full, chunked, strict=True)):
        assert metrics[f"max_attn_logit/{i}"] == pytest.approx(float(whole), rel=1e-5)
        assert float(in_chunks) == pytest.approx(float(whole), rel=1e-6)  # chunking changes nothing
    assert metrics["log_z_mean"] == pytest.approx(float(log_z.mean()), rel=1e-5)
    assert metrics["log_z_std"] == pytest.approx(float(log_z.std()), rel=1e-4)

    labels = jax.tree.leaves(spec.table.labels(before))
    flat_before, flat_after = jax.tree.leaves(before), jax.tree.leaves(after)
    for role in ROLES:
        idx = [i for i, r in enumerate(labels) if r == role]
        d = np.concatenate([(flat_after[i] - flat_before[i]).ravel() for i in idx])
        p = np.concatenate([flat_before[i].ravel() for i in idx])
        assert metrics[f"update_rms_ratio/{role}"] == pytest.approx(
            np.sqrt(np.mean(d**2)) / np.sqrt(np.mean(p**2)), rel=1e-4), role
        q = np.concatenate([flat_after[i].ravel() for i in idx])
        assert metrics[f"param_norm/{role}"] == pytest.approx(np.linalg.norm(q), rel=1e-5), role
    role_norms = np.array([metrics[f"grad_norm/{role}"] for role in ROLES])
    assert np.sqrt(np.sum(role_norms**2)) == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)


@pytest.mark.slow
def test_a_run_logs_telemetry_only_at_its_interval(tmp_path):
    cfg = load_config(TINY, ["train.steps=12", "train.log_every=4", "diagnostics.telemetry_every=6",
                             "schedule.warmup_steps=2", "train.eval_every=12"])
    run(cfg, tmp_path, console=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 6, 8, 12]
    watched = [r["step"] for r in rows if "max_attn_logit/1" in r and "update_rms_ratio/hidden" in r]
    assert watched == [6, 12]
    assert all(np.isfinite(r["log_z_std"]) and r["max_attn_logit/0"] > 0 for r in rows if r["step"] in watched)
