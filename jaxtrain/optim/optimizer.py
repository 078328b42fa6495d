"""The optax chain, built from the parametrization table:

    clip_by_global_norm
    -> per role: scale_by_adam(eps * eps_mult) -> add_decayed_weights -> scale(lr_mult)
    -> scale by -lr(t), the rate the host computed for this step (`learning_rate=`)

so a parameter of role R moves by
    -lr(t) * lr_R * (m_hat / (sqrt(v_hat) + eps * eps_R) + lambda'_R * theta).
Decoupled weight decay (Loshchilov & Hutter 2019), lambda_R = lambda * decay_R from the table:
  coupled      lambda'_R = lambda_R: decay follows the parameter's current LR (optax adamw);
  independent  lambda'_R = lambda_R / (lr_R * eta), so the decay term is
               -(lr(t) / eta) * lambda_R * theta: a per-step rate that only follows the
               schedule's shape, not eta or the muP LR multiplier (Wortsman et al. 2023).
Init and optimizer read the same table, so they cannot drift apart. The `untrained` role
(model state such as the MoE balance bias, `update: none`) gets a zero update and no state.

`optimizer.name: muon`: the table marks the hidden matrices `update: muon`, and their
scale_by_adam is replaced by Muon's orthogonalized momentum times the table's muon_scale
(jaxtrain/optim/muon.py), so they move by
    -lr(t) * lr_R * (muon_scale_R * O_t + lambda'_R * theta)
with lr_R and decay_R from the table's Muon rows (parametrization._muon_rule). The other
roles keep AdamW, their rate multiplied by optimizer.adam_lr / optimizer.lr when it is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxtrain.config.schema import OptimizerConfig
from jaxtrain.model.parametrization import ROLES, ParamRule, Table
from jaxtrain.optim.muon import muon_direction


def _role_rule(table: Table, role: str) -> ParamRule | None:
    """The role's shared optimizer settings (the table gives all its members the same)."""
    members = {(r.lr, r.eps, r.weight_decay, r.update): r for r in table.rules.values() if r.role == role}
    if len(members) > 1:
        raise ValueError(f"role {role} has differing optimizer settings: {sorted(members)}")
    return next(iter(members.values()), None)


def _direction(cfg: OptimizerConfig, table: Table, rule: ParamRule) -> optax.GradientTransformation:
    if rule.update == "muon":
        return muon_direction(table, cfg.muon_momentum, cfg.muon_ns_steps, jnp.dtype(cfg.muon_ns_dtype))
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps * rule.eps)


def _role_transform(cfg: OptimizerConfig, table: Table, rule: ParamRule) -> optax.GradientTransformation:
    if rule.update == "none":  # the untrained role: no update, no state
        return optax.set_to_zero()
    lr = rule.lr
    if rule.update == "adam" and cfg.adam_lr is not None:
        lr *= cfg.adam_lr / cfg.lr
    decay = cfg.weight_decay * rule.weight_decay
    if cfg.weight_decay_mode == "independent":
        # per step lr(t)/peak * lr_R * lambda * decay_R: free of the swept peak, but the
        # role's LR multiplier stays in, so parametrization.gamma is the exponent of the
        # coupled coefficient in both modes (lambda_R ~ d^gamma: Fan et al. 0.5, mup 1)
        decay /= lr / rule.lr * cfg.lr
    steps = [_direction(cfg, table, rule)]
    if decay > 0:
        steps.append(optax.add_decayed_weights(decay))
    if lr != 1.0:
        steps.append(optax.scale(lr))
    return optax.chain(*steps)


def scale_by_given_learning_rate() -> optax.GradientTransformationExtraArgs:
    """updates -> -learning_rate * updates, the rate passed to `update(..., learning_rate=lr)`.
    The schedule lives on the host (a function of tokens seen, jaxtrain/optim/schedules.py), so
    the optimizer state holds no schedule counter that could disagree with it."""
    def update(updates, state, params=None, *, learning_rate, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: -learning_rate * u, updates), state
    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, table: Table) -> optax.GradientTransformationExtraArgs:
    """The chain; call its update with `learning_rate=lr` (the step's scheduled rate)."""
    rules = {role: _role_rule(table, role) for role in ROLES}
    per_role = optax.partition({role: _role_transform(cfg, table, rule) for role, rule in rules.items() if rule},
                               table.labels)
    steps = [per_role, scale_by_given_learning_rate()]
    if cfg.clip_norm > 0:
        steps.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
    return optax.chain(*steps)
