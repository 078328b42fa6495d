"""The fitted law's prediction error on a held-out (B, T) cell (docs/batch_transfer.md):
fit log2 lr_opt = log2 a + alpha log2 B + b log2 T over every cell of the horizon sweep but
the held-out one (default: the largest B and T), predict that cell's optimum, print the
error in grid steps (one grid step = a factor 2 in lr here).

    python docs/batch_transfer/holdout.py runs/sweeps/horizons/results.json [B T]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from jaxtrain.tools.optimum_law import least_squares_power_law


def main() -> None:
    results = json.loads(open(sys.argv[1]).read())
    cells = [(o["train.batch_size"], o["tokens"], o["optimum"]) for o in results["optima"]
             if not o["optimum"]["at_edge"]]
    held = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) == 4 else max((b, t) for b, t, _ in cells)
    train = [(b, t, o) for b, t, o in cells if (b, t) != held]
    target = [o for b, t, o in cells if (b, t) == held]
    if not target:
        sys.exit(f"no interior optimum at batch {held[0]}, {held[1]} tokens")
    fit = least_squares_power_law(np.array([o["opt_log2"] for _, _, o in train]),
                                  np.log2([[b, t] for b, t, _ in train]))
    log2_a, alpha, b = fit["beta"]
    predicted = log2_a + alpha * np.log2(held[0]) + b * np.log2(held[1])
    step = results["grid_step_log2"]
    print(json.dumps({"held_out": {"batch": held[0], "tokens": held[1]}, "fitted_on": len(train),
                      "alpha_batch": alpha, "b_tokens": b, "se": fit["se"][1:],
                      "predicted_lr": 2 ** predicted, "measured_lr": 2 ** target[0]["opt_log2"],
                      "error_grid_steps": (predicted - target[0]["opt_log2"]) / step}))


if __name__ == "__main__":
    main()
