"""The parametrization table: roles from logical axes, and init and optimizer following it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import step as ts
from jaxtrain.config.files import from_dict
from jaxtrain.model import parametrization
from jaxtrain.optim.optimizer import make_optimizer
from jaxtrain.optim.schedules import make_schedule

EXPECTED_ROLES = {  # by parameter name, to check the axis-based classification against
    "embed": "embedding", "lm_head": "readout", "wq": "hidden", "wk": "hidden", "wv": "hidden",
    "wo": "hidden", "w_gate": "hidden", "w_up": "hidden", "w_down": "hidden", "scale": "vector",
    "router": "router",  # with model.moe (its experts' w_gate, w_up, w_down are hidden)
    "balance_bias": "untrained",  # with model.moe.bias_update_rate: state, not a parameter of the loss
}
MOE = {"n_experts": 4, "top_k": 2, "n_shared_experts": 1}
BIASED_MOE = {**MOE, "bias_update_rate": 0.001, "moe_every": 2}


def config(width, name="mup", depth=2, moe=None, **extra):
    return from_dict({
        "model": {"d_model": width, "n_layers": depth, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True,
                  "moe": moe or {}},
        "parametrization": {"name": name, "d0": 64, "L0": 2, **extra},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0, "clip_norm": 0.0},
        "schedule": {"name": "constant"},
        "train": {"steps": 10},
    })


@pytest.mark.parametrize("moe", [None, MOE, BIASED_MOE], ids=["dense", "moe", "interleaved-biased-moe"])
@pytest.mark.parametrize("name", ["sp", "mup", "ntk"])
def test_every_parameter_has_exactly_one_role_from_its_axes(name, moe):
    spec = ts.model_spec(config(128, name, moe=moe))
    paths = [parametrization.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(spec.abstract_params)]
    assert sorted(paths) == sorted(spec.table.rules)  # full coverage, no extras, no duplicates
    for path, rule in spec.table.rules.items():
        assert rule.role == EXPECTED_ROLES[path.split(".")[-1]], path
    # a dense model has no router; a MoE model has every role, the untrained one with a balance bias
    absent = {"router", "untrained"} if moe is None else set() if moe.get("bias_update_rate") else {"untrained"}
    assert {r.role for r in spec.table.rules.values()} == set(parametrization.ROLES) - absent


def test_roles_come_from_axes_not_names():
    assert parametrization.classify(("embed", "mlp"), 1) == "hidden"
    assert parametrization.classify(("vocab", "embed"), 1) == "embedding"
    assert parametrization.classify(("embed", "vocab"), 1) == "readout"
    assert parametrization.classify(("heads", "head_dim", "embed"), 2) == "hidden"
    assert parametrization.classify(("mlp",), 0) == "vector"
    with pytest.raises(ValueError):
        parametrization.classify(("vocab", "vocab"), 1)  # nothing grows with width: no role


def first_update(cfg):
    """Initial params and the size of the first AdamW update of every parameter."""
    spec = ts.model_spec(cfg)
    tx = make_optimizer(cfg.optimizer, spec.table)
    lr = float(make_schedule(cfg)(0))
    params = jax.jit(lambda key: ts.init_params(cfg, spec, key))(jax.random.PRNGKey(0))
    batch = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, 256)

    @jax.jit  # one compiled call instead of thousands of eager ops
    def update(params):
        grads = jax.grad(lambda p: ts.loss_and_metrics(p, spec, batch, 0.0)[0])(params)
        return tx.update(grads, tx.init(params), params, learning_rate=lr)[0]

    return spec, params, update(params)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sp", "mup"])
def test_init_std_and_learning_rates_follow_the_table_across_widths(name):
    lr = 1e-2
    measured = {}
    for width in (64, 256):
        spec, params, updates = first_update(config(width, name))
        flat_p = dict(jax.tree_util.tree_leaves_with_path(params))
        flat_u = dict(jax.tree_util.tree_leaves_with_path(updates))
        for key_path, value in flat_p.items():
            path = parametrization.path_str(key_path)
            rule = spec.table.rules[path]
            if rule.role != "vector":
                assert float(jnp.std(value)) == pytest.approx(rule.init_std, rel=0.1), path
            # Adam's first step is lr * g / (|g| + eps): magnitude lr * lr_mult where g != 0.
            moved = np.abs(np.asarray(flat_u[key_path]))
            moved = moved[moved > 0]
            assert np.median(moved) == pytest.approx(lr * rule.lr, rel=0.02), path
            measured[width, path] = (rule.init_std, rule.lr)
    m = 256 / 64
    hidden = "blocks.mlp.w_up"
    std_64, lr_64 = measured[64, hidden]
    std_256, lr_256 = measured[256, hidden]
    assert std_256 == pytest.approx(std_64 / math.sqrt(m))  # fan_in grew 4x in both
    assert lr_256 == pytest.approx(lr_64 / m if name == "mup" else lr_64)
    assert measured[256, "embed"] == measured[64, "embed"]  # embedding: constant std and LR
    readout_std = measured[256, "lm_head"][0] / measured[64, "lm_head"][0]
    assert readout_std == pytest.approx(1.0 if name == "mup" else 1 / math.sqrt(m))


def test_mup_multipliers_and_base_width_equivalence():
    wide = ts.model_spec(config(256, "mup")).table
    assert wide.rules["lm_head"].multiplier == pytest.approx(64 / 256)
    assert wide.forward.attn_scale == pytest.approx(math.sqrt(16) / 64)  # sqrt(d_head0) / d_head
    base_mup, base_sp = ts.model_spec(config(64, "mup")).table, ts.model_spec(config(64, "sp")).table
    assert base_mup.rules == base_sp.rules and base_mup.forward == base_sp.forward


def test_attention_scale_anchored_to_a_fixed_head_size():
    """Widening by heads (d_head fixed at head_dim0): muP's 1/d_head rule is then SP's
    1/sqrt(d_head) at every width; without head_dim0 the base is d0/n_heads."""
    cfg = lambda **extra: from_dict({
        "model": {"d_model": 256, "n_layers": 2, "n_heads": 16},
        "parametrization": {"name": "mup", "d0": 64, "L0": 2, **extra}})
    assert ts.model_spec(cfg(head_dim0=16)).table.forward.attn_scale == pytest.approx(1 / 4)
    assert ts.model_spec(cfg()).table.forward.attn_scale == pytest.approx(math.sqrt(64 / 16) / 16)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_depth_scaling_rules(alpha):
    table = ts.model_spec(config(64, "mup", depth=8, depth_alpha=alpha)).table
    r = 8 / 2
    assert table.forward.residual == pytest.approx(r**-alpha)
    assert table.rules["blocks.attn.wq"].lr == pytest.approx(r ** (alpha - 1))
    assert table.rules["blocks.attn.wq"].eps == pytest.approx(r**-alpha)
    assert table.rules["embed"].lr == 1.0


@pytest.mark.slow
def test_weight_decay_width_exponent_and_mode():
    cfg = config(256, "mup", gamma=0.5)
    table = ts.model_spec(cfg).table
    assert table.rules["blocks.mlp.w_down"].weight_decay == pytest.approx(2.0)  # (256/64)^0.5
    assert table.rules["final_norm.scale"].weight_decay == 0.0  # vector-like: not decayed
    raw = cfg.to_dict()
    raw["optimizer"].update(weight_decay=0.1, weight_decay_mode="independent", lr=1.0)
    spec = ts.model_spec(from_dict(raw))
    tx = make_optimizer(from_dict(raw).optimizer, spec.table)
    lr = float(make_schedule(from_dict(raw))(0))
    params = ts.init_params(from_dict(raw), spec, jax.random.PRNGKey(0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params, learning_rate=lr)  # zero gradients: only decay acts
    w = params["blocks"]["mlp"]["w_down"]
    # independent: -(lr(t)/eta) * lr_R * lambda * m^gamma * theta with muP's lr_R = 1/m: the
    # coupled coefficient lambda/eta * m^gamma, so gamma means what it means in coupled mode
    np.testing.assert_allclose(updates["blocks"]["mlp"]["w_down"], -0.1 * 2.0 / 4 * w, rtol=1e-5)
    np.testing.assert_array_equal(updates["final_norm"]["scale"], 0.0)


def test_table_differences_are_named():
    a = ts.model_spec(config(128, "mup")).table.to_json()
    b = ts.model_spec(config(128, "mup", gamma=1.0)).table
    message = parametrization.describe_difference(a, b.to_json())
    assert "weight_decay" in message and "blocks." in message
    assert parametrization.describe_difference(a, a) is None
