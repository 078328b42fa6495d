"""`jaxtrain sweep`: a grid of short trainings, the results table, and the optimum of each
curve from a fit in log learning rate.

    jaxtrain sweep CONFIG --grid model.d_model=64,128 --grid optimizer.lr=1e-3,2e-3,4e-3 \
        [--grid parametrization.name=sp,mup] --out DIR

Every combination is an ordinary run in DIR/runs/<key=value,...>/, and DIR is a cache keyed
by each run's resolved config: rerunning a sweep reads a finished run back from its
result.json (written atomically, with the resolved config it was trained with) and resumes
a half-done one from its checkpoint, but only when that recorded config equals the one the
rerun would train (a key a run lacks, written by an older jaxtrain, counts as its default).
A run recorded with another config (say `--set train.steps=30` after 10) is trained again
from scratch; its old directory is moved to DIR/replaced/<run>@<time>/, not deleted,
since it may be hours of work trained with the settings the user meant. A result.json
that cannot be read (a sweep cut off while writing it by an older jaxtrain) means the run
is not done: it resumes from its last checkpoint, which costs one evaluation.

Grid values are numbers wherever Python reads them as numbers (1e-3, 3E-4, 1_000; YAML 1.1
would keep `1e-3` a string), else YAML scalars (sp, true). The x axis (default
optimizer.lr, fitted in log2) must hold positive numbers, checked before anything trains;
it is swept inside each CURVE (default: the first other grid key); every remaining key
makes a PANEL.

Outputs: DIR/results.json (runs, per-curve optima, drift of the optimum per panel),
DIR/results.csv (one row per run) and DIR/sweep.png (loss vs log2(x), one curve per value
of the curve key, one panel per value of the panel keys).

A run DIVERGED when its final validation loss is not finite or is no better than a uniform
guess over the vocabulary (ln V); diverged runs stay in the table and are left out of fits.
Optimum: the vertex of the parabola in log2(x) through the best point and its two
neighbours (it lies between the neighbours); the best grid point itself when that point
is at the edge of the grid (flagged `at_edge`: the optimum may lie outside the grid). Drift of a panel = optimum at the last curve value minus optimum at
the first, in grid steps (the grid's smallest log2 spacing); `steps_per_doubling` = the
least-squares slope of the optimum (grid steps) against log2 of the curve value, for any
numeric curve axis: width, train.batch_size, train.steps (the token budget at a fixed
batch), optimizer.weight_decay, ...

Other axes (each run's row also records its `steps` and `tokens` = steps x batch x seq_len):
* --equal-tokens (tools/token_budget.py): a batch-size grid at the config's token budget,
  train.steps derived per point;
* --fit X~C1,C2 (tools/optimum_law.py): log2 x_opt = log2 a + sum alpha_i log2 c_i by least
  squares over the curves' optima, with standard errors (results.json `fits`, DIR/fits.png);
* --branch-horizons (tools/horizons.py): a train.steps grid as one long WSD run per cell
  and cooldown branches from its checkpoints for the shorter horizons.

LR sensitivity of a curve (Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities", Sec. 3): mean over its grid points of
min(loss, loss_at_init) minus its best loss, diverged runs counting as loss_at_init.
loss_at_init is ln V, the loss of uniform predictions: exact when the readout starts at
zero (parametrization.readout_zero_init), close to it otherwise. Lower = flatter curve.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from jaxtrain.config.errors import ConfigError, UserError
from jaxtrain.config.files import load_config
from jaxtrain.config.schema import Config
from jaxtrain.run.metrics import read_metrics
from jaxtrain.run.workdir import Layout, write_atomic
from jaxtrain.tools import optimum_law, token_budget
from jaxtrain.tools.optimum_law import DERIVED


class StopSweep(Exception):
    """A signal stopped the run in progress (it saved a checkpoint and will resume)."""


@dataclasses.dataclass(frozen=True)
class Axis:
    key: str
    values: tuple


def grid_value(text: str) -> Any:
    """A number when Python reads `text` as a finite one, else its YAML scalar."""
    text = text.strip()
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(items: list[str]) -> list[Axis]:
    """`key=v1,v2,...` -> Axis (values: `grid_value`)."""
    axes = []
    for item in items:
        key, sep, text = item.partition("=")
        values = tuple(grid_value(v) for v in text.split(",") if v.strip())
        if not sep or not key or not values:
            raise ConfigError(item, "a grid must look like key.path=v1,v2,...")
        if key in [a.key for a in axes]:
            raise ConfigError(key, "appears in two --grid options")
        axes.append(Axis(key, values))
    return axes


def run_name(assignment: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in assignment.items()).replace("/", "_")


def plan(config: str, overrides: list[str], grid: list[Axis],
         derive: Callable[[Config, dict], list[str]] | None = None) -> list[tuple[dict, Config]]:
    """Every grid point with its validated config: a bad key fails before anything runs.
    `derive(cfg, assignment)` gives further --set items a point's own config implies
    (--equal-tokens: its train.steps)."""
    points = []
    for values in itertools.product(*(a.values for a in grid)):
        assignment = dict(zip((a.key for a in grid), values, strict=True))
        sets = [*overrides, *(f"{k}={v}" for k, v in assignment.items())]
        cfg = load_config(config, sets)
        if derive is not None:
            cfg = load_config(config, [*sets, *derive(cfg, assignment)])
        points.append((assignment, cfg))
    return points


def summarize(cfg: Config, workdir: Path, seconds: float, halted: bool = False) -> dict[str, Any]:
    """Final validation loss, mean training loss over the last 10% of steps, divergence
    (`halted`: the run stopped at a non-finite step)."""
    rows = read_metrics(Layout(workdir).metrics)
    tail_from = cfg.train.steps - max(cfg.train.steps // 10, 1)
    train = [r["loss"] for r in rows if r["step"] > tail_from]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    train_loss = float(np.mean(train)) if train else math.nan
    val_loss = float(val[-1]) if val else math.nan
    chance = math.log(cfg.model.vocab_size)
    diverged = halted or not (math.isfinite(val_loss) and math.isfinite(train_loss)) or val_loss >= chance
    return {"train_loss": train_loss, "val_loss": val_loss, "diverged": diverged, "seconds": seconds}


def _read_result(path: Path) -> dict | None:
    """A finished run's result.json, or None when it is missing or unreadable (not done)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and {"val_loss", "train_loss", "diverged"} <= set(result) else None


