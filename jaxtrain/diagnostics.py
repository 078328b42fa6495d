"""Diagnostics for any run, every `diagnostics.every_steps` steps (never on ordinary steps).

* Top singular value of every weight matrix (each layer of a stacked one: sv/blocks.I.*),
  of the weight the forward pass uses (multiplier applied), viewed as (fan_in, fan_out). Under a width-robust parametrization
  the sublayer gains, and so these values, stay comparable across widths ("Robust
  Layerwise Scaling Rules by Proper Weight Decay Tuning", the top-singular-value check).
  Power iteration: v <- W^T W v / |W^T W v|, sigma = |W v|.
* Sharpness: the top eigenvalue of the Hessian of the training loss on the step's batch
  (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
  Stability"), by power iteration on Hessian-vector products H v = d/de grad L(theta + e v),
  reported as the Rayleigh quotient v.Hv with |v| = 1.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxtrain import parametrization
from jaxtrain.config import DiagnosticsConfig


def top_singular_value(matrix: jax.Array, iterations: int) -> jax.Array:
    v = jnp.ones((matrix.shape[1],), jnp.float32) / math.sqrt(matrix.shape[1])

    def body(_, v):
        w = matrix.T @ (matrix @ v)
        return w / (jnp.linalg.norm(w) + 1e-30)

    v = jax.lax.fori_loop(0, iterations, body, v)
    return jnp.linalg.norm(matrix @ v)


def singular_values(params: Any, table: parametrization.Table, iterations: int) -> dict[str, jax.Array]:
    effective = parametrization.effective_params(table, params)
    out = {}
    for key_path, value in jax.tree_util.tree_leaves_with_path(effective):
        path = parametrization.path_str(key_path)
        rule = table.rules[path]
        if rule.role == "vector":
            continue
        fan_in = math.prod(rule.shape[:rule.fan_in_dims])
        layers = value.reshape(-1, fan_in, math.prod(rule.shape) // fan_in).astype(jnp.float32)
        sigmas = jax.vmap(lambda matrix: top_singular_value(matrix, iterations))(layers)
        out.update({f"sv/{name}": sigma for name, sigma in zip(rule.per_layer_paths(path), sigmas, strict=True)})
    return out


def sharpness(loss_fn: Callable[[Any], jax.Array], params: Any, iterations: int, key: jax.Array) -> jax.Array:
    grad_fn = jax.grad(loss_fn)

    def hvp(v):
        return jax.jvp(grad_fn, (params,), (v,))[1]

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = treedef.unflatten([jax.random.normal(k, p.shape, jnp.float32) for k, p in zip(keys, leaves, strict=True)])
    v = jax.tree.map(lambda x: x / optax.global_norm(v), v)

    def body(_, v):
        hv = hvp(v)
        return jax.tree.map(lambda x: x / (optax.global_norm(hv) + 1e-30), hv)

    v = jax.lax.fori_loop(0, iterations, body, v)
    return optax.tree.vdot(v, hvp(v))


def make_diagnose(cfg: DiagnosticsConfig, table: parametrization.Table,
                  loss_fn: Callable[[Any, jax.Array], jax.Array]) -> Callable:
    """diagnose(params, batch, step) -> {name: scalar}; a pure function to jit."""

    def diagnose(params, batch, step):
        out = {}
        if cfg.singular_values:
            out.update(singular_values(params, table, cfg.power_iterations))
        if cfg.sharpness:
            key = jax.random.fold_in(jax.random.PRNGKey(0), step)
            out["sharpness"] = sharpness(lambda p: loss_fn(p, batch), params, cfg.power_iterations, key)
        return out

    return diagnose
