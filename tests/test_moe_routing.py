"""MoE routing beyond the layer (tests/test_moe.py holds the layer against its dense
reference): dense / MoE interleaving (model.moe.moe_every, model/block_stack.py) and the
auxiliary-loss-free balance bias (model.moe.bias_update_rate, model/moe.py), through the
model, the table, the train step, the counts and a real run that resumes."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY
from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.files import from_dict, load_config
from jaxtrain.model import block_stack, parametrization, sharding
from jaxtrain.model.moe import MOE_SOWABLE, MoE, route, update_balance_bias
from jaxtrain.model.transformer import SwiGLU, Transformer, forward_sown
from jaxtrain.run import memory
from jaxtrain.tools import dry_run, flops

D, FF, E, DENSE_FF = 32, 16, 4, 80  # DENSE_FF: model.d_ff, not (top_k + shared) * FF


def config(n_layers=4, moe_every=2, bias_update_rate=0.0, optimizer=None, **train):
    moe = {"n_experts": E, "top_k": 2, "expert_d_ff": FF, "n_shared_experts": 1, "moe_every": moe_every,
           "bias_update_rate": bias_update_rate}
    return from_dict({"model": {"d_model": D, "n_layers": n_layers, "n_heads": 2, "vocab_size": 64, "d_ff": DENSE_FF,
                                "moe": moe},
                      "optimizer": optimizer or {}, "train": {"steps": 4, "batch_size": 4, **train},
                      "data": {"seq_len": 16}})


# --- interleaving ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers,moe_every,moe_blocks", [(4, 1, (0, 1, 2, 3)), (4, 2, (1, 3)), (6, 3, (2, 5))])
def test_block_i_is_moe_iff_i_plus_one_is_a_multiple_of_moe_every(n_layers, moe_every, moe_blocks):
    cfg = config(n_layers, moe_every)
    assert cfg.model.moe.moe_blocks(n_layers) == moe_blocks  # Qwen3-MoE's decoder_sparse_step
    ids = block_stack.block_ids(cfg.model)
    assert ids[block_stack.MAIN] == moe_blocks
    assert sorted(ids.get(block_stack.DENSE, ()) + ids[block_stack.MAIN]) == list(range(n_layers))
    model = Transformer(cfg.model, nnx.Rngs(params=0), parametrization.forward_scales(cfg))
    kinds = [type(model.layer(i).mlp) for i in range(n_layers)]
    assert kinds == [MoE if i in moe_blocks else SwiGLU for i in range(n_layers)]
    stored = {name: jax.tree.leaves(nnx.state(getattr(model, name)))[0].shape[0] for name in ids}
    assert stored == {name: len(found) for name, found in ids.items()}  # one stack entry per block
    assert model.layer(0).mlp.w_up.shape == ((D, DENSE_FF) if moe_every > 1 else (E, D, FF))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_group_scan_equals_the_blocks_run_one_by_one_in_model_order(scan_layers):
    base = config(6, 3)
    model = Transformer(base.model.model_copy(update={"scan_layers": scan_layers}), nnx.Rngs(params=0),
                        parametrization.forward_scales(base))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
    names = ("mlp_rms", *MOE_SOWABLE)
    logits, sown = forward_sown(model, tokens, names)
    x, positions = model.embed_tokens(tokens), jnp.broadcast_to(jnp.arange(8), (2, 8))
    mlp_rms, loads = [], []
    for i in range(6):  # Transformer.layer(i) finds block i in its stack by block_stack.locate
        (x, _), found = nnx.capture(model.layer(i), nnx.Intermediate)(x, positions, None, sow=names)
        found = {path[-1]: variable.get_value() for path, variable in nnx.to_flat_state(found)}
        mlp_rms.append(found["mlp_rms"])
        loads += [found["router_load"]] if "router_load" in found else []
    np.testing.assert_allclose(model.logits(x), logits, rtol=1e-4, atol=1e-4)  # eager vs scanned: rounding
    np.testing.assert_allclose(sown["mlp_rms"], mlp_rms, rtol=1e-4)  # (n_layers,), in model order
    assert len(loads) == 2 and sown["router_load"].shape == (2, E)  # one row per MoE block: 2 and 5
    np.testing.assert_allclose(sown["router_load"], loads, rtol=1e-6)


def test_the_compiled_program_does_not_grow_with_depth():
    """One group (a dense block and a MoE block) is compiled whatever n_layers: the matmuls
    of the loss's compiled program are those of one group, unless the scan is unrolled."""
    def matmuls(n_layers, scan_layers=True):
        cfg = config(n_layers, 2)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"scan_layers": scan_layers})})
        spec = ts.model_spec(cfg)
        batch = jax.ShapeDtypeStruct((4, 17), jnp.int32)
        compiled = jax.jit(lambda p, b: ts.loss_and_metrics(p, spec, b, 0.0)[0]).lower(spec.abstract_params,
                                                                                         batch).compile()
        return len(re.findall(r"= \S+ dot\(", compiled.as_text()))

    assert 0 < matmuls(4) == matmuls(8) < matmuls(8, scan_layers=False)


