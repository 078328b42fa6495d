"""Muon's update direction for the hidden matrices: Nesterov momentum, orthogonalized.

    M_t = mu * M_{t-1} + G_t            momentum (optax.trace)
    N_t = G_t + mu * M_t                its Nesterov form
    O_t = NS(N_t) ~ U V^T               for N_t = U S V^T: every singular value moved near 1

(Jordan et al. 2024, "Muon: An optimizer for hidden layers"; Liu et al. 2025, "Muon is
Scalable for LLM Training"). N_t is Jordan's lerp form ((1 - mu) G + mu * EMA) divided by
(1 - mu); the normalization below removes that constant. What multiplies O_t (the table's
muon_scale, learning rate and decay) is applied by the chain in optimizer.py.

Newton-Schulz, quintic: X_0 = N / (||N||_F + eps), so every singular value is <= 1, then
`steps` times

    X <- a X + (b A + c A^2) X,   A = X X^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)

Each iteration keeps the singular vectors and maps every singular value s to
p(s) = a s + b s^3 + c s^5. The coefficients (Jordan et al.) make p'(0) = a large, so
small singular values grow fast. They do not converge to 1: after 5 iterations every
singular value of X_0 at or above NS_BAND_FROM ends in NS_BAND, and none ends above its
top (tests/test_muon.py checks square, wide, tall and stacked matrices). The iteration
works on the wide orientation (rows <= columns), where A is the smaller Gram matrix.

Which matrix is orthogonalized: a kernel's fan-in axes (the table's `fan_in_dims` leading
axes) against its fan-out axes, i.e. the linear map the layer applies. wq
(embed, heads, head_dim) is one d x (H * head_dim) matrix, not H separate heads: the
spectral condition the scale rules rely on is about that map's norm. A stacked weight's
leading `layers` axis is a batch axis: every layer's matrix is orthogonalized on its own,
and so is every expert's of a mixture of experts (the `experts` axis after it, [layers,
experts, fan_in, fan_out]: one Newton-Schulz per expert, as each is its own linear map).

On a mesh, the iterations run on whole matrices, the layers split over a mesh axis
(`layer_spec`): the momentum moves into that layout and the update back, once per step,
whatever the number of iterations (HLO bytes in tests/test_muon.py and docs/muon.md), and
the sharded step equals the one-device step (tests/test_muon.py).

Why not optax.contrib.scale_by_muon: it runs the iterations in the momentum's dtype (there
is no separate precision setting, `optimizer.muon_ns_dtype` here), its orthogonalizer is
not public API, and its width scalings are fixed formulas of the shape, where ours come
from the parametrization table. Momentum, decay and scaling are optax's own transforms.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxtrain.model.parametrization import ParamRule, Table, path_str

QUINTIC = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024
NS_EPS = 1e-7  # keeps an all-zero momentum (a step with no gradient) at zero
NS_BAND_FROM = 3e-3  # singular values of X_0 = N / ||N||_F from here on ...
NS_BAND = (0.68, 1.21)  # ... end in this band after 5 iterations (the p^5 image of [3e-3, 1])


def newton_schulz(x: jax.Array, steps: int = 5, dtype: Any = jnp.float32,
                  layout: Callable[[jax.Array], jax.Array] = lambda y: y) -> jax.Array:
    """The quintic iteration over the last two axes of x (leading axes are a batch);
    computed in `dtype`, returned in x's dtype. `layout` pins every iterate (and Gram
    matrix) to a sharding, so that XLA cannot re-shard them between iterations."""
    a, b, c = QUINTIC
    wide = x.shape[-2] <= x.shape[-1]
    y = layout(x.astype(dtype) if wide else jnp.swapaxes(x, -1, -2).astype(dtype))
    norm = jnp.sqrt(jnp.sum(jnp.square(y.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    y = (y / (norm + NS_EPS).astype(dtype)).astype(dtype)
    for _ in range(steps):
        gram = layout(y @ jnp.swapaxes(y, -1, -2))
        y = layout(a * y + (b * gram + c * gram @ gram) @ y)
    return (y if wide else jnp.swapaxes(y, -1, -2)).astype(x.dtype)


def orthogonalize_kernel(update: jax.Array, rule: ParamRule, steps: int, dtype: Any) -> jax.Array:
    """A kernel of the table's shape (with its leading layers axis when stacked) viewed as
    [layers,] fan_in x fan_out matrices, orthogonalized and given back in its own shape."""
    fan_in = math.prod(rule.shape[:rule.fan_in_dims])
    batch = tuple(size for size in (rule.layers, rule.experts) if size)
    matrices = update.reshape(*batch, fan_in, -1)
    spec = layer_spec(rule.layers, len(batch) + 1, rule.experts) if rule.layers else None
    layout = (lambda y: y) if spec is None else (lambda y: jax.lax.with_sharding_constraint(y, spec))
    return newton_schulz(matrices, steps, dtype, layout).reshape(update.shape)


def layer_spec(layers: int, trailing: int = 2, experts: int = 0) -> P | None:
    """The layout Newton-Schulz runs in for (layers, fan_in, fan_out) momenta (`trailing`
    axes after layers: 2, or 3 for (layers, experts, fan_in, fan_out)): each matrix
    whole on one device, the layers split over the first mesh axis (fsdp, data, tensor)
    that divides their number, so the devices along it orthogonalize a share of the layers
    each and the momentum moves once, by an all-to-all (measured in docs/muon.md). Left to
    itself, XLA re-gathered the (embed/fsdp)-sharded matrices in every iteration (6.7x
    AdamW's all-gather bytes); split over two axes at once, it moved them by all-gathers.
    When no axis divides the layers, the matrices are gathered whole once. A mixture of
    experts' matrices (`experts` > 0) keep their experts split over the `expert` mesh axis,
    where they are stored, so that only the layers move. None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    axis = next((a for a in ("fsdp", "data", "tensor") if mesh.shape[a] > 1 and layers % mesh.shape[a] == 0), None)
    if experts and mesh.shape.get("expert", 1) > 1 and experts % mesh.shape["expert"] == 0:
        return P(axis, "expert", *[None] * (trailing - 1))
    return P(axis, *[None] * trailing)


def orthogonalize(table: Table, steps: int, dtype: Any) -> optax.GradientTransformation:
    """updates -> muon_scale_R * NS(updates), per parameter, by the table's rows (meant for
    the Muon role's subtree of an optax.partition: other leaves are absent there)."""

    def update_fn(updates, state, params=None):
        del params

        def one(key_path, update):
            rule = table.rules[path_str(key_path)]
            return rule.muon_scale * orthogonalize_kernel(update, rule, steps, dtype)

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def muon_direction(table: Table, momentum: float, steps: int, dtype: Any) -> optax.GradientTransformation:
    """Gradients -> muon_scale_R * O_t (momentum kept in float32, as the parameters)."""
    return optax.chain(optax.trace(decay=momentum, nesterov=True), orthogonalize(table, steps, dtype))
