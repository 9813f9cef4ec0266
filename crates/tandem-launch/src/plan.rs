//! What to start: one [`Planned`] process per rank, with its role, command and environment.
//!
//! Why pure planning apart from starting: the environment each process gets is exactly what a real
//! scheduler would inject (a PyTorchJob's torchrun variables for allreduce jobs, a TFJob's
//! `TF_CONFIG` for parameter-server jobs), so the same binary behaves the same under
//! `tandem launch`, Kubeflow or Slurm. Keeping it pure lets the tests resolve every planned
//! environment with `ClusterSpec::from_vars` and check each process lands where it should,
//! without starting anything.

use std::path::PathBuf;

use tandem_core::cluster::Role;
use tandem_core::{Error, Result};

/// The shape of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nproc` equal ranks running collectives (a PyTorchJob).
    Allreduce {
        /// Number of ranks.
        nproc: usize,
    },
    /// Parameter servers and workers (a TFJob).
    Ps {
        /// Number of parameter servers.
        ps: usize,
        /// Number of workers.
        workers: usize,
        /// Whether worker 0 is a separate `chief` replica (TFJob `Chief`).
        chief: bool,
    },
}

/// When a failed process is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// A failure ends the job.
    Never,
    /// A process that exits non-zero is restarted up to `max` times.
    OnFailure {
        /// Restarts allowed per process.
        max: u32,
    },
}

/// Where the output lines of the processes go instead of the launcher's own stdout and stderr:
/// called with the process, the line (without its newline) and whether it came from stderr.
#[derive(Clone)]
pub struct LineSink(pub std::sync::Arc<SinkFn>);

/// The function behind a [`LineSink`].
pub type SinkFn = dyn Fn(&Planned, &str, bool) + Send + Sync;

impl std::fmt::Debug for LineSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineSink")
    }
}

/// Everything `tandem launch` needs to start a job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The job's shape.
    pub layout: Layout,
    /// The program (and arguments) the training processes run.
    pub command: Vec<String>,
    /// The program the parameter servers run (default: [`JobSpec::command`]).
    pub ps_command: Option<Vec<String>>,
    /// Folder for one log file per process (`None`: no files).
    pub log_dir: Option<PathBuf>,
    /// Restart policy.
    pub restart: Restart,
    /// Extra variables for every process.
    pub env: Vec<(String, String)>,
    /// Host the processes use to reach each other.
    pub host: String,
    /// Prefix each output line with the process's role and index.
    pub prefix: bool,
    /// Hand output lines to this instead of printing them (log files are still written).
    pub sink: Option<LineSink>,
    /// GPUs for the training processes, in ring order: process i gets
    /// `CUDA_VISIBLE_DEVICES=gpus[i % len]` (empty: leave the variable alone).
    pub gpus: Vec<usize>,
    /// An elastic allreduce job's `(min, max)` members: a rank that fails does not end the job
    /// while `min` remain (processes get `TANDEM_ELASTIC=min:max`; see tandem-elastic).
    pub elastic: Option<(usize, usize)>,
}

impl JobSpec {
    /// A job running `command` in every process, no log files, never restarted.
    pub fn new(layout: Layout, command: Vec<String>) -> JobSpec {
        JobSpec {
            layout,
            command,
            ps_command: None,
            log_dir: None,
            restart: Restart::Never,
            env: Vec::new(),
            host: "127.0.0.1".into(),
            prefix: true,
            sink: None,
            gpus: Vec::new(),
            elastic: None,
        }
    }

