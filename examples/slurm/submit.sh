#!/bin/bash
# Run a whole sweep on a SLURM cluster: one job array per planning round, one array task per run.
#
#   examples/slurm/submit.sh configs/sweeps/smollm2-135m.yaml runs/smollm2-135m [MAX_PARALLEL]
#
# A sweep without a tuning section takes one round. With tuning, experiment runs depend on the
# selected values, so each round submits what the plan can configure now (the next tuning stage,
# then the experiments) and waits for it (sbatch --wait). SLURM does the scheduling; this loop only
# re-plans. Run it on a login node inside tmux/screen; rerunning it resumes (finished work is skipped).
set -euo pipefail
CONFIG=${1:?usage: submit.sh SWEEP_CONFIG SWEEP_DIR [MAX_PARALLEL]}
SWEEP_DIR=${2:?usage: submit.sh SWEEP_CONFIG SWEEP_DIR [MAX_PARALLEL]}
MAX_PARALLEL=${3:-8}
HERE=$(cd "$(dirname "$0")" && pwd)

while true; do
  mmpo sweep plan --config "$CONFIG" --out "$SWEEP_DIR"
  runs=$(wc -l < "$SWEEP_DIR/commands.txt")
  waiting=$(python -c "import json, sys; print(len(json.load(open(sys.argv[1]))['waiting']))" "$SWEEP_DIR/plan.json")
  # --wait: return when every task of the array has ended; a failed task fails the call, so
  # stop and let the user look (its log is <job>-<array id>_<index>.out); rerunning retries it.
  sbatch --wait --array=0-$((runs - 1))%"$MAX_PARALLEL" "$HERE/run_one.sbatch" "$SWEEP_DIR"
  if [ "$waiting" -eq 0 ]; then
    break  # that round covered every run of the sweep
  fi
done
mmpo report "$SWEEP_DIR" --command "examples/slurm/submit.sh $CONFIG $SWEEP_DIR"
