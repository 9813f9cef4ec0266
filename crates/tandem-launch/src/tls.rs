//! The TLS files `tandem launch` makes for a job: its own CA, a certificate per process naming its
//! identity, the CA's key deleted once they are issued.

use std::path::PathBuf;

use tandem_core::{Error, Result};

use crate::plan::{JobSpec, Planned};

/// The TLS files `tandem launch` makes for each job, in `tls/` of the job's log folder (or a
/// temporary folder, removed when the job ends): a CA of its own and one certificate per process
/// naming its identity (`tls/rank-3/`, `tls/worker-1/`, `tls/ps-0/`, `tls/chief/`, and
/// `tls/rendezvous/` for the launcher's rendezvous), each folder complete for `TANDEM_TLS_DIR`.
/// The CA's key is deleted once every certificate is issued. Not made when the user's
/// environment already names TLS files.
pub(crate) struct JobTls {
    /// The folder of every identity's folder.
    root: PathBuf,
    /// Whether the folder is removed with the job.
    temporary: bool,
}

/// The job name the launcher's certificates carry.
const LAUNCH_JOB: &str = "tandem-launch";

impl JobTls {
    /// The job's CA and certificates, made for this launch when neither the environment nor the
    /// spec names TLS files (every connection is then mutual TLS); `None` when they do.
    pub(crate) fn make(
        log_dir: Option<&std::path::Path>,
        spec: &JobSpec,
    ) -> Result<Option<JobTls>> {
        let named = |k: &str| {
            std::env::var_os(k).is_some_and(|v| !v.is_empty())
                || spec.env.iter().any(|(n, v)| n == k && !v.is_empty())
        };
        if [
            tandem_tls::DIR_VAR,
            tandem_tls::CA_VAR,
            tandem_tls::CERT_VAR,
            tandem_tls::KEY_VAR,
        ]
        .iter()
        .any(|k| named(k))
        {
            return Ok(None);
        }
        let (root, temporary) = match log_dir {
            Some(d) => (d.join("tls"), false),
            None => (
                std::env::temp_dir().join(format!(
                    "tandem-tls-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0)
                )),
                true,
            ),
        };
        Ok(Some(JobTls { root, temporary }))
    }

    /// Issues one per planned process, then deletes the CA's key. Returns each process's folder,
    /// in the order of `planned`.
    pub(crate) fn issue(&self, spec: &JobSpec, planned: &[Planned]) -> Result<Vec<PathBuf>> {
        let dirs = planned
            .iter()
            .map(|p| self.issue_one(spec, &identity(spec, p)))
            .collect::<Result<Vec<_>>>()?;
        let key = self.root.join(tandem_tls::CA_KEY_FILE);
        std::fs::remove_file(&key)
            .map_err(|e| Error::io(format!("deleting the CA key {}", key.display()), e))?;
        Ok(dirs)
    }

    /// Issues the certificate of `identity` (once) into its folder and returns the folder.
    pub(crate) fn issue_one(&self, spec: &JobSpec, identity: &str) -> Result<PathBuf> {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        if !names.contains(&spec.host) && !spec.host.is_empty() {
            names.push(spec.host.clone());
        }
        let dir = self.root.join(identity);
        if !dir.join(tandem_tls::CERT_FILE).exists() {
            tandem_tls::init_as(&self.root, Some(&dir), LAUNCH_JOB, identity, &names, 30)?;
        }
        Ok(dir)
    }
}

/// The identity a planned process's certificate names: `rank-N` in an allreduce job, `chief`,
/// `worker-N` or `ps-N` in a parameter-server job.
fn identity(spec: &JobSpec, p: &Planned) -> String {
    match (&spec.layout, p.role) {
        (crate::plan::Layout::Allreduce { .. }, _) => format!("rank-{}", p.rank),
        (_, tandem_core::cluster::Role::Chief) => "chief".into(),
        (_, tandem_core::cluster::Role::Ps) => format!("ps-{}", p.index),
        (_, _) => format!("worker-{}", p.index),
    }
}

impl Drop for JobTls {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