    /// Checks the spec before anything starts.
    pub fn validate(&self) -> Result<()> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(Error::invalid(
                "command",
                "no program to run; put it after `--`, e.g. `tandem launch --nproc 2 -- python train.py`",
            ));
        }
        if let Some(ps) = &self.ps_command
            && ps.first().is_none_or(String::is_empty)
        {
            return Err(Error::invalid("--ps-cmd", "is empty"));
        }
        if let Some((min, max)) = self.elastic {
            match self.layout {
                Layout::Allreduce { nproc } if min >= 1 && min <= nproc && nproc <= max => {}
                Layout::Allreduce { nproc } => {
                    return Err(Error::invalid(
                        "--elastic",
                        format!("{min}:{max} must satisfy 1 <= MIN <= --nproc ({nproc}) <= MAX"),
                    ));
                }
                Layout::Ps { .. } => {
                    return Err(Error::invalid(
                        "--elastic",
                        "is for allreduce jobs (--nproc); parameter-server jobs keep their workers with leases",
                    ));
                }
            }
        }
        match self.layout {
            Layout::Allreduce { nproc } if nproc == 0 || nproc > 1024 => Err(Error::invalid(
                "--nproc",
                format!("{nproc} is not between 1 and 1024"),
            )),
            Layout::Ps { ps, workers, .. } if ps == 0 || workers == 0 => Err(Error::invalid(
                "--ps/--workers",
                format!(
                    "a parameter-server job needs at least one of each (got {ps} servers, {workers} workers)"
                ),
            )),
            Layout::Ps { ps, workers, .. } if ps + workers > 1024 => Err(Error::invalid(
                "--ps/--workers",
                format!("{} processes is more than 1024", ps + workers),
            )),
            _ => Ok(()),
        }
    }
}

/// One process of a planned job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Its role.
    pub role: Role,
    /// Its index among the replicas of its role.
    pub index: usize,
    /// Its rank in the job (chief, workers, then servers).
    pub rank: usize,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The variables set for it (on top of the launcher's own environment).
    pub env: Vec<(String, String)>,
}

impl Planned {
    /// A short name such as `worker 2` or `ps 0`.
    pub fn name(&self) -> String {
        format!("{} {}", self.role, self.index)
    }
    /// How its output lines are prefixed: the name, and the rank when it differs from the index
    /// (`worker 2`, `ps 0 (rank 4)`).
    pub fn label(&self) -> String {
        if self.index == self.rank {
            self.name()
        } else {
            format!("{} (rank {})", self.name(), self.rank)
        }
    }
    /// The value of one planned variable.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// Whether this process trains (chief or worker), as opposed to serving parameters.
    pub fn trains(&self) -> bool {
        matches!(self.role, Role::Chief | Role::Worker)
    }
}

/// Plans the processes of `spec`: the rendezvous is at `rendezvous` (`host:port`, hosted by the
/// launcher), and `ports` gives one port per process for the addresses a `TF_CONFIG` lists (servers
/// bind theirs; it may be empty for allreduce jobs).
pub fn plan(spec: &JobSpec, rendezvous: &str, ports: &[u16]) -> Result<Vec<Planned>> {
    spec.validate()?;
    if !rendezvous.contains(':') {
        return Err(Error::invalid(
            "rendezvous",
            format!("{rendezvous:?} is not host:port"),
        ));
    }
    match spec.layout {
        Layout::Allreduce { nproc } => Ok(plan_allreduce(spec, rendezvous, ports, nproc)),
        Layout::Ps { ps, workers, chief } => plan_ps(spec, rendezvous, ports, ps, workers, chief),
    }
}

/// The variables every process gets: the launcher's rendezvous, then `extra`, then the user's.
fn common(spec: &JobSpec, rendezvous: &str, extra: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            tandem_core::settings::RENDEZVOUS_ADDR.name.to_string(),
            rendezvous.to_string(),
        ),
        (
            tandem_core::settings::RENDEZVOUS_EXTERNAL.name.to_string(),
            "1".to_string(),
        ),
    ];
    if let Some((min, max)) = spec.elastic {
        env.push((
            tandem_core::settings::ELASTIC.name.to_string(),
            format!("{min}:{max}"),
        ));
    }
    env.extend(extra);
    env.extend(spec.env.iter().cloned());
    env
}

/// An allreduce job: the variables torchrun gives (a PyTorchJob's), one process per rank.
/// `MASTER_PORT` is `ports[0]` when given: a port nobody holds, for the store rank 0 of a
/// `torch.distributed` job binds there (Tandem's own processes use `TANDEM_RENDEZVOUS_ADDR`).
fn plan_allreduce(spec: &JobSpec, rendezvous: &str, ports: &[u16], nproc: usize) -> Vec<Planned> {
    let (master_addr, launcher_port) = rendezvous.rsplit_once(':').unwrap_or((rendezvous, ""));
    let master_port = ports
        .first()
        .map_or_else(|| launcher_port.to_string(), u16::to_string);
    (0..nproc)
        .map(|rank| {
            let env = common(
                spec,
                rendezvous,
                vec![
                    ("RANK".into(), rank.to_string()),
                    ("WORLD_SIZE".into(), nproc.to_string()),
                    ("LOCAL_RANK".into(), rank.to_string()),
                    ("LOCAL_WORLD_SIZE".into(), nproc.to_string()),
                    ("GROUP_RANK".into(), "0".into()),
                    ("MASTER_ADDR".into(), master_addr.to_string()),
                    ("MASTER_PORT".into(), master_port.to_string()),
                ],
            );
            let env = with_gpu(env, &spec.gpus, rank);
            // torchrun names every rank a worker; so do the logs.
            Planned {
                role: Role::Worker,
                index: rank,
                rank,
                command: spec.command.clone(),
                env,
            }
        })
        .collect()
}

