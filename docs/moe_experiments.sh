#!/usr/bin/env bash
# The mixture-of-experts experiments of docs/moe_experiments.md on the default corpus
# (configs/moe_sweep.yaml; about 2 hours on 2 CPU cores; sweeps are caches under runs/sweeps/moe).
set -euo pipefail
cd "$(dirname "$0")/.."
J=${JAXTRAIN:-.venv/bin/jaxtrain}
OUT=${OUT:-runs/sweeps/moe}
CFG=configs/moe_sweep.yaml
LRS=4.8828125e-4,9.765625e-4,1.953125e-3,3.90625e-3,7.8125e-3,1.5625e-2,3.125e-2   # 2^-11 .. 2^-5

# 1. The optimal learning rate of the MoE model across width 32 -> 256 (8x), muP vs SP.
$J sweep $CFG --grid model.d_model=32,64,128,256 --grid optimizer.lr=$LRS \
  --grid parametrization.name=sp,mup --out $OUT/width

# 2. MoE (8 experts, top-2, each 192 wide) against dense models of the same active
#    parameters (d_ff = 2 x 192) and of the same total parameters (d_ff = 8 x 192), width 64,
#    equal tokens: each arm's learning rate swept at seed 0 ...
for arm in active:384 total:1536; do
  $J sweep $CFG --grid optimizer.lr=$LRS --grid model.d_ff=${arm#*:} --x optimizer.lr --set model.moe.n_experts=0 \
    --out $OUT/dense_${arm%%:*}
done
# ... then seeds 1 and 2 at each arm's best grid learning rate (the MoE arm's from sweep 1).
bash docs/moe_experiments/seeds.sh

# 3. Balance mechanisms at width 64 and the MoE arm's learning rate, seeds 0, 1, 2: no
#    balancing, the Switch loss (0.01), the auxiliary-loss-free bias (u = 0.001), both.
LR_MOE=$(.venv/bin/python -c "import json; r = json.load(open('$OUT/width/results.json'))['runs']; \
print(min((x for x in r if x['model.d_model'] == 64 and x['parametrization.name'] == 'mup' and not x['diverged']), key=lambda x: x['val_loss'])['optimizer.lr'])")
for S in 0 1 2; do
  for AUX in 0 0.01; do
    for U in 0 0.001; do
      $J sweep $CFG --grid optimizer.lr=$LR_MOE --grid model.d_model=64 --x optimizer.lr \
        --set model.moe.aux_loss=$AUX --set model.moe.bias_update_rate=$U \
        --set train.seed=$S --set data.seed=$S --out $OUT/balance/aux${AUX}_u${U}_s$S
    done
  done
done
