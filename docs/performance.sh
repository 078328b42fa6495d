#!/usr/bin/env bash
# Regenerates the CPU table of docs/performance.md: `jaxtrain bench` and the two yardsticks
# of ../shared/yardsticks (plain JAX, PyTorch eager) on the same model, one after another in
# one run, then the tokens/s ratios. About 3 minutes on 2 CPU cores.
#   bash docs/performance.sh [YARDSTICK_DIR]          (default ../shared/yardsticks)
# Also the compile-time-vs-depth curve with and without scan over layers.
set -euo pipefail
cd "$(dirname "$0")/.."
YARD=${1:-../shared/yardsticks}
make venv >/dev/null
PY=.venv/bin/python
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
OUT=runs/performance
mkdir -p $OUT
CFG=configs/bench_cpu.yaml

{
  .venv/bin/jaxtrain bench $CFG --steps 10 | sed 's/^/jaxtrain_bf16 /'
  .venv/bin/jaxtrain bench $CFG --steps 10 --set model.dtype=float32 | sed 's/^/jaxtrain_fp32 /'
  $PY $YARD/ref_jax_gpt.py
  $PY $YARD/ref_torch_gpt.py
} | tee $OUT/cpu.txt

$PY - $OUT/cpu.txt <<'EOF'
import json, re, sys
rate = {}
for line in open(sys.argv[1]):
    name, _, rest = line.partition(" ")
    if name.startswith("jaxtrain"):
        report = json.loads(rest)
        rate[name] = report["tokens_per_s"]
        print(f"{name}: {report['tokens_per_s']:.0f} tok/s, MFU {report['mfu']:.3f} "
              f"({report['peak_source']}), compile {report['compile_s']:.1f}s, "
              f"peak RSS {report['peak_memory_bytes'] / 2**20:.0f} MiB")
    else:
        rate[name] = float(re.search(r"tok/s=(\d+)", line).group(1))
for name in ("jaxtrain_bf16", "jaxtrain_fp32"):
    print(f"{name} / ref_jax = {rate[name] / rate['ref_jax']:.2f}   "
          f"{name} / ref_torch = {rate[name] / rate['ref_torch']:.2f}")
print(f"ref_torch / ref_jax = {rate['ref_torch'] / rate['ref_jax']:.2f}")
EOF

# Compile time vs depth, scan over layers off and on (d=256, bf16; 1 timed step each).
for scan in false true; do
  for L in 4 8 16 32; do
    .venv/bin/jaxtrain bench $CFG --steps 1 --warmup 0 --set model.n_layers=$L --set model.scan_layers=$scan \
      | $PY -c "import json,sys; r=json.load(sys.stdin); print('scan=$scan', 'layers=$L', 'compile_s=%.2f' % r['compile_s'])"
  done
done | tee $OUT/compile_vs_depth.txt
