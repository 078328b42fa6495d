"""The mixture-of-experts MLP (jaxtrain/model/moe.py): the dropless layer against a dense
reference, the router losses against their formulas, the parametrization rows, training,
resume and decoding through the real paths, and the Hugging Face (Qwen3-MoE) mapping of the
section (the transformers round trips are tests/test_huggingface_moe.py)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY
from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.files import from_dict, load_config
from jaxtrain.model import parametrization
from jaxtrain.model.moe import MOE_SOWABLE, MoE, router_losses
from jaxtrain.model.transformer import SwiGLU, Transformer
from jaxtrain.optim.muon import orthogonalize_kernel

D, FF = 32, 16


def model_config(n_experts=4, top_k=2, shared=0, renormalize=True, bias_update_rate=0.0, moe_every=1, **model):
    moe = {"n_experts": n_experts, "top_k": top_k, "expert_d_ff": FF, "n_shared_experts": shared,
           "renormalize": renormalize, "bias_update_rate": bias_update_rate, "moe_every": moe_every}
    return from_dict({"model": {"d_model": D, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "moe": moe, **model},
                      "train": {"steps": 4, "batch_size": 2}, "data": {"seq_len": 16}})


def layer(cfg):
    rngs = nnx.Rngs(params=0)
    moe = cfg.model.moe
    shared = SwiGLU(cfg.model, rngs, moe.n_shared_experts * FF) if moe.n_shared_experts else None
    return MoE(cfg.model, rngs, shared)


def swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def chosen_experts(p, tokens, top_k):
    """(N, E) 1 where a token chose the expert: the top_k of probability + balance bias."""
    probs = jax.nn.softmax(tokens @ p["router"], axis=-1)
    return jax.nn.one_hot(jax.lax.top_k(probs + p.get("balance_bias", 0.0), top_k)[1], probs.shape[-1]).sum(axis=1)


def dense_reference(p, x, top_k, renormalize):
    """Every expert on every token, combined with the top-k gates (zero for the others):
    the unbiased probabilities of the experts the biased scores chose."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax(tokens @ p["router"], axis=-1)
    gates = probs * chosen_experts(p, tokens, top_k)
    if renormalize:
        gates = gates / gates.sum(axis=-1, keepdims=True)
    every = jnp.stack([swiglu(tokens, p["w_gate"][e], p["w_up"][e], p["w_down"][e])
                       for e in range(probs.shape[-1])], axis=1)  # (N, E, d)
    out = jnp.einsum("ned,ne->nd", every, gates).reshape(x.shape)
    if "shared" in p:
        out = out + swiglu(x, p["shared"]["w_gate"], p["shared"]["w_up"], p["shared"]["w_down"])
    return out


BIAS = [0.3, -0.3, 0.0, 0.15, -0.15, 0.05, 0.2, -0.1]  # a balance bias that changes the choice


@pytest.mark.parametrize("n_experts,top_k,shared,renormalize,biased",
                         [(e, k, s, r, False) for (e, k), s, r in itertools.product([(4, 1), (4, 2), (8, 3)], [0, 1],
                                                                                    [True, False])] +
                         [(e, k, s, True, True) for (e, k), s in itertools.product([(4, 1), (4, 2), (8, 3)], [0, 1])])
