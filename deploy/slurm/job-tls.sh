# Sourced by the sbatch scripts: the job's TLS certificates (every Tandem connection between hosts
# is mutual TLS). Unless TANDEM_TLS_DIR is already set (certificates of your own, e.g. from your
# site's CA), makes a CA for this job and one certificate per task naming its identity (rank-N in an
# allreduce job; ps-N and worker-N when PS_COUNT is set) in the submit directory (which every node
# sees), deletes the CA's key once they are issued, and removes the folder when the job script
# ends. TANDEM_TLS_ROOT names the folder; each task takes its own (deploy/slurm/task-tls.sh, or
# ps-task.sh), so no task holds another's key.
if [[ -z "${TANDEM_TLS_DIR:-}" && -z "${TANDEM_INSECURE:-}" ]]; then
  tls_root="${SLURM_SUBMIT_DIR:-.}/.tandem-tls-${SLURM_JOB_ID:-$$}"
  tls_job="${SLURM_JOB_NAME:-tandem}-${SLURM_JOB_ID:-$$}"
  for ((task = 0; task < ${SLURM_NTASKS:-1}; task++)); do
    if [[ -z "${PS_COUNT:-}" ]]; then
      id="rank-$task"
    elif ((task < PS_COUNT)); then
      id="ps-$task"
    else
      id="worker-$((task - PS_COUNT))"
    fi
    "${TANDEM_CLI:-target/release/tandem}" certs init "$tls_root/ca" --out "$tls_root/$id" \
      --identity "$id" --job "$tls_job" >/dev/null
  done
  rm -f "$tls_root/ca/ca-key.pem"
  trap 'rm -rf "$tls_root"' EXIT
  export TANDEM_TLS_ROOT="$tls_root"
fi
