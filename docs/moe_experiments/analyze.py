"""Tables and figures of docs/moe_experiments.md from the sweeps of docs/moe_experiments.sh.

    1. width:   the MoE model's optimal learning rate across width, muP vs SP (the sweep's
                own optima and drift, results.json)
    2. arms:    MoE vs dense of equal active / equal total parameters, seeds 0, 1, 2 at each
                arm's best grid learning rate
    3. balance: Switch loss and the auxiliary-loss-free bias, alone and together: final val
                loss and the expert load of the last quarter of training (metrics.jsonl)

    python docs/moe_experiments/analyze.py runs/sweeps/moe [--figure PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

ARMS = {"moe": "width", "dense_active": "dense_active", "dense_total": "dense_total"}
LOAD_KEYS = ("moe/load_max", "moe/load_min", "moe/balance", "moe/router_entropy", "moe/bias_abs_max")


def load(path: str) -> dict:
    return json.load(open(path))


def best_run(results: dict, **match) -> dict:
    runs = [r for r in results["runs"] if not r["diverged"] and all(r[k] == v for k, v in match.items())]
    return min(runs, key=lambda r: r["val_loss"])


def arms(out: str) -> dict:
    """{arm: {"lr": best grid lr at seed 0, "val_loss": [seed 0, 1, 2]}}."""
    table = {}
    for arm, sweep in ARMS.items():
        match = {"model.d_model": 64, "parametrization.name": "mup"} if arm == "moe" else {}
        best = best_run(load(os.path.join(out, sweep, "results.json")), **match)
        seeds = [load(os.path.join(out, "seeds", f"{arm}_s{s}", "results.json"))["runs"][0]["val_loss"]
                 for s in (1, 2) if os.path.exists(os.path.join(out, "seeds", f"{arm}_s{s}", "results.json"))]
        losses = [best["val_loss"], *seeds]
        table[arm] = {"lr": best["optimizer.lr"], "val_loss": losses,
                      "mean": float(np.mean(losses)), "spread": float(np.ptp(losses))}
    return table


def late_load(run_dir: str) -> dict:
    """The router statistics averaged over the last quarter of the logged steps."""
    logged = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in logged if "moe/load_max" in r]
    last = rows[-max(1, len(rows) // 4):]
    return {k: float(np.mean([r[k] for r in last])) for k in LOAD_KEYS if k in last[0]}


def balance(out: str) -> list[dict]:
    """One row per run of $OUT/balance/aux<A>_u<U>_s<seed> (one run each)."""
    rows = []
    for sweep in sorted(glob.glob(os.path.join(out, "balance", "aux*_u*_s*"))):
        if not os.path.exists(os.path.join(sweep, "results.json")):
            continue
        arm, seed = os.path.basename(sweep).rsplit("_s", 1)
        aux, rate = arm[len("aux"):].split("_u")
        run = load(os.path.join(sweep, "results.json"))["runs"][0]
        (run_dir,) = glob.glob(os.path.join(sweep, "runs", "*"))
        rows.append({"seed": int(seed), "arm": f"aux_loss={aux},bias_update_rate={rate}",
                     "val_loss": run["val_loss"], **late_load(run_dir)})
    return rows


def summarize_balance(rows: list[dict]) -> dict:
    out = {}
    for arm in sorted({r["arm"] for r in rows}):
        mine = [r for r in rows if r["arm"] == arm]
        out[arm] = {k: float(np.mean([r[k] for r in mine])) for k in ("val_loss", *LOAD_KEYS) if k in mine[0]}
        out[arm]["val_loss_seeds"] = [r["val_loss"] for r in sorted(mine, key=lambda r: r["seed"])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--figure")
    args = parser.parse_args()
    width = load(os.path.join(args.out, "width", "results.json"))
    result = {"arms": arms(args.out), "balance": summarize_balance(balance(args.out))}
    if len({o["model.d_model"] for o in width["optima"]}) > 1:  # section 1 needs the whole width sweep
        result["width_drift"] = width["drift"]
        result["width_optima"] = [{k: o[k] for k in ("model.d_model", "parametrization.name")} | o["optimum"]
                                  for o in width["optima"]]
    print(json.dumps(result, indent=1))
    if args.figure:
        draw(result, args.figure)


def draw(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if result["balance"] else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    labels = {"moe": "MoE 8 x 192, top-2", "dense_active": "dense d_ff 384\n(= active)",
              "dense_total": "dense d_ff 1536\n(= total)"}
    for i, (arm, row) in enumerate(result["arms"].items()):
        ax.plot([i] * len(row["val_loss"]), row["val_loss"], "o", color=f"C{i}", alpha=0.6)
        ax.plot([i - 0.2, i + 0.2], [row["mean"]] * 2, "-", color=f"C{i}", lw=2)
    ax.set_xticks(range(len(result["arms"])), [labels[a] for a in result["arms"]], fontsize=8)
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title("equal tokens, each arm at its best lr (seeds 0, 1, 2; bar: mean)", fontsize=9)
    if result["balance"]:
        ax = axes[0][1]
        names = list(result["balance"])
        for i, arm in enumerate(names):
            row = result["balance"][arm]
            ax.bar(i - 0.2, row["moe/load_max"], 0.4, color="C3", label="max expert load" if i == 0 else None)
            ax.bar(i + 0.2, row["moe/load_min"], 0.4, color="C0", label="min expert load" if i == 0 else None)
            ax.text(i, row["moe/load_max"] + 0.01, f"{row['val_loss']:.3f}", ha="center", fontsize=8)
        ax.set_ylim(0, 1.12 * max(result["balance"][n]["moe/load_max"] for n in names))
        ax.axhline(1 / 8, color="k", lw=0.8, ls=":", label="uniform 1/8")
        ax.set_xticks(range(len(names)), [short_name(n) for n in names], fontsize=8)
        ax.set_ylabel("fraction of assignments, last quarter of training")
        ax.set_title("balance mechanisms (text: mean val loss of 3 seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def short_name(arm: str) -> str:
    """'aux_loss=0.01,bias_update_rate=0' -> 'Switch loss 0.01'."""
    aux, rate = (float(kv.split("=")[1]) for kv in arm.split(","))
    parts = ([f"Switch loss {aux:g}"] if aux else []) + ([f"bias u={rate:g}"] if rate else [])
    return "\n+ ".join(parts) or "none"


if __name__ == "__main__":
    main()
