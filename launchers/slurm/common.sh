# The body of every sbatch template here, sourced by them after their #SBATCH block:
#   source launchers/slurm/common.sh launchers/pretrain.py "$@"
# Rendezvous, communication knobs, one srun task per GPU, signal forwarding, requeue on status 75.
ENTRY=$1
shift
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
mkdir -p "$RUN_DIR"

# Rendezvous: the first node of the allocation, a port derived from the job id (two jobs sharing
# a node get different ports). bootmae_ds.runtime.dist derives the same values if these are unset.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# Communication knobs (uncomment what your fabric needs):
# export NCCL_SOCKET_IFNAME=ib0         # the interface NCCL bootstraps over
# export NCCL_IB_HCA=mlx5               # InfiniBand adapters to use
# export NCCL_DEBUG=WARN                # INFO when diagnosing hangs
# export GLOO_SOCKET_IFNAME=eth0        # gloo (CPU runs) interface
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "[sbatch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST," \
     "master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# The time-limit warning (USR1) and preemption (TERM) reach this script; every rank is asked to
# finish its step, write a checkpoint and exit with status 75.
forward() {
  echo "[sbatch] SIG$1 received: asking the ranks to checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$srun_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --kill-on-bad-exit=0 python "$ENTRY" --output-dir "$RUN_DIR" "$@" &
srun_pid=$!
while true; do   # `wait` returns early when a trapped signal arrives; wait again until srun ends
  wait "$srun_pid"
  status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$status" -eq 75 ]; then
  echo "[sbatch] checkpoint written; requeueing job $SLURM_JOB_ID to continue"
  scontrol requeue "$SLURM_JOB_ID"
elif [ "$status" -eq 0 ]; then
  echo "[sbatch] training finished"
else
  echo "[sbatch] training failed with status $status; not requeueing"
fi
exit "$status"
