"""The loss-curve law across learning-rate schedules (Tissue et al. 2024, "Scaling Law with
Learning Rate Annealing"):

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)

    S1(s) = sum_{i<=s} eta_i                      forward area: how far the run has moved
    S2(s) = sum_{i<=s} m_i,  m_i = lambda * m_{i-1} + (eta_{i-1} - eta_i)
                                                  annealing area: the LR decrease so far,
                                                  with a momentum that delays its effect

eta_i is the learning rate of step i (the whole schedule, warmup included, from the run's
config: jaxtrain/optim/schedules.py), lambda = 0.999 as in the paper. One fit of (L0, A, alpha, C)
to the logged training loss of one or more runs of a model and data predicts the curve of
any other schedule for them: only S1 and S2 change.

Fit: for a given alpha the law is linear in (L0, A, C), solved by least squares; alpha is
chosen on a grid in [0.02, 2] refined around its best point (no scipy needed). Rows before
the end of the warmup (or the first 5% of steps) are left out: the law describes the
curve after the initial transient.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxtrain.config.errors import UserError
from jaxtrain.config.files import load_config
from jaxtrain.optim.schedules import lr_per_step, resolve
from jaxtrain.run.metrics import read_metrics
from jaxtrain.run.workdir import Layout, read_run_config

MOMENTUM = 0.999  # lambda of the annealing area


@dataclasses.dataclass(frozen=True)
class Curve:
    """A schedule (and, if it ran, its logged training loss) in the law's coordinates."""

    label: str
    lrs: np.ndarray  # eta_1 .. eta_S: the LR of the s-th update
    steps: np.ndarray  # updates applied before each logged loss (empty if it never ran)
    losses: np.ndarray
    first_step: int  # losses after fewer updates are not part of the law

    def areas(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return annealing_areas(self.lrs, MOMENTUM, steps)


def annealing_areas(lrs: np.ndarray, momentum: float, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after each of `steps` (1-based: after step s the LRs eta_1 .. eta_s applied)."""
    s1 = np.cumsum(lrs)
    drops = np.diff(lrs, prepend=lrs[0]) * -1.0  # eta_{i-1} - eta_i, 0 for the first step
    m = np.zeros_like(lrs)
    acc = 0.0
    for i, drop in enumerate(drops):
        acc = momentum * acc + drop
        m[i] = acc
    s2 = np.cumsum(m)
    index = np.asarray(steps, int) - 1
    return s1[index], s2[index]


def load_curve(path: str | Path) -> Curve:
    """A workdir (config.yaml, metrics.jsonl if it ran) or a config file (prediction only)."""
    path = Path(path)
    if path.is_dir():
        cfg, rows = read_run_config(path), read_metrics(Layout(path).metrics)
    elif path.is_file():
        cfg, rows = load_config(path), []
    else:
        raise UserError(f"{path}: no such workdir or config file")
    lengths = resolve(cfg)
    first = max(math.ceil(lengths.warmup / lengths.per_step), cfg.train.steps // 20, 1)
    # a row of step s logs the loss of its batch before the s-th update: s - 1 updates in
    rows = [r for r in rows if "loss" in r and r["step"] - 1 >= first and math.isfinite(r["loss"])]
    return Curve(path.name if path.is_dir() else path.stem, lr_per_step(cfg),
                 np.array([r["step"] - 1 for r in rows], int), np.array([r["loss"] for r in rows], float), first)


@dataclasses.dataclass(frozen=True)
class Law:
    L0: float
    A: float
    alpha: float
    C: float

    def predict(self, curve: Curve, steps: np.ndarray) -> np.ndarray:
        s1, s2 = curve.areas(steps)
        return self.L0 + self.A * s1 ** -self.alpha - self.C * s2


def _solve(alpha: float, s1: np.ndarray, s2: np.ndarray, y: np.ndarray) -> tuple[Law, float]:
    design = np.stack([np.ones_like(s1), s1 ** -alpha, -s2], axis=1)
    (l0, a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    law = Law(float(l0), float(a), alpha, float(c))
    return law, float(np.mean((design @ np.array([l0, a, c]) - y) ** 2))


def fit(curves: list[Curve]) -> Law:
    usable = [c for c in curves if len(c.steps)]
    if sum(len(c.steps) for c in usable) < 5:
        raise UserError("fit-schedule-law: the fitted runs have fewer than 5 logged losses after warmup")
    areas = [c.areas(c.steps) for c in usable]
    s1 = np.concatenate([a[0] for a in areas])
    s2 = np.concatenate([a[1] for a in areas])
    y = np.concatenate([c.losses for c in usable])
    grid = np.geomspace(0.02, 2.0, 200)
    errors = [_solve(a, s1, s2, y)[1] for a in grid]
    best = int(np.argmin(errors))
    fine = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], 101)
    return min((_solve(a, s1, s2, y) for a in fine), key=lambda result: result[1])[0]


def prediction_error(law: Law, curve: Curve) -> dict[str, Any]:
    """Predicted final loss; with a logged curve also its mean/max absolute error and the
    error at the last logged step (the final loss, what a schedule comparison is about)."""
    final_step = len(curve.lrs)
    result: dict[str, Any] = {"run": curve.label, "predicted_final_loss": float(law.predict(curve, [final_step])[0])}
    if len(curve.steps):
        err = law.predict(curve, curve.steps) - curve.losses
        tail = curve.steps >= curve.steps[-1] - max(final_step // 20, 1)  # last 5%: average out batch noise
        result.update(logged_final_loss=float(curve.losses[tail].mean()),
                      predicted_tail_loss=float(law.predict(curve, curve.steps[tail]).mean()),
                      mean_abs_error=float(np.abs(err).mean()), max_abs_error=float(np.abs(err).max()),
                      final_error=float(err[tail].mean()))
    return result


def fit_and_predict(fit_paths: list[str], predict_paths: list[str]) -> dict[str, Any]:
    fitted = [load_curve(p) for p in fit_paths]
    predicted = [load_curve(p) for p in predict_paths]
    law = fit(fitted)
    return {"law": dataclasses.asdict(law), "momentum": MOMENTUM,
            "fitted": [prediction_error(law, c) for c in fitted],
            "predicted": [prediction_error(law, c) for c in predicted],
            "curves": [{"run": c.label, "fitted": was_fitted, "steps": c.steps.tolist(), "losses": c.losses.tolist(),
                        "law_steps": list(range(c.first_step, len(c.lrs) + 1)),
                        "law": law.predict(c, np.arange(c.first_step, len(c.lrs) + 1)).tolist()}
                       for c, was_fitted in [*((c, True) for c in fitted), *((c, False) for c in predicted)]]}
