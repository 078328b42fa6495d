"""FSDP's weight reads in mixed precision: weights gathered in the compute dtype, their
gradients summed over the batch devices in the reduction dtype (`train.grad_reduce_dtype`).

The policy is torchtitan FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=f32):
the float32 master shards are cast to the compute dtype and all-gathered in it; the weight
gradients come back to the shards by a reduce-scatter in float32, so the sum over the
batch devices rounds once, not once per partial sum (Micikevicius et al. 2018, "Mixed
Precision Training": updates to float32 master weights, products accumulated in float32).

Where the reduction happens is decided by XLA's SPMD partitioner, not by the program's
order: a weight gradient comes out of a matmul (x^T dy) batch-partial, and the partitioner
sums it right at that matmul's output, in the matmul's output dtype, whatever cast follows
(a convert is elementwise: the layout requested after it moves to before it). So casting
the bf16 gradient to float32 and then pinning it to the storage layout still reduces in
bf16 (measured on the TPU v5p and H100 compilers). `project` therefore computes the weight
gradient itself, as the einsum x^T dy with float32 OUTPUT (preferred_element_type; the
operands stay bf16, at bf16 matmul speed, accumulated in float32 as the hardware does
anyway). Its other half, dx, is autodiff's.

Pinning that float32 gradient to the storage layout was enough for the H100 compiler (a
float32 reduce-scatter per layer inside the layer scan), not for TPU v5p's: there the
partitioner all-reduced each layer's whole gradient and sliced the shard off (gpt350m,
remat full, batch 8: 1.33 GB/device/step of all-reduce, no reduce-scatter). So the sum is
written out: `_weight_gradient` contracts each device's own rows of x and dy under
`jax.shard_map` and reduces the partial gradient with `lax.psum_scatter` over the axis the
storage layout adds (fsdp, onto the shard) and `lax.psum` over the rest of the batch axes
(data, which replicates weights); tensor-parallel dims stay as the compute layout has them.
Measured (gpt350m, 4 layers, remat full, batch 8): tpu-v5p-8 fsdp=4 went from 323 MB of
all-reduce to 80.7 MB of float32 reduce-scatter (the storage shard, as the analytic model
books it); fsdp=2 x tensor=2 from 514 MB all-reduce + 0 reduce-scatter to 352 MB
all-reduce (the tensor-parallel activations') + 80.7 MB reduce-scatter; h100x8 (fsdp=8,
and fsdp=4 x tensor=2) is byte for byte what the pinned layout gave, 40.4 MB of float32
reduce-scatter.

`gathered` is the read alone (the embedding table, whose lookup is no matmul): its backward
casts the cotangent to the reduction dtype and pins it to the storage layout, the placement
is fixed (a reduce-scatter onto the shard) but the dtype follows the partitioner's rule.

With reduction dtype = compute dtype (float32 on CPU) both are autodiff's math: the same
products, in the same dtypes; only the layouts are pinned.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from jaxtrain.model.sharding import COMPUTE_RULES, STORAGE_RULES, constrain, grad_reduce_dtype, keep_stored, \
    logical_to_spec

Axes = tuple[str | None, ...]


def gathered(weights: Sequence[jax.Array], weight_axes: Sequence[Axes], axes: Axes, dtype: Any,
             combine: Callable[..., jax.Array] | None = None, compute_axes: Axes | None = None) -> jax.Array:
    """The stored shards of `weights` (named by `weight_axes`) cast to `dtype` and `combine`d
    (a linear rearrangement: reshape, concatenate, stack; default: the one weight as it is)
    while still in their storage layout `axes`, then laid out by the compute rules on
    `compute_axes` (default `axes`): under FSDP, the all-gather in the compute dtype."""
    read = _Read(weights, weight_axes, axes, combine, compute_axes)

    @jax.custom_vjp
    def layout(*ws: jax.Array) -> jax.Array:
        return read.compute(ws, dtype)

    def backward(_: None, cotangent: jax.Array) -> tuple[jax.Array, ...]:
        return read.to_shards(cotangent.astype(grad_reduce_dtype(dtype)))

    layout.defvjp(lambda *ws: (read.compute(ws, dtype), None), backward)
    return layout(*weights)


def project(subscripts: str, x: jax.Array, weights: Sequence[jax.Array], weight_axes: Sequence[Axes],
            axes: Axes, combine: Callable[..., jax.Array] | None = None,
            preferred_element_type: Any = None) -> jax.Array:
    """jnp.einsum(subscripts, x, W), W = `gathered(weights, ..., x.dtype, combine)`, whose
    weight gradient is the einsum of x and dy with float32 (the reduction dtype's) output,
    reduce-scattered onto the shards in that dtype (module docstring). `subscripts` is
    "x,w->y" where every index of w appears in x or y (a matmul, not a trace of w)."""
    read = _Read(weights, weight_axes, axes, combine, None)
    x_in, rest = subscripts.replace(" ", "").split(",")
    w_in, y_out = rest.split("->")
    product = lambda x, w: jnp.einsum(subscripts, x, w, preferred_element_type=preferred_element_type)  # noqa: E731

    @jax.custom_vjp
    def matmul(x: jax.Array, *ws: jax.Array) -> jax.Array:
        return product(x, read.compute(ws, x.dtype))

    def forward(x: jax.Array, *ws: jax.Array) -> tuple[jax.Array, tuple]:
        w = read.compute(ws, x.dtype)
        return product(x, w), (x, w)

    def backward(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, ...]:
        x, w = residuals  # w: a layout change's output, which no remat policy keeps (gathered again)
        dx = jax.vjp(lambda x: product(x, w), x)[1](dy)[0]
        dw = _weight_gradient(f"{x_in},{y_out}->{w_in}", x, dy.astype(jnp.promote_types(x.dtype, dy.dtype)),
                              axes, grad_reduce_dtype(x.dtype))
        return (dx, *read.to_shards(dw))

    matmul.defvjp(forward, backward)
    return matmul(x, *weights)


def _weight_gradient(subscripts: str, x: jax.Array, dy: jax.Array, axes: Axes, dtype: Any) -> jax.Array:
    """dW = einsum(`subscripts`, x, dy) in `dtype`, summed over the batch devices onto W's
    storage layout (W's dims named by `axes`' trailing names) by an explicit psum_scatter
    over the mesh axes the storage layout shards W on beyond its compute layout (fsdp), and
    a psum over the other batch axes (data), under shard_map: each device contracts its own
    rows of x and dy (the first dimension of both is the batch), W's tensor-parallel dims
    stay as the compute layout has them. No mesh, or a batch on one device: the einsum."""
    einsum = lambda x, dy: jnp.einsum(subscripts, x, dy, preferred_element_type=dtype)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return einsum(x, dy)
    x_in, rest = subscripts.split(",")
    y_out, w_in = rest.split("->")
    sizes = dict(zip(x_in, x.shape, strict=True)) | dict(zip(y_out, dy.shape, strict=True))
    w_axes, w_shape = tuple(axes)[len(axes) - len(w_in):], tuple(sizes[i] for i in w_in)
    names = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)  # noqa: E731
    batch = names(logical_to_spec(("batch",), (x.shape[0],), mesh, COMPUTE_RULES)[0])
    compute = logical_to_spec(w_axes, w_shape, mesh, COMPUTE_RULES)
    storage = logical_to_spec(w_axes, w_shape, mesh, STORAGE_RULES)
    scatters = [(dim, tuple(a for a in names(s) if a not in names(c))) for dim, (c, s) in enumerate(zip(compute, storage))]
    scatters = [(dim, extra) for dim, extra in scatters if extra]
    scattered = {a for _, extra in scatters for a in extra}
    if not batch or not scattered <= set(batch) or any(not set(names(c)) <= set(names(s)) for c, s in zip(compute, storage)):
        return einsum(x, dy)
    by_index = dict(zip(w_in, compute))
    spec = lambda index: P(batch, *(by_index.get(i) for i in index[1:]))  # noqa: E731

    def local(x: jax.Array, dy: jax.Array) -> jax.Array:
        grad = einsum(x, dy)
        for dim, extra in scatters:
            grad = jax.lax.psum_scatter(grad, extra, scatter_dimension=dim, tiled=True)
        summed = tuple(a for a in batch if a not in scattered)
        return jax.lax.psum(grad, summed) if summed else grad

    return jax.shard_map(local, mesh=mesh, in_specs=(spec(x_in), spec(y_out)), out_specs=storage)(x, dy)


class _Read:
    """The layouts of one weight read: storage shards -> cast, combined -> compute layout,
    and the transpose of that path from a cotangent to the shards."""

    def __init__(self, weights: Sequence[jax.Array], weight_axes: Sequence[Axes], axes: Axes,
                 combine: Callable[..., jax.Array] | None, compute_axes: Axes | None):
        self.shapes = [(w.shape, w.dtype) for w in weights]
        self.weight_axes, self.axes = list(weight_axes), axes
        self.combine = combine or (lambda weight: weight)
        self.compute_axes = axes if compute_axes is None else compute_axes

    def stored(self, ws: Sequence[jax.Array], dtype: Any) -> jax.Array:
        cast = [keep_stored(w, w_axes).astype(dtype) for w, w_axes in zip(ws, self.weight_axes, strict=True)]
        return keep_stored(self.combine(*cast), self.axes)

    def compute(self, ws: Sequence[jax.Array], dtype: Any) -> jax.Array:
        return constrain(self.stored(ws, dtype), self.compute_axes)

    def to_shards(self, cotangent: jax.Array) -> tuple[jax.Array, ...]:
        """A cotangent of the combined weight (any layout), summed onto the storage layout in
        its own dtype, then taken back through the rearrangement to each weight's shard."""
        summed = keep_stored(cotangent, self.axes)
        like = [jax.ShapeDtypeStruct(shape, cotangent.dtype) for shape, _ in self.shapes]
        grads = jax.linear_transpose(lambda *ws: self.stored(ws, cotangent.dtype), *like)(summed)
        return tuple(keep_stored(g.astype(dtype), w_axes)
                     for g, (_, dtype), w_axes in zip(grads, self.shapes, self.weight_axes, strict=True))
