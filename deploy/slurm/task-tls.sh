#!/bin/bash
# Run by srun for each task of an allreduce job: points TANDEM_TLS_DIR at this task's own
# certificate (rank-$SLURM_PROCID, made by job-tls.sh) and runs the command.
#   srun deploy/slurm/task-tls.sh PROGRAM ARGS...
set -euo pipefail
if [[ -n "${TANDEM_TLS_ROOT:-}" ]]; then
  export TANDEM_TLS_DIR="$TANDEM_TLS_ROOT/rank-${SLURM_PROCID:?task-tls.sh runs under srun}"
fi
exec "$@"
