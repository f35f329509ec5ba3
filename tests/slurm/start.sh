#!/usr/bin/env bash
# Copied from shared/tools/local-slurm (ours) so CI needs nothing outside the repository.
# Local Slurm 22.05 (Debian bookworm): munged + slurmctld + N slurmd (node1..nodeN) on one host.
# Idempotent (PID files). Env: SLURM_LOCAL_DIR, SLURM_LOCAL_NODES (2), SLURM_LOCAL_PORT (16817)
set -euo pipefail
D=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/local-slurm}; N=${SLURM_LOCAL_NODES:-2}; P=${SLURM_LOCAL_PORT:-16817}
log() { echo "[start_local_slurm ${SECONDS}s] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
waitpid() { for _ in $(seq 50); do [ -s "$1" ] && break; sleep 0.1; done; cat "$1"; }
PKGS="slurmctld slurmd slurm-client munge"
if ! (command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged) >/dev/null; then
  log "installing $PKGS"; export DEBIAN_FRONTEND=noninteractive
  apt-get install -yq --no-install-recommends $PKGS >/dev/null ||
    { apt-get update -q >/dev/null; apt-get install -yq --no-install-recommends $PKGS >/dev/null; }
fi
mkdir -p "$D"/{state,log,run,munge}; chmod 755 "$D" "$D/munge"   # munged needs o+x socket dir
NODES=$(seq -f 'node%g' 1 "$N")
for n in $NODES; do mkdir -p "$D/spool/$n"; done
export SLURM_CONF="$D/slurm.conf"; echo "export SLURM_CONF=$SLURM_CONF" > "$D/env.sh"
if ! alive "$D/munge/munged.pid"; then
  [ -s "$D/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$D/munge/munge.key"; chmod 400 "$D/munge/munge.key"; }
  munged -S "$D/munge/munge.socket" --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
    --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"
  log "munged pid $(waitpid "$D/munge/munged.pid")"
fi
if ! alive "$D/run/slurmctld.pid"; then
  { cat <<EOF
ClusterName=localci
SlurmctldHost=$(hostname)
SlurmctldPort=$P
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=5,sched_interval=5
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
KillWait=5
EOF
  i=0; for n in $NODES; do i=$((i+1))
    echo "NodeName=$n NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((P+184+i)) CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) / N ))"
  done; echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"; } > "$SLURM_CONF"
  slurmctld -f "$SLURM_CONF"; log "slurmctld pid $(waitpid "$D/run/slurmctld.pid")"
fi
for n in $NODES; do   # Debian's build has --enable-multiple-slurmd
  alive "$D/run/slurmd-$n.pid" || { slurmd -f "$SLURM_CONF" -N "$n"; log "slurmd $n pid $(waitpid "$D/run/slurmd-$n.pid")"; }
  getent hosts "$n" >/dev/null || echo "127.0.0.1 $n # start_local_slurm" >> /etc/hosts
done
for _ in $(seq 60); do
  [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = "$N" ] && { log "ready: source $D/env.sh"; exit 0; }
  sleep 0.5
done
sinfo -N >&2; exit 1
