#!/usr/bin/env bash
# A real one-node SLURM cluster on 127.0.0.1, for testing launch/slurm.sbatch (as root):
#   launch/slurm_local_cluster.sh start   install slurm-wlm + munge if missing, write a
#                                         one-node slurm.conf, start munged, slurmctld, slurmd
#                                         with no state from an earlier start (no old jobs)
#   launch/slurm_local_cluster.sh stop    stop the daemons
# Exit status 2: not root; 3: the packages cannot be installed; 1: the node did not come up.
# tests/test_slurm.py starts it, and skips (saying why) only on statuses 2 and 3.
set -euo pipefail
action="${1:-start}"
conf_dir=/etc/slurm
cpus="$(nproc)"

stop() {
  for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null || true
    for _ in $(seq 100); do pgrep -x "$daemon" >/dev/null || break; sleep 0.1; done
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "slurm_local_cluster.sh: needs root (it starts system daemons)" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
         || { apt-get update -q >/dev/null 2>&1 &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; }; }; then
    echo "slurm_local_cluster.sh: cannot install slurm-wlm and munge (no Debian package source reachable)" >&2
    exit 3
  fi
fi
stop
# A test cluster starts empty: a job saved by an earlier start (still running when it was
# stopped, or requeued) would otherwise be recovered, rerun and hold the node's CPUs.
rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/slurm
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 2>/dev/null;
                                 chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
cat > "$conf_dir/slurm.conf" <<EOF
ClusterName=jaxtrain
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
runuser -u munge -- munged --force
slurmctld
slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm_local_cluster.sh: one node ($cpus CPUs) up on 127.0.0.1"
    exit 0
  fi
  sleep 1
done
echo "slurm_local_cluster.sh: the node did not come up; see /var/log/slurm/" >&2
exit 1