def active_matmul_params(spec, top_k):
    """N of flops.py counted from the parameter tree itself: every matrix but the embedding,
    an expert matrix at top_k / n_experts of its size (what one token passes through)."""
    total = 0
    for path, rule in spec.table.rules.items():
        if rule.role in ("vector", "untrained", "embedding"):
            continue
        size = math.prod(spec.params_by_path()[path][1])
        total += size * top_k // rule.experts if rule.experts else size
    return total


def test_parameters_flops_and_memory_count_dense_blocks_as_dense():
    interleaved, every = config(4, 2), config(4, 1)
    spec = ts.model_spec(interleaved)
    assert flops.matmul_params(interleaved.model) == active_matmul_params(spec, 2)
    assert flops.matmul_params(every.model) == active_matmul_params(ts.model_spec(every), 2)
    d, dense_mlp, moe_mlp = D, 3 * D * DENSE_FF, 3 * D * (2 + 1) * FF + D * E  # top_k + shared experts, router
    assert flops.matmul_params(every.model) - flops.matmul_params(interleaved.model) == 2 * (moe_mlp - dense_mlp)
    plan = dry_run.plan(interleaved, devices=1, backend="cpu")
    assert plan["params_total"] == sum(math.prod(a.shape) for a in jax.tree.leaves(spec.abstract_params))
    dense_stack = sum(math.prod(shape) for path, (_, shape) in spec.params_by_path().items()
                      if path.startswith("dense_blocks.mlp."))
    assert dense_stack == 2 * 3 * d * DENSE_FF  # two dense blocks, each a SwiGLU of width d_ff
    assert "dense_blocks.*.mlp.w_up" in dry_run.format_plan(plan)
    assert memory.block_counts(interleaved) == {False: 2, True: 2} and memory.block_counts(every) == {True: 4}
    per_block = lambda cfg, moe: memory.block_bytes_per_token(cfg, "none", 1, "cpu", moe)  # noqa: E731
    b = 4  # float32 activations on cpu: 6 f b of the MLP's per token, f = d_ff or (top_k + shared) x expert_d_ff
    assert per_block(interleaved, True) - per_block(interleaved, False) == pytest.approx(6 * (3 * FF - DENSE_FF) * b)
    tokens = 4 * 16
    assert plan["memory_per_device"]["activations"] == pytest.approx(
        2 * tokens * (per_block(interleaved, False) + per_block(interleaved, True)))


def test_depth_rules_count_blocks_and_per_layer_names_are_model_indices():
    cfg = from_dict({"model": {"d_model": 64, "n_layers": 4, "n_heads": 4,
                               "moe": {"n_experts": 4, "top_k": 2, "moe_every": 2}},
                     "parametrization": {"name": "mup", "d0": 64, "L0": 2, "depth_alpha": 1.0}})
    table = ts.model_spec(cfg).table
    assert table.depth_mult == 2.0 and table.forward.residual == pytest.approx(0.5)  # 4 blocks / L0, not 2 groups
    assert table.rules["dense_blocks.attn.wq"].layers == table.rules["blocks.attn.wq"].layers == 2
    assert table.per_layer_paths("dense_blocks.attn.wq") == ["dense_blocks.0.attn.wq", "dense_blocks.2.attn.wq"]
    assert table.per_layer_paths("blocks.mlp.router") == ["blocks.1.mlp.router", "blocks.3.mlp.router"]
    assert table.per_layer_paths("blocks.mlp.w_up")[:3] == ["blocks.1.mlp.w_up.0", "blocks.1.mlp.w_up.1",
                                                            "blocks.1.mlp.w_up.2"]


