"""`jaxtrain sweep --branch-horizons`: a sweep over the horizon (train.steps) as one long
run per cell plus a cooldown branch per shorter horizon.

Under a WSD schedule (Power likewise) the S-step run is the learning rate eta after the
warmup until k = S - D_S, then a decay of D_S steps that depends only on k and D_S
(optim/schedules.py). The longest run of the cell, S_max, holds the same eta up to its own
decay start, and it sees the same batches in the same order. So the S-step run IS
`jaxtrain cooldown LONG --step k --decay D_S` (tools/cooldown.py): the long run's params,
optimizer state, RNG and data position at k, then the same decay. A horizon sweep of n
horizons costs S_max + sum(D_S) steps instead of sum(S) (Hagele et al. 2024, "Scaling Laws
and Compute-Optimal Training Beyond Fixed Training Durations", Sec. 4: one run, many
cooldowns); docs/schedules.md measured a branch at step 480 ending at the 600-step WSD run's
loss exactly, and tests/test_horizons.py checks a branched run's losses against the full run's.

The equality needs, and the plan checks before anything trains (one line naming the key):
* schedule.name wsd or power (a cosine or linear run's whole schedule depends on S);
* warmup in steps or tokens, not schedule.warmup_fraction (a fraction of S_max is not one of S);
* each horizon's decay a whole number of steps, and k_S after the warmup and no later than
  the long run's own decay start (cooldown.branch_config refuses it otherwise);
* nothing else that depends on train.steps (data.phases by start_fraction) differing.
The long run checkpoints every gcd(k_S..., S_max) steps and keeps all of them (its
checkpoint section is set so: one saved state per checkpoint on disk), so every branch
finds its step. A branch records its parent (`branched_from`) and step (`branch_step`) in
the sweep's rows; its `seconds` are the decay's alone. A branch whose step the long run never
saved (it halted, non-finite, before it) is recorded as diverged without training.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

from jaxtrain.config import files as config_file
from jaxtrain.config.checks import phase_start_steps
from jaxtrain.config.errors import UserError
from jaxtrain.config.schema import Config
from jaxtrain.optim.schedules import resolve
from jaxtrain.run.workdir import Layout

STEPS_KEY = "train.steps"
# The schedule's length keys: a branch gives its lengths in steps/tokens, the full run as set
LENGTH_KEYS = ("warmup_steps", "warmup_tokens", "warmup_fraction", "decay_fraction", "decay_steps", "decay_tokens")


def _decay_steps(cfg: Config, assignment: dict) -> int:
    """D_S, the horizon's decay in steps (schedule checks of the module docstring)."""
    where = ", ".join(f"{k}={v}" for k, v in assignment.items())
    if cfg.schedule.name not in ("wsd", "power"):
        raise UserError(f"--branch-horizons: {where}: schedule.name is {cfg.schedule.name!r}; only a 'wsd' or "
                        f"'power' run branches into shorter horizons")
    if cfg.schedule.warmup_fraction is not None:
        raise UserError(f"--branch-horizons: schedule.warmup_fraction={cfg.schedule.warmup_fraction} stretches with "
                        f"the horizon; give schedule.warmup_steps or schedule.warmup_tokens")
    lengths = resolve(cfg)
    if lengths.decay % lengths.per_step:
        raise UserError(f"--branch-horizons: {where}: the decay ({lengths.decay:,} tokens) is not a whole number "
                        f"of {lengths.per_step:,}-token steps")
    return lengths.decay // lengths.per_step


def parent_config(cfg: Config, branch_steps: list[int]) -> Config:
    """The long run, checkpointing at every branch step and keeping every checkpoint."""
    every = math.gcd(cfg.train.steps, *branch_steps)
    keep = cfg.train.steps // every + 1
    return config_file.from_dict(config_file.apply_overrides(
        cfg.to_dict(), [f"checkpoint.every_steps={every}", f"checkpoint.keep={keep}"]))


