#!/usr/bin/env bash
# Power (one a, b) and cosine (one LR) across the batch x horizon grid of
# docs/batch_transfer.md section 3, against each cell's best WSD run: docs/schedule_transfer.md.
# Needs that section's sweep (bash docs/batch_transfer.sh) for the WSD side. About 40 minutes
# on 2 CPU cores; sweeps are caches (rerunning resumes them).
set -euo pipefail
cd "$(dirname "$0")/.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps}
GRID=(--grid train.batch_size=8,16,32,64 --grid train.steps=40,80,160,320)
LRS=9.765625e-4,1.953125e-3,3.90625e-3,7.8125e-3,1.5625e-2,3.125e-2,6.25e-2   # 2^-10 .. 2^-4
AS=3.125e-2,6.25e-2,0.125,0.25,0.5,1,2                                         # 2^-5 .. 2^1
# Power: lr = min(2^-5, B a n^-0.51) (n tokens seen, B sequences), the same 20 % decay as WSD;
# its stable phase does not know the horizon, so shorter horizons branch as cooldowns
$J sweep configs/mup_sweep.yaml "${GRID[@]}" --grid schedule.power_a=$AS --x schedule.power_a \
    --curves train.steps --branch-horizons --set schedule.name=power --set schedule.power_b=-0.51 \
    --set optimizer.lr=3.125e-2 --out $OUT/power
# cosine to 0.1 of the peak: every horizon trained in full
$J sweep configs/mup_sweep.yaml "${GRID[@]}" --grid optimizer.lr=$LRS --curves train.steps \
    --set schedule.name=cosine --out $OUT/cosine
