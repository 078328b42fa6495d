"""The same train step on different meshes gives the same loss and parameters."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain import step as ts
from jaxtrain.config.files import from_dict
from jaxtrain.model import sharding

MESHES = {  # (data, fsdp, tensor)
    "1x1": (1, 1, 1),
    "data8": (8, 1, 1),
    "fsdp2xtensor4": (1, 2, 4),
    "fsdp4xtensor2": (1, 4, 2),
    "data2xfsdp2xtensor2": (2, 2, 2),
}
# Float32 on CPU; the meshes only change the order of reductions.
RTOL, ATOL = 2e-4, 2e-5


def config(data, fsdp, tensor):
    return from_dict({
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "train": {"batch_size": 16, "steps": 10},
        "optimizer": {"lr": 1e-3},
    })


def two_steps(mesh_shape):
    cfg = config(*mesh_shape)
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n])
    spec = ts.model_spec(cfg)
    steps = ts.build_steps(cfg, spec, mesh)
    state, step = steps.init(), steps.train
    batches = np.random.default_rng(0).integers(0, 256, (2, 16, 33), dtype=np.int32)
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)), cfg.optimizer.lr)
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def reference():
    return two_steps(MESHES["1x1"])


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MESHES if m != "1x1"])
def test_step_matches_single_device(name, reference):
    ref_losses, ref_state = reference
    losses, state = two_steps(MESHES[name])
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    for ref, got in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=RTOL, atol=ATOL)


def test_params_and_moments_are_actually_sharded():
    _, state = two_steps(MESHES["fsdp2xtensor4"])
    w_up = state.params["blocks"]["mlp"]["w_up"]  # stacked: (layers, embed, mlp)
    assert w_up.sharding.spec == P(None, "fsdp", "tensor")
    assert w_up.addressable_shards[0].data.shape == (2, 64 // 2, w_up.shape[2] // 4)
    wk = state.params["blocks"]["attn"]["wk"]  # 2 kv heads cannot split over tensor=4
    assert wk.sharding.spec == P(None, "fsdp", None, None)
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == w_up.shape]
    assert moments and all(m.sharding.spec == P(None, "fsdp", "tensor") for m in moments)


def test_mesh_fill_axis():
    assert sharding.mesh_shape(config(2, -1, 2).mesh, 8) == (2, 2, 1, 2)  # data, fsdp, expert, tensor