def _changed_key(new: dict, old: dict, prefix: str = "") -> str | None:
    """`key (old -> new)` of the first dotted key on which two configs differ, or None."""
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = new.get(key), old.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if found := _changed_key(a, b, f"{prefix}{key}."):
                return found
        elif a != b:
            return f"{prefix}{key} ({b!r} -> {a!r})"
    return None


def _with_defaults(recorded: dict, defaults: dict) -> dict:
    """`recorded` with the keys it lacks (added to jaxtrain after it was written) at their defaults."""
    filled = {k: v for k, v in recorded.items() if k not in defaults}
    for key, default in defaults.items():
        value = recorded.get(key, default)
        nested = isinstance(default, dict) and isinstance(value, dict)
        filled[key] = _with_defaults(value, default) if nested else value
    return filled


def recorded_config(workdir: Path, result: dict | None) -> dict | None:
    """The resolved config a run directory was trained with (its result.json's, else the
    config.yaml training recorded), keys it lacks filled with their defaults; None if none."""
    recorded = result.get("config") if result else None
    if recorded is None and Layout(workdir).config.is_file():
        try:
            recorded = yaml.safe_load(Layout(workdir).config.read_text())
        except (OSError, yaml.YAMLError):
            return None  # training's own resume check reads it and says what is wrong
    return _with_defaults(recorded, Config().to_dict()) if isinstance(recorded, dict) else None


def _move_aside(workdir: Path, replaced: Path) -> Path:
    replaced.mkdir(parents=True, exist_ok=True)
    target = replaced / f"{workdir.name}@{time.strftime('%Y%m%dT%H%M%S')}"
    while target.exists():
        target = target.with_name(target.name + "+")
    workdir.rename(target)
    return target


def reusable_result(cfg: Config, workdir: Path, replaced: Path, log=print) -> dict | None:
    """The stored result of `workdir` if it was trained with `cfg`; a run trained with
    another config is moved to `replaced` (None: train it)."""
    result = _read_result(workdir / "result.json")
    recorded = recorded_config(workdir, result)
    changed = recorded is not None and _changed_key(json.loads(json.dumps(cfg.to_dict())), recorded)
    if changed:
        log(f"{workdir.name}: trained with another config, {changed}; moved to "
            f"{_move_aside(workdir, replaced)}, training again")
        return None
    if result is None and (workdir / "result.json").exists():
        log(f"{workdir / 'result.json'}: unreadable, the run is not done; resuming it")
    return result


