"""Device mesh from config, and ONE rules table per mode mapping logical axis names to
mesh axes: where parameters are stored, and where activations (and the weights a matmul
reads) live while the step computes.

Mesh axes, outermost first: `data` (pure data parallel, params replicated), `fsdp` (data
parallel with params/optimizer state sharded along `embed`, ZeRO-3 style), `expert` (expert
parallel: a mixture of experts' experts split over it, its tokens exchanged by all-to-all,
model/moe_dispatch.py; a data axis for everything else, as in DeepSpeed-MoE and GShard)
and `tensor` (Megatron-style tensor parallel over heads / MLP width / vocabulary).

Two tables, one vocabulary of names (the model names logical axes, never mesh axes):

  STORAGE_RULES   parameters, gradients and optimizer state at rest. `embed` over fsdp is
                  the ZeRO-3 shard; `layers` (the stacked blocks' leading axis) is never split;
                  `experts` over expert.
  COMPUTE_RULES   activations, and the weights as a matmul reads them. `batch` over
                  data x fsdp x expert; heads / kv_heads / mlp / vocab over tensor; `embed`
                  whole; `experts` over expert (each device computes its own experts).

`constrain(x, axes)` pins an array to its COMPUTE_RULES layout; the model calls it at the
embedding output, on q/k/v and the attention output, on the MLP hidden, at each block
output and on the logits, and on every weight it reads (after the cast to the compute
dtype). That last constraint is what makes FSDP ZeRO-3: a weight stored as (embed/fsdp, ..)
must be all-gathered over fsdp, in the compute dtype, right where a layer uses it, and its
gradient, which comes out of the matmul batch-partial, is reduce-scattered back to the
shard (XLA's SPMD partitioner emits an all-reduce + slice or a reduce-scatter for that).
The optimizer then updates shards only. Without these constraints XLA's sharding
propagation is free to keep the weight sharded on `embed` and move the activations
instead, which it did: measured before this table existed, 19x (batch 32) to 148x
(batch 256) the ZeRO-3 bytes on `configs/small.yaml` with fsdp=8 (docs/performance.md).

Mesh axis types: `AxisType.Auto` (sharding propagation fills in every array the model does
not constrain). jax >= 0.10 can also make `Explicit` axes, where the sharding is part of
each array's type and every op must be unambiguous; the measured Auto + constraints step
already reaches the ZeRO-3 / Megatron bytes (docs/performance.md, "Scaling"). Tried on
Explicit axes (constraints as `jax.sharding.reshard`), the step stops at the first op whose
output sharding is ambiguous, the embedding lookup; every such op, in the model and in
optax's per-leaf updates, would have to state its layout for no fewer bytes, so Auto is
kept. `constrain` outside a mesh context (one device, generate, notebooks) does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtrain.config.errors import ConfigError
from jaxtrain.config.moe import check_experts_split
from jaxtrain.config.schema import Config, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = dict[str, str | tuple[str, ...] | None]

# Logical axis -> mesh axis (or None = replicated), for parameters and optimizer state.
STORAGE_RULES: Rules = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "experts": "expert",  # a mixture of experts' experts (expert parallelism)
}

# ... and for activations and the weights as the matmuls read them (all-gathered over fsdp).
COMPUTE_RULES: Rules = {
    "batch": ("data", "fsdp", "expert"),
    "sequence": None,
    "embed": None,
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "experts": "expert",
}


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Resolve the -1 (fill) axis and check the product equals the device count: the sizes
    in MESH_AXES order."""
    sizes = [getattr(mesh_cfg, axis) for axis in MESH_AXES]
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
        raise ConfigError("mesh", f"{'*'.join(MESH_AXES)} = {math.prod(sizes)} "
                                  f"does not match the {n_devices} available devices")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Any,
                    rules: Rules = STORAGE_RULES) -> P:
    """Map logical axis names to a PartitionSpec under `rules`; a dim not divisible by its
    mesh axes is replicated instead (e.g. 2 kv heads on tensor=4), and no mesh axis is
    used twice. A mesh without one of MESH_AXES (one made by hand) has it of size 1."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = rules.get(name) if name else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape.get(a, 1) > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def traced_on(mesh: Mesh, fn: Callable, grad_reduce_dtype: str | None = None) -> Callable:
    """fn, traced with `mesh` as the mesh that `constrain` lays arrays out on, and with the
    weight gradients that `model.fsdp` reads summed over the batch devices in
    `grad_reduce_dtype` (None: the compute dtype). Wrap a step in this before `jax.jit`:
    both are read when jit traces it."""
    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), _reducing_in(grad_reduce_dtype):
            return fn(*args, **kwargs)
    return on_mesh


_GRAD_REDUCE_DTYPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("grad_reduce_dtype", default=None)


@contextlib.contextmanager
def _reducing_in(dtype: str | None) -> Iterator[None]:
    token = _GRAD_REDUCE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _GRAD_REDUCE_DTYPE.reset(token)


def grad_reduce_dtype(compute_dtype: Any) -> Any:
    """The dtype weight gradients are summed over the batch devices in while a step is traced
    (`traced_on`); outside one, or where it set none, the compute dtype (plain autodiff's)."""
    return jax.numpy.dtype(_GRAD_REDUCE_DTYPE.get() or compute_dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """x pinned to its COMPUTE_RULES layout on the current mesh (see the module docstring);
    `axes` names x's dimensions, or its trailing ones (a stacked weight's slice inside the
    layer scan has lost its leading `layers` axis). No mesh, or one device: x unchanged."""
    return _pinned(x, axes, COMPUTE_RULES)


def splits(axis: str, size: int) -> bool:
    """Whether the compute layout on the current mesh splits a dimension `size` long named
    `axis` (False without a mesh, or where the mesh axis does not divide it)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and logical_to_spec((axis,), (size,), mesh, COMPUTE_RULES)[0] is not None


def keep_stored(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """x pinned to its STORAGE_RULES layout: a weight before it is laid out for compute, so
    that what the backward pass keeps of it is the shard, and the gather happens in the layer."""
    return _pinned(x, axes, STORAGE_RULES)


def _pinned(x: jax.Array, axes: tuple[str | None, ...], rules: Rules) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    axes = tuple(axes)[len(axes) - x.ndim:]
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def shard_count(spec: P, mesh: Any) -> int:
    """How many pieces a PartitionSpec cuts an array into on `mesh`."""
    return math.prod(math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s))
                     for s in spec if s is not None)


def param_shardings(logical_axes: Any, abstract_params: Any, mesh: Mesh) -> Any:
    """NamedSharding per parameter from its logical axes (a tree of PartitionSpecs of names)."""
    return jax.tree.map(
        lambda axes, leaf: NamedSharding(mesh, logical_to_spec(tuple(axes), leaf.shape, mesh)),
        logical_axes, abstract_params, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh_shape: dict[str, int]) -> int:
    """How many pieces the `batch` rule cuts a batch into: data x fsdp x expert."""
    return math.prod(mesh_shape.get(axis, 1) for axis in COMPUTE_RULES["batch"])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sequences split over data x fsdp x expert (the `batch` rule); the time axis is not split."""
    return NamedSharding(mesh, P(COMPUTE_RULES["batch"], None))


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B/count, (index + 1) * B/count) of
    every global batch, read off the batch sharding itself (the rows its addressable
    devices hold), so any valid mesh over any number of processes builds the same global
    batch. Where the batch is replicated across processes (e.g. mesh.tensor spanning them)
    count is 1 and every process feeds the whole batch."""
    shards = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1))
    rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in shards.values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or batch_size % (stop - start) or start % (stop - start):
        raise ConfigError("mesh", f"process {jax.process_index()}'s devices hold rows {rows} of the "
                                  f"{batch_size}-row batch, not one contiguous block: order the mesh so each "
                                  f"process's devices are adjacent along data x fsdp x expert")
    return start // (stop - start), batch_size // (stop - start)


def check_batch_divides(cfg: Config, mesh: Mesh) -> None:
    """The batch (and its microbatches) and the experts split over the mesh, and processes
    hold whole rows."""
    check_batch_splits(cfg, dict(mesh.shape))
    process_rows(mesh, cfg.train.batch_size)


def check_batch_splits(cfg: Config, mesh_shape: dict[str, int]) -> None:
    """The arithmetic half of `check_batch_divides`, for a planned mesh (dry-run)."""
    check_experts_split(cfg.model.moe.n_experts, mesh_shape.get("expert", 1))
    shards = batch_shards(mesh_shape)
    if cfg.train.batch_size % shards:
        raise ConfigError("train.batch_size",
                          f"{cfg.train.batch_size} is not divisible by data*fsdp*expert = {shards}")
    micro = cfg.train.microbatches
    if cfg.train.batch_size % (shards * micro):
        raise ConfigError("train.microbatches",
                          f"{micro} microbatches of a {cfg.train.batch_size}-sequence batch do not split "
                          f"evenly over data*fsdp*expert = {shards}")