/// A parameter-server job: a TFJob's `TF_CONFIG` for every trainer (chief first, if any) and server.
fn plan_ps(
    spec: &JobSpec,
    rendezvous: &str,
    ports: &[u16],
    ps: usize,
    workers: usize,
    chief: bool,
) -> Result<Vec<Planned>> {
    let total = ps + workers;
    if ports.len() < total {
        return Err(Error::invalid(
            "ports",
            format!("{} ports for {total} processes", ports.len()),
        ));
    }
    let cluster = tf_cluster(spec, ports, ps, workers, chief);
    let trainers: Vec<(Role, usize)> = if chief {
        std::iter::once((Role::Chief, 0))
            .chain((0..workers - 1).map(|i| (Role::Worker, i)))
            .collect()
    } else {
        (0..workers).map(|i| (Role::Worker, i)).collect()
    };
    let processes = trainers.into_iter().chain((0..ps).map(|i| (Role::Ps, i)));
    Ok(processes
        .enumerate()
        .map(|(rank, (role, index))| {
            let tf_config = serde_json::json!({
                "cluster": cluster,
                "task": { "type": role.name(), "index": index },
            });
            let command = match (role, &spec.ps_command) {
                (Role::Ps, Some(c)) => c.clone(),
                _ => spec.command.clone(),
            };
            let env = common(
                spec,
                rendezvous,
                vec![("TF_CONFIG".into(), tf_config.to_string())],
            );
            // Trainers come first in rank order, so rank is their index among trainers.
            let env = if role == Role::Ps {
                env
            } else {
                with_gpu(env, &spec.gpus, rank)
            };
            Planned {
                role,
                index,
                rank,
                command,
                env,
            }
        })
        .collect())
}

/// The `cluster` of the `TF_CONFIG`: the chief, the workers, then the servers, at the ports given.
fn tf_cluster(
    spec: &JobSpec,
    ports: &[u16],
    ps: usize,
    workers: usize,
    chief: bool,
) -> serde_json::Map<String, serde_json::Value> {
    let addr = |i: usize| format!("{}:{}", spec.host, ports[i]);
    let list = |offset: usize, n: usize| -> serde_json::Value {
        serde_json::Value::Array((0..n).map(|i| addr(offset + i).into()).collect())
    };
    let mut cluster = serde_json::Map::new();
    let chiefs = usize::from(chief);
    if chief {
        cluster.insert("chief".into(), list(0, 1));
    }
    if workers > chiefs {
        cluster.insert("worker".into(), list(chiefs, workers - chiefs));
    }
    cluster.insert("ps".into(), list(workers, ps));
    cluster
}

