"""Learning-rate schedules: pure functions of the tokens seen, so a resumed run replays them
exactly and the batch size may change between resumes.

The host computes lr = schedule(t) before every step from t = tokens seen before the step
(an exact integer kept in every checkpoint) and passes it into the compiled step. Lengths
are resolved to tokens once per start (`resolve`): given in steps they count steps of this
config's tau = batch_size * seq_len tokens, as fractions they are fractions of the budget
S, the tokens seen when the run reaches train.steps: S = train.steps * tau for a run that
keeps its batch size, t0 + (train.steps - s0) * tau when it resumes at step s0 with t0
tokens seen under another batch size. With a fixed batch, t = step * tau and every
formula below reads the same with steps in place of tokens.

Peak eta (optimizer.lr), warmup W, decay D, final fraction f (lr_min = f * eta):

* warmup (all schedules): lr = target * (t + tau) / W for t < W, where target is the
  schedule's value at t = W, so step 0 already moves (in steps: (s + 1) / W).
* constant:  eta.
* linear:    lr_min + (eta - lr_min) * (1 - p),          p = (t - W) / (S - W) in [0, 1]
* cosine:    lr_min + (eta - lr_min) * (1 + cos(pi p)) / 2
* WSD (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hagele et al. 2024 "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations"): eta until S - D, then from
  eta to lr_min with q = (t - (S - D)) / D in [0, 1]:
    linear       lr_min + (eta - lr_min) * (1 - q)
    cosine       lr_min + (eta - lr_min) * (1 + cos(pi q)) / 2
    1-sqrt       lr_min + (eta - lr_min) * (1 - sqrt(q))     (Hagele et al. 2024, Sec. 3)
    exponential  eta * (lr_min / eta) ** q                   (needs lr_min > 0)
* Power (Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number Agnostic
  Learning Rate Scheduler", Eq. for the stable phase):
    lr = min(eta, beta * a * n ** b)   n = tokens seen, beta = batch size in sequences,
  published a = 4, b = -0.51 (fitted with muP; both configurable: power_a, power_b). The
  units are those of the paper's fit (n in tokens, beta in sequences); with other units
  a must be refitted. The final decay (D, decay_shape) goes from the Power value at S - D,
  p0, to f * p0 with the WSD shapes above.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxtrain.config.schema import Config

Schedule = Callable[[np.ndarray], np.ndarray]  # tokens seen before the step -> lr


@dataclasses.dataclass(frozen=True)
class Lengths:
    """A schedule's lengths, all in tokens."""

    per_step: int  # tau
    total: int  # S
    warmup: int  # W
    decay: int  # D (WSD, Power)

    @property
    def decay_start(self) -> int:
        return self.total - self.decay


def wsd_decay_start(total: int, decay_fraction: float) -> int:
    """The step where a decay given as a fraction of `total` steps begins: the last
    max(round(decay_fraction * total), 1) steps decay."""
    return total - max(round(decay_fraction * total), 1)


def resolve(cfg: Config, start_step: int = 0, start_tokens: int = 0) -> Lengths:
    """Lengths for a run at `start_step` with `start_tokens` seen (a fresh run: 0, 0)."""
    s, tau = cfg.schedule, cfg.train.batch_size * cfg.data.seq_len
    total = start_tokens + (cfg.train.steps - start_step) * tau
    if s.warmup_tokens is not None:
        warmup = s.warmup_tokens
    elif s.warmup_fraction is not None:
        warmup = round(s.warmup_fraction * total)
    else:
        warmup = s.warmup_steps * tau
    if s.decay_tokens is not None:
        decay = s.decay_tokens
    elif s.decay_steps is not None:
        decay = s.decay_steps * tau
    else:
        steps = total // tau
        decay = (steps - wsd_decay_start(steps, s.decay_fraction)) * tau
    return Lengths(tau, total, warmup, max(min(decay, total), 1))


# WSD decay shapes: fraction of the way from lr_min to the decay's start left at progress q
DECAY_SHAPES: dict[str, Callable] = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + np.cos(np.pi * q)),
    "1-sqrt": lambda q: 1.0 - np.sqrt(q),
}


def _decay(start_lr, final_fraction: float, shape: str, q):
    low = start_lr * final_fraction
    if shape == "exponential":
        return start_lr * final_fraction ** q
    return low + (start_lr - low) * DECAY_SHAPES[shape](q)


def _progress(t, start: float, length: float):
    return np.clip((t - start) / max(length, 1), 0.0, 1.0)


def _with_warmup(after: Schedule, lengths: Lengths) -> Schedule:
    w, tau = lengths.warmup, lengths.per_step
    if w == 0:
        return after
    target = after(np.float64(w))
    return lambda t: np.where(t < w, target * np.minimum((t + tau) / w, 1.0), after(t))


def constant(peak: float) -> Schedule:
    return lambda t: np.full(np.shape(t), peak)


def linear(peak: float, lengths: Lengths, final_fraction: float) -> Schedule:
    length = lengths.total - lengths.warmup
    return lambda t: _decay(peak, final_fraction, "linear", _progress(t, lengths.warmup, length))


def cosine(peak: float, lengths: Lengths, final_fraction: float) -> Schedule:
    length = lengths.total - lengths.warmup
    return lambda t: _decay(peak, final_fraction, "cosine", _progress(t, lengths.warmup, length))


def wsd(peak: float, lengths: Lengths, final_fraction: float, shape: str = "linear") -> Schedule:
    return lambda t: _decay(peak, final_fraction, shape, _progress(t, lengths.decay_start, lengths.decay))


def power_law(peak: float, batch: int, a: float, b: float) -> Schedule:
    """min(eta, batch * a * n ** b); n = 0 gives eta."""
    def lr(n):
        n = np.asarray(n, np.float64)
        with np.errstate(divide="ignore"):
            return np.minimum(peak, batch * a * np.where(n > 0, n, 0.0) ** b)
    return lr


def power(peak: float, lengths: Lengths, batch: int, a: float, b: float, final_fraction: float,
          shape: str = "linear") -> Schedule:
    stable = power_law(peak, batch, a, b)
    start_lr = stable(np.float64(lengths.decay_start))
    decay = lambda t: _decay(start_lr, final_fraction, shape, _progress(t, lengths.decay_start, lengths.decay))
    return lambda t: np.where(t < lengths.decay_start, stable(t), decay(t))


def make_schedule(cfg: Config, start_step: int = 0, start_tokens: int = 0) -> Schedule:
    """tokens seen before a step (int or array) -> that step's learning rate (float64), for a
    run (re)started at `start_step` with `start_tokens` seen."""
    s, peak, lengths = cfg.schedule, cfg.optimizer.lr, resolve(cfg, start_step, start_tokens)
    after = {
        "constant": lambda: constant(peak),
        "linear": lambda: linear(peak, lengths, s.final_lr_fraction),
        "cosine": lambda: cosine(peak, lengths, s.final_lr_fraction),
        "wsd": lambda: wsd(peak, lengths, s.final_lr_fraction, s.decay_shape),
        "power": lambda: power(peak, lengths, cfg.train.batch_size, s.power_a, s.power_b,
                               s.final_lr_fraction, s.decay_shape),
    }[s.name]()
    schedule = _with_warmup(after, lengths)
    return lambda t: np.asarray(schedule(np.asarray(t, np.float64)), np.float64)


def lr_per_step(cfg: Config) -> np.ndarray:
    """The learning rate of every step 0 .. train.steps-1 at this config's batch size."""
    tau = cfg.train.batch_size * cfg.data.seq_len
    return make_schedule(cfg)(np.arange(cfg.train.steps, dtype=np.float64) * tau)
