"""orbax checkpoints of everything a run needs to continue exactly.

One checkpoint (`WORKDIR/checkpoints/<step>/`) holds three items:
  state  params, optimizer state, step and RNG key (sharded arrays, OCDBT/tensorstore)
  data   the grain iterator state (JSON): where the next batch comes from
  meta   tokens seen, the resolved config and parametrization table (JSON)

Saves are asynchronous by default: orbax copies device arrays to host before `save`
returns (so the next step may donate the buffers), then writes in a background thread.
Every checkpoint is written to a temporary directory and renamed when complete, so an
interrupted save is never mistaken for a checkpoint. `keep` newest are retained.
Restoring takes the target shardings, so a checkpoint restores onto whatever mesh the
current run uses (another device count or axis sizes: orbax reads each device's shard).

What can go wrong on disk, and what happens:
  killed mid-save       the temporary directory is ignored (and removed at the next start)
  corrupted checkpoint  (truncated or missing files) `restore_newest` warns, moves it to
                        WORKDIR/checkpoints.unreadable/<step>, and uses the previous one
  failed save           (disk full, permissions) `CheckpointSaveError` names the step and the
                        checkpoints still intact; earlier checkpoints are never touched
With several processes every call here is collective: all processes make it together.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from jaxtrain.config import CheckpointConfig
from jaxtrain.distributed import barrier
from jaxtrain.errors import UserError

UNREADABLE_DIR = "checkpoints.unreadable"


class CheckpointSaveError(UserError):
    """Writing a checkpoint failed; the earlier ones are intact."""

    exit_code = 1


class Checkpointer:
    def __init__(self, workdir: Path, cfg: CheckpointConfig, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # left by a save killed mid-write
        )
        self._directory = Path(workdir).absolute() / "checkpoints"
        self._manager = ocp.CheckpointManager(self._directory, options=options,
                                              item_names=("state", "data", "meta"))
        self._every = cfg.every_steps
        self._saving: int | None = None  # step of the save that may still be in flight

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `save` will write at `step` without being forced."""
        return step % self._every == 0

    def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Save if `step` is a multiple of `every_steps` (or `force`); returns whether it saved."""
        if not (force or self.due(step)):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.wait()  # orbax would wait for the previous save too; this attributes its failure
        with self._reporting_failure(step):
            saved = self._manager.save(step, args=args, force=True)
        self._saving = step
        return saved

    @contextlib.contextmanager
    def _reporting_failure(self, step: int) -> Iterator[None]:
        """Turn a failed write into one line naming the step and what is still intact."""
        try:
            yield
        except Exception as err:
            intact = [s for s in self.all_steps() if s != step]
            raise CheckpointSaveError(
                f"checkpoint save at step {step} in {self._directory} failed "
                f"({_first_line(err)}); intact checkpoints: steps {intact or 'none'}"
            ) from err

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """abstract_state: ShapeDtypeStructs carrying the target shardings."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        return restored.state, restored.data, restored.meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (optimizer state is not read): for evaluation and inspection."""
        target = {"params": abstract_params}
        state = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                       restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        return self._manager.restore(step, args=ocp.args.Composite(state=state)).state["params"]

    def restore_newest(self, abstract_state: Any, warn: Callable[[str], None]) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data, meta) of the newest checkpoint that reads back completely,
        or None when there is none. Unreadable newer ones are reported through `warn` and
        moved aside (never deleted), so later saves of those step numbers do not collide
        with them. If no checkpoint reads at all, the cause is more likely this run's
        target (e.g. another optimizer structure) than the disk: that is an error, and
        nothing is moved."""
        steps = sorted(self.all_steps(), reverse=True)
        if steps:
            _silence_abandoned_reads(self._directory)
        unreadable = []
        for step in steps:
            try:
                restored = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any read failure means "unusable"
                unreadable.append((step, err))
                continue
            for bad_step, err in unreadable:
                moved = self._move_aside(bad_step)
                warn(f"checkpoint at step {bad_step} is unreadable ({_first_line(err)}); "
                     f"skipped it and moved it to {moved}")
            return (step, *restored)
        if unreadable:
            step, err = unreadable[0]
            raise UserError(f"{self._directory}: no checkpoint reads back into this run's state (step {step}: "
                            f"{_first_line(err)}); nothing was changed (move the checkpoints aside "
                            f"to start over)")
        return None

    def newest_meta(self) -> dict | None:
        """The metadata of the newest checkpoint whose metadata reads (None: no checkpoint)."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.read_meta(step)
            except Exception:  # noqa: BLE001 - restore_newest reports and skips it later
                continue
        return None

    def _move_aside(self, step: int) -> Path:
        target = self._directory.parent / UNREADABLE_DIR / f"{step}.{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(self._directory / str(step)), str(target))
        barrier(f"jaxtrain: moved checkpoint {step} aside")
        self._manager.reload()
        return target

    def read_meta(self, step: int) -> dict:
        """Only the metadata item of a checkpoint (no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Block until the in-flight save is on disk (raises CheckpointSaveError if it failed)."""
        if self._saving is not None:
            step, self._saving = self._saving, None
            with self._reporting_failure(step):
                self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# A failed orbax read abandons its other in-flight shard reads; each later fails again and
# prints a traceback (asyncio "exception never retrieved", "Exception ignored in" when the
# coroutine is collected, "Event loop is closed" when tensorstore completes a read after
# orbax closed its loop). The one-line warning already says it all.
_ABANDONED_READ = "_read_array_index_and_device_put"
_QUIET_DIRECTORIES: set[str] = set()  # checkpoint directories whose late read failures are dropped


class _DropAbandonedReads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (_ABANDONED_READ in message or any(d in message for d in _QUIET_DIRECTORIES))


def _drop_abandoned_reads(unraisable: Any) -> None:
    abandoned = getattr(unraisable.object, "__qualname__", "") == _ABANDONED_READ
    late_callback = str(unraisable.exc_value) == "Event loop is closed"  # read done after orbax gave up
    if not (abandoned or late_callback):
        _drop_abandoned_reads.previous(unraisable)


def _silence_abandoned_reads(directory: Path) -> None:
    """Drop only the late reports of failed reads (hooks installed once per process)."""
    if not _QUIET_DIRECTORIES:
        logging.getLogger("asyncio").addFilter(_DropAbandonedReads())
        _drop_abandoned_reads.previous = sys.unraisablehook
        sys.unraisablehook = _drop_abandoned_reads
    _QUIET_DIRECTORIES.add(str(directory))


def _first_line(err: BaseException) -> str:
    """The innermost cause's first line (orbax wraps the tensorstore error that says what
    is wrong with the file), shortened for a one-line message."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 240 else line[:237] + "..."


@contextlib.contextmanager
def quiet_absl():
    """Silence absl's INFO/WARNING lines (orbax notes that a read-only manager will not
    save or delete) for a block."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
