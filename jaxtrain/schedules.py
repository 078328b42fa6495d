"""Learning-rate schedules: pure functions of the step, so a resumed run replays them exactly.

With peak lr eta, warmup W, total steps S and final fraction f (lr_min = f * eta):

* warmup (all schedules): lr(s) = eta * (s + 1) / W for s < W, so step 0 already moves.
* constant:  lr(s) = eta after warmup.
* cosine:    lr(s) = lr_min + (eta - lr_min) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W).
* WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hagele et al. 2024 "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations"): constant eta until the last
  D = decay_fraction * S steps, then from eta to lr_min with q = (s - (S - D)) / D in [0, 1]:
    linear       lr = lr_min + (eta - lr_min) * (1 - q)
    cosine       lr = lr_min + (eta - lr_min) * (1 + cos(pi * q)) / 2
    1-sqrt       lr = lr_min + (eta - lr_min) * (1 - sqrt(q))   (Hagele et al. 2024, Sec. 3)
    exponential  lr = eta * (lr_min / eta) ** q                 (needs lr_min > 0)

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


# WSD decay shapes: fraction of the way from lr_min to eta left at decay progress q in [0, 1]
DECAY_SHAPES: dict[str, Callable] = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + jnp.cos(jnp.pi * q)),
    "1-sqrt": lambda q: 1.0 - jnp.sqrt(q),
}


def wsd_decay_start(total: int, decay_fraction: float) -> int:
    """The step where WSD's decay begins: the last max(round(decay_fraction * S), 1) steps decay."""
    return total - max(round(decay_fraction * total), 1)


def wsd(peak: float, warmup: int, total: int, decay_fraction: float, final_fraction: float,
        shape: str = "linear") -> Schedule:
    low = peak * final_fraction
    decay_start = wsd_decay_start(total, decay_fraction)
    decay_steps = total - decay_start

    def after(step):
        progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
        if shape == "exponential":
            return peak * (low / peak) ** progress
        return low + (peak - low) * DECAY_SHAPES[shape](progress)
    return _with_warmup(peak, warmup, after)


def make_schedule(cfg: Config) -> Schedule:
    s, peak, total = cfg.schedule, cfg.optimizer.lr, cfg.train.steps
    if s.name == "constant":
        return constant(peak, s.warmup_steps)
    if s.name == "cosine":
        return cosine(peak, s.warmup_steps, total, s.final_lr_fraction)
    return wsd(peak, s.warmup_steps, total, s.decay_fraction, s.final_lr_fraction, s.decay_shape)


def lr_per_step(cfg: Config) -> np.ndarray:
    """The learning rate of every step 0 .. train.steps-1 (for summaries and plots)."""
    return np.asarray(jax.vmap(make_schedule(cfg))(np.arange(cfg.train.steps)))
