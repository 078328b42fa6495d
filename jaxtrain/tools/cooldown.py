"""`jaxtrain cooldown`: branch a decay phase from any checkpoint of a stable-phase run.

A WSD, constant-LR or Power run can be stopped anywhere in its stable phase and "cooled
down" (Hagele et al. 2024): continue from checkpoint k with the learning rate decaying
from its value at k to lr_min over D more steps. That branch is exactly a WSD (Power for a
Power parent) run of k + D steps whose decay starts at step k, so it is written as one:

    train.steps = k + D,  schedule = wsd | power,  decay_steps = D

with the parent's warmup (in tokens) and peak, so its LR equals the parent's up to step k. The branch
is a new workdir holding a copy of checkpoint k (params, optimizer, RNG, data position),
the parent's logged rows up to k, the resolved config and `lineage.json` (parent workdir,
step, decay). The parent is only read. The new workdir is assembled in a temporary
directory and renamed when complete; rerunning the same command resumes the branch.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxtrain import config_file
from jaxtrain.checkpoint import Checkpointer, quiet_absl
from jaxtrain.config import Config, identity_difference
from jaxtrain.distributed import barrier
from jaxtrain.errors import ConfigError, UserError
from jaxtrain.metrics import truncate_after
from jaxtrain.schedules import resolve

LINEAGE_FILE = "lineage.json"


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
    """Write the branch workdir (or, if it exists from an earlier call with the same lineage,
    reuse it) and return its config and lineage."""
    parent_dir, new_dir = Path(parent_dir).absolute(), Path(new_dir).absolute()
    parent = config_file.read_run_config(parent_dir)
    with quiet_absl():  # orbax notes that a read-only manager will not write
        ckpt = Checkpointer(parent_dir, parent.checkpoint, read_only=True)
    try:
        saved = sorted(ckpt.all_steps())
    finally:
        ckpt.close()
    if not saved:
        raise UserError(f"{parent_dir}: has no complete checkpoint to branch from")
    step = saved[-1] if step is None else step
    if step not in saved:
        raise UserError(f"--step {step}: no checkpoint at that step in {parent_dir} (saved: {saved})")
    n_decay = decay_steps(decay, step)
    cfg = branch_config(parent, step, n_decay, shape, final_fraction, overrides or [])
    difference = identity_difference(cfg.to_dict(), parent.to_dict())
    if difference:  # the branch continues the parent's checkpoint: what it holds stays
        key, theirs, mine = difference
        raise ConfigError(key, f"is {mine!r}, but the parent {parent_dir} was trained with {theirs!r}; "
                               f"a cooldown continues its checkpoint")
    lineage = {"parent": str(parent_dir), "step": step, "decay_steps": n_decay, "decay_shape": shape,
               "final_lr_fraction": cfg.schedule.final_lr_fraction}
    # Every process makes the same checks; process 0 alone writes, and all meet at the
    # barrier (a process may see the branch process 0 has just written: it is reused).
    if new_dir.exists():
        lineage = _existing_branch(new_dir, lineage, cfg)
    elif new_dir == parent_dir or parent_dir in new_dir.parents:
        raise UserError(f"--workdir {new_dir}: must be outside the parent workdir")
    elif jax.process_index() == 0:
        _write_branch(parent_dir, step, new_dir, cfg, lineage)
    barrier("jaxtrain: cooldown branch written")
    return cfg, lineage


def _write_branch(parent_dir: Path, step: int, new_dir: Path, cfg: Config, lineage: dict) -> None:
    """The branch workdir, made in a temporary directory and renamed into place whole."""
    tmp = new_dir.with_name(f".{new_dir.name}.tmp-{int(time.time())}")
    try:
        (tmp / "checkpoints").mkdir(parents=True)
        shutil.copytree(parent_dir / "checkpoints" / str(step), tmp / "checkpoints" / str(step))
        if (parent_dir / "metrics.jsonl").exists():
            shutil.copy2(parent_dir / "metrics.jsonl", tmp / "metrics.jsonl")
            truncate_after(tmp / "metrics.jsonl", step)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / LINEAGE_FILE).write_text(json.dumps({**lineage, "created": time.time()}, indent=1))
        tmp.rename(new_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _existing_branch(new_dir: Path, lineage: dict, cfg: Config) -> dict[str, Any]:
    path = new_dir / LINEAGE_FILE
    if not path.is_file():
        raise UserError(f"--workdir {new_dir}: exists and is not a cooldown branch; choose a new directory")
    recorded = json.loads(path.read_text())
    different = {k: (recorded.get(k), v) for k, v in lineage.items() if recorded.get(k) != v}
    if different:
        key, (old, new) = next(iter(different.items()))
        raise UserError(f"--workdir {new_dir}: holds a branch with {key}={old!r}, this command asks for {new!r}")
    return recorded
