# The body of every sbatch template here, sourced by them after their #SBATCH block:
#   source launchers/slurm/common.sh launchers/pretrain.py "$@"
# Rendezvous, communication knobs, one srun task per GPU, signal forwarding, requeue after a preemption
# (status 75) or a failure (a bounded number of times in a row), never after bad input.
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

# Rank 0 records its exit status here, another rank a status a rerun would end with again (bad
# input, 3, 4) in .other_rank (bootmae_ds.runtime.launch): with --kill-on-bad-exit=1 a rank that
# exits or dies (SIGKILL, a crash, a lost node) takes the step down at once instead of leaving the
# others blocked in a collective until the distributed timeout, and srun's own status then no longer
# tells a preemption or bad input from a crash. No file means no rank finished deliberately: a failure.
export BOOTMAE_EXIT_STATUS_FILE="$RUN_DIR/.exit_status"
FAILURES_FILE="$RUN_DIR/.failed_attempts"
MAX_FAILED_REQUEUES=${BOOTMAE_MAX_FAILED_REQUEUES:-3}
rm -f "$BOOTMAE_EXIT_STATUS_FILE" "$BOOTMAE_EXIT_STATUS_FILE.other_rank"

srun --kill-on-bad-exit=1 python "$ENTRY" --output-dir "$RUN_DIR" "$@" &
srun_pid=$!
while true; do   # `wait` returns early when a trapped signal arrives; wait again until srun ends
  wait "$srun_pid"
  srun_status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
status=$(cat "$BOOTMAE_EXIT_STATUS_FILE" 2>/dev/null || echo "none")
other=$(cat "$BOOTMAE_EXIT_STATUS_FILE.other_rank" 2>/dev/null || echo "none")
case "$status" in
  0|2|3|4|75) ;;                               # rank 0 finished deliberately: its word
  *) [ "$other" = "none" ] || status=$other ;;  # rank 0 killed or failed after another rank's stop
esac
failures=$(cat "$FAILURES_FILE" 2>/dev/null || echo 0)

case "$status" in
  75)
    echo 0 > "$FAILURES_FILE"
    echo "[sbatch] checkpoint written; requeueing job $SLURM_JOB_ID to continue"
    scontrol requeue "$SLURM_JOB_ID"
    ;;
  0)
    echo 0 > "$FAILURES_FILE"
    echo "[sbatch] training finished"
    ;;
  2|3|4)
    # bad input (2), non-finite losses after any rewinds (3), a checkpoint that could not be written (4):
    # a rerun would fail the same way; the message above says what to fix
    echo "[sbatch] training stopped with status $status; not requeueing (rerun the job once fixed)"
    ;;
  *)
    failures=$((failures + 1))
    echo "$failures" > "$FAILURES_FILE"
    if [ "$failures" -le "$MAX_FAILED_REQUEUES" ]; then
      echo "[sbatch] training failed (srun status $srun_status, recorded status $status; restart" \
           "${SLURM_RESTART_COUNT:-0}); requeueing job $SLURM_JOB_ID, failure $failures of $MAX_FAILED_REQUEUES in a row"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "[sbatch] training failed $failures times in a row; not requeueing (BOOTMAE_MAX_FAILED_REQUEUES=$MAX_FAILED_REQUEUES)"
    fi
    status=1
    ;;
esac
exit "$status"
