#!/usr/bin/env bash
# Copied from shared/tools/local-slurm (ours) so CI needs nothing outside the repository.
# Cancel jobs, then stop only the daemons start_local_slurm.sh started (PID files).
D=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/local-slurm}; export SLURM_CONF="$D/slurm.conf"
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$D/run/slurmctld.pid" && ids=$(squeue -h -o %i) && [ -n "$ids" ]; then
  scancel $ids
  for _ in $(seq 40); do [ -z "$(squeue -h -o %i)" ] && break; sleep 0.5; done
fi
stop() {   # $1 = expected name, rest = PID files; SIGTERM all, wait, SIGKILL leftovers
  local want=$1 f p pids=""; shift
  for f in "$@"; do
    if alive "$f" && p=$(cat "$f") && grep -q "$want" "/proc/$p/cmdline"; then kill "$p"; pids="$pids $p"; fi
    rm -f "$f"
  done
  for p in $pids; do
    for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null; echo "stopped $want $p"
  done
}
stop slurmd "$D"/run/slurmd-*.pid
stop slurmctld "$D/run/slurmctld.pid"
stop munged "$D/munge/munged.pid"
if grep -q '# start_local_slurm$' /etc/hosts; then
  grep -v '# start_local_slurm$' /etc/hosts > "$D/hosts.tmp"; cat "$D/hosts.tmp" > /etc/hosts; rm -f "$D/hosts.tmp"
fi
exit 0
