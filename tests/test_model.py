"""Model properties: causality, logical axes on every parameter, the loss formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtrain import step as ts
from jaxtrain.config.files import from_dict
from jaxtrain.model.parametrization import forward_scales
from jaxtrain.model.transformer import Transformer

VARIANTS = {
    "mha": {},
    "gqa+qk_norm": {"n_kv_heads": 2, "qk_norm": True},
    "mqa+bf16": {"n_kv_heads": 1, "dtype": "bfloat16"},
}


def build(**model):
    cfg = from_dict({"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, **model}})
    return cfg, Transformer(cfg.model, nnx.Rngs(params=jax.random.PRNGKey(0)), forward_scales(cfg))


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_changing_future_tokens_leaves_past_logits_unchanged(variant):
    _, model = build(**VARIANTS[variant])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, 256)
    t = 13
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 256)
    before, after = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(before[:, : t + 1]), np.asarray(after[:, : t + 1]))
    assert not np.allclose(before[:, t + 1:], after[:, t + 1:])  # the future did change


def test_past_tokens_do_change_later_logits():
    _, model = build()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, 256)
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % 256)
    assert not np.allclose(model(tokens)[:, -1], model(changed)[:, -1])


def test_every_parameter_has_one_logical_name_per_dimension():
    cfg, _ = build(n_kv_heads=2, qk_norm=True)
    spec = ts.model_spec(cfg)
    names = jax.tree.leaves(spec.logical_axes, is_leaf=lambda x: isinstance(x, P))
    shapes = jax.tree.leaves(spec.abstract_params)
    assert len(names) == len(shapes) > 0
    known = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    paths = [ts.parametrization.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(spec.abstract_params)[0]]
    for path, axes, leaf in zip(paths, names, shapes, strict=True):
        assert len(axes) == leaf.ndim and set(axes) <= known | {"layers"}, (axes, leaf.shape)
        # the blocks' weights, and only they, are stored stacked: one leading layers axis
        stacked = path.startswith("blocks.")
        assert (axes[0] == "layers" and leaf.shape[0] == cfg.model.n_layers) == stacked, path
        assert "layers" not in axes[1:]


def test_loss_is_cross_entropy_plus_z_loss():
    cfg, _ = build()
    spec = ts.model_spec(cfg)
    params = ts.init_params(cfg, spec, jax.random.PRNGKey(0))
    batch = jax.random.randint(jax.random.PRNGKey(2), (2, 17), 0, 256)
    logits = ts.bind_model(spec, params)(batch[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    lse = jax.nn.logsumexp(logits, axis=-1)
    assert 4.0 < float(ce) < 7.0  # near ln(256) = 5.55 at init: the std came from the table
    total, metrics = ts.loss_and_metrics(params, spec, batch, 1e-2)
    assert float(metrics["loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(total) == pytest.approx(float(ce + 1e-2 * jnp.mean(lse**2)), rel=1e-5)


def test_dropout_uses_the_key_and_is_off_without_it():
    _, model = build(dropout=0.5)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, 256)
    np.testing.assert_array_equal(model(tokens), model(tokens))
    a = model(tokens, dropout_key=jax.random.PRNGKey(0))
    b = model(tokens, dropout_key=jax.random.PRNGKey(1))
    assert not np.allclose(a, b)


def test_cluster_example_is_about_350m_parameters():
    from conftest import REPO
    from jaxtrain.config.files import load_config

    spec = ts.model_spec(load_config(REPO / "configs" / "gpt350m.yaml"))  # abstract shapes only
    n_params = sum(leaf.size for leaf in jax.tree.leaves(spec.abstract_params))
    assert 300e6 < n_params < 420e6, n_params