def _comparable(cfg: Config) -> dict:
    raw = cfg.to_dict()
    raw.pop("checkpoint")
    for key in LENGTH_KEYS:
        raw["schedule"].pop(key)
    raw["data"]["phases"] = phase_start_steps(cfg)
    return {**raw, "lengths": resolve(cfg)}


def _difference(branch: Config, full: Config) -> str | None:
    """The first section (or `lengths`) where the branch would train otherwise than the full run."""
    a, b = _comparable(branch), _comparable(full)
    return next((key for key in b if a.get(key) != b[key]), None)


def branch_for(parent: Config, full: Config, assignment: dict) -> tuple[Config, int, int]:
    """(branch config, branch step k, decay D) of one shorter horizon; refused (one line)
    where the branch would not be that horizon's full run."""
    from jaxtrain.tools.cooldown import branch_config  # imports jax

    decay = _decay_steps(full, assignment)
    step = full.train.steps - decay
    if step < 1:
        raise UserError(f"--branch-horizons: {STEPS_KEY}={full.train.steps} decays from its first step; "
                        f"nothing to branch from")
    try:
        cfg = branch_config(parent, step, decay, full.schedule.decay_shape, full.schedule.final_lr_fraction, [])
    except UserError as err:
        why = str(err).removeprefix(f"--step {step}: ")
        raise UserError(f"--branch-horizons: {STEPS_KEY}={full.train.steps} branches from the "
                        f"{parent.train.steps}-step run at step {step}: {why}") from None
    if (key := _difference(cfg, full)) is not None:
        raise UserError(f"--branch-horizons: {STEPS_KEY}={full.train.steps}: a branch of the {parent.train.steps}-step "
                        f"run would differ from the full run in {key}")
    return cfg, step, decay


def jobs(points: list[tuple[dict, Config]], grid_keys: list[str], workdir: Callable[[dict], Path]) -> list[tuple]:
    """The sweep's jobs, long runs first: (grid index, assignment, config trained, what to do
    before training (write the branch) or None, the row's lineage fields)."""
    if STEPS_KEY not in grid_keys:
        raise UserError(f"--branch-horizons: needs --grid {STEPS_KEY}=S1,S2,... (the horizons to branch)")
    groups: dict[tuple, list[int]] = {}
    for i, (assignment, _) in enumerate(points):
        groups.setdefault(tuple((k, repr(v)) for k, v in assignment.items() if k != STEPS_KEY), []).append(i)
    longs, branches = [], []
    for members in groups.values():
        long = max(members, key=lambda i: points[i][1].train.steps)
        starts = {i: points[i][1].train.steps - _decay_steps(points[i][1], points[i][0]) for i in members}
        shorter = [i for i in members if points[i][1].train.steps < points[long][1].train.steps]
        parent = parent_config(points[long][1], [starts[i] for i in shorter])
        parent_name = workdir(points[long][0]).name
        longs.append((long, points[long][0], parent, None, {"branched_from": None, "branch_step": None}))
        for i in shorter:
            cfg, step, decay = branch_for(parent, points[i][1], points[i][0])
            write = functools.partial(_write_branch, workdir(points[long][0]), step, decay, workdir(points[i][0]), cfg)
            branches.append((i, points[i][0], cfg, write, {"branched_from": parent_name, "branch_step": step}))
    return longs + branches


def _write_branch(parent_dir: Path, step: int, decay: int, new_dir: Path, cfg: Config) -> bool:
    """The branch workdir from the long run's checkpoint (reused when it is already there);
    False when the long run has no checkpoint at `step` (it halted, non-finite, before it)."""
    from jaxtrain.tools.cooldown import create_branch

    if not Layout(new_dir).lineage.is_file() and not (Layout(parent_dir).checkpoints / str(step)).is_dir():
        return False
    written, _ = create_branch(parent_dir, step, decay, new_dir, cfg.schedule.decay_shape,
                               cfg.schedule.final_lr_fraction, [])
    if written != cfg:
        raise UserError(f"{new_dir}: the branch written differs from the one planned ({_difference(written, cfg)})")
    return True
