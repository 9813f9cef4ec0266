//! Where a worker stands in a parameter-server job, read from the cluster spec (`TF_CONFIG` of a
//! TFJob, or what `tandem launch --ps P --workers W` sets).
//!
//! Why a separate reader: the servers' addresses, this worker's index and the number of workers
//! are what a client needs to connect, and they come from the same cluster spec every launcher
//! convention fills in; reading them here keeps the client free of launcher knowledge.

use tandem_core::cluster::{ClusterSpec, Role};
use tandem_core::{Error, Result};

/// The servers of a job and this worker's place among its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsJob {
    /// Every parameter server's address, in index order.
    pub servers: Vec<String>,
    /// This worker's index among the training processes (the chief is worker 0).
    pub worker: u32,
    /// Number of training processes (chief and workers).
    pub workers: u32,
}

impl PsJob {
    /// Reads the job from the environment.
    pub fn from_env() -> Result<PsJob> {
        Self::from_spec(&ClusterSpec::from_env()?)
    }

    /// Reads the job from a spec.
    ///
    /// ```
    /// use tandem_core::cluster::ClusterSpec;
    /// use tandem_ps::job::PsJob;
    /// let tf = r#"{"cluster":{"ps":["ps-0:2222","ps-1:2222"],"worker":["w-0:2222","w-1:2222"]},
    ///              "task":{"type":"worker","index":1}}"#;
    /// let job = PsJob::from_spec(&ClusterSpec::from_vars(&[("TF_CONFIG", tf)])?)?;
    /// assert_eq!((job.worker, job.workers), (1, 2));
    /// assert_eq!(job.servers, ["ps-0:2222", "ps-1:2222"]);
    /// # Ok::<(), tandem_core::Error>(())
    /// ```
    pub fn from_spec(spec: &ClusterSpec) -> Result<PsJob> {
        let servers: Vec<String> = spec
            .peers()
            .get(&Role::Ps)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        if servers.is_empty() {
            return Err(Error::config(
                "TF_CONFIG",
                format!(
                    "the job ({} convention) lists no parameter servers; start it with `tandem launch --ps P --workers W` or a TFJob with PS replicas",
                    spec.source()
                ),
            ));
        }
        if servers.len() != spec.replicas(Role::Ps) {
            return Err(Error::config(
                "TF_CONFIG",
                format!(
                    "{} parameter servers have addresses but the job has {}",
                    servers.len(),
                    spec.replicas(Role::Ps)
                ),
            ));
        }
        let worker = spec.training_rank().ok_or_else(|| {
            Error::config(
                "TF_CONFIG",
                format!(
                    "this process is {} {}, not a worker",
                    spec.role(),
                    spec.index()
                ),
            )
        })?;
        let count = |n: usize, what: &str| {
            u32::try_from(n).map_err(|_| Error::config("TF_CONFIG", format!("too many {what}")))
        };
        Ok(PsJob {
            servers,
            worker: count(worker, "workers")?,
            workers: count(spec.training_world_size(), "workers")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chief_is_worker_zero_and_servers_are_in_order() {
        let tf = r#"{"cluster":{"chief":["c:1"],"worker":["w0:1","w1:1"],"ps":["p0:1","p1:1","p2:1"]},"task":{"type":"worker","index":1}}"#;
        let job = PsJob::from_spec(&ClusterSpec::from_vars(&[("TF_CONFIG", tf)]).unwrap()).unwrap();
        assert_eq!(job.worker, 2);
        assert_eq!(job.workers, 3);
        assert_eq!(job.servers, ["p0:1", "p1:1", "p2:1"]);
    }

    #[test]
    fn servers_and_jobs_without_servers_are_refused() {
        let tf = r#"{"cluster":{"worker":["w0:1"],"ps":["p0:1"]},"task":{"type":"ps","index":0}}"#;
        let e = PsJob::from_spec(&ClusterSpec::from_vars(&[("TF_CONFIG", tf)]).unwrap());
        assert!(e.unwrap_err().to_string().contains("not a worker"));
        let spec = ClusterSpec::from_vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap();
        let e = PsJob::from_spec(&spec).unwrap_err().to_string();
        assert!(e.contains("no parameter servers"), "{e}");
    }
}
