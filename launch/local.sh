#!/usr/bin/env bash
# One process on this machine, all local devices in one mesh.
#   launch/local.sh CONFIG WORKDIR [--set key=value ...]
# Expects the project's virtual environment (`make venv`) or `jaxtrain` on PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
config="$1"; workdir="$2"; shift 2
jaxtrain_bin="${JAXTRAIN_BIN:-$here/.venv/bin/jaxtrain}"
[ -x "$jaxtrain_bin" ] || jaxtrain_bin=jaxtrain
exec "$jaxtrain_bin" train "$config" --workdir "$workdir" "$@"