def test_dropless_layer_equals_every_expert_on_every_token(n_experts, top_k, shared, renormalize, biased):
    cfg = model_config(n_experts, top_k, shared, renormalize, bias_update_rate=0.001 if biased else 0.0)
    graphdef, state = nnx.split(layer(cfg))
    state = jax.tree.map(lambda w: 0.3 * w, state)  # moderate logits: no ties in the top-k
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, D))
    if biased:  # the choice changes for some tokens, not for all
        nnx.replace_by_pure_dict(state, {"balance_bias": jnp.asarray(BIAS[:n_experts])})
        params, tokens = nnx.to_pure_dict(state), x.reshape(-1, D)
        unbiased = chosen_experts({"router": params["router"]}, tokens, top_k)
        changed = np.any(chosen_experts(params, tokens, top_k) != unbiased, axis=-1)
        assert 0 < changed.sum() < len(tokens)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 8, D))
    layer_loss = jax.jit(jax.value_and_grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) * cotangent), (0, 1)))
    reference_loss = jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(dense_reference(p, x, top_k, renormalize) * cotangent), (0, 1)))
    (got, (got_state, got_x)), (want, (want_params, want_x)) = layer_loss(state, x), reference_loss(
        nnx.to_pure_dict(state), x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-4, atol=1e-5)
    got_params = nnx.to_pure_dict(got_state)
    assert jax.tree.structure(got_params) == jax.tree.structure(want_params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_params), jax.tree.leaves(want_params)):
        if "balance_bias" in str(path):  # model state, no parameter of the loss
            assert np.abs(a).max() == np.abs(b).max() == 0
            continue
        assert np.abs(b).max() > 0, path  # every weight gets a gradient from this batch
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_router_losses_and_loads_follow_their_formulas():
    cfg = model_config(n_experts=4, top_k=2)
    module = layer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, D))
    _, found = nnx.capture(module, nnx.Intermediate)(x, sow=MOE_SOWABLE)
    sown = {name: value[None] for name, value in nnx.to_pure_dict(found).items()}  # one layer
    logits = np.asarray(x.reshape(-1, D) @ module.router[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :2]
    f = np.bincount(top.ravel(), minlength=4) / top.size
    P = probs.mean(0)
    lse = np.log(np.exp(logits).sum(-1))
    moe = cfg.model.moe
    term, metrics = jax.tree.map(float, router_losses(sown, moe))
    assert metrics["moe/aux_loss"] == pytest.approx(moe.aux_loss * 4 * np.sum(f * P), rel=1e-5)
    assert metrics["moe/router_z_loss"] == pytest.approx(moe.router_z_loss * np.mean(lse**2), rel=1e-5)
    assert metrics["moe/router_entropy"] == pytest.approx(-np.mean(np.sum(probs * np.log(probs), -1)), rel=1e-5)
    assert term == pytest.approx(metrics["moe/aux_loss"] + metrics["moe/router_z_loss"], rel=1e-6)
    np.testing.assert_allclose(sown["router_load"][0], f, rtol=1e-6)
    assert float(jnp.sum(sown["router_load"])) == pytest.approx(1.0)
    assert metrics["moe/load_max"] == pytest.approx(f.max()) and metrics["moe/load_min"] == pytest.approx(f.min())
    two_layers = {name: jnp.concatenate([v, v * 0.5]) for name, v in sown.items()}  # averaged over layers
    assert router_losses(two_layers, moe)[1]["moe/router_z_loss"] == pytest.approx(
        0.75 * metrics["moe/router_z_loss"], rel=1e-6)


def test_router_terms_are_in_the_training_loss_and_reach_the_router():
    cfg = model_config()
    spec = ts.model_spec(cfg)
    params = ts.init_params(cfg, spec, jax.random.PRNGKey(0))
    batch = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 64)
    total, metrics = jax.tree.map(float, ts.loss_and_metrics(params, spec, batch, 0.0))
    assert total == pytest.approx(metrics["loss"] + metrics["moe/aux_loss"] + metrics["moe/router_z_loss"], rel=1e-6)
    router_only = lambda p: ts.loss_and_metrics(p, spec, batch, 0.0)[0] - ts.loss_and_metrics(p, spec, batch, 0.0)[1][
        "loss"]
    grad = jax.grad(router_only)(params)
    assert np.abs(grad["blocks"]["mlp"]["router"]).max() > 0  # the aux terms train the router
    # the last layer's experts and the head feed no router: the router terms give them nothing
    assert np.abs(grad["blocks"]["mlp"]["w_up"][-1]).max() == np.abs(grad["lm_head"]).max() == 0


def test_incremental_decoding_equals_the_full_forward_pass():
    cfg = model_config(shared=1)
    model = Transformer(cfg.model, nnx.Rngs(params=0), parametrization.forward_scales(cfg))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
    full = model(tokens)
    logits, caches = model.decode(tokens[:, :8], model.empty_caches(2, 12))
    steps = [logits]
    for t in range(8, 12):
        logits, caches = model.decode(tokens[:, t:t + 1], caches)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


# --- parametrization and Muon ----------------------------------------------------------------

def mup_config(width, optimizer="adamw", **parametrization_extra):
    moe = {"n_experts": 4, "top_k": 2, "expert_d_ff": 32}
    return from_dict({"model": {"d_model": width, "n_layers": 2, "n_heads": 4, "moe": moe},
                      "parametrization": {"name": "mup", "d0": 64, "L0": 2, **parametrization_extra},
                      "optimizer": {"name": optimizer}})


def test_expert_matrices_are_hidden_and_the_router_is_readout_like_under_mup():
    table = ts.model_spec(mup_config(128, readout_zero_init=True)).table
    for name, fan_in in (("w_gate", 128), ("w_up", 128), ("w_down", 32)):
        rule = table.rules[f"blocks.mlp.{name}"]
        assert (rule.role, rule.layers, rule.experts, rule.fan_in_dims) == ("hidden", 2, 4, 1)
        assert rule.lr == pytest.approx(0.5) and rule.init_std == pytest.approx(fan_in ** -0.5)
    router = table.rules["blocks.mlp.router"]
    assert (router.role, router.shape, router.experts) == ("router", (128, 4), 0)
    assert router.init_std == pytest.approx(64 ** -0.5)  # sigma/sqrt(d0), not zero despite readout_zero_init
    assert (router.multiplier, router.lr, router.eps, router.weight_decay) == pytest.approx((0.5, 1.0, 0.5, 0.0))
    assert table.rules["lm_head"].init_std == 0.0
    assert parametrization.classify(("embed", "experts"), 1) == "router"
    assert parametrization.classify(("embed", "mlp"), 1) == "hidden"
    assert table.rules["blocks.mlp.w_up"].per_layer_paths("blocks.mlp.w_up")[:5] == [
        "blocks.0.mlp.w_up.0", "blocks.0.mlp.w_up.1", "blocks.0.mlp.w_up.2", "blocks.0.mlp.w_up.3",
        "blocks.1.mlp.w_up.0"]