/// Adds `CUDA_VISIBLE_DEVICES` for `trainer` when GPUs were assigned.
fn with_gpu(
    mut env: Vec<(String, String)>,
    gpus: &[usize],
    trainer: usize,
) -> Vec<(String, String)> {
    if !gpus.is_empty() {
        env.push((
            "CUDA_VISIBLE_DEVICES".into(),
            gpus[trainer % gpus.len()].to_string(),
        ));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::cluster::ClusterSpec;

    fn cmd() -> Vec<String> {
        vec!["train".into()]
    }

    #[test]
    fn allreduce_processes_resolve_to_their_ranks() {
        let spec = JobSpec::new(Layout::Allreduce { nproc: 3 }, cmd());
        let procs = plan(&spec, "127.0.0.1:4000", &[]).unwrap();
        assert_eq!(procs.len(), 3);
        for (r, p) in procs.iter().enumerate() {
            let c = ClusterSpec::from_vars(&p.env).unwrap();
            assert_eq!((c.rank(), c.world_size(), c.local_rank()), (r, 3, r));
            assert_eq!(c.rendezvous(), Some("127.0.0.1:4000"));
            assert_eq!(p.name(), format!("worker {r}"));
        }
        // With a reserved port, MASTER_PORT is that one (torch's store binds it), not the
        // launcher's rendezvous.
        let procs = plan(&spec, "127.0.0.1:4000", &[4100]).unwrap();
        for p in &procs {
            assert_eq!(p.env_var("MASTER_PORT"), Some("4100"));
            assert_eq!(p.env_var("TANDEM_RENDEZVOUS_ADDR"), Some("127.0.0.1:4000"));
            let c = ClusterSpec::from_vars(&p.env).unwrap();
            assert_eq!(c.rendezvous(), Some("127.0.0.1:4000"));
        }
    }

    #[test]
    fn ps_processes_get_a_tf_config_naming_every_server() {
        let mut spec = JobSpec::new(
            Layout::Ps {
                ps: 2,
                workers: 3,
                chief: true,
            },
            cmd(),
        );
        spec.ps_command = Some(vec!["tandem".into(), "ps".into()]);
        let procs = plan(&spec, "127.0.0.1:4000", &[11, 12, 13, 14, 15]).unwrap();
        let names: Vec<String> = procs.iter().map(Planned::name).collect();
        assert_eq!(names, ["chief 0", "worker 0", "worker 1", "ps 0", "ps 1"]);
        assert_eq!(procs[3].command, ["tandem", "ps"]);
        assert_eq!(procs[0].command, ["train"]);
        for (r, p) in procs.iter().enumerate() {
            let c = ClusterSpec::from_vars(&p.env).unwrap();
            assert_eq!((c.role(), c.index(), c.rank()), (p.role, p.index, r));
            assert_eq!(c.world_size(), 5);
            assert_eq!(c.peer(Role::Ps, 1), Some("127.0.0.1:15"));
            assert_eq!(c.training_world_size(), 3);
            assert_eq!(c.rendezvous(), Some("127.0.0.1:4000"));
        }
    }

    #[test]
    fn trainers_get_their_gpu_in_ring_order_and_servers_none() {
        let mut spec = JobSpec::new(
            Layout::Ps {
                ps: 1,
                workers: 2,
                chief: false,
            },
            cmd(),
        );
        spec.gpus = vec![2, 0];
        let procs = plan(&spec, "127.0.0.1:4000", &[1, 2, 3]).unwrap();
        let dev: Vec<Option<&str>> = procs
            .iter()
            .map(|p| p.env_var("CUDA_VISIBLE_DEVICES"))
            .collect();
        assert_eq!(dev, [Some("2"), Some("0"), None]);
        let mut spec = JobSpec::new(Layout::Allreduce { nproc: 3 }, cmd());
        spec.gpus = vec![1, 3];
        let procs = plan(&spec, "127.0.0.1:4000", &[]).unwrap();
        let dev: Vec<Option<&str>> = procs
            .iter()
            .map(|p| p.env_var("CUDA_VISIBLE_DEVICES"))
            .collect();
        assert_eq!(dev, [Some("1"), Some("3"), Some("1")]);
    }

    #[test]
    fn bad_specs_are_refused_naming_the_flag() {
        let e = plan(
            &JobSpec::new(Layout::Allreduce { nproc: 0 }, cmd()),
            "h:1",
            &[],
        );
        assert!(e.unwrap_err().to_string().contains("--nproc"));
        let e = plan(
            &JobSpec::new(Layout::Allreduce { nproc: 2 }, vec![]),
            "h:1",
            &[],
        );
        assert!(e.unwrap_err().to_string().contains("command"));
        let ps = Layout::Ps {
            ps: 0,
            workers: 2,
            chief: false,
        };
        let e = plan(&JobSpec::new(ps, cmd()), "h:1", &[1, 2]);
        assert!(e.unwrap_err().to_string().contains("--ps"));
        let ps = Layout::Ps {
            ps: 1,
            workers: 2,
            chief: false,
        };
        let e = plan(&JobSpec::new(ps, cmd()), "h:1", &[1]);
        assert!(e.unwrap_err().to_string().contains("ports"));
    }
}