@pytest.mark.parametrize("moe,key", [({"n_experts": 4, "moe_every": 3}, "model.moe.moe_every"),  # 4 layers
                                     ({"n_experts": 4, "moe_every": 0}, "model.moe.moe_every"),
                                     ({"moe_every": 2}, "model.moe.moe_every"),
                                     ({"n_experts": 4, "bias_update_rate": -0.001}, "model.moe.bias_update_rate"),
                                     ({"bias_update_rate": 0.001}, "model.moe.bias_update_rate")])
def test_bad_routing_values_are_one_line_naming_the_key(moe, key):
    with pytest.raises(ConfigError) as err:
        from_dict({"model": {"n_layers": 4, "moe": moe}})
    assert err.value.key == key and "\n" not in str(err.value)


# --- the auxiliary-loss-free balance bias -----------------------------------------------------

def test_the_bias_update_follows_its_formula_on_a_hand_made_load():
    load = jnp.array([[0.5, 0.25, 0.25, 0.0],  # mean 0.25: over, even, even, under
                      [0.1, 0.2, 0.3, 0.4]])
    bias = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.01, -0.02, 0.0, 0.5]])
    want = np.array([[-0.001, 0.0, 0.0, 0.001], [0.011, -0.019, -0.001, 0.499]])
    np.testing.assert_allclose(update_balance_bias(bias, load, 0.001), want, rtol=0, atol=1e-7)  # float32
    counts = load * 64  # counts or fractions: the same signs
    np.testing.assert_array_equal(update_balance_bias(bias, counts, 0.001), update_balance_bias(bias, load, 0.001))