def test_muon_orthogonalizes_each_expert_of_each_layer_on_its_own():
    table = ts.model_spec(mup_config(64, "muon")).table
    rule = table.rules["blocks.mlp.w_down"]
    assert rule.update == "muon"
    update = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 64))
    whole = orthogonalize_kernel(update, rule, 5, jnp.float32)
    one = orthogonalize_kernel(update[1, 2], dataclasses.replace(rule, layers=0, experts=0), 5, jnp.float32)
    np.testing.assert_allclose(whole[1, 2], one, rtol=1e-5, atol=1e-6)


# --- config and refusals ---------------------------------------------------------------------

@pytest.mark.parametrize("moe,key", [({"n_experts": 2, "top_k": 3}, "model.moe.top_k"),
                                     ({"n_shared_experts": 1}, "model.moe.n_shared_experts"),
                                     ({"n_experts": -1}, "model.moe.n_experts"),
                                     ({"n_experts": 4, "aux_loss": -0.1}, "model.moe.aux_loss"),
                                     ({"n_experts": 4, "expert_d_ff": 0}, "model.moe.expert_d_ff"),
                                     ({"n_expert": 4}, "model.moe.n_expert")])
def test_bad_moe_values_are_one_line_naming_the_key(moe, key):
    with pytest.raises(ConfigError) as err:
        from_dict({"model": {"moe": moe}})
    assert err.value.key == key and "\n" not in str(err.value)


def test_the_dense_model_is_unchanged_by_the_moe_section():
    spec = ts.model_spec(from_dict({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2}}))
    assert not any("router" in path or r.experts for path, r in spec.table.rules.items())
    assert {r.role for r in spec.table.rules.values()} == set(parametrization.ROLES) - {"router", "untrained"}


# --- the real training path ------------------------------------------------------------------

MOE_TINY = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=64", "model.moe.n_shared_experts=1",
            "data.seq_len=32", "train.batch_size=8", "train.steps=20", "train.eval_every=10",
            "checkpoint.every_steps=10", "diagnostics.telemetry_every=10"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    from jaxtrain.run.loop import run

    cfg = load_config(TINY, MOE_TINY)
    workdir = tmp_path_factory.mktemp("moe_whole")
    return cfg, workdir, run(cfg, workdir)


@pytest.mark.slow
def test_a_moe_model_trains_and_reports_its_routers(moe_run):
    from jaxtrain.run.metrics import read_metrics

    cfg, workdir, result = moe_run
    rows = read_metrics(workdir / "metrics.jsonl")
    assert result.step == 20 and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    for row in rows:
        assert {"moe/aux_loss", "moe/router_z_loss", "moe/router_entropy", "moe/load_max", "moe/load_min"} <= row.keys()
        assert 0 <= row["moe/load_min"] <= 1 / 4 <= row["moe/load_max"] <= 1
    watched = [r for r in rows if "moe/load/0/0" in r]
    assert [r["step"] for r in watched] == [10, 20]
    for row in watched:
        for index in range(cfg.model.n_layers):
            assert sum(row[f"moe/load/{index}/{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_an_interrupted_moe_run_resumes_bitwise(moe_run, tmp_path):
    from jaxtrain.run.loop import run
    from jaxtrain.run.metrics import read_metrics
    from test_train import final_state, without_timing

    cfg, whole, _ = moe_run
    assert run(cfg, tmp_path, stop_after=10).step == 10
    assert run(cfg, tmp_path).resumed_from == 10
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == \
        without_timing(read_metrics(whole / "metrics.jsonl"))
    (ref, ref_data, _), (got, data, _) = final_state(cfg, whole), final_state(cfg, tmp_path)
    assert data == ref_data
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_huggingface_export_refuses_a_moe_run_with_a_shared_expert(moe_run, tmp_path):
    from jaxtrain.tools.huggingface_export import export_run

    with pytest.raises(ConfigError) as err:  # Qwen3-MoE has no shared expert
        export_run(moe_run[1], tmp_path / "hf")
    assert err.value.key == "model.moe.n_shared_experts" and not (tmp_path / "hf").exists()


# --- on meshes -------------------------------------------------------------------------------

def two_steps_on(mesh_shape, optimizer):
    """(last loss, final params) of two train steps of a small MoE model on a mesh."""
    from jaxtrain.model import sharding

    cfg = model_config(n_experts=4, top_k=2, shared=1).model_copy(update={
        "mesh": from_dict({}).mesh.model_copy(update=dict(zip(("data", "fsdp", "tensor"), mesh_shape))),
        "optimizer": from_dict({}).optimizer.model_copy(update={"name": optimizer, "lr": 0.01})})
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_shape))])
    steps = ts.build_steps(cfg, ts.model_spec(cfg), mesh)
    state = steps.init()
    for batch in np.random.default_rng(0).integers(0, 64, (2, 8, 17), dtype=np.int32):
        state, metrics = steps.train(state, jax.device_put(batch, sharding.batch_sharding(mesh)), cfg.optimizer.lr)
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.params)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sharded_moe_steps_equal_the_one_device_steps(optimizer):
    ref_loss, ref = two_steps_on((1, 1, 1), optimizer)
    for mesh_shape in ((1, 8, 1), (2, 2, 2)):
        loss, got = two_steps_on(mesh_shape, optimizer)
        assert loss == pytest.approx(ref_loss, rel=2e-4), mesh_shape
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5, err_msg=f"{mesh_shape} {path}")


