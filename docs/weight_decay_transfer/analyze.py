"""Weight decay across width for each parametrization.gamma (docs/weight_decay_transfer.md):
the per-width optimum of lambda from the sweep, its drift in grid steps, and the hidden
matrices' top singular value sigma_max (telemetry) against Fan et al.'s steady state
sqrt(eta_R / lambda_R) * d^0.75, read from every run's metrics.jsonl.

    python docs/weight_decay_transfer/analyze.py runs/sweeps/weight_decay [--figure PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
import yaml

STABLE_STEP = 480  # the last telemetry step before WSD's decay (the last 20 % of 640 steps)


def telemetry_rows(sweep: str) -> list[dict]:
    rows = []
    for run in sorted(glob.glob(os.path.join(sweep, "runs", "*"))):
        cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
        logged = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        sig = {r["step"]: r for r in logged if "sigma_max/hidden" in r}
        if STABLE_STEP not in sig:
            continue
        end = sig[max(sig)]
        rows.append({"gamma": cfg["parametrization"]["gamma"], "width": cfg["model"]["d_model"],
                     "wd": cfg["optimizer"]["weight_decay"],
                     "sigma_max_stable": sig[STABLE_STEP]["sigma_max/hidden"],
                     "sigma_ratio_stable": sig[STABLE_STEP]["sigma_ratio/hidden"],
                     "sigma_max_end": end["sigma_max/hidden"], "sigma_ratio_end": end["sigma_ratio/hidden"],
                     "reference": sig[STABLE_STEP]["sigma_max/hidden"] / sig[STABLE_STEP]["sigma_ratio/hidden"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep")
    parser.add_argument("--figure")
    args = parser.parse_args()
    results = json.load(open(os.path.join(args.sweep, "results.json")))
    optima = [{"gamma": o["parametrization.gamma"], "width": o["model.d_model"], **o["optimum"]}
              for o in results["optima"]]
    rows = telemetry_rows(args.sweep)
    for o in optima:  # telemetry of the grid point nearest the optimum
        near = min((r for r in rows if r["gamma"] == o["gamma"] and r["width"] == o["width"]),
                   key=lambda r: abs(np.log2(r["wd"]) - o["opt_log2"]))
        o.update({k: near[k] for k in ("wd", "sigma_max_stable", "sigma_ratio_stable", "reference")})
        o["grid_wd"] = o.pop("wd")
    print(json.dumps({"optima": optima, "drift": results["drift"], "runs": rows}, indent=1))
    if args.figure:
        draw(rows, optima, args.figure)


def draw(rows: list, optima: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gammas = sorted({r["gamma"] for r in rows})
    wds = sorted({r["wd"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(wds)))
    fig, axes = plt.subplots(1, len(gammas), figsize=(4.2 * len(gammas), 4), sharey=True)
    for ax, gamma in zip(np.atleast_1d(axes), gammas):
        for wd, color in zip(wds, colors):
            pts = sorted((r["width"], r["sigma_max_stable"], r["reference"]) for r in rows
                         if r["gamma"] == gamma and r["wd"] == wd)
            w, s, ref = map(np.array, zip(*pts))
            ax.plot(w, s, "o-", color=color, label=f"lambda 2^{np.log2(wd):.0f}")
            ax.plot(w, ref, ":", color=color)
        best = sorted((o["width"], o["sigma_max_stable"]) for o in optima if o["gamma"] == gamma)
        ax.plot(*zip(*best), "k*", ms=12, label="at each width's lambda_opt")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("width d")
        ax.set_title(f"gamma = {gamma}")
    axes[0].set_ylabel(f"sigma_max of hidden matrices at step {STABLE_STEP}\n(dotted: sqrt(eta_R/lambda_R) d^0.75)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
