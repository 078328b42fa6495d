"""The training loop's periodic actions: what runs after a step, and every how many steps.

Levanter's hooks with `every=`: each action is a small function of the step just
dispatched (a `Tick`), registered with its period (`every` steps, 0 = never) and any
other condition (`also`, e.g. the last step or a stop). `run_due` runs the due ones in
the order they were registered, which matters: the training loop documents its order
where it registers them (`TrainingRun._actions` in jaxtrain/run/loop.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


def every(n: int, step: int) -> bool:
    """Whether `step` is a multiple of the period `n` (never when n is 0)."""
    return n > 0 and step % n == 0


@dataclasses.dataclass
class Tick:
    """One dispatched step as the actions after it see it; actions may update it."""

    step: int
    tokens: int  # seen after this step
    batch: Any  # the step's global batch
    metrics: dict  # its metrics, device values not yet fetched
    telemetry: bool  # it ran the variant of the step with extra metrics
    last: bool  # step == train.steps
    fired: set[str] = dataclasses.field(default_factory=set)  # names of the actions run after it so far
    halt: bool = False  # the run stops after this step (set by the stop vote)


@dataclasses.dataclass(frozen=True)
class Action:
    """`run(tick)` after every `every`-th step (0 = by `also` alone), and after any step
    for which `also(tick)` holds."""

    name: str
    run: Callable[[Tick], None]
    every: int = 0
    also: Callable[[Tick], bool] | None = None

    def due(self, tick: Tick) -> bool:
        return every(self.every, tick.step) or (self.also is not None and self.also(tick))


def run_due(actions: Sequence[Action], tick: Tick) -> None:
    """Run the actions due after `tick`'s step, in order; each sees the names run before it."""
    for action in actions:
        if action.due(tick):
            action.run(tick)
            tick.fired.add(action.name)
