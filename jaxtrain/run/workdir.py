"""A run's workdir: its layout, its one owner, the run recorded in it, and the run read
back at a checkpoint.

    WORKDIR/
      config.yaml              the resolved config            (record_run)
      parametrization.json     the parametrization table      (record_run)
      metrics.jsonl            one row per logged step        (metrics.py)
      tb/                      TensorBoard events             (metrics.py)
      checkpoints/<step>/      orbax checkpoints              (checkpoint.py)
      checkpoints.unreadable/  checkpoints that did not read back, moved aside
      lineage.json             a cooldown branch's parent, step and decay
      .owner                   the lock file of the process that writes the workdir

One owner: every command that writes a workdir (train, cooldown, import) holds an
exclusive lock on `.owner` for as long as it runs (`owned`); a second one is refused in one
line naming the holder, and changes nothing. Read-only commands (eval, generate, plot,
export, the notebook) take no lock and read while a run trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import yaml

from jaxtrain.config import ownership
from jaxtrain.config.errors import UserError, writing
from jaxtrain.config.files import from_dict, read_yaml_mapping
from jaxtrain.config.schema import Config
from jaxtrain.model.parametrization import Table
from jaxtrain.run.checkpoint import Checkpointer, quiet_absl


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each file of a workdir lives; the only place these names are spelled."""

    root: Path

    config = property(lambda self: self.root / "config.yaml")
    table = property(lambda self: self.root / "parametrization.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tb")
    checkpoints = property(lambda self: self.root / "checkpoints")
    lineage = property(lambda self: self.root / "lineage.json")
    unreadable = property(lambda self: self.root / "checkpoints.unreadable")  # Checkpointer's choice
    owner = property(lambda self: self.root / ".owner")

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())


def record_run(workdir: Path, cfg: Config, table: Table) -> None:
    """The resolved config and table in the workdir, each replaced atomically (process 0)."""
    if jax.process_index() == 0:
        layout = Layout(workdir)
        with writing("the run's config", layout.config):
            write_atomic(layout.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with writing("the run's parametrization table", layout.table):
            write_atomic(layout.table, json.dumps(table.to_json(), indent=1))


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a reader never sees it half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_run_config(workdir: str | Path) -> Config:
    """The resolved config a run recorded in `WORKDIR/config.yaml`."""
    path = Layout(Path(workdir)).config
    if not path.is_file():
        raise UserError(f"{workdir}: not a jaxtrain workdir (no config.yaml)")
    return from_dict(read_yaml_mapping(path, "the run's config"))


@dataclasses.dataclass(frozen=True)
class OpenRun:
    """A run opened read-only at one of its checkpoints."""

    workdir: Path
    cfg: Config
    checkpointer: Checkpointer  # read-only; closed when the `open_at_step` block ends
    step: int
    steps_saved: tuple[int, ...]


@contextlib.contextmanager
def open_at_step(workdir: str | Path, step: int | None = None, step_name: str = "--step") -> Iterator[OpenRun]:
    """The run in `workdir` at checkpoint `step` (default: the newest), read-only. One line
    if the workdir holds no run, no complete checkpoint, or not that step (`step_name` is
    what the user called the step: a flag or a config key)."""
    workdir = Path(workdir).absolute()
    cfg = read_run_config(workdir)
    if not Layout(workdir).checkpoints.is_dir():
        raise UserError(f"{workdir}: has no checkpoints yet")
    with quiet_absl():  # orbax notes that a read-only manager will not save or delete
        checkpointer = Checkpointer(Layout(workdir).checkpoints, cfg.checkpoint, read_only=True)
    try:
        saved = tuple(sorted(checkpointer.all_steps()))
        if not saved:
            raise UserError(f"{workdir}: has no complete checkpoint yet")
        chosen = saved[-1] if step is None else step
        if chosen not in saved:
            raise UserError(f"{step_name} {step}: no checkpoint at that step in {workdir} (saved: {list(saved)})")
        yield OpenRun(workdir, cfg, checkpointer, chosen, saved)
    finally:
        checkpointer.close()


# ---- one owner -------------------------------------------------------------------------
#
# The lock is config/ownership.py's flock on WORKDIR/.owner, taken without waiting; the
# kernel drops it however the holder ends, so a killed run never blocks its rerun. On NFS it
# holds across machines (a crashed client's lock goes when its NFSv4 lease ends, ~90 s, or
# its NFSv3 lock daemon recovers). Lustre gives cluster-wide flock only when mounted with
# `-o flock`; `localflock` excludes only processes on the same node, and with neither the
# call fails (ENOSYS), which is refused in one line: JAXTRAIN_UNLOCKED_WORKDIR=1 runs
# without the lock, on the user's word that nothing else writes the workdir.

UNLOCKED_ENV = "JAXTRAIN_UNLOCKED_WORKDIR"
_held: dict[Path, list] = {}  # lock file -> [file descriptor, depth]: re-entrant in one process


class WorkdirBusy(UserError):
    """Another process owns the workdir."""


@contextlib.contextmanager
def owned(workdir: str | Path, command: str) -> Iterator[None]:
    """Hold the workdir's lock for the block (creating the workdir if needed). In a process
    group, process 0 takes it for all and every process learns the outcome: all go on, or
    all stop with the same line. Nested calls in one process share the lock."""
    path = Layout(Path(workdir).absolute()).owner
    error = None
    if jax.process_index() == 0 and os.environ.get(UNLOCKED_ENV) != "1":
        try:
            _acquire(path, command)
        except UserError as err:
            error = str(err)
    error = _agree(error)
    if error is not None:
        raise WorkdirBusy(error)
    try:
        yield
    finally:
        if path in _held:
            _release(path)


def _acquire(path: Path, command: str) -> None:
    if path in _held:
        _held[path][1] += 1
        return
    try:
        with writing("the workdir's lock file", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _held[path] = [ownership.take(path, command), 1]
    except ownership.Owned as err:
        raise UserError(f"--workdir {path.parent}: {err}; it has this workdir until it exits "
                        f"(one owner per workdir)") from None
    except ownership.NoLocks as err:
        raise UserError(f"--workdir {path.parent}: this file system cannot lock {path.name} ({err}); "
                        f"on Lustre mount with -o flock, or set {UNLOCKED_ENV}=1 if nothing else "
                        f"writes this workdir") from None


def _release(path: Path) -> None:
    entry = _held[path]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        os.close(entry[0])  # closing the only descriptor drops the flock


def _agree(error: str | None) -> str | None:
    """Process 0's outcome, on every process of the group."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    codes = np.zeros(512, np.int32)
    if error is not None:
        encoded = np.frombuffer(error.encode()[:511], np.uint8)
        codes[:len(encoded)] = encoded
        codes[-1] = 1
    shared = np.asarray(multihost_utils.broadcast_one_to_all(codes))
    if shared[-1] == 0:
        return None
    return bytes(shared[:-1].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
