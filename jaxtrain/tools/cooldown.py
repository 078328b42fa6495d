"""`jaxtrain cooldown`: branch a decay phase from any checkpoint of a stable-phase run.

A WSD, constant-LR or Power run can be stopped anywhere in its stable phase and "cooled
down" (Hagele et al. 2024): continue from checkpoint k with the learning rate decaying
from its value at k to lr_min over D more steps. That branch is exactly a WSD (Power for a
Power parent) run of k + D steps whose decay starts at step k, so it is written as one:

    train.steps = k + D,  schedule = wsd | power,  decay_steps = D

with the parent's warmup (in tokens) and peak, so its LR equals the parent's up to step k. The branch
is a new workdir holding a copy of checkpoint k (params, optimizer, RNG, data position),
the parent's logged rows up to k, the resolved config and `lineage.json` (parent workdir,
step, decay). The parent is only read. The branch workdir is owned (workdir.owned) from
before anything is written in it until its training ends; its files are assembled in a
staging directory inside it and moved into place, lineage.json last, so a branch whose
lineage exists is complete, and a staging directory found by the owner is a dead writer's
(it is removed and the branch written again). Rerunning the same command resumes the
branch from its own checkpoints, whatever the parent kept since.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxtrain.config import files as config_file
from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.resume import identity_difference
from jaxtrain.config.schema import Config
from jaxtrain.optim.schedules import resolve
from jaxtrain.run.distributed import barrier
from jaxtrain.run.metrics import truncate_after
from jaxtrain.run.workdir import Layout, open_at_step, owned, read_run_config

STAGING = ".cooldown-staging"  # inside the branch workdir, while it is assembled


def decay_steps(decay: int | float, step: int) -> int:
    """D from `--decay`: a step count (200) or the branch's fraction in decay (0.2:
    D / (k + D) = 0.2)."""
    if isinstance(decay, int) and decay >= 1:
        return decay
    if 0 < decay < 1:
        return max(round(decay * step / (1 - decay)), 1)
    raise UserError(f"--decay {decay!r}: expected a number of steps (e.g. 200) or a fraction in (0, 1)")


def branch_config(parent: Config, step: int, steps: int, shape: str, final_fraction: float | None,
                  overrides: list[str]) -> Config:
    """The parent's config with the decay phase starting at `step` and lasting `steps`."""
    s, lengths = parent.schedule, resolve(parent)
    if s.name not in ("wsd", "constant", "power"):
        raise UserError(f"the parent's schedule is {s.name!r}: a cooldown branches from the stable phase "
                        f"of a 'wsd', 'constant' or 'power' schedule")
    if s.name != "constant" and step * lengths.per_step > lengths.decay_start:
        raise UserError(f"--step {step}: the parent already decays from step {lengths.decay_start // lengths.per_step}; "
                        f"branch from a checkpoint at or before it")
    if step * lengths.per_step < lengths.warmup:
        raise UserError(f"--step {step}: still in the parent's warmup ({lengths.warmup // lengths.per_step} steps)")
    raw = parent.to_dict()
    raw["train"]["steps"] = step + steps
    # the parent's warmup in tokens (a fraction would stretch with the branch's length)
    raw["schedule"].update(name="power" if s.name == "power" else "wsd", decay_steps=steps, decay_tokens=None,
                           decay_shape=shape, warmup_steps=0, warmup_fraction=None, warmup_tokens=lengths.warmup)
    if final_fraction is not None:
        raw["schedule"]["final_lr_fraction"] = final_fraction
    return config_file.from_dict(config_file.apply_overrides(raw, overrides))


