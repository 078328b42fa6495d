"""The optax chain: global-norm clipping -> AdamW with a learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) as optax implements it: the decoupled weight decay is
multiplied by the current learning rate ("coupled" to the schedule):
    theta <- theta - lr(s) * (m_hat / (sqrt(v_hat) + eps) + lambda * theta).
Only matrices (ndim >= 2) are decayed; norm gains are not.

Seam for the parametrization table: `decay_mask` and the single learning rate become
per-role multipliers there; the chain keeps this order (clip first, then the update).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxtrain.config import OptimizerConfig
from jaxtrain.schedules import Schedule


def decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, schedule: Schedule) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
