#!/usr/bin/env bash
# N processes of one job on this machine, talking over 127.0.0.1 (process 0 is the
# coordinator). For testing multi-host behaviour on one box, and for multi-socket hosts.
#   launch/multiprocess.sh N CONFIG WORKDIR [--set key=value ...]
# Environment:
#   JAXTRAIN_PORT         coordinator port (default 12355)
#   JAXTRAIN_CPU_DEVICES  CPU devices per process when running on CPU (default 4)
#   JAXTRAIN_BIN          the jaxtrain executable (default .venv/bin/jaxtrain, else PATH)
# Exits with the first non-zero status of any process (0 when all succeed); Ctrl-C or
# SIGTERM is forwarded to every process, which then checkpoint and stop together.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
n="$1"; config="$2"; workdir="$3"; shift 3
jaxtrain_bin="${JAXTRAIN_BIN:-$here/.venv/bin/jaxtrain}"
[ -x "$jaxtrain_bin" ] || jaxtrain_bin=jaxtrain
port="${JAXTRAIN_PORT:-12355}"
flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="$flags --xla_force_host_platform_device_count=${JAXTRAIN_CPU_DEVICES:-4}"
pids=()
for ((i = 0; i < n; i++)); do
  "$jaxtrain_bin" train "$config" --workdir "$workdir" --coordinator "127.0.0.1:$port" \
    --num-processes "$n" --process-id "$i" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; rc=$?
  # wait returns >128 when interrupted by the trapped signal: wait again for the real status
  while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
  [ "$status" -eq 0 ] && status=$rc
done
exit "$status"
