"""`jaxtrain sweep --fit lr~batch,tokens`: a power law for the optimum, fitted by least
squares over the sweep's per-cell optima.

A CELL of a sweep is one curve: every grid key but the x axis fixed. Its optimum x_opt is
sweep.fit_optimum's (the vertex of the parabola in log2 x through the best point and its
neighbours, else the best grid point). With the cell's covariates c_1..c_k (grid values, or
the derived `tokens` = steps x batch x seq_len and `steps`), the law

    x_opt = a * c_1^alpha_1 * ... * c_k^alpha_k

is linear in log2, and fitted by ordinary least squares over the n cells:

    y_j = log2 x_opt_j,   X_j = (1, log2 c_1j, ..., log2 c_kj),   p = k + 1 parameters
    beta = argmin |y - X beta|^2 = (X^T X)^-1 X^T y          (numpy.linalg.lstsq)
    s^2 = |y - X beta|^2 / (n - p),   Cov(beta) = s^2 (X^T X)^-1,   se_i = sqrt(Cov_ii)

beta = (log2 a, alpha_1, ..., alpha_k). The standard errors are those of OLS with
independent, equal-variance errors in log2 x_opt; they need n > p (n = p is an exact fit
with no residual left to estimate them: reported as null). Optima at the grid's edge are
bounds, not estimates, so they are left out of the fit and listed under `excluded`.
Scaling-law studies fit hyperparameter optima in this form (e.g. DeepSeek-AI 2024,
"DeepSeek LLM", Sec. 3.1: the optimal learning rate and batch size as power laws of compute).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxtrain.config.errors import UserError

# Short names a law may use for common grid keys, and the covariates every cell carries.
ALIASES = {"lr": "optimizer.lr", "batch": "train.batch_size", "width": "model.d_model",
           "depth": "model.n_layers", "wd": "optimizer.weight_decay"}
DERIVED = ("tokens", "steps")


@dataclasses.dataclass(frozen=True)
class Law:
    text: str  # as given: lr~batch,tokens
    target: str  # the x key whose optimum is fitted
    covariates: tuple[str, ...]  # keys of the per-cell optima: grid keys or DERIVED names


def _resolve(name: str, grid_keys: list[str], text: str) -> str:
    """A name of a law -> the grid key (or derived covariate) it means."""
    if name in DERIVED or name in grid_keys:
        return name
    key = ALIASES.get(name)
    matches = [key] if key in grid_keys else [k for k in grid_keys if k.split(".")[-1] == name]
    if len(matches) != 1:
        known = ", ".join([*grid_keys, *DERIVED])
        raise UserError(f"--fit {text}: {name!r} is not a --grid key (nor an alias of one) or derived "
                        f"covariate; choose from {known}")
    return matches[0]


def parse_law(text: str, x_key: str, grid_keys: list[str]) -> Law:
    """`TARGET~C1,C2,...` -> Law; the target must be the sweep's x axis."""
    target, sep, rest = text.partition("~")
    names = [n.strip() for n in rest.split(",") if n.strip()]
    if not sep or not target.strip() or not names:
        raise UserError(f"--fit {text}: expected TARGET~COVARIATE,... (e.g. lr~batch,tokens)")
    if _resolve(target.strip(), grid_keys, text) != x_key:
        raise UserError(f"--fit {text}: the fitted optimum is the sweep's x axis ({x_key}), not {target.strip()!r}")
    covariates = tuple(_resolve(n, grid_keys, text) for n in names)
    if x_key in covariates or len(set(covariates)) != len(covariates):
        raise UserError(f"--fit {text}: each covariate once, and not the x axis {x_key}")
    return Law(text, x_key, covariates)


def check_law(law: Law, cells: list[dict]) -> None:
    """Refuse, before anything trains, a law the sweep's grid cannot determine: every
    covariate a positive number that varies, not a combination of the others."""
    for key in law.covariates:
        bad = next((c[key] for c in cells if isinstance(c[key], bool) or not isinstance(c[key], (int, float))
                    or c[key] <= 0), None)
        if bad is not None:
            raise UserError(f"--fit {law.text}: {key}={bad!r} is not a positive number (the law is fitted in log2)")
    rows = sorted({tuple(c[k] for k in law.covariates) for c in cells})
    X = np.column_stack([np.ones(len(rows)), np.log2(np.asarray(rows, np.float64)).reshape(len(rows), -1)])
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise UserError(f"--fit {law.text}: the grid's {len(rows)} distinct values of ({', '.join(law.covariates)}) "
                        f"cannot determine {X.shape[1]} parameters: each covariate must vary, independently "
                        f"of the others")


