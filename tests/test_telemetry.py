"""Stability telemetry: what the telemetry step reports equals the same quantities computed
directly, layer by layer with the document mask when packed (as the coordinate check's RMS
must), the update is the plain step's, and a run logs it only at its interval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import sharding
from jaxtrain.model import attention as attention_lib
from jaxtrain.model.transformer import rms
from jaxtrain.run import telemetry
from jaxtrain.run.loop import run
from jaxtrain.run.metrics import read_metrics
from jaxtrain.tools import inspection
from jaxtrain.tools.coord_check import activation_rms

ROLES = ("embedding", "hidden", "readout", "vector")


def by_hand(model, tokens, segment_ids):
    """Max attention logit and branch RMS per layer, and log Z, computed from the model's
    pieces one layer at a time: each layer's whole (T, T) scores from its own q and k, with
    the causal mask and the document mask and positions built here from `segment_ids`
    (numpy (B, T); None: one document per row)."""
    length = tokens.shape[1]
    segment_ids = np.zeros(tokens.shape, int) if segment_ids is None else np.asarray(segment_ids)
    positions = jnp.asarray([[t - list(row).index(row[t]) for t in range(length)] for row in segment_ids])
    visible = (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(np.ones((length, length), bool))
    mask = jnp.asarray(visible[:, None])
    x = model.embed_tokens(tokens)
    out = {"embedding": rms(x), "max_logit": [], "attn": [], "mlp": []}
    for block in map(model.layer, range(model.cfg.n_layers)):
        q, k, _ = block.attn._qkv(block.attn_norm(x), positions)
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        logits = block.attn.scale * jnp.einsum("btnh,bsnh->bnts", q, k)
        out["max_logit"].append(jnp.max(jnp.where(mask, logits, -jnp.inf)))
        attended = block.attn(block.attn_norm(x), positions, segment_ids=jnp.asarray(segment_ids))[0]
        x = x + block.residual * attended
        branch = block.mlp(block.mlp_norm(x))
        x = x + block.residual * branch
        out["attn"].append(rms(attended))
        out["mlp"].append(rms(branch))
    out["logits"] = model.logits(x)
    out["log_z"] = jax.nn.logsumexp(out["logits"], axis=-1)
    return out


def direct(spec, params, tokens, segment_ids=None):
    """`by_hand` of the inputs of a (B, T + 1) batch, compiled once instead of run op by op."""
    segments = None if segment_ids is None else segment_ids[:, :-1]
    return jax.device_get(jax.jit(lambda p, t: by_hand(ts.bind_model(spec, p), t, segments))(params, tokens[:, :-1]))


def telemetry_steps(cfg):
    spec = ts.model_spec(cfg)
    return spec, ts.build_steps(cfg, spec, sharding.make_mesh(cfg.mesh), extra_metrics=telemetry.step_metrics(spec))


def assert_forward_telemetry(metrics, expected):
    for i, logit in enumerate(expected["max_logit"]):
        assert metrics[f"max_attn_logit/{i}"] == pytest.approx(float(logit), rel=1e-5), i
    assert metrics["log_z_mean"] == pytest.approx(float(expected["log_z"].mean()), rel=1e-5)
    assert metrics["log_z_std"] == pytest.approx(float(expected["log_z"].std()), rel=1e-4)


@pytest.mark.slow
def test_telemetry_matches_direct_computation_and_leaves_the_update_alone():
    cfg = load_config(TINY, ["model.qk_norm=true"])
    spec, steps = telemetry_steps(cfg)
    batch = jax.random.randint(jax.random.PRNGKey(0), (16, 65), 0, 256)
    before = jax.device_get(steps.init().params)
    plain, _ = steps.train(steps.init(), batch, cfg.optimizer.lr)
    watched, metrics = steps.train_extra(steps.init(), batch, cfg.optimizer.lr)
    after = jax.device_get(watched.params)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(jax.device_get(plain.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    metrics = jax.device_get(metrics)
    assert_forward_telemetry(metrics, direct(spec, before, batch))

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
def test_telemetry_and_coord_check_of_a_packed_batch_see_its_document_mask(monkeypatch):
    """Under data.packing the telemetry step and the coordinate check read the forward pass
    that is trained: each document sees only itself. The batch is such that ignoring the
    mask changes every quantity compared, so each comparison would catch it."""
    monkeypatch.setattr(attention_lib, "_SCORE_CHUNK", 16)  # 4 query chunks of T = 64, each with its mask rows
    cfg = load_config(TINY, ["data.packing=true"])
    spec, steps = telemetry_steps(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (16, 65)).astype(np.int32)
    segments = np.cumsum(rng.random((16, 65)) < 0.1, axis=1).astype(np.int32)  # documents of ~10 tokens
    batch = {"tokens": tokens, "segment_ids": segments}
    params = jax.device_get(steps.init().params)
    _, metrics = steps.train_extra(steps.init(), batch, cfg.optimizer.lr)
    masked, unmasked = direct(spec, params, tokens, segments), direct(spec, params, tokens)
    assert_forward_telemetry(jax.device_get(metrics), masked)

    found = jax.device_get(jax.jit(lambda p, b: activation_rms(p, b, spec=spec))(params, batch))
    expected = {"embedding": masked["embedding"], "logits": rms(masked["logits"]),
                **{f"block{i}.{part}": masked[part][i] for i in range(cfg.model.n_layers) for part in ("attn", "mlp")}}
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        assert float(found[name]) == pytest.approx(float(value), rel=1e-5), name

    def far_apart(a, b):  # beyond ten times the rel=1e-5 the comparisons above allow
        return abs(float(a) - float(b)) > 1e-4 * abs(float(b))

    for i in range(cfg.model.n_layers):  # the mask matters on this batch
        assert far_apart(unmasked["max_logit"][i], masked["max_logit"][i]), i
        assert far_apart(unmasked["attn"][i], masked["attn"][i]) and far_apart(unmasked["mlp"][i], masked["mlp"][i]), i
    assert far_apart(unmasked["log_z"].mean(), masked["log_z"].mean())
    assert far_apart(unmasked["log_z"].std(), masked["log_z"].std())


@pytest.mark.slow
def test_attention_maps_of_a_packed_row_are_those_of_its_documents_alone():
    cfg = load_config(TINY)
    spec = ts.model_spec(cfg)
    model = ts.bind_model(spec, ts.init_params(cfg, spec, jax.random.PRNGKey(1)))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, 256)
    packed = inspection.attention_maps(model, tokens, jnp.asarray([[0] * 10 + [1] * 14] * 2))
    first, second = inspection.attention_maps(model, tokens[:, :10]), inspection.attention_maps(model, tokens[:, 10:])
    assert len(packed) == cfg.model.n_layers and packed[0].shape == (2, 4, 24, 24)
    for layer in range(cfg.model.n_layers):
        assert float(packed[layer][:, :, 10:, :10].max()) == 0.0  # no query sees the other document
        np.testing.assert_allclose(np.asarray(packed[layer][:, :, :10, :10]), np.asarray(first[layer]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(packed[layer][:, :, 10:, 10:]), np.asarray(second[layer]), atol=1e-6)


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
