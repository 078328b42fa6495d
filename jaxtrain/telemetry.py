"""Stability telemetry, computed inside the train step every `diagnostics.telemetry_every`
steps (a second compiled variant of the step; ordinary steps do none of this work).

The signals that precede the instabilities of "Small-scale proxies for large-scale
Transformer training instabilities" (Wortsman et al. 2023), all on the step's batch:

  max_attn_logit/<layer>   max over heads, queries and visible keys of scale * q.k, with
                           the params before the update; attention-logit growth is what
                           QK-norm prevents
  log_z_mean, log_z_std    statistics of log Z = logsumexp(output logits) over all
                           positions; output-logit divergence (log Z drifting from 0) is
                           what z-loss prevents
  grad_norm/<role>         ||g_R|| over the parameters of each role (the global norm is
                           `grad_norm`)
  update_rms/<role>        RMS(theta_after - theta_before) over the role: the step's size
                           (under Muon, the hidden role's is lr(t) * lr_R * muon_scale * RMS(O))
  update_rms_ratio/<role>  RMS(theta_after - theta_before) / RMS(theta_before) over the
                           role: the relative size of the step each role takes (inf while
                           a zero-initialized role is still exactly zero)
  param_norm/<role>        ||theta_R|| after the update
Roles are those of the parametrization table (embedding, hidden, readout, vector).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtrain.model import Transformer


def _sums_by_role(tree: Any, labels: Any) -> dict[str, tuple[jax.Array, int]]:
    """role -> (sum of squares, number of entries) over the leaves of that role."""
    sums: dict[str, tuple[jax.Array, int]] = {}
    for leaf, role in zip(jax.tree.leaves(tree), jax.tree.leaves(labels), strict=True):
        total, count = sums.get(role, (jnp.float32(0), 0))
        sums[role] = (total + jnp.sum(jnp.square(leaf.astype(jnp.float32))), count + leaf.size)
    return sums


def forward_telemetry(model: Transformer, tokens: jax.Array) -> dict[str, jax.Array]:
    """Max attention logit per layer and log Z statistics of one no-dropout forward pass."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed_tokens(tokens)
    out = {}
    for i in range(model.cfg.n_layers):
        block = model.layer(i)
        out[f"max_attn_logit/{i}"] = block.attn.max_logit(block.attn_norm(x), positions)
        x, _ = block(x, positions, None)
    log_z = jax.nn.logsumexp(model.logits(x), axis=-1)
    out["log_z_mean"], out["log_z_std"] = jnp.mean(log_z), jnp.std(log_z)
    return out


def optimizer_telemetry(before: Any, after: Any, grads: Any, labels: Any) -> dict[str, jax.Array]:
    """Per-role gradient norm, update/parameter RMS ratio and parameter norm."""
    out = {}
    update = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), after, before)
    grad_sums, update_sums = _sums_by_role(grads, labels), _sums_by_role(update, labels)
    before_sums, after_sums = _sums_by_role(before, labels), _sums_by_role(after, labels)
    for role in sorted(grad_sums):
        out[f"grad_norm/{role}"] = jnp.sqrt(grad_sums[role][0])
        update_rms = jnp.sqrt(update_sums[role][0] / update_sums[role][1])
        param_rms = jnp.sqrt(before_sums[role][0] / before_sums[role][1])
        out[f"update_rms/{role}"] = update_rms
        out[f"update_rms_ratio/{role}"] = jnp.where(param_rms > 0, update_rms / param_rms, jnp.inf)
        out[f"param_norm/{role}"] = jnp.sqrt(after_sums[role][0])
    return out
