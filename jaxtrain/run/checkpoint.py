"""orbax checkpoints of everything a run needs to continue exactly.

One checkpoint (`<directory>/<step>/`, WORKDIR/checkpoints in a workdir) holds three items:
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
                        <directory>.unreadable/<step>, and uses the previous one
  failed save           (disk full, permissions) `CheckpointSaveError`, one line: the step, the
                        cause (for a file-system error: its reason and the free space there),
                        the checkpoints still intact, what to do; the failed save's temporary
                        directory is removed (it would hold space the next save needs), earlier
                        checkpoints are never touched, and orbax's own reports of it are dropped
With several processes every call here is collective: all processes make it together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from jaxtrain.config.errors import RERUN, UserError, WriteError, explain_os_error
from jaxtrain.config.schema import CheckpointConfig
from jaxtrain.run.distributed import barrier


class CheckpointSaveError(WriteError):
    """Writing a checkpoint failed; the earlier ones are intact."""


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig, read_only: bool = False):
        """`directory`: where the step directories go (workdir.Layout.checkpoints); a
        checkpoint that does not read back is moved to `<directory>.unreadable/`."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # left by a save killed mid-write
        )
        self._directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self._directory, options=options,
                                              item_names=("state", "data", "meta"))
        self._every = cfg.every_steps
        self._saving: int | None = None  # step of the save that may still be in flight
        if not read_only:
            _silence_failed_saves(self._directory)

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
            self._remove_partial(step)
            code = _os_error_code(err)
            reason, advice = explain_os_error(self._directory, OSError(code, os.strerror(code))) if code \
                else (_first_line(err), RERUN)
            failure = CheckpointSaveError(f"checkpoint save at step {step} in {self._directory} failed: {reason}", advice)
            raise failure.with_intact(intact) from None

    def _remove_partial(self, step: int) -> None:
        """The failed save's temporary directory (process 0: the directory is shared)."""
        if jax.process_index() == 0 and self._directory.is_dir():
            for partial in self._directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)

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
        target = self._directory.with_name(self._directory.name + ".unreadable") / f"{step}.{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(self._directory / str(step)), str(target))
        barrier(f"jaxtrain: moved checkpoint {step} aside")
        self._manager.reload()
        return target

    def read_meta(self, step: int) -> dict:
        """Only the metadata item of a checkpoint (no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def settle(self) -> list[int]:
        """The complete checkpoints once the in-flight save has ended, whether or not it
        succeeded (for the report of a run that is failing anyway)."""
        try:
            self.wait()
        except CheckpointSaveError:
            pass
        return sorted(self.all_steps())

    def wait(self) -> None:
        """Block until the in-flight save is on disk (raises CheckpointSaveError if it failed)."""
        if self._saving is not None:
            step, self._saving = self._saving, None
            with self._reporting_failure(step):
                self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


class _DropReports(logging.Filter):
    """Drop a logger's records (at `level` and above; those below pass) that mention one of
    `phrases` or of `directories`: orbax's own reports of a failure this module already
    reports in one line."""

    def __init__(self, phrases: tuple[str, ...], directories: set[str], level: int = logging.NOTSET):
        super().__init__()
        self.phrases, self.directories, self.level = phrases, directories, level

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return record.levelno < self.level or not any(
            text in message for text in (*self.phrases, *self.directories))


# A failed orbax read abandons its other in-flight shard reads; each later fails again and
# prints a traceback (asyncio "exception never retrieved", "Exception ignored in" when the
# coroutine is collected, "Event loop is closed" when tensorstore completes a read after
# orbax closed its loop). The one-line warning already says it all.
_ABANDONED_READ = "_read_array_index_and_device_put"
_QUIET_DIRECTORIES: set[str] = set()  # checkpoint directories whose late read failures are dropped


def _drop_abandoned_reads(unraisable: Any) -> None:
    abandoned = getattr(unraisable.object, "__qualname__", "") == _ABANDONED_READ
    late_callback = str(unraisable.exc_value) == "Event loop is closed"  # read done after orbax gave up
    if not (abandoned or late_callback):
        _drop_abandoned_reads.previous(unraisable)


def _silence_abandoned_reads(directory: Path) -> None:
    """Drop only the late reports of failed reads (hooks installed once per process)."""
    if not _QUIET_DIRECTORIES:
        logging.getLogger("asyncio").addFilter(_DropReports((_ABANDONED_READ,), _QUIET_DIRECTORIES))
        _drop_abandoned_reads.previous = sys.unraisablehook
        sys.unraisablehook = _drop_abandoned_reads
    _QUIET_DIRECTORIES.add(str(directory))


# orbax logs a failed background save at ERROR, with tracebacks, from each of its threads
# (not every record names the directory); `Checkpointer.wait` raises it as one line.
_FAILED_SAVE_PHRASES = ("Save Finalize thread", "_SignalingThread.run() raised")
_SAVING_DIRECTORIES: set[str] = set()  # checkpoint directories this process saves into


def _silence_failed_saves(directory: Path) -> None:
    if not _SAVING_DIRECTORIES:
        logging.getLogger("absl").addFilter(_DropReports(_FAILED_SAVE_PHRASES, _SAVING_DIRECTORIES, logging.ERROR))
    _SAVING_DIRECTORIES.add(str(directory))


def _os_error_code(err: BaseException) -> int | None:
    """The errno of a file-system failure anywhere in the chain: an OSError, or tensorstore's
    `[os_error_code='28']` inside the error orbax raises."""
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err.errno
        found = re.search(r"os_error_code='?(\d+)", str(err))
        if found:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


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
