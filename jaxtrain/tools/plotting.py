"""PNG figures: sweeps, the coordinate check, and run curves (matplotlib, no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxtrain.config.errors import UserError


def _save(fig, path: Path) -> None:
    """Write the PNG and close the figure. The PNG's `Description` text records what it
    draws (JSON: per panel its title, axis labels and each labelled curve's point count),
    so a script or a test can check a figure's content without reading pixels."""
    panels = [{"title": ax.get_title(), "x": ax.get_xlabel(), "y": ax.get_ylabel(),
               "curves": {line.get_label(): len(line.get_xdata()) for line in ax.get_lines()
                          if not line.get_label().startswith("_")}}
              for ax in fig.axes if ax.axison]
    fig.savefig(path, dpi=110, metadata={"Description": json.dumps({"panels": panels})})
    _pyplot().close(fig)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is drawn:
    plotting is optional (`pip install 'jaxtrain[plot]'`); training never needs it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("drawing figures needs matplotlib: pip install 'jaxtrain[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def check_available() -> None:
    """For commands that train before they draw (sweep, coord-check): refuse at the start,
    not after the runs, when matplotlib is missing."""
    _pyplot()


def _short(key: str) -> str:
    return key.split(".")[-1]


def _panel_title(panel: dict) -> str:
    return ", ".join(f"{_short(k)}={v}" for k, v in panel.items()) or "all runs"


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """Validation loss vs log2(x), one curve per curve-key value, one panel per panel value.
    Stars mark each curve's fitted optimum; crosses on the top edge mark diverged runs."""
    plt = _pyplot()
    x_key, curve_key, panel_keys = results["x"], results["curve"], results["panels"]
    runs = results["runs"]
    panels = list(dict.fromkeys(tuple(r[k] for k in panel_keys) for r in runs))
    finite = [r["val_loss"] for r in runs if not r["diverged"]]
    # Clip the far-off (high-LR) tail so the region around the optima stays readable.
    low = min(finite) if finite else 0.0
    top = min(max(finite), low + 3 * (sorted(finite)[len(finite) // 2] - low)) + 0.05 if finite else 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharey=True)
    colors = plt.get_cmap("viridis")
    curves = list(dict.fromkeys(r[curve_key] for r in runs))
    for ax, panel_values in zip(axes[0], panels, strict=True):
        panel = dict(zip(panel_keys, panel_values, strict=True))
        for i, curve in enumerate(curves):
            color = colors(i / max(len(curves) - 1, 1))
            pts = sorted((r for r in runs if r[curve_key] == curve and all(r[k] == v for k, v in panel.items())),
                         key=lambda r: r[x_key])
            ok = [r for r in pts if not r["diverged"]]
            ax.plot([math.log2(r[x_key]) for r in ok], [min(r["val_loss"], top) for r in ok], "o-",
                    color=color, label=f"{_short(curve_key)}={curve}")
            bad = [math.log2(r[x_key]) for r in pts if r["diverged"]]
            ax.plot(bad, [top] * len(bad), "x", color=color, markersize=9)
            fit = next((o["optimum"] for o in results["optima"]
                        if o[curve_key] == curve and all(o[k] == v for k, v in panel.items())), None)
            if fit:
                ax.plot([fit["opt_log2"]], [min(fit["best_loss"], top)], "*", color=color, markersize=14,
                        markeredgecolor="black")
        drift = next((d for d in results["drift"] if all(d[k] == v for k, v in panel.items())), None)
        title = _panel_title(panel)
        if drift:
            per = drift.get("steps_per_doubling")
            title += f"\noptimum drift {drift['drift_steps']:+.2f} grid steps"
            title += "" if per is None else f"\n({per:+.2f} per doubling of {_short(curve_key)})"
        ax.set_title(title)
        ax.set_xlabel(f"log2({_short(x_key)})")
        ax.set_ylim(low - 0.02, top + 0.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (nats/token)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_fits(fits: list[dict[str, Any]], path: Path) -> None:
    """One panel per fitted law (tools/optimum_law.py): each cell's optimum (log2) against
    the law's value there; on the diagonal where the law holds exactly."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fits), figsize=(5.0 * len(fits), 4.4), squeeze=False)
    for ax, fit in zip(axes[0], fits, strict=True):
        ax.set_title(fit["law"] + ("" if "error" in fit else "\n" + ", ".join(
            f"{_short(k)}^{a:+.2f}" for k, a in fit["exponents"].items())), fontsize=9)
        ax.set_xlabel(f"log2({_short(fit['target'])}) of the law")
        ax.set_ylabel(f"log2({_short(fit['target'])}) optimum")
        if "error" in fit:
            ax.text(0.5, 0.5, "not fitted:\n" + fit["error"], ha="center", va="center", wrap=True, fontsize=8,
                    transform=ax.transAxes)
            continue
        law, seen = [c["fitted_log2"] for c in fit["cells"]], [c["opt_log2"] for c in fit["cells"]]
        ax.plot(law, seen, "o", label="optima")
        ends = [min(law + seen), max(law + seen)]
        ax.plot(ends, ends, "-", color="gray", alpha=0.6, label="law")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_coord_check(report: dict[str, Any], path: Path) -> None:
    """RMS of each recorded activation vs width (log-log), one line per step."""
    plt = _pyplot()
    names = report["names"]
    records = report["records"]
    steps = sorted({r["step"] for r in records})
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    colors = plt.get_cmap("plasma")
    for ax, name in zip(axes.flat, names):
        for i, step in enumerate(steps):
            pts = sorted((r["width"], r["rms"][name]) for r in records if r["step"] == step)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors(i / max(len(steps), 1)),
                    label=f"t={step}", markersize=3)
        slope = report["slopes"].get(str(steps[-1]), {}).get(name)
        ax.set_title(name + (f"  (slope at t={steps[-1]}: {slope:+.2f})" if slope is not None else ""),
                     fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        if high / low < 4:  # a flat curve should look flat, not fill the panel with noise
            mid = math.sqrt(low * high)
            ax.set_ylim(mid / 2, mid * 2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"coordinate check: {report['parametrization']} (RMS of activations vs width)")
    fig.tight_layout()
    _save(fig, path)


def plot_runs(runs: dict[str, list[dict]], metrics: list[str], x_key: str, path: Path,
              log_y: set[str] = frozenset()) -> None:
    """Overlay the logged curves of several runs: one panel per metric, one line per run.
    `runs` maps a label to its metrics.jsonl rows; rows without a metric are skipped
    (val_loss is logged only at evaluation steps)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.9), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, rows in runs.items():
            points = [(r[x_key], r[metric]) for r in rows if r.get(metric) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], ".-" if len(points) < 30 else "-",
                    label=label, markersize=4)
        ax.set_title(metric)
        ax.set_xlabel(x_key)
        if metric in log_y:
            ax.set_yscale("log")
        elif metric in ("loss", "val_loss"):  # the interesting part is near the end
            finite = [r[metric] for rows in runs.values() for r in rows[len(rows) // 10:]
                      if r.get(metric) is not None and math.isfinite(r[metric])]
            if finite:
                ax.set_ylim(min(finite) - 0.05, max(finite) + 0.05)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_schedule(cfg, path: Path) -> None:
    """The learning rate of every step of a config's schedule."""
    plt = _pyplot()
    from jaxtrain.optim.schedules import lr_per_step, resolve

    lrs, lengths = lr_per_step(cfg), resolve(cfg)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(len(lrs)), lrs, label="learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    shape = f" ({cfg.schedule.decay_shape} decay)" if cfg.schedule.name in ("wsd", "power") else ""
    ax.set_title(f"{cfg.schedule.name}{shape}: peak {cfg.optimizer.lr:g}, "
                 f"warmup {lengths.warmup / lengths.per_step:g} steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_schedule_law(report: dict[str, Any], path: Path) -> None:
    """Logged training loss (dots) and the fitted law's curve per run: solid for the runs
    it was fitted on, dashed for the runs it predicts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.get_cmap("tab10")
    errors = {r["run"]: r for r in report["fitted"] + report["predicted"]}
    lows = []
    for i, curve in enumerate(report["curves"]):
        color = colors(i % 10)
        if curve["steps"]:
            ax.plot(curve["steps"], curve["losses"], ".", color=color, alpha=0.35, markersize=3)
            lows.append(min(curve["losses"]))
        err = errors[curve["run"]].get("mean_abs_error")
        label = f"{curve['run']} ({'fit' if curve['fitted'] else 'predicted'}"
        label += f", mean |err| {err:.3f})" if err is not None else ")"
        ax.plot(curve["law_steps"], curve["law"], "-" if curve["fitted"] else "--", color=color, label=label)
        lows.append(min(curve["law"]))
    law = report["law"]
    ax.set_title(f"L = {law['L0']:.3f} + {law['A']:.3f} S1^-{law['alpha']:.3f} - {law['C']:.3f} S2", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
