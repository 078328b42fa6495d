"""The attention kernels against one reference, and the rule choosing among them.

The reference is softmax(scores) @ v with `attention.scores` (segment ids compared directly,
no mask array); the XLA path, the arguments jaxtrain gives cuDNN (evaluated on XLA: this
machine has no GPU) and splash (Pallas interpret mode) must match it, forward and
gradients of q, k and v, packed and unpacked, GQA and MHA, under the muP 1/d_head scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import step as ts
from jaxtrain.config.errors import ConfigError
from jaxtrain.config.files import from_dict
from jaxtrain.model import attention, execution
from jaxtrain.run import memory

B, T, N, D = 2, 128, 4, 16  # splash tiles are multiples of 128, even interpreted
SCALE = 1.0 / D  # muP


def _inputs(kv_heads: int, packed: bool):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(kv_heads + 10 * packed), 3)
    q = jax.random.normal(kq, (B, T, N, D))
    k = jax.random.normal(kk, (B, T, kv_heads, D))
    v = jax.random.normal(kv, (B, T, kv_heads, D))
    segments = jnp.array([[0] * 40 + [1] * 60 + [2] * 28, [0] * 100 + [1] * 28], jnp.int32) if packed else None
    return q, k, v, segments


def _reference(q, k, v, segments):
    probabilities = attention.weights(q, k, segments, SCALE)  # (B, N, T, T)
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return jnp.einsum("bnts,bsnh->btnh", probabilities, v)


def _against_reference(kernel, kv_heads: int, packed: bool) -> None:
    q, k, v, segments = _inputs(kv_heads, packed)
    np.testing.assert_allclose(kernel(q, k, v, segments), _reference(q, k, v, segments), atol=2e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, segments) * cotangent)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5, err_msg=f"d{name}")


CASES = pytest.mark.parametrize("kv_heads,packed", [(4, False), (2, False), (4, True), (1, True)],
                                ids=["mha", "gqa", "mha-packed", "mqa-packed"])


@CASES
def test_xla_kernel_matches_reference(kv_heads, packed):
    _against_reference(lambda q, k, v, s: attention.attend("xla", q, k, v, s, SCALE), kv_heads, packed)


@CASES
def test_cudnn_arguments_mean_the_reference(kv_heads, packed):
    """What jaxtrain passes to the cuDNN call, evaluated by XLA, is the reference attention."""
    def with_cudnn_arguments(q, k, v, segments):
        arguments = attention.dot_product_arguments(segments, SCALE)
        assert arguments["is_causal"] and arguments["scale"] == SCALE
        return jax.nn.dot_product_attention(q, k, v, **arguments, implementation="xla")
    _against_reference(with_cudnn_arguments, kv_heads, packed)


@CASES
def test_splash_kernel_matches_reference(kv_heads, packed):
    _against_reference(lambda q, k, v, s: attention.splash_attention(q, k, v, s, SCALE, interpret=True),
                       kv_heads, packed)


def test_splash_under_a_mesh_matches_reference():
    """Under shard_map: batch over data x fsdp, heads over tensor; 2 kv heads on tensor=4 are
    repeated for their queries."""
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v, segments = _inputs(2, True)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attention.splash_attention(*a, SCALE, interpret=True))(q, k, v, segments)
    np.testing.assert_allclose(out, _reference(q, k, v, segments), atol=2e-5)


def test_max_logit_sees_only_visible_keys():
    q, k, _, segments = _inputs(2, True)
    logits = attention.scores(q, k, segments, SCALE)
    assert attention.max_logit(q, k, segments, SCALE) == jnp.max(logits)
    hidden = np.asarray(segments)[:, :, None] != np.asarray(segments)[:, None, :]
    assert np.all(np.isneginf(np.asarray(logits)[np.broadcast_to(hidden[:, None], logits.shape)]))


@pytest.mark.parametrize("platform,dtype,want", [("cpu", "float32", "xla"), ("gpu", "bfloat16", "cudnn"),
                                                 ("gpu", "float32", "xla"), ("tpu", "bfloat16", "splash"),
                                                 ("tpu", "float32", "splash")])
def test_auto_resolution_table(platform, dtype, want):
    assert attention.kernel_for("auto", platform, dtype, 64, 2048) == want


def test_auto_falls_back_to_xla_where_shapes_do_not_fit():
    assert attention.kernel_for("auto", "tpu", "bfloat16", 64, 1000) == "xla"  # tiles of 128
    assert attention.kernel_for("auto", "gpu", "bfloat16", 12, 2048) == "xla"  # head_dim % 8
    assert attention.kernel_for("auto", "gpu", "bfloat16", 256, 2048) == "xla"  # head_dim > 128


@pytest.mark.parametrize("requested,platform,dtype,seq", [("cudnn", "cpu", "bfloat16", 2048),
                                                          ("cudnn", "gpu", "float32", 2048),
                                                          ("splash", "gpu", "bfloat16", 2048),
                                                          ("splash", "tpu", "bfloat16", 1000)])
def test_explicit_kernel_that_cannot_run_is_a_config_error(requested, platform, dtype, seq):
    with pytest.raises(ConfigError, match="model.attention"):
        attention.kernel_for(requested, platform, dtype, 64, seq)


def _config(**model):
    return from_dict({"model": {"d_model": 64, "n_heads": 4, "n_layers": 1, **model}, "data": {"seq_len": 256}})


def test_model_spec_resolves_for_the_target_platform():
    """dtype and attention follow the platform the step is compiled for, not this backend."""
    assert ts.model_spec(_config(), "gpu").model.model_dump(include={"dtype", "attention"}) == \
        {"dtype": "bfloat16", "attention": "cudnn"}
    assert ts.model_spec(_config(), "tpu").model.attention == "splash"
    assert ts.model_spec(_config()).model.model_dump(include={"dtype", "attention"}) == \
        {"dtype": "float32", "attention": "xla"}  # this CPU
    assert execution.resolve(_config(dtype="float32"), "gpu").model.attention == "xla"


def test_memory_model_follows_the_kernel():
    cfg = _config()
    assert memory.flash_attention(cfg, "gpu") and memory.flash_attention(cfg, "tpu")
    assert not memory.flash_attention(cfg, "cpu") and not memory.flash_attention(_config(attention="xla"), "gpu")
    heads_term = 4 * cfg.model.n_heads * cfg.data.seq_len
    gap = lambda backend: memory.block_bytes_per_token(_config(attention="xla"), "none", 1, backend) - \
        memory.block_bytes_per_token(cfg, "none", 1, backend)
    assert gap("gpu") == gap("tpu") == heads_term * 2 and gap("cpu") == 0  # bfloat16 there under dtype auto