def test_the_bias_alone_balances_a_skewed_router():
    """No gradient, only the rule: a router that sends most tokens to expert 0 ends up
    spreading them, and the gates stay the unbiased probabilities."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (512, 8)) + jnp.array([2.0, 1.0, 0, 0, 0, 0, 0, -1.0])
    load = lambda bias: route(logits, 2, False, bias).counts / (2 * 512)  # noqa: E731
    bias = jnp.zeros(8)
    for _ in range(300):
        bias = update_balance_bias(bias[None], load(bias)[None], 0.002)[0]
    assert float(load(jnp.zeros(8)).max()) > 0.4 and float(load(bias).max()) < 0.16
    routing = route(logits, 2, False, bias)
    np.testing.assert_array_equal(routing.gates, jnp.take_along_axis(jax.nn.softmax(logits), routing.experts, -1))


def bias_of(state):
    return np.asarray(ts.balance_bias(state.params))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_train_step_moves_the_bias_by_the_whole_steps_load_and_nothing_else(optimizer):
    cfg = config(4, 2, bias_update_rate=0.01, optimizer={"name": optimizer, "lr": 0.1, "weight_decay": 1.0},
                 microbatches=2)
    spec = ts.model_spec(cfg)
    rule = spec.table.rules["blocks.mlp.balance_bias"]
    assert (rule.role, rule.lr, rule.weight_decay, rule.update) == ("untrained", 0.0, 0.0, "none")
    mesh = sharding.make_mesh(cfg.mesh.model_copy(update={"fsdp": 2}), jax.devices()[:2])
    steps = ts.build_steps(cfg, spec, mesh)
    assert steps.shardings.params["blocks"]["mlp"]["balance_bias"].spec == jax.sharding.PartitionSpec(None, None)
    state = steps.init()
    start = {"blocks": {"mlp": {"balance_bias": jnp.array([[0.02, -0.01, 0.0, 0.03], [0.0, 0.01, -0.02, 0.0]])}}}
    state = state.replace(params=jax.device_put(with_leaves(state.params, start), steps.shardings.params))
    batch = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
    before = bias_of(state)
    load_of = lambda rows: forward_sown(ts.bind_model(spec, state.params), jnp.asarray(rows[:, :-1]),  # noqa: E731
                                        ["router_load"])[1]["router_load"]
    step_load = load_of(batch)  # microbatches take rows 0, 2 and 1, 3: together the whole batch
    halves = [load_of(batch[j::2]) for j in range(2)]
    assert any(np.any(np.sign(step_load.mean(-1, keepdims=True) - step_load) !=
                      np.sign(h.mean(-1, keepdims=True) - h)) for h in halves)  # one half's load would differ
    state, metrics = steps.train(state, jax.device_put(batch, sharding.batch_sharding(mesh)), 0.1)
    assert "expert_loads" not in metrics and float(metrics["moe/bias_abs_max"]) == pytest.approx(0.03)
    np.testing.assert_allclose(bias_of(state), before + 0.01 * np.sign(step_load.mean(-1, keepdims=True) - step_load),
                               rtol=0, atol=1e-7)


def with_leaves(params, update):
    """params with the leaves of `update` (a nested dict of some of its paths) replaced."""
    merged = dict(params)
    for key, value in update.items():
        merged[key] = with_leaves(params[key], value) if isinstance(value, dict) else value
    return merged


# --- a real run: trains, reports, resumes bitwise -------------------------------------------

ROUTED_TINY = ["model.n_layers=4", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=32",
               "model.moe.moe_every=2", "model.moe.bias_update_rate=0.01", "data.seq_len=32", "train.batch_size=16",
               "train.microbatches=2", "train.steps=6", "train.log_every=1", "train.eval_every=6",
               "checkpoint.every_steps=3", "diagnostics.telemetry_every=3"]


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory):
    from jaxtrain.run.loop import run

    cfg = load_config(TINY, ROUTED_TINY)
    workdir = tmp_path_factory.mktemp("routed_whole")
    return cfg, workdir, run(cfg, workdir)


@pytest.mark.slow
def test_an_interleaved_biased_run_trains_and_reports_each_moe_block(routed_run):
    from jaxtrain.run.metrics import read_metrics

    cfg, workdir, result = routed_run
    rows = read_metrics(workdir / "metrics.jsonl")
    assert result.step == 6 and all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert [r["moe/bias_abs_max"] for r in rows[:2]] == pytest.approx([0.0, 0.01])  # one step of 0.01 each
    watched = [r for r in rows if "moe/load/1/0" in r]
    assert [r["step"] for r in watched] == [3, 6]
    for row in watched:  # MoE blocks 1 and 3 by their model index; the dense blocks 0, 2 route nothing
        assert not any(k.startswith(("moe/load/0/", "moe/load/2/", "moe/bias/0/")) for k in row)
        for block in (1, 3):
            assert sum(row[f"moe/load/{block}/{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-5)
            biases = [row[f"moe/bias/{block}/{e}"] for e in range(4)]
            assert max(map(abs, biases)) <= 0.01 * (row["step"] - 1) + 1e-6  # at most u per step so far
        assert max(abs(row[f"moe/bias/{b}/{e}"]) for b in (1, 3) for e in range(4)) == \
            pytest.approx(row["moe/bias_abs_max"], abs=1e-7)


@pytest.mark.slow
def test_an_interrupted_interleaved_biased_run_resumes_bitwise(routed_run, tmp_path):
    from jaxtrain.run.loop import run
    from jaxtrain.run.metrics import read_metrics
    from test_train import final_state, without_timing

    cfg, whole, _ = routed_run
    assert run(cfg, tmp_path, stop_after=3).step == 3
    assert run(cfg, tmp_path).resumed_from == 3
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == \
        without_timing(read_metrics(whole / "metrics.jsonl"))
    (ref, ref_data, _), (got, data, _) = final_state(cfg, whole), final_state(cfg, tmp_path)
    assert data == ref_data
    assert np.abs(ts.balance_bias(got.params)).max() > 0  # the bias moved, and was saved and restored
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_an_interleaved_run_is_inspected_by_model_block(routed_run):
    from jaxtrain.tools.inspection import parameter_stats
    from jaxtrain.tools.saved_run import load_run

    rows = {row["path"]: row for row in parameter_stats(load_run(routed_run[1]))}
    assert {"dense_blocks.0.mlp.w_up", "dense_blocks.2.mlp.w_up", "blocks.1.mlp.w_up.3", "blocks.3.mlp.router",
            "blocks.3.mlp.balance_bias"} <= rows.keys()
    assert rows["dense_blocks.2.attn.wq"]["layer"] == 2 and rows["blocks.3.mlp.router"]["layer"] == 3
    assert rows["blocks.1.mlp.balance_bias"]["role"] == "untrained"
    assert "top_singular_value" not in rows["blocks.1.mlp.balance_bias"]