def run_point(assignment: dict, cfg: Config, workdir: Path, replaced: Path, log=print,
              prepare: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The run's result (without its config), read back when `workdir` holds it for `cfg`;
    `prepare()` runs before training it (--branch-horizons: writes the branch workdir; False:
    nothing to train from, the run counts as diverged and is not recorded, so a rerun retries)."""
    result = reusable_result(cfg, workdir, replaced, log)
    if result is not None:
        return {**{k: v for k, v in result.items() if k != "config"}, **assignment}
    from jaxtrain.run.nonfinite import NonFiniteError
    from jaxtrain.run.loop import run  # imports jax

    started, halted = time.perf_counter(), False
    if prepare is not None and not prepare():  # a branch whose parent diverged before its step
        return {**assignment, "train_loss": math.nan, "val_loss": math.nan, "diverged": True, "seconds": 0.0}
    try:
        if run(cfg, workdir, console=False).stop_signal is not None:
            raise StopSweep(workdir)  # stopped by a signal: not a result; rerunning resumes it
    except NonFiniteError:
        halted = True  # on_nonfinite=halt stopped it: diverged, recorded like any other run
    result = {**assignment, **summarize(cfg, workdir, time.perf_counter() - started, halted)}
    write_atomic(workdir / "result.json", json.dumps({**result, "config": cfg.to_dict()}, indent=1))
    return result


def fit_optimum(xs: list[float], losses: list[float]) -> dict[str, Any] | None:
    """Optimum of loss(log2 x) for one curve; None if every point diverged."""
    if not xs:
        return None
    order = np.argsort(xs)
    lx, ly = np.log2(np.asarray(xs, float)[order]), np.asarray(losses, float)[order]
    best = int(np.argmin(ly))
    opt, method = lx[best], "grid"
    if 0 < best < len(lx) - 1:  # parabolic interpolation through the best point and its neighbours
        a, b, _ = np.polyfit(lx[best - 1:best + 2], ly[best - 1:best + 2], 2)
        if a > 0:
            opt, method = float(-b / (2 * a)), "parabola"
    return {"opt_log2": float(opt), "opt": float(2.0**opt), "best_loss": float(ly[best]),
            "method": method, "at_edge": best in (0, len(lx) - 1)}


def lr_sensitivity(losses: list[float], loss_at_init: float) -> float:
    capped = [min(x, loss_at_init) if math.isfinite(x) else loss_at_init for x in losses]
    return float(np.mean(capped) - min(capped))


def analyse(runs: list[dict], x_key: str, curve_key: str, panel_keys: list[str],
            loss_at_init: float = math.inf) -> dict[str, Any]:
    xs_all = sorted({r[x_key] for r in runs})
    spacing = np.diff(np.log2(xs_all))
    step = float(spacing[spacing > 0].min()) if (spacing > 0).any() else 1.0
    optima, drift = [], []
    for panel, panel_runs in _group(runs, panel_keys):
        curves = []
        for curve, curve_runs in _group(panel_runs, [curve_key]):
            ok = [r for r in curve_runs if not r["diverged"]]
            fit = fit_optimum([r[x_key] for r in ok], [r["val_loss"] for r in ok])
            losses = [loss_at_init if r["diverged"] else r["val_loss"] for r in curve_runs]
            curves.append({**panel, **curve, **_shared(curve_runs, DERIVED), "optimum": fit,
                           "lr_sensitivity": lr_sensitivity(losses, loss_at_init)})
        curves.sort(key=lambda c: _sortable(c[curve_key]))  # drift runs from the smallest to the largest
        optima.extend(curves)
        fitted = [c for c in curves if c["optimum"]]
        if len(fitted) >= 2:
            first, last = fitted[0]["optimum"]["opt_log2"], fitted[-1]["optimum"]["opt_log2"]
            spread = [c["optimum"]["opt_log2"] for c in fitted]
            drift.append({**panel, "from": fitted[0][curve_key], "to": fitted[-1][curve_key],
                          "drift_steps": (last - first) / step,
                          "spread_steps": (max(spread) - min(spread)) / step,
                          "steps_per_doubling": _per_doubling([c[curve_key] for c in fitted], spread, step)})
    return {"grid_step_log2": step, "optima": optima, "drift": drift}


def _shared(runs: list[dict], keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of `keys` every run of a curve has in common (its steps, tokens)."""
    return {k: runs[0][k] for k in keys if all(k in r and r[k] == runs[0][k] for r in runs)}


def _per_doubling(curve_values: list, opt_log2: list[float], step: float) -> float | None:
    """Least-squares slope of the optimum (grid steps) against log2 of the curve value: the
    drift per doubling of any numeric curve axis; None when its values are not positive
    numbers or do not vary."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in curve_values):
        return None
    lc = np.log2(np.asarray(curve_values, np.float64))
    if np.ptp(lc) == 0:
        return None
    return float(np.polyfit(lc, np.asarray(opt_log2) / step, 1)[0])


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _group(runs: list[dict], keys: list[str]):
    """(assignment of `keys`, runs) in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [(dict(zip(keys, k, strict=True)), rs) for k, rs in groups.items()]


def choose_keys(grid: list[Axis], x_key: str, curve_key: str | None) -> tuple[str, list[str]]:
    """(curve key, panel keys); the x axis must be a grid key of positive numbers (log2)."""
    keys = [a.key for a in grid]
    if x_key not in keys:
        raise UserError(f"--x {x_key}{' (the default)' if x_key == 'optimizer.lr' else ''}: the sweep's x "
                        f"axis must be one of the --grid keys ({', '.join(keys)})")
    for value in grid[keys.index(x_key)].values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise UserError(f"--grid {x_key}={value}: the sweep's x axis takes positive numbers "
                            f"(it is fitted and plotted in log2)")
    curve_key = curve_key or next((k for k in keys if k != x_key), None)
    if curve_key is None or curve_key not in keys or curve_key == x_key:
        raise ConfigError(str(curve_key), "the curve key must be another --grid key")
    return curve_key, [k for k in keys if k not in (x_key, curve_key)]


def write_table(out: Path, runs: list[dict]) -> None:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(runs[0]))
    writer.writeheader()
    writer.writerows(runs)
    write_atomic(out / "results.csv", table.getvalue())


