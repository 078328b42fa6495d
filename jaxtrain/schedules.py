"""Learning-rate schedules: pure functions of the step, so a resumed run replays them exactly.

With peak lr eta, warmup W, total steps S and final fraction f (lr_min = f * eta):

* warmup (all schedules): lr(s) = eta * (s + 1) / W for s < W, so step 0 already moves.
* constant:  lr(s) = eta after warmup.
* cosine:    lr(s) = lr_min + (eta - lr_min) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W).
* WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hagele et al. 2024 "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations"): constant eta until the last
  D = decay_fraction * S steps, then linear to lr_min: lr(s) = eta - (eta - lr_min) * q,
  q = (s - (S - D)) / D.

The step argument may be a traced int; results are float32 scalars.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.config import Config

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def _with_warmup(peak: float, warmup: int, after: Schedule) -> Schedule:
    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup == 0:
            return after(step)
        return jnp.where(step < warmup, peak * (step + 1) / warmup, after(step))
    return lr


def constant(peak: float, warmup: int) -> Schedule:
    return _with_warmup(peak, warmup, lambda step: jnp.full_like(step, peak))


def cosine(peak: float, warmup: int, total: int, final_fraction: float) -> Schedule:
    low = peak * final_fraction

    def after(step):
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        return low + (peak - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return _with_warmup(peak, warmup, after)


def wsd(peak: float, warmup: int, total: int, decay_fraction: float, final_fraction: float) -> Schedule:
    low = peak * final_fraction
    decay_steps = max(round(decay_fraction * total), 1)
    decay_start = total - decay_steps

    def after(step):
        progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
        return peak - (peak - low) * progress
    return _with_warmup(peak, warmup, after)


def make_schedule(cfg: Config) -> Schedule:
    s, peak, total = cfg.schedule, cfg.optimizer.lr, cfg.train.steps
    if s.name == "constant":
        return constant(peak, s.warmup_steps)
    if s.name == "cosine":
        return cosine(peak, s.warmup_steps, total, s.final_lr_fraction)
    return wsd(peak, s.warmup_steps, total, s.decay_fraction, s.final_lr_fraction)


def lr_per_step(cfg: Config) -> np.ndarray:
    """The learning rate of every step 0 .. train.steps-1 (for summaries and plots)."""
    return np.asarray(jax.vmap(make_schedule(cfg))(np.arange(cfg.train.steps)))
