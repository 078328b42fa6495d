#!/usr/bin/env bash
# Regenerates docs/stability/ (about 45 minutes on 2 CPU cores): final loss vs learning
# rate, 2^-13 .. 2^-1 (3.6 orders of magnitude), at widths 64 and 128, for the baseline,
# +QK-norm, +z-loss (1e-4) and +both; the LR-sensitivity per arm; max attention logit and
# log Z traces. Sweep runs land in runs/stability/ (git-ignored); rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
J=.venv/bin/jaxtrain
OUT=runs/stability
LRS=0.0001220703125,0.00048828125,0.001953125,0.0078125,0.03125,0.125,0.5   # 2^-13 .. 2^-1, x4

$J sweep configs/stability_sweep.yaml --grid model.d_model=64,128 --grid train.z_loss=0,0.0001 \
  --grid model.qk_norm=false,true --grid optimizer.lr=$LRS --curves model.qk_norm --out $OUT

mkdir -p docs/stability
cp $OUT/results.json $OUT/results.csv $OUT/sweep.png docs/stability/
# Max attention logit and log Z traces of the four arms at width 128, learning rate 2^-3.
R=$OUT/runs
$J plot "$R/d_model=128,z_loss=0,qk_norm=False,lr=0.125" "$R/d_model=128,z_loss=0,qk_norm=True,lr=0.125" \
  "$R/d_model=128,z_loss=0.0001,qk_norm=False,lr=0.125" "$R/d_model=128,z_loss=0.0001,qk_norm=True,lr=0.125" \
  --metric max_attn_logit/0,max_attn_logit/1,log_z_mean,loss --log-y max_attn_logit/0,max_attn_logit/1 \
  --out docs/stability/traces_w128_lr0.125.png