def _points(config: str, overrides: list[str], grid: list[Axis], equal_tokens: bool) -> tuple[list, int | None]:
    """The grid's points, and under --equal-tokens the token budget every run trains on."""
    if not equal_tokens:
        return plan(config, overrides, grid), None
    token_budget.check_grid([a.key for a in grid])
    base = load_config(config, overrides)
    return plan(config, overrides, grid, token_budget.equal_token_overrides(base)), token_budget.tokens(base)


def _jobs(points: list[tuple[dict, Config]], keys: list[str], out: Path, branch_horizons: bool) -> list[tuple]:
    """(grid index, assignment, config, prepare or None, extra row fields) in training order."""
    if not branch_horizons:
        return [(i, assignment, cfg, None, {}) for i, (assignment, cfg) in enumerate(points)]
    from jaxtrain.tools import horizons

    return horizons.jobs(points, keys, lambda assignment: out / "runs" / run_name(assignment))


def sweep(config: str, grid: list[Axis], out: Path, *, overrides: list[str] = (), x_key: str = "optimizer.lr",
          curve_key: str | None = None, equal_tokens: bool = False, fits: list[str] = (),
          branch_horizons: bool = False, log=print) -> dict[str, Any]:
    from jaxtrain.tools import plotting

    curve_key, panel_keys = choose_keys(grid, x_key, curve_key)
    laws = [optimum_law.parse_law(text, x_key, [a.key for a in grid]) for text in fits]
    points, budget = _points(config, list(overrides), grid, equal_tokens)
    cells = [{**assignment, "steps": cfg.train.steps, "tokens": token_budget.tokens(cfg)} for assignment, cfg in points]
    for law in laws:
        optimum_law.check_law(law, cells)
    jobs = _jobs(points, [a.key for a in grid], out, branch_horizons)
    plotting.check_available()
    out.mkdir(parents=True, exist_ok=True)
    finished = {}
    for n, (index, assignment, cfg, prepare, lineage) in enumerate(jobs, 1):
        result = run_point(assignment, cfg, out / "runs" / run_name(assignment), out / "replaced", log, prepare)
        finished[index] = {**result, "steps": cells[index]["steps"], "tokens": cells[index]["tokens"], **lineage}
        state = "diverged" if result["diverged"] else f"val {result['val_loss']:.4f} train {result['train_loss']:.4f}"
        log(f"[{n}/{len(jobs)}] {run_name(assignment)}: {state} ({result['seconds']:.0f}s)")
    runs = [finished[i] for i in range(len(points))]
    analysis = analyse(runs, x_key, curve_key, panel_keys, math.log(points[0][1].model.vocab_size))
    results = {"config": str(config), "overrides": list(overrides),
               "grid": {a.key: list(a.values) for a in grid}, "x": x_key, "curve": curve_key,
               "panels": panel_keys, "equal_tokens": budget, "branch_horizons": branch_horizons, "runs": runs,
               **analysis, "fits": [optimum_law.fit_law(law, analysis["optima"]) for law in laws]}
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    write_table(out, runs)
    plotting.plot_sweep(results, out / "sweep.png")
    if results["fits"]:
        plotting.plot_fits(results["fits"], out / "fits.png")
    return results
