#!/usr/bin/env bash
# Seeds 1 and 2 (train.seed = data.seed) at each batch size's best grid learning rate of
# docs/batch_transfer.sh's first sweep (seed 0); prints one JSON line per batch.
set -euo pipefail
cd "$(dirname "$0")/../.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps}
for pair in $(.venv/bin/python -c "
import json
runs = json.load(open('$OUT/batch/results.json'))['runs']
for b in sorted({r['train.batch_size'] for r in runs}):
    best = min((r for r in runs if r['train.batch_size'] == b and not r['diverged']), key=lambda r: r['val_loss'])
    print(f\"{b}:{best['optimizer.lr']}\")"); do
  B=${pair%%:*}; LR=${pair#*:}
  for S in 1 2; do
    $J sweep configs/mup_sweep.yaml --grid train.batch_size=$B --grid optimizer.lr=$LR --equal-tokens \
        --set schedule.name=wsd --set train.steps=320 --set train.seed=$S --set data.seed=$S \
        --out $OUT/seeds/b${B}_s$S > /dev/null
  done
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = json.load(open(f"{out}/batch/results.json"))["runs"]
for b in sorted({r["train.batch_size"] for r in runs}):
    best = min((r for r in runs if r["train.batch_size"] == b and not r["diverged"]), key=lambda r: r["val_loss"])
    seeds = [best["val_loss"]] + [json.load(open(f"{out}/seeds/b{b}_s{s}/results.json"))["runs"][0]["val_loss"] for s in (1, 2)]
    print(json.dumps({"batch": b, "lr": best["optimizer.lr"], "val_loss_seeds_0_1_2": seeds,
                      "mean": sum(seeds) / 3, "spread": max(seeds) - min(seeds)}))
PY
