#!/usr/bin/env bash
# Run the same jaxtrain command on every worker of a TPU VM pod slice; JAX finds the
# process group from the TPU metadata (one process per worker, all local chips).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--set key=value ...]
# Expects: gcloud authenticated for the project, the repository checked out at the same
# path on every worker with `make venv` done (or JAXTRAIN_BIN pointing at jaxtrain), and
# WORKDIR on a filesystem every worker mounts at the same path (Filestore/NFS, or a
# bucket mounted with gcsfuse).
# Preemption: a maintenance event or `gcloud ... stop` sends SIGTERM; all workers
# checkpoint the same step and exit 143; rerunning this script resumes.
set -euo pipefail
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
repo="${JAXTRAIN_REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
jaxtrain_bin="${JAXTRAIN_BIN:-$repo/.venv/bin/jaxtrain}"
printf -v extra ' %q' "$@"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $(printf %q "$repo") && $(printf %q "$jaxtrain_bin") train $(printf %q "$config") --workdir $(printf %q "$workdir")$extra"