def least_squares_power_law(y_log2: np.ndarray, c_log2: np.ndarray) -> dict[str, Any]:
    """OLS of y on (1, columns of c_log2): coefficients, standard errors (None when n = p),
    residual standard deviation and fitted values (module docstring)."""
    y = np.asarray(y_log2, np.float64)
    X = np.column_stack([np.ones(len(y)), np.asarray(c_log2, np.float64)])
    n, p = X.shape
    if n < p or np.linalg.matrix_rank(X) < p:
        why = "" if n < p else " (over these optima a covariate is constant or a combination of the others)"
        raise ValueError(f"{n} optima cannot determine {p} parameters{why}")
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    residual = y - X @ beta
    if n > p:
        s2 = float(residual @ residual) / (n - p)
        se = np.sqrt(np.diag(s2 * np.linalg.inv(X.T @ X)))
        se_list, s = [float(v) for v in se], math.sqrt(s2)
    else:
        se_list, s = [None] * p, None
    return {"beta": [float(b) for b in beta], "se": se_list, "residual_std_log2": s,
            "fitted_log2": [float(v) for v in X @ beta]}


def _left_out(fit: dict | None, values: list) -> str | None:
    """Why a cell's optimum is not used, or None."""
    if fit is None:
        return "diverged"
    if fit["at_edge"]:
        return "at_edge"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        return "covariate not a positive number"
    return None


def fit_law(law: Law, optima: list[dict]) -> dict[str, Any]:
    """The law fitted over the cells' optima; {"law", "error"} when it cannot be (too few
    optima left after divergences and edges: the sweep's other results stand)."""
    used, excluded = [], []
    for cell in optima:
        fit, values = cell["optimum"], {c: cell.get(c) for c in law.covariates}
        reason = _left_out(fit, list(values.values()))
        if reason:
            excluded.append({**values, "reason": reason})
        else:
            used.append({**values, "opt_log2": fit["opt_log2"]})
    base = {"law": law.text, "target": law.target, "covariates": list(law.covariates), "excluded": excluded}
    try:
        covariates = np.array([[c[k] for k in law.covariates] for c in used], np.float64)
        ols = least_squares_power_law([c["opt_log2"] for c in used],
                                      np.log2(covariates).reshape(len(used), len(law.covariates)))
    except ValueError as err:
        return {**base, "error": str(err)}
    (log2_a, *alphas), (se_a, *se_alphas) = ols["beta"], ols["se"]
    cells = [{**c, "fitted_log2": f} for c, f in zip(used, ols["fitted_log2"], strict=True)]
    return {**base, "n": len(used), "a": 2.0**log2_a, "log2_a": log2_a, "log2_a_se": se_a,
            "exponents": dict(zip(law.covariates, alphas, strict=True)),
            "exponent_se": dict(zip(law.covariates, se_alphas, strict=True)),
            "residual_std_log2": ols["residual_std_log2"], "cells": cells}


def describe(fit: dict[str, Any]) -> str:
    """One line: `lr~batch,tokens: optimizer.lr_opt = 0.0031 * batch_size^-0.52(±0.04) ...`."""
    if "error" in fit:
        return f"{fit['law']}: not fitted: {fit['error']}"
    se = lambda v: "" if v is None else f"(±{v:.3f})"
    terms = " * ".join(f"{k.split('.')[-1]}^{a:+.3f}{se(fit['exponent_se'][k])}" for k, a in fit["exponents"].items())
    return (f"{fit['law']}: {fit['target']}_opt = {fit['a']:.4g} * {terms} over {fit['n']} optima "
            f"(log2 a {fit['log2_a']:.3f}{se(fit['log2_a_se'])}; {len(fit['excluded'])} left out)")