def create_branch(parent_dir: str | Path, step: int | None, decay: int | float, new_dir: str | Path, shape: str = "linear",
                  final_fraction: float | None = None, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """Write the branch workdir (or, if it holds a branch with the same lineage, reuse it)
    and return its config and lineage. An existing branch is recognized before the parent's
    checkpoints are consulted: it holds its own copy of the branch step, which the parent
    may have deleted since (keep=N)."""
    parent_dir, new_dir = Path(parent_dir).absolute(), Path(new_dir).absolute()
    if new_dir == parent_dir or parent_dir in new_dir.parents:
        raise UserError(f"--workdir {new_dir}: must be outside the parent workdir")
    parent = read_run_config(parent_dir)
    branch = lambda at: _branch(parent, parent_dir, at, decay, shape, final_fraction, overrides or [])
    recorded = _recorded_lineage(new_dir)
    if recorded is not None:
        return _matching(new_dir, recorded, *branch(recorded["step"] if step is None else step))
    with open_at_step(parent_dir, step) as at:
        step = at.step
    cfg, lineage = branch(step)
    with owned(new_dir, "cooldown"):  # every process checks; process 0 writes, all meet at the barrier
        if jax.process_index() == 0 and _recorded_lineage(new_dir) is None:
            _clear_for_branch(new_dir)
            _write_branch(parent_dir, step, new_dir, cfg, lineage)
        barrier("jaxtrain: cooldown branch written")
        return _matching(new_dir, _recorded_lineage(new_dir), cfg, lineage)


def _branch(parent: Config, parent_dir: Path, step: int, decay: int | float, shape: str,
            final_fraction: float | None, overrides: list[str]) -> tuple[Config, dict]:
    """The branch's config and lineage; refused if an override changes what the checkpoint holds."""
    n_decay = decay_steps(decay, step)
    cfg = branch_config(parent, step, n_decay, shape, final_fraction, overrides)
    difference = identity_difference(cfg.to_dict(), parent.to_dict())
    if difference:  # the branch continues the parent's checkpoint: what it holds stays
        key, theirs, mine = difference
        raise ConfigError(key, f"is {mine!r}, but the parent {parent_dir} was trained with {theirs!r}; "
                               f"a cooldown continues its checkpoint")
    lineage = {"parent": str(parent_dir), "step": step, "decay_steps": n_decay, "decay_shape": shape,
               "final_lr_fraction": cfg.schedule.final_lr_fraction}
    return cfg, lineage


def _recorded_lineage(new_dir: Path) -> dict | None:
    """The lineage of the complete branch in `new_dir` (None: no branch there yet)."""
    path = Layout(new_dir).lineage
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err}); the branch's lineage is needed to resume it") from None


def _clear_for_branch(new_dir: Path) -> None:
    """Under the lock, with no lineage: a staging directory is a dead writer's, removed
    with what it had moved into place; anything else is not ours to overwrite."""
    layout, staging = Layout(new_dir), new_dir / STAGING
    if staging.exists():
        for leftover in (layout.metrics, layout.config):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(layout.checkpoints, ignore_errors=True)
        shutil.rmtree(staging)
    foreign = sorted(p.name for p in new_dir.iterdir() if p != layout.owner)
    if foreign:
        raise UserError(f"--workdir {new_dir}: exists and is not a cooldown branch (holds {foreign[0]}); "
                        f"choose a new directory")


def _write_branch(parent_dir: Path, step: int, new_dir: Path, cfg: Config, lineage: dict) -> None:
    """The branch's files, assembled in the staging directory and moved into place with
    lineage.json last: a branch whose lineage exists is complete."""
    parent, branch, staging = Layout(parent_dir), Layout(new_dir), Layout(new_dir / STAGING)
    staging.checkpoints.mkdir(parents=True)
    shutil.copytree(parent.checkpoints / str(step), staging.checkpoints / str(step))
    if parent.metrics.exists():
        shutil.copy2(parent.metrics, staging.metrics)
        truncate_after(staging.metrics, step)
        staging.metrics.rename(branch.metrics)
    staging.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    staging.checkpoints.rename(branch.checkpoints)
    staging.config.rename(branch.config)
    staging.lineage.write_text(json.dumps({**lineage, "created": time.time()}, indent=1))
    staging.lineage.rename(branch.lineage)
    staging.root.rmdir()


def _matching(new_dir: Path, recorded: dict, cfg: Config, lineage: dict) -> tuple[Config, dict[str, Any]]:
    """The branch's config and recorded lineage, if it is the branch this command asks for."""
    different = {k: (recorded.get(k), v) for k, v in lineage.items() if recorded.get(k) != v}
    if different:
        key, (old, new) = next(iter(different.items()))
        raise UserError(f"--workdir {new_dir}: holds a branch with {key}={old!r}, this command asks for {new!r}")
    return cfg, recorded
