#!/usr/bin/env bash
# Weight decay across width under muP for parametrization.gamma 0, 0.5, 1 (independent
# decay), and the top singular values against Fan et al.'s sqrt(eta/lambda) d^0.75:
# docs/weight_decay_transfer.md. About 30 minutes on 2 CPU cores; the sweep is a cache.
set -euo pipefail
cd "$(dirname "$0")/.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps}
WDS=2.44140625e-4,4.8828125e-4,9.765625e-4,1.953125e-3,3.90625e-3,7.8125e-3,1.5625e-2   # 2^-12 .. 2^-6
# batch 8, 640 steps (327,680 tokens), lr 2^-8 (near the WSD optimum at that batch and budget,
# docs/batch_transfer.md), per-step decay lambda at the base width 64, times m^(gamma-1) at m = d/64
$J sweep configs/mup_sweep.yaml --grid parametrization.gamma=0,0.5,1 --grid model.d_model=64,128,256 \
    --grid optimizer.weight_decay=$WDS --x optimizer.weight_decay --curves model.d_model \
    --set schedule.name=wsd --set optimizer.weight_decay_mode=independent --set optimizer.lr=3.90625e-3 \
    --set train.batch_size=8 --set train.steps=640 --set train.eval_every=640 \
    --set checkpoint.every_steps=640 --set diagnostics.telemetry_every=160 --out $OUT/weight_decay
