"""Power with one (a, b) and cosine with one learning rate across the batch x horizon grid,
against each cell's best WSD run (docs/schedule_transfer.md).

gap(cell) = val loss of the schedule's run - the best val loss over WSD's learning-rate
grid in that cell (same seed). "One setting" is chosen two ways: `global`, the grid value
with the smallest mean gap over all 16 cells (tuned once, on the whole grid), and `proxy`,
the best value at the smallest cell (batch 8, 40 steps) alone, as a small proxy run would
pick it. Seeds 1 and 2 (docs/schedule_transfer/seeds.sh) repeat the chosen settings and
each cell's best WSD learning rate; their gaps are paired by seed.

    python docs/schedule_transfer/gaps.py runs/sweeps [--choices] [--figure PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

SEEDS = (1, 2)
PROXY = (8, 40)


def cells_of(results: dict, key: str | None) -> dict:
    """{(batch, steps): {value of key: val loss}} over the runs that did not diverge."""
    out: dict = {}
    for r in results["runs"]:
        if not r["diverged"]:
            out.setdefault((r["train.batch_size"], r["train.steps"]), {})[r[key] if key else None] = r["val_loss"]
    return out


def load(sweeps: str, name: str) -> dict:
    return json.load(open(os.path.join(sweeps, name, "results.json")))


def choose(arm: dict, wsd_best: dict) -> dict:
    values = sorted({v for by_value in arm.values() for v in by_value})
    mean_gap = {v: np.mean([arm[c].get(v, np.inf) - wsd_best[c] for c in wsd_best]) for v in values}
    return {"global": min(values, key=lambda v: mean_gap[v]),
            "proxy": min(arm[PROXY], key=arm[PROXY].get),
            "mean_gap": {str(v): float(g) for v, g in mean_gap.items()}}


def seed_gaps(sweeps: str, arm: str, value, wsd_lr: dict) -> dict:
    """{cell: [gap of seed 1, gap of seed 2]} where the seed sweeps exist."""
    out: dict = {}
    for s in SEEDS:
        try:
            got = cells_of(load(sweeps, f"schedule_seeds/{arm}_s{s}"), None)
        except FileNotFoundError:
            continue
        wsd = {}  # one sweep per batch (each batch has its own best learning rates)
        for path in glob.glob(os.path.join(sweeps, f"schedule_seeds/wsd_s{s}_b*/results.json")):
            wsd.update(cells_of(json.load(open(path)), "optimizer.lr"))
        for c, by in got.items():
            out.setdefault(c, []).append(by[None] - wsd[c][wsd_lr[c]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweeps")
    parser.add_argument("--choices", action="store_true", help="print the chosen settings as JSON and stop")
    parser.add_argument("--figure")
    args = parser.parse_args()
    wsd = cells_of(load(args.sweeps, "horizons"), "optimizer.lr")
    wsd_best = {c: min(by.values()) for c, by in wsd.items()}
    wsd_lr = {c: min(by, key=by.get) for c, by in wsd.items()}
    arms = {"power": (cells_of(load(args.sweeps, "power"), "schedule.power_a"), "a"),
            "cosine": (cells_of(load(args.sweeps, "cosine"), "optimizer.lr"), "lr")}
    chosen = {name: choose(cells, wsd_best) for name, (cells, _) in arms.items()}
    if args.choices:
        print(json.dumps({"power_a": chosen["power"]["global"], "cosine_lr": chosen["cosine"]["global"],
                          "wsd_lr": {f"{b},{s}": lr for (b, s), lr in sorted(wsd_lr.items())}}))
        return
    rows = []
    for c in sorted(wsd_best):
        row = {"batch": c[0], "steps": c[1], "wsd_best": wsd_best[c], "wsd_lr": wsd_lr[c]}
        for name, (cells, _) in arms.items():
            for how in ("global", "proxy"):
                row[f"{name}_{how}_gap"] = cells[c][chosen[name][how]] - wsd_best[c]
            row[f"{name}_tuned_gap"] = min(cells[c].values()) - wsd_best[c]
            seeds = seed_gaps(args.sweeps, name, chosen[name]["global"], wsd_lr).get(c, [])
            row[f"{name}_global_gap_seeds"] = [row[f"{name}_global_gap"], *seeds]
        rows.append(row)
    summary = {name: {"chosen": {k: chosen[name][k] for k in ("global", "proxy")},
                      "mean_gap_per_value": chosen[name]["mean_gap"],
                      **{f"{how}_gap_mean": float(np.mean([r[f"{name}_{how}_gap"] for r in rows]))
                         for how in ("global", "proxy", "tuned")},
                      **{f"{how}_gap_max": float(np.max([r[f"{name}_{how}_gap"] for r in rows]))
                         for how in ("global", "proxy", "tuned")},
                      "global_gap_3seed_mean": float(np.mean([np.mean(r[f"{name}_global_gap_seeds"]) for r in rows]))}
               for name in arms}
    print(json.dumps({"summary": summary, "cells": rows}, indent=1))
    if args.figure:
        draw(rows, args.figure)


def draw(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for name, color in (("power", "C0"), ("cosine", "C3")):
        seeds = [r[f"{name}_global_gap_seeds"] for r in rows]
        mean = [np.mean(s) for s in seeds]
        err = [[m - min(s) for m, s in zip(mean, seeds)], [max(s) - m for m, s in zip(mean, seeds)]]
        ax.errorbar(x, mean, yerr=err, fmt="o-", color=color, capsize=3,
                    label=f"{name}, one setting (mean and range of {max(map(len, seeds))} seeds)")
        ax.plot(x, [r[f"{name}_proxy_gap"] for r in rows], "x:", color=color, label=f"{name}, set at batch 8 x 40 steps")
        ax.plot(x, [r[f"{name}_tuned_gap"] for r in rows], "s--", color=color, alpha=0.4, mfc="none",
                label=f"{name}, tuned per cell")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"B{r['batch']}\n{r['steps']}" for r in rows], fontsize=8)
    ax.set_xlabel("cell: batch (sequences) / steps")
    ax.set_ylabel("val loss - best WSD in the cell (nats)")
    ax.set_title("Power (one a, b = -0.51) and cosine (one lr) against each cell's best WSD, muP, width 64")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
