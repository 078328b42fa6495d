"""`jaxtrain sweep --equal-tokens`: every run of a batch-size (or sequence-length) grid
trains on the same number of tokens.

A run's length is `train.steps` (config/schema.py); it trains on

    T = train.steps * train.batch_size * data.seq_len tokens

(optim/schedules.py: the budget S its fractions refer to). Comparing optima across batch
sizes B at a fixed number of steps confounds B with T (a bigger batch sees more data), so
under --equal-tokens the budget is the one the config itself gives (CONFIG and --set,
before the grid: T0 = steps0 * B0 * seq_len0) and each grid point trains

    train.steps = T0 / (B * seq_len)          (refused unless a whole number)

Lengths the config gives in steps (schedule.warmup_steps, schedule.decay_steps) count
steps of the config's own batch: they become the same number of tokens
(warmup_tokens = warmup_steps * B0 * seq_len0), so every run warms up and decays over the
same tokens too. Fractions (warmup_fraction, decay_fraction) already scale with the run.
"""

from __future__ import annotations

from typing import Callable

from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config

# The grid keys that change the tokens of one step.
PER_STEP_KEYS = ("train.batch_size", "data.seq_len")


def tokens(cfg: Config) -> int:
    """The tokens a fresh run of `cfg` trains on."""
    return cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len


def check_grid(grid_keys: list[str]) -> None:
    """--equal-tokens needs a grid over the tokens per step, and derives train.steps itself."""
    if "train.steps" in grid_keys:
        raise UserError("--equal-tokens derives train.steps from the token budget: drop --grid train.steps "
                        "(or drop --equal-tokens to sweep the budget at a fixed batch)")
    if not any(k in grid_keys for k in PER_STEP_KEYS):
        raise UserError(f"--equal-tokens: no --grid key changes the tokens per step ({', '.join(PER_STEP_KEYS)})")


def equal_token_overrides(base: Config) -> Callable[[Config, dict], list[str]]:
    """(a grid point's config, its assignment) -> the --set items that give it `base`'s token
    budget, warmup and decay (module docstring)."""
    budget, base_per_step = tokens(base), base.train.batch_size * base.data.seq_len

    def overrides(cfg: Config, assignment: dict) -> list[str]:
        per_step = cfg.train.batch_size * cfg.data.seq_len
        if budget % per_step:
            point = ", ".join(f"{k}={v}" for k, v in assignment.items() if k in PER_STEP_KEYS)
            raise UserError(f"--equal-tokens: {point}: the budget of {budget:,} tokens ({base.train.steps} steps "
                            f"x {base.train.batch_size} x {base.data.seq_len}) is not a whole number of "
                            f"{per_step:,}-token steps")
        sets = [f"train.steps={budget // per_step}"]
        s = cfg.schedule
        if s.warmup_steps:
            sets += ["schedule.warmup_steps=0", f"schedule.warmup_tokens={s.warmup_steps * base_per_step}"]
        if s.decay_steps is not None:
            sets += ["schedule.decay_steps=null", f"schedule.decay_tokens={s.decay_steps * base_per_step}"]
        return sets

    return overrides
