# Sourced by the sbatch scripts: the job's TLS certificates (every Tandem connection between hosts
# is mutual TLS). Unless TANDEM_TLS_DIR is already set (certificates of your own, e.g. from your
# site's CA), makes a CA for this job and one certificate for its tasks in the submit directory
# (which every node sees), deletes the CA's key at once (nothing else is issued), and removes the
# folder when the job script ends.
if [[ -z "${TANDEM_TLS_DIR:-}" && -z "${TANDEM_INSECURE:-}" ]]; then
  tls_root="${SLURM_SUBMIT_DIR:-.}/.tandem-tls-${SLURM_JOB_ID:-$$}"
  "${TANDEM_CLI:-target/release/tandem}" certs init "$tls_root/ca" --out "$tls_root/tasks" \
    --job "${SLURM_JOB_NAME:-tandem}-${SLURM_JOB_ID:-$$}" >/dev/null
  rm -f "$tls_root/ca/ca-key.pem"
  trap 'rm -rf "$tls_root"' EXIT
  export TANDEM_TLS_DIR="$tls_root/tasks"
fi
