#!/bin/bash
# Runs one task of deploy/slurm/ps.sbatch: computes this task's TF_CONFIG from the Slurm variables
# and the node list, then starts `tandem ps` (tasks 0..PS_COUNT-1) or the worker program.
# Needs SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST (expanded with `scontrol show hostnames`),
# PS_COUNT and TANDEM_PS_PORT; task t runs on node t / tasks-per-node at port TANDEM_PS_PORT + t mod
# tasks-per-node. With TANDEM_PRINT_ONLY=1 it prints what Tandem resolves instead of running.
set -euo pipefail

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
ntasks=$SLURM_NTASKS
per_node=$(( (ntasks + ${#nodes[@]} - 1) / ${#nodes[@]} ))
addr() { # task index -> host:port (each task on a node gets its own port)
  local t=$1
  echo "${nodes[$((t / per_node))]}:$((TANDEM_PS_PORT + t % per_node))"
}
list() { # first count -> JSON list of addresses
  local from=$1 count=$2 out="" i
  for ((i = from; i < from + count; i++)); do out+="${out:+,}\"$(addr "$i")\""; done
  echo "[$out]"
}
ps_list=$(list 0 "$PS_COUNT")
worker_list=$(list "$PS_COUNT" $((ntasks - PS_COUNT)))
if (( SLURM_PROCID < PS_COUNT )); then
  type=ps; index=$SLURM_PROCID
else
  type=worker; index=$((SLURM_PROCID - PS_COUNT))
fi
export TF_CONFIG="{\"cluster\":{\"ps\":$ps_list,\"worker\":$worker_list},\"task\":{\"type\":\"$type\",\"index\":$index}}"
# Slurm's variables describe the same tasks in another order: let TF_CONFIG decide.
export TANDEM_LAUNCHER=tf_config
# This task's own certificate (ps-N or worker-N), made by job-tls.sh.
if [[ -n "${TANDEM_TLS_ROOT:-}" ]]; then
  export TANDEM_TLS_DIR="$TANDEM_TLS_ROOT/$type-$index"
fi
if [[ -n "${TANDEM_PRINT_ONLY:-}" ]]; then
  exec "${TANDEM_BIN:-target/release}/tandem" info --json
fi
if [[ $type == ps ]]; then
  # Serves this task's address from TF_CONFIG (only that interface).
  exec "${TANDEM_BIN:-target/release}/tandem" ps
else
  exec "${TANDEM_BIN:-target/release}/examples/sync_ps" --steps 2000
fi
