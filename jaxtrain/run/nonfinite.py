"""What a run does when a step's loss or gradients are not finite (`train.on_nonfinite`).

  halt  (default) stop with `NonFiniteError`, exit status 3, naming the first bad step and
        the first non-finite metric. The check runs before every checkpoint save, so no
        checkpoint ever holds a state that came out of a non-finite step: the newest one on
        disk is the last good state, and rerunning resumes from it (e.g. with a lower LR).
  skip  the step keeps the old params and optimizer state (`train_step` selects on the
        device); the step counter, data and schedule still move on. The number of skipped
        steps is logged as `skipped_steps` (cumulative, carried across resumes in the
        checkpoint metadata).

Each step's flag is a device scalar left unfetched until a log row or a save needs it, so
the guard never makes the host wait for a step it would not wait for anyway.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

from jaxtrain.config.errors import UserError
from jaxtrain.step import NONFINITE


class NonFiniteError(UserError):
    """A step produced a non-finite loss or gradient under `on_nonfinite: halt`."""

    exit_code = 3


class NonFiniteGuard:
    """`newest_checkpoint()` names the last good state in the halt message (asked only then)."""

    def __init__(self, mode: str, newest_checkpoint: Callable[[], int | None], skipped_before: int = 0):
        self.mode = mode
        self.skipped = skipped_before
        self._newest_checkpoint = newest_checkpoint
        self._unchecked: list[tuple[int, jax.Array, dict]] = []

    def record(self, step: int, metrics: dict) -> dict:
        """Keep step `step`'s flag (and metrics, to name the culprit); returns the metrics
        without the flag, for logging."""
        metrics = dict(metrics)
        self._unchecked.append((step, metrics.pop(NONFINITE), metrics))
        return metrics

    def check(self, upto: int | None = None) -> None:
        """Fetch the flags recorded since the last check, up to step `upto` (default all):
        count skipped steps, or raise at the first non-finite step under `halt`."""
        unchecked = [entry for entry in self._unchecked if upto is None or entry[0] <= upto]
        if not unchecked:
            return
        self._unchecked = self._unchecked[len(unchecked):]
        flags = jax.device_get([flag for _, flag, _ in unchecked])
        for (step, _, metrics), bad in zip(unchecked, flags, strict=True):
            if not bad:
                continue
            if self.mode == "skip":
                self.skipped += 1
                continue
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            name, value = next(((k, v) for k, v in values.items() if not math.isfinite(v)),
                               ("a gradient entry", math.nan))
            last_saved = self._newest_checkpoint()
            kept = f"the newest checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint exists"
            raise NonFiniteError(f"step {step}: {name} is {value} (train.on_nonfinite=halt); stopped before saving "
                                 f"it, {kept}. Rerun to resume there (e.g. with a lower optimizer.lr), "
                                 f"or set train.on_nonfinite=skip")

    def row_fields(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped} if self.mode == "skip" else {}
