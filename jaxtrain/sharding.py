"""Device mesh from config, logical-axis -> mesh-axis rules, and shardings for state and batch.

Mesh axes, outermost first: `data` (pure data parallel, params replicated), `fsdp` (data
parallel with params/optimizer state sharded along `embed`, ZeRO-3 style) and `tensor`
(Megatron-style tensor parallel over heads / MLP width / vocabulary).

The mesh uses `AxisType.Auto` on purpose (jax >= 0.10 makes `jax.make_mesh` default to
Explicit axes, where shardings become part of every array type and each op must be
unambiguous). With Auto axes we pin shardings only at the compiled boundary (jit
in/out shardings for state and batch) and let XLA's propagation place the activations.
That keeps the model code free of sharding annotations and works on CPU, GPU and TPU.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtrain.config import Config, MeshConfig
from jaxtrain.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None = replicated). One table for the whole model.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
}


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the -1 (fill) axis and check the product equals the device count."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ConfigError("mesh", f"only one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if n_devices % known:
            raise ConfigError(f"mesh.{MESH_AXES[fills[0]]}",
                              f"-1 cannot fill: {n_devices} devices are not divisible by {known}")
        sizes[fills[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError("mesh", f"data*fsdp*tensor = {math.prod(sizes)} "
                                  f"does not match the {n_devices} available devices")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """Map logical axis names to a PartitionSpec; a dim not divisible by its mesh axes is
    replicated instead (e.g. 2 kv heads on tensor=4), and no mesh axis is used twice."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = LOGICAL_RULES.get(name) if name else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(logical_axes: Any, abstract_params: Any, mesh: Mesh) -> Any:
    """NamedSharding per parameter from its logical axes (a tree of PartitionSpecs of names)."""
    return jax.tree.map(
        lambda axes, leaf: NamedSharding(mesh, logical_to_spec(tuple(axes), leaf.shape, mesh)),
        logical_axes, abstract_params, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sequences split over data x fsdp (the `batch` rule); the time axis is not split."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], None))


def check_batch_divides(cfg: Config, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % shards:
        raise ConfigError("train.batch_size",
                          f"{cfg.train.batch_size} is not divisible by data*fsdp = {shards}")
    micro = cfg.train.microbatches
    if cfg.train.batch_size % (shards * micro):
        raise ConfigError("train.microbatches",
                          f"{micro} microbatches of a {cfg.train.batch_size}-sequence batch do not split "
                          f"evenly over data*fsdp = {shards}")
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError("train.batch_size",
                          f"{cfg.train.batch_size} is not divisible by {jax.process_count()} processes")
