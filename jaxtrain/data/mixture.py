"""Which source each window of the training stream comes from: weights per phase, exactly.

The stream is a sequence of slots (global window positions, `train.batch_size` per step).
A phase covers the slots from its first step on and mixes with integer proportions
p_1..p_S (each weight as the nearest fraction with a denominator <= 1000 / weight, so
within 0.05% of itself and never 0; `integer_proportions`). Inside a phase the
first n slots hold exactly

    c_1(n) = n - floor(n (R - p_1) / R),  R = p_1 + ... + p_S,

slots of source 1, and the remaining floor(n (R - p_1) / R) are shared among sources
2..S by the same rule: a deterministic stride schedule, as grain's MixedMapDataset uses,
so counts stay within S - 1 windows of n p_s / R at every n. Slot k belongs to the source
whose count grows from n = k to n = k + 1, and is that source's window number
(windows read in earlier phases) + c_s(k). A source's windows are its own seeded,
epoch-by-epoch shuffled stream, so the epoch a source is in is its windows read so far
divided by its window count. Everything is a pure function of the slot index: random
access, exact resume, and the same stream for any number of processes.
"""

from __future__ import annotations

import bisect
import fractions
import math
from typing import Sequence

from jaxtrain.config.checks import phase_start_steps
from jaxtrain.config.schema import Config


# Weights are read as fractions with denominators <= 1000 / weight (1000 from weight 1 up):
# exact for any weight written with three significant digits (0.7, 0.125, 0.0005), and
# the nearest fraction otherwise.
WEIGHT_DENOMINATOR = 1000

# grain wants a finite length; 2**62 slots never run out and stay below int64's 2**63.
STREAM_SLOTS = 2**62


def _weight_fraction(weight: float) -> fractions.Fraction:
    """`weight` as the nearest fraction with denominator <= D = WEIGHT_DENOMINATOR / min(weight, 1).
    Some fraction k/D lies within 1/(2D) of the weight, so the error is at most
    weight / (2 WEIGHT_DENOMINATOR): 0.05% of the weight whatever its size (a fixed D = 1000
    rounded 0.0006 to 1/1000, 1.7x, and anything below 1/2000 to 0)."""
    exact = fractions.Fraction(weight)
    if exact == 0:
        return exact
    return exact.limit_denominator(max(WEIGHT_DENOMINATOR, math.ceil(WEIGHT_DENOMINATOR / exact)))


def integer_proportions(weights: Sequence[float]) -> tuple[int, ...]:
    """Smallest integers in the ratio of `weights`; every positive weight gets >= 1 (its
    source owns at least one slot per period), a zero weight gets 0."""
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"mixture weights must be >= 0 and not all 0, got {list(weights)}")
    fracs = [_weight_fraction(w) for w in weights]
    scale = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * scale) for f in fracs]
    divisor = math.gcd(*ints)
    return tuple(i // divisor for i in ints)


def counts(n: int, proportions: Sequence[int]) -> list[int]:
    """Slots of each source among the first n slots of a phase (module docstring)."""
    remaining, rest, out = sum(proportions), n, []
    for p in proportions:
        after = rest * (remaining - p) // remaining if remaining else 0
        out.append(rest - after)
        rest, remaining = after, remaining - p
    return out


class Mixture:
    """slot -> (source index, window number within that source's stream): a grain
    selection map (`grain.MapDataset.select_from_datasets`)."""

    def __init__(self, phase_slots: Sequence[int], phase_weights: Sequence[Sequence[float]]):
        self.starts = list(phase_slots)  # first slot of each phase; starts[0] == 0
        self.proportions = [integer_proportions(w) for w in phase_weights]
        self.offsets = [[0] * len(self.proportions[0])]  # windows of each source before each phase
        for j in range(1, len(self.starts)):
            done = counts(self.starts[j] - self.starts[j - 1], self.proportions[j - 1])
            self.offsets.append([a + b for a, b in zip(self.offsets[-1], done)])

    def windows_read(self, slot: int) -> list[int]:
        """Windows of each source in slots [0, slot)."""
        j = bisect.bisect_right(self.starts, slot) - 1
        inside = counts(slot - self.starts[j], self.proportions[j])
        return [a + b for a, b in zip(self.offsets[j], inside)]

    def __len__(self) -> int:
        return STREAM_SLOTS

    def __getitem__(self, slot: int) -> tuple[int, int]:
        before, after = self.windows_read(slot), self.windows_read(slot + 1)
        source = next(s for s, (a, b) in enumerate(zip(before, after)) if b > a)
        return source, before[source]


def mixture_for(cfg: Config) -> Mixture:
    """The run's mixture: data.sources weights from slot 0, then each of data.phases."""
    names = cfg.data.source_names() or ["text"]
    base = [s.weight for s in cfg.data.sources] or [1.0]
    slots = [0] + [step * cfg.train.batch_size for step in phase_start_steps(cfg)]
    weights = [base] + [[p.weights.get(n, 0.0) for n in names] for p in cfg.data.phases]
    return Mixture(slots, weights)
