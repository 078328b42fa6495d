"""The run's logs: `metrics.jsonl`, TensorBoard events, and a progress display (what the
rows measure beyond the loss is run/telemetry.py's).

`metrics.jsonl` holds one JSON object per logged step with at least
  step, tokens, loss, lr, grad_norm, tokens_per_sec   (+ val_loss at evaluation steps,
  eval/<task>/<metric> at task evaluations; a new run with eval.tasks starts with a row
  of its step-0 evaluation: step, tokens, val_loss, eval/...).
On resume, rows after the restored checkpoint are dropped (they will be recomputed), so
the file of a resumed run equals that of an uninterrupted one except for timing fields.
TensorBoard events go to `WORKDIR/tb` (tensorboardX, no TensorFlow needed); a resumed
writer purges events after the restored step. With `train.wandb_project` set, rows also go
to Weights & Biases (optional: never imported otherwise), one W&B run per workdir,
resumed with it.

Every file written here turns an OSError (a full disk, lost permissions, a directory where
the file should be) into one line naming the path, the free space and what to do
(errors.writing). TensorBoard events are written by tensorboardX's own thread: its failure
is kept and raised the same way at the next row.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from jaxtrain.config.errors import ConfigError, UserError, WriteError, writing
from jaxtrain.run.workdir import Layout, write_atomic

TIMING_KEYS = ("tokens_per_sec", "eta_sec")


def _summary_writer(logdir: Path, purge_step: int):
    """tensorboardX's SummaryWriter, imported by the process that logs (process 0) when it
    starts logging. tensorboardX imports PyTorch at module level whenever it is installed,
    only to accept torch tensors, which jaxtrain never passes: 1.3 s and a few hundred MB
    per process on a machine with PyTorch. The import is made with torch marked absent
    (tensorboardX's own `except ImportError` path), unless torch is already loaded; the mark
    is removed at once, so later `import torch` works as usual."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    _keep_tensorboard_failures()
    return SummaryWriter(str(logdir), purge_step=purge_step)


_TENSORBOARD_FAILURES: list[OSError] = []  # raised in tensorboardX's writer thread, not yet reported


def _keep_tensorboard_failures() -> None:
    """An OSError in tensorboardX's writer thread would print a traceback from the thread;
    it is kept for `MetricsLogger.write` to raise as one line instead (hook installed once)."""
    _TENSORBOARD_FAILURES.clear()
    if getattr(threading.excepthook, "keeps_tensorboard_failures", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboardX"):
            _TENSORBOARD_FAILURES.append(args.exc_value)
        else:
            previous(args)

    hook.keeps_tensorboard_failures = True
    threading.excepthook = hook


def _abandon(writer) -> None:
    """Mark a failed tensorboardX writer closed, so that its exit hook does not try (and
    fail, with a traceback) to flush again."""
    event_writer = getattr(getattr(writer, "file_writer", None), "event_writer", None)
    if event_writer is not None:
        event_writer._closed = True


def read_metrics(path: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl. A last line that is not a whole JSON row (what a kill or
    a full disk leaves mid-write) is dropped, with a one-line warning; the row is recomputed
    when the run resumes. A damaged row before the last is an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a row with a step")
        except ValueError as err:
            if number == len(lines):
                (warn or _warn)(f"{path}: dropped its last line, cut short by an interrupted write "
                                f"({len(line)} characters)")
                break
            raise UserError(f"{path} line {number}: not a metrics row ({err}); the file is damaged") from None
        rows.append(row)
    return rows


def _warn(text: str) -> None:
    print(f"jaxtrain: warning: {text}", file=sys.stderr, flush=True)


def truncate_after(path: Path, step: int, warn: Callable[[str], None] | None = None) -> None:
    """Keep rows with row['step'] <= step (and drop a torn last line); the file is
    replaced atomically."""
    if not path.exists():
        return
    kept = [row for row in read_metrics(path, warn) if row["step"] <= step]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def check_wandb(project: str | None) -> None:
    """A one-line error, before training starts, if W&B is asked for but not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("train.wandb_project", f"{project!r} needs the wandb package "
                                                 "(pip install wandb), which is not installed") from None


def _wandb_run(workdir: Path, project: str, run_config: dict):
    import wandb

    run_id = hashlib.sha1(str(workdir.absolute()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=workdir.name, id=run_id, resume="allow", dir=str(workdir),
                      config=run_config)


class MetricsLogger:
    """Writes rows to metrics.jsonl and TensorBoard, and shows progress on the terminal."""

    def __init__(self, workdir: Path, start_step: int, total_steps: int, enabled: bool = True,
                 console: bool = True, wandb_project: str | None = None, run_config: dict | None = None,
                 warn: Callable[[str], None] | None = None, fresh: bool = False):
        """Rows after `start_step` are dropped; `fresh` (a run without a checkpoint) drops
        those at start_step too (a new run's step-0 evaluation row is written again)."""
        self.enabled = enabled
        self.path, self._tb_dir = Layout(workdir).metrics, Layout(workdir).tensorboard
        self._tty = console and sys.stderr.isatty()
        self._bar = None
        self._muted = not console  # set when the terminal went away, or asked to be quiet
        if not enabled:
            return
        with writing("metrics file", self.path):
            truncate_after(self.path, start_step - fresh, warn)
            self._file = self.path.open("a")
        with writing("TensorBoard directory", self._tb_dir):
            self._tb = _summary_writer(self._tb_dir, start_step + 1 - fresh)
        self._wandb = _wandb_run(workdir, wandb_project, run_config or {}) if wandb_project else None
        if self._tty:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with writing("metrics file", self.path):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        with writing("TensorBoard events in", self._tb_dir):
            if _TENSORBOARD_FAILURES:
                _abandon(self._tb)
                raise _TENSORBOARD_FAILURES[0]
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        self._display(self._show, row)

    def _display(self, show, *args) -> None:
        """Terminal output is best effort: a closed pipe (e.g. `| head`) must not stop training."""
        if self._muted:
            return
        try:
            show(*args)
        except OSError:  # BrokenPipeError included
            self._muted = True

    def _show(self, row: dict) -> None:
        parts = [f"loss {row['loss']:.4f}", f"{row['tokens_per_sec']:,.0f} tok/s"] if "loss" in row else []
        parts += [f"{key.removeprefix('eval/')} {row[key]:.4f}" for key in row
                  if key == "val_loss" or key.startswith("eval/")]
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(parts), refresh=False)
            self._bar.update(row["step"] - self._bar.n)
        else:
            eta = row.get("eta_sec")
            eta_text = f", eta {eta:.0f}s" if eta is not None else ""
            print(f"step {row['step']}: " + ", ".join(parts) + eta_text, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self._display(self._print, text)

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Flush and close everything. A write that fails here is one line, unless the run
        is already ending on an error (that one is reported, not this consequence of it)."""
        if not self.enabled:
            return
        ending_on_error = sys.exc_info()[0] is not None
        if self._bar is not None:
            self._display(self._bar.close)
        try:
            with writing("TensorBoard events in", self._tb_dir):
                try:
                    self._tb.close()
                finally:
                    _abandon(self._tb)
            with writing("metrics file", self.path):
                self._file.close()
        except WriteError:
            if not ending_on_error:
                raise
        finally:
            if self._wandb is not None:
                self._wandb.finish()