@pytest.mark.slow
def test_fsdp_moves_expert_weights_not_tokens():
    """Each device dispatches its own tokens: the step's collectives are the experts' ZeRO-3
    gathers (forward and backward) and their gradients' reduce-scatter, no all-reduce of
    tokens or of whole expert gradients (a global sort made XLA all-reduce both)."""
    from jaxtrain.model import sharding
    from jaxtrain.tools.hlo_collectives import bytes_by_kind

    cfg = load_config(TINY, ["model.moe.n_experts=4", "model.moe.top_k=1", "model.moe.expert_d_ff=256",
                             "data.seq_len=64", "train.batch_size=16", "mesh.fsdp=8"])
    spec = ts.model_spec(cfg)
    moved = bytes_by_kind(ts.build_steps(cfg, spec, sharding.make_mesh(cfg.mesh)).compile_train().as_text())
    experts = sum(spec.abstract_params["blocks"]["mlp"][name].size * 4 for name in ("w_gate", "w_up", "w_down"))
    tokens = cfg.train.batch_size * cfg.data.seq_len * cfg.model.d_model * 4
    assert moved["all-reduce"] < min(experts, tokens) / 8
    assert moved["all-gather"] >= 2 * experts  # gathered in the forward and again in the backward pass
    assert moved["reduce-scatter"] >= experts / 8  # each device's shard of the expert gradients


@pytest.mark.slow
def test_a_moe_run_is_inspected_evaluated_and_sampled_from(moe_run, capsys):
    from conftest import cli_in_process
    from jaxtrain.tools.inspection import parameter_stats
    from jaxtrain.tools.saved_run import load_run

    cfg, workdir, _ = moe_run
    rows = {row["path"]: row for row in parameter_stats(load_run(workdir))}
    assert {f"blocks.{i}.mlp.w_up.{e}" for i in range(2) for e in range(4)} <= rows.keys()  # one row per expert
    assert rows["blocks.1.mlp.w_up.3"]["shape"] == (64, 64) and rows["blocks.1.mlp.router"]["role"] == "router"
    assert all(row["top_singular_value"] > 0 for path, row in rows.items() if ".mlp.w_" in path)
    status, out, err = cli_in_process(capsys, "generate", str(workdir), "--prompt", "import ", "--max-new-tokens", "8")
    assert status == 0, err
    status, out, err = cli_in_process(capsys, "eval", str(workdir))
    assert status == 0, err


def test_the_moe_section_as_a_qwen3_moe_config_and_back():
    from pathlib import Path

    from jaxtrain.huggingface import architecture

    cfg = model_config(renormalize=False, qk_norm=True)
    config = architecture.hf_config(cfg.model, max_positions=16, eos_id=0, dtype="float32")
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert [config[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                                "decoder_sparse_step", "mlp_only_layers")] == [4, 2, FF, False, 1, []]
    assert architecture.model_fields(config, Path("unused"))["moe"] == {
        "n_experts": 4, "top_k": 2, "expert_d_ff": FF, "renormalize": False, "n_shared_experts": 0}
    for settings, key in [({"shared": 1, "qk_norm": True}, "model.moe.n_shared_experts"), ({}, "model.qk_norm"),
                          ({"bias_update_rate": 0.001, "qk_norm": True}, "model.moe.bias_update_rate"),
                          ({"moe_every": 2, "qk_norm": True}, "model.moe.moe_every")]:
        with pytest.raises(ConfigError) as err:
            architecture.check_exportable(model_config(**settings).model, "jaxtrain export")
        assert err.value.key == key
