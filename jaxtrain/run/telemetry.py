"""What a run measures about itself besides the loss: stability telemetry and diagnostics.

None of it is part of the plain train step. run/loop.py hands `step_metrics(spec)` to the
step builder as its extra metrics when `diagnostics.telemetry_every` > 0 (a second
compiled variant of the step, run every that many steps), and `compile_diagnose` is a
separate compiled function, run every `diagnostics.every_steps` steps.

Stability telemetry: the signals that precede the instabilities of "Small-scale proxies
for large-scale Transformer training instabilities" (Wortsman et al. 2023), on the step's
batch. The forward ones are sown by the model's own forward pass (`Transformer.__call__`,
params before the update, no dropout), with the document mask when `data.packing` is on:

  max_attn_logit/<layer>   max over heads, queries and visible keys of scale * q.k;
                           attention-logit growth is what QK-norm prevents
  log_z_mean, log_z_std    statistics of log Z = logsumexp(output logits) over all
                           positions; output-logit divergence (log Z drifting from 0) is
                           what z-loss prevents
  moe/load/<layer>/<e>     with model.moe: the fraction of MoE block <layer>'s (its index
                           in the model) token-to-expert assignments routed to expert e
                           (every step's moe/* metrics, model/moe.py, summarise them
                           over layers)
  moe/bias/<layer>/<e>     with model.moe.bias_update_rate > 0: expert e's balance bias in
                           that block, the one this step's routing added (moe/bias_abs_max,
                           every step, is the largest |b| over blocks and experts)
  grad_norm/<role>         ||g_R|| over the parameters of each role (the global norm is
                           `grad_norm`)
  update_rms/<role>        RMS(theta_after - theta_before) over the role: the step's size
                           (under Muon, the hidden role's is lr(t) * lr_R * muon_scale * RMS(O))
  update_rms_ratio/<role>  RMS(theta_after - theta_before) / RMS(theta_before) over the
                           role: the relative size of the step each role takes (inf while
                           a zero-initialized role is still exactly zero)
  param_norm/<role>        ||theta_R|| after the update
  sigma_max/<role>         the largest top singular value over the role's matrices (every
                           layer of a stacked one, as (fan_in, fan_out)), of the stored
                           parameter after the update, by power iteration
  sigma_ratio/<role>       sigma_max/<role> / (sqrt(eta_R / lambda_R) * d^0.75), for the
                           AdamW roles with weight decay (`sigma_reference`)
Roles are those of the parametrization table (embedding, hidden, readout, router, vector).

The sigma ratio is the diagnostic of "Robust Layerwise Scaling Rules by Proper Weight Decay
Tuning" (Fan et al. 2025, arXiv 2510.15262): in AdamW's steady state the singular values of
a matrix scale as sqrt(eta/lambda) (per step the update adds ~eta, the decay removes
eta*lambda*theta: their balance), and across widths d the top one as
sqrt(eta/lambda) * d^0.75. eta_R is the role's peak learning rate (the table's lr_R times
optimizer.lr), lambda_R its coupled decay coefficient (the table's). A ratio that stays the
same across widths (`jaxtrain plot RUN_d64 RUN_d256 --metric 'sigma_ratio/*'`) says the
sublayer gains transfer: what parametrization.gamma = 0.5 (lambda ∝ sqrt(d) under muP's
eta ∝ 1/d) is for. It describes the stable phase: a decaying lr(t) leaves it.

Diagnostics, on the params after the step:
* Top singular value of every weight matrix (each layer of a stacked one: sv/blocks.I.*),
  of the weight the forward pass uses (multiplier applied), viewed as (fan_in, fan_out).
  Under a width-robust parametrization the sublayer gains, and so these values, stay
  comparable across widths ("Robust Layerwise Scaling Rules by Proper Weight Decay
  Tuning", the top-singular-value check). Power iteration: v <- W^T W v / |W^T W v|,
  sigma = |W v|.
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
from jax.sharding import Mesh

from jaxtrain import step as ts
from jaxtrain.config.schema import Config, DiagnosticsConfig
from jaxtrain.model import parametrization, sharding
from jaxtrain.model.transformer import forward_sown

# Added to a norm before dividing by it: a zero matrix (a zero-initialized readout) or a
# direction of zero curvature gives W^T W v = 0 or Hv = 0, and the iterate stays 0, not NaN.
NORM_FLOOR = 1e-30
# The sharpness iteration's random start is fold_in(PRNGKey(SHARPNESS_SEED), step): fixed
# per step, so a resumed run reports the same values as an uninterrupted one.
SHARPNESS_SEED = 0
FORWARD_TELEMETRY = ("max_attn_logit", "log_z")  # what the model is asked to sow
NOT_MATRICES = ("vector", "untrained")  # the roles without singular values
# sigma_max/<role>: power iterations per matrix at a telemetry step (the loop passes
# diagnostics.power_iterations), and the width exponent of Fan et al.'s observed law.
SIGMA_ITERATIONS = 20
SIGMA_WIDTH_EXPONENT = 0.75


def step_metrics(spec: ts.ModelSpec, sigma_scale: dict[str, float] | None = None,
                 iterations: int = SIGMA_ITERATIONS) -> ts.ExtraMetrics:
    """The stability telemetry as the train step's extra metrics; `sigma_scale` (role ->
    sqrt(eta_R/lambda_R) d^0.75, `sigma_reference`) adds sigma_ratio/<role>."""

    def metrics(before: Any, after: Any, grads: Any, batch: Any) -> dict[str, jax.Array]:
        sigmas = role_sigma_max(after, spec.table, iterations)
        ratios = {f"sigma_ratio/{role}": sigmas[f"sigma_max/{role}"] / scale
                  for role, scale in (sigma_scale or {}).items() if f"sigma_max/{role}" in sigmas}
        return {**forward_telemetry(spec, before, batch),
                **optimizer_telemetry(before, after, grads, spec.table.labels(before)), **sigmas, **ratios}

    return metrics


def forward_telemetry(spec: ts.ModelSpec, params: Any, batch: Any) -> dict[str, jax.Array]:
    """Max attention logit per layer and log Z statistics of one no-dropout forward pass
    over the batch's inputs, with its document mask when packed; with experts, the load
    (and the balance bias) of each expert of each MoE block."""
    inputs, segment_ids = ts.model_inputs(batch)
    names = (*FORWARD_TELEMETRY, "router_load") if spec.model.moe.enabled else FORWARD_TELEMETRY
    _, sown = forward_sown(ts.bind_model(spec, params), inputs, names, segment_ids)
    out = {f"max_attn_logit/{i}": logit for i, logit in enumerate(sown["max_attn_logit"])}
    moe_blocks = spec.model.moe.moe_blocks(spec.model.n_layers)
    for layer, loads in zip(moe_blocks, sown.get("router_load", ())):
        out.update({f"moe/load/{layer}/{expert}": load for expert, load in enumerate(loads)})
    if spec.model.moe.bias_update_rate > 0:
        for layer, biases in zip(moe_blocks, ts.balance_bias(params), strict=True):
            out.update({f"moe/bias/{layer}/{expert}": bias for expert, bias in enumerate(biases)})
    out["log_z_mean"], out["log_z_std"] = jnp.mean(sown["log_z"]), jnp.std(sown["log_z"])
    return out


def _sums_by_role(tree: Any, labels: Any) -> dict[str, tuple[jax.Array, int]]:
    """role -> (sum of squares, number of entries) over the leaves of that role."""
    sums: dict[str, tuple[jax.Array, int]] = {}
    for leaf, role in zip(jax.tree.leaves(tree), jax.tree.leaves(labels), strict=True):
        if role == "untrained":  # no gradient, no optimizer: the moe/bias/* telemetry shows it
            continue
        total, count = sums.get(role, (jnp.float32(0), 0))
        sums[role] = (total + jnp.sum(jnp.square(leaf.astype(jnp.float32))), count + leaf.size)
    return sums


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


def top_singular_value(matrix: jax.Array, iterations: int) -> jax.Array:
    v = jnp.ones((matrix.shape[1],), jnp.float32) / math.sqrt(matrix.shape[1])

    def body(_, v):
        w = matrix.T @ (matrix @ v)
        return w / (jnp.linalg.norm(w) + NORM_FLOOR)

    v = jax.lax.fori_loop(0, iterations, body, v)
    return jnp.linalg.norm(matrix @ v)


def _layer_sigmas(value: jax.Array, rule: parametrization.ParamRule, iterations: int) -> jax.Array:
    """Top singular value of each layer of a (stacked) weight viewed as (fan_in, fan_out)."""
    fan_in = math.prod(rule.shape[:rule.fan_in_dims])
    layers = value.reshape(-1, fan_in, math.prod(rule.shape) // fan_in).astype(jnp.float32)
    return jax.vmap(lambda matrix: top_singular_value(matrix, iterations))(layers)


def singular_values(params: Any, table: parametrization.Table, iterations: int) -> dict[str, jax.Array]:
    effective = parametrization.effective_params(table, params)
    out = {}
    for key_path, value in jax.tree_util.tree_leaves_with_path(effective):
        path = parametrization.path_str(key_path)
        rule = table.rules[path]
        if rule.role in NOT_MATRICES:
            continue
        sigmas = _layer_sigmas(value, rule, iterations)
        out.update({f"sv/{name}": sigma for name, sigma in zip(table.per_layer_paths(path), sigmas, strict=True)})
    return out


def role_sigma_max(params: Any, table: parametrization.Table, iterations: int) -> dict[str, jax.Array]:
    """sigma_max/<role>: the largest top singular value over the role's matrices (each layer
    of a stacked one), of the STORED parameter: what AdamW moves and decays, so what the
    steady state sqrt(eta/lambda) * d^0.75 (module docstring) is about."""
    tops: dict[str, list[jax.Array]] = {}
    for key_path, value in jax.tree_util.tree_leaves_with_path(params):
        rule = table.rules[parametrization.path_str(key_path)]
        if rule.role not in NOT_MATRICES:
            tops.setdefault(rule.role, []).append(jnp.max(_layer_sigmas(value, rule, iterations)))
    return {f"sigma_max/{role}": jnp.max(jnp.stack(found)) for role, found in sorted(tops.items())}


def sigma_reference(cfg: Config, table: parametrization.Table) -> dict[str, float]:
    """role -> sqrt(eta_R / lambda_R) * d^0.75 (Fan et al. 2025) for the AdamW roles that
    decay: eta_R = the role's peak LR (optimizer.adam_lr or .lr, times lr_R); lambda_R the
    coupled decay coefficient applied, lambda * decay_R (mode `independent`: divided by
    the peak eta, since its per-step shrink lr(t)/eta * lr_R * lambda * decay_R =
    lr(t) lr_R * that)."""
    o, out = cfg.optimizer, {}
    for role in parametrization.ROLES:
        members = {(r.lr, r.weight_decay, r.update) for r in table.rules.values() if r.role == role}
        if role == "vector" or len(members) != 1:
            continue
        ((lr_mult, decay_mult, update),) = members
        eta = lr_mult * (o.adam_lr if o.adam_lr is not None else o.lr)
        lam = o.weight_decay * decay_mult / (eta / lr_mult if o.weight_decay_mode == "independent" else 1.0)
        if update == "adam" and lam > 0:
            out[role] = math.sqrt(eta / lam) * cfg.model.d_model ** SIGMA_WIDTH_EXPONENT
    return out


def sharpness(loss_fn: Callable[[Any], jax.Array], params: Any, iterations: int, key: jax.Array) -> jax.Array:
    grad_fn = jax.grad(loss_fn)

    def hvp(v):
        return jax.jvp(grad_fn, (params,), (v,))[1]

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = treedef.unflatten([jax.random.normal(k, p.shape, jnp.float32) for k, p in zip(keys, leaves, strict=True)])
    v = jax.tree.map(lambda x: x / optax.tree_utils.tree_norm(v), v)

    def body(_, v):
        hv = hvp(v)
        return jax.tree.map(lambda x: x / (optax.tree_utils.tree_norm(hv) + NORM_FLOOR), hv)

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
            key = jax.random.fold_in(jax.random.PRNGKey(SHARPNESS_SEED), step)
            out["sharpness"] = sharpness(lambda p: loss_fn(p, batch), params, cfg.power_iterations, key)
        return out

    return diagnose


def compile_diagnose(cfg: Config, spec: ts.ModelSpec, shardings: ts.TrainState, mesh: Mesh) -> Callable | None:
    """The jitted diagnostics (singular values, sharpness), or None when they are off."""
    if cfg.diagnostics.every_steps == 0:
        return None
    loss = lambda params, batch: ts.loss_and_metrics(params, spec, batch, cfg.train.z_loss)[0]
    diagnose = make_diagnose(cfg.diagnostics, spec.table, loss)
    rep = sharding.replicated(mesh)
    return jax.jit(sharding.traced_on(mesh, diagnose, cfg.train.grad_reduce_dtype),
                   in_shardings=(shardings.params, sharding.batch_sharding(mesh), rep), out_shardings=rep)
