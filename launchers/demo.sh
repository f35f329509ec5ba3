#!/usr/bin/env bash
# Demo pre-training on the bundled digits: every GPU of this machine, or 2 CPU ranks without one.
#   bash launchers/demo.sh [RUN_DIR] [--max-steps N] [--set key=value ...]
# Running it again resumes from the newest checkpoint in RUN_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="${1:-runs/demo}"
shift || true
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -eq 0 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  ranks=2
else
  ranks=$gpus
fi
exec deepspeed --num_gpus "$ranks" launchers/pretrain.py --config demo --output-dir "$run_dir" "$@"
