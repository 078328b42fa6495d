#!/usr/bin/env bash
# Regenerates the figures of docs/data.md (about 6 minutes on 2 CPU cores): prepares the
# default corpus (bytes and BPE 8k) and the second corpus, benchmarks the input pipeline
# against the train step of the same config in one process, and trains small_bpe.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
make data
mkdir -p docs/data
.venv/bin/jaxtrain data bench data/cache/stdlib --config configs/small.yaml --seconds 30 | tee docs/data/bench_small.json
.venv/bin/jaxtrain data bench data/cache/stdlib-bpe8k --config configs/small_bpe.yaml --seconds 15 \
    | tee docs/data/bench_small_bpe.json
rm -rf runs/small_bpe
.venv/bin/jaxtrain train configs/small_bpe.yaml --workdir runs/small_bpe | tail -1 | tee docs/data/small_bpe_final.txt
.venv/bin/jaxtrain eval runs/small_bpe | tee docs/data/small_bpe_eval.json
.venv/bin/jaxtrain plot runs/small_bpe --out docs/data/small_bpe_curves.png \
    --metric loss,val_loss/stdlib,val_loss/copyright,val_bits_per_byte
