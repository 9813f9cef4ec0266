//! The resolved description of a job and of this process's place in it.
//!
//! Why one type for every launcher: the collectives and the parameter server need the same few
//! facts (rank, world size, role and index, peers' addresses, where the rendezvous is, how many
//! processes share this machine) whatever scheduler started the process. [`ClusterSpec`] holds
//! them after validation, so code downstream never re-reads the environment or re-checks a rank
//! against the world size.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

use crate::vars::check_address;

/// What a process does in a job, named as Kubeflow's TFJob names its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The coordinating worker (TFJob `Chief`/`Master`, PyTorchJob `Master`, rank 0 of allreduce jobs).
    Chief,
    /// A training worker.
    Worker,
    /// A parameter server.
    Ps,
    /// An evaluator, which reads checkpoints and takes no part in training.
    Evaluator,
}

impl Role {
    /// Every role, in rank order.
    pub const ALL: [Role; 4] = [Role::Chief, Role::Worker, Role::Ps, Role::Evaluator];

    /// The lower-case name used in TF_CONFIG.
    pub fn name(self) -> &'static str {
        match self {
            Role::Chief => "chief",
            Role::Worker => "worker",
            Role::Ps => "ps",
            Role::Evaluator => "evaluator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "chief" | "master" => Ok(Role::Chief),
            "worker" => Ok(Role::Worker),
            "ps" => Ok(Role::Ps),
            "evaluator" => Ok(Role::Evaluator),
            _ => Err(Error::config(
                "role",
                format!("unknown task type {s:?}; expected chief, master, worker, ps or evaluator"),
            )),
        }
    }
}

/// Which convention the spec was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Convention {
    /// [`ClusterSpec::builder`] in code.
    Builder,
    /// Tandem's own `TANDEM_*` variables.
    Tandem,
    /// Kubeflow TFJob's (and TensorFlow's) `TF_CONFIG`.
    TfConfig,
    /// torchrun / PyTorchJob (`RANK`, `WORLD_SIZE`, ... and the `PET_*` forms).
    Torchrun,
    /// Slurm (`SLURM_PROCID`, ...).
    Slurm,
    /// Open MPI (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// MPICH and Intel MPI (`PMI_RANK`, `PMI_SIZE`).
    Pmi,
    /// Nothing was set: a single process.
    SingleProcess,
}

impl Convention {
    /// The name users write in `TANDEM_LAUNCHER`.
    pub fn name(self) -> &'static str {
        match self {
            Convention::Builder => "builder",
            Convention::Tandem => "tandem",
            Convention::TfConfig => "tf_config",
            Convention::Torchrun => "torchrun",
            Convention::Slurm => "slurm",
            Convention::OpenMpi => "openmpi",
            Convention::Pmi => "pmi",
            Convention::SingleProcess => "single",
        }
    }
}

impl fmt::Display for Convention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A job's layout and this process's place in it.
///
/// `rank` and `world_size` count every process of the job in the order chief, workers, parameter
/// servers, evaluators; [`ClusterSpec::training_rank`] counts only chief and workers (the group that
/// runs collectives in a parameter-server job).
///
/// ```
/// use tandem_core::cluster::{ClusterSpec, Role};
/// let spec = ClusterSpec::builder()
///     .rank(1)
///     .world_size(4)
///     .rendezvous("127.0.0.1:29500")
///     .build()
///     .unwrap();
/// assert_eq!(spec.role(), Role::Worker);
/// assert_eq!(spec.index(), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterSpec {
    pub(crate) source: Convention,
    pub(crate) role: Role,
    pub(crate) index: usize,
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
    pub(crate) local_rank: usize,
    pub(crate) local_world_size: usize,
    pub(crate) node_rank: Option<usize>,
    pub(crate) replicas: BTreeMap<Role, usize>,
    pub(crate) peers: BTreeMap<Role, BTreeMap<usize, String>>,
    pub(crate) rendezvous: Option<String>,
}

impl ClusterSpec {
    /// Starts an explicit spec; see [`Builder`].
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The convention the spec came from.
    pub fn source(&self) -> Convention {
        self.source
    }
    /// This process's role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// This process's index among the replicas of its role.
    pub fn index(&self) -> usize {
        self.index
    }
    /// This process's rank in the whole job.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of processes in the job.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// Rank among the processes on this machine.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Number of processes on this machine.
    pub fn local_world_size(&self) -> usize {
        self.local_world_size
    }
    /// Index of this machine, when the launcher says it.
    pub fn node_rank(&self) -> Option<usize> {
        self.node_rank
    }
    /// Number of replicas of a role.
    pub fn replicas(&self, role: Role) -> usize {
        self.replicas.get(&role).copied().unwrap_or(0)
    }
    /// Known addresses (`host:port`, or a bare host under Slurm) of the job's processes, by role and index.
    pub fn peers(&self) -> &BTreeMap<Role, BTreeMap<usize, String>> {
        &self.peers
    }
    /// Address of one process, if the launcher published it.
    pub fn peer(&self, role: Role, index: usize) -> Option<&str> {
        self.peers.get(&role)?.get(&index).map(String::as_str)
    }
    /// The same spec with its rendezvous at `addr` (found after the spec was read, e.g. published
    /// by rank 0 of an MPI job).
    pub fn with_rendezvous(mut self, addr: impl Into<String>) -> ClusterSpec {
        self.rendezvous = Some(addr.into());
        self
    }
    /// The rendezvous endpoint (`host:port`), if one is known.
    pub fn rendezvous(&self) -> Option<&str> {
        self.rendezvous.as_deref()
    }
    /// The rendezvous endpoint, or a configuration error that says how to set one.
    pub fn require_rendezvous(&self) -> Result<&str> {
        self.rendezvous.as_deref().ok_or_else(|| {
            Error::config(
                "TANDEM_RENDEZVOUS_ADDR",
                format!(
                    "the {} convention does not say where the rendezvous is; set TANDEM_RENDEZVOUS_ADDR=host:port (or MASTER_ADDR and MASTER_PORT)",
                    self.source
                ),
            )
        })
    }
    /// Whether this process hosts the rendezvous (rank 0).
    pub fn hosts_rendezvous(&self) -> bool {
        self.rank == 0
    }
    /// Number of training processes (chief and workers), the group that runs collectives.
    pub fn training_world_size(&self) -> usize {
        self.replicas(Role::Chief) + self.replicas(Role::Worker)
    }
    /// Rank among the training processes, or `None` for parameter servers and evaluators.
    pub fn training_rank(&self) -> Option<usize> {
        match self.role {
            Role::Chief => Some(self.index),
            Role::Worker => Some(self.replicas(Role::Chief) + self.index),
            Role::Ps | Role::Evaluator => None,
        }
    }

    /// Checks the invariants every spec must keep, naming `variable` in errors.
    pub(crate) fn validate(self, variable: &str) -> Result<Self> {
        if self.world_size == 0 {
            return Err(Error::config(variable, "world size is 0"));
        }
        if self.rank >= self.world_size {
            return Err(Error::config(
                variable,
                format!(
                    "rank {} is not below the world size {}",
                    self.rank, self.world_size
                ),
            ));
        }
        if self.local_world_size == 0 || self.local_rank >= self.local_world_size {
            return Err(Error::config(
                variable,
                format!(
                    "local rank {} is not below the local world size {}",
                    self.local_rank, self.local_world_size
                ),
            ));
        }
        if self.local_world_size > self.world_size {
            return Err(Error::config(
                variable,
                format!(
                    "local world size {} exceeds the world size {}",
                    self.local_world_size, self.world_size
                ),
            ));
        }
        if let Some(addr) = &self.rendezvous {
            check_address(variable, addr)?;
        }
        Ok(self)
    }
}

impl fmt::Display for ClusterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source:           {}", self.source)?;
        writeln!(f, "role:             {} {}", self.role, self.index)?;
        writeln!(f, "rank:             {} of {}", self.rank, self.world_size)?;
        writeln!(
            f,
            "local rank:       {} of {}",
            self.local_rank, self.local_world_size
        )?;
        if let Some(n) = self.node_rank {
            writeln!(f, "node rank:        {n}")?;
        }
        let replicas: Vec<String> = self
            .replicas
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        writeln!(f, "replicas:         {}", replicas.join(" "))?;
        writeln!(
            f,
            "rendezvous:       {}",
            self.rendezvous.as_deref().unwrap_or("(none)")
        )?;
        for (role, peers) in &self.peers {
            for (i, addr) in peers {
                writeln!(
                    f,
                    "peer {role} {i}:{:>w$}{addr}",
                    "",
                    w = 10usize.saturating_sub(role.name().len() + i.to_string().len())
                )?;
            }
        }
        Ok(())
    }
}

/// Builds a [`ClusterSpec`] explicitly, for code that knows its layout (tests, custom launchers).
///
/// Without a role, rank 0 is the chief and rank r > 0 is worker r − 1 (an allreduce job).
#[derive(Debug, Clone, Default)]
pub struct Builder {
    role: Option<(Role, usize)>,
    rank: usize,
    world_size: Option<usize>,
    local: Option<(usize, usize)>,
    rendezvous: Option<String>,
    peers: BTreeMap<Role, BTreeMap<usize, String>>,
    replicas: BTreeMap<Role, usize>,
}

impl Builder {
    /// This process's rank (default 0).
    pub fn rank(mut self, rank: usize) -> Self {
        self.rank = rank;
        self
    }
    /// Number of processes (default 1).
    pub fn world_size(mut self, n: usize) -> Self {
        self.world_size = Some(n);
        self
    }
    /// Local rank and local world size (default 0 of 1).
    pub fn local(mut self, rank: usize, size: usize) -> Self {
        self.local = Some((rank, size));
        self
    }
    /// This process's role and index (default: derived from the rank).
    pub fn role(mut self, role: Role, index: usize) -> Self {
        self.role = Some((role, index));
        self
    }
    /// Number of replicas of a role (default: an allreduce job of one chief and world − 1 workers).
    pub fn replicas(mut self, role: Role, n: usize) -> Self {
        self.replicas.insert(role, n);
        self
    }
    /// The rendezvous endpoint.
    pub fn rendezvous(mut self, addr: impl Into<String>) -> Self {
        self.rendezvous = Some(addr.into());
        self
    }
    /// The address of one peer.
    pub fn peer(mut self, role: Role, index: usize, addr: impl Into<String>) -> Self {
        self.peers
            .entry(role)
            .or_default()
            .insert(index, addr.into());
        self
    }
    /// Checks and returns the spec.
    pub fn build(self) -> Result<ClusterSpec> {
        let world_size = self.world_size.unwrap_or(1);
        let (role, index) = self.role.unwrap_or_else(|| allreduce_role(self.rank));
        let replicas = if self.replicas.is_empty() {
            allreduce_replicas(world_size)
        } else {
            self.replicas
        };
        let (local_rank, local_world_size) = self.local.unwrap_or((0, 1));
        ClusterSpec {
            source: Convention::Builder,
            role,
            index,
            rank: self.rank,
            world_size,
            local_rank,
            local_world_size,
            node_rank: None,
            replicas,
            peers: self.peers,
            rendezvous: self.rendezvous,
        }
        .validate("builder")
    }
}

/// The role of a rank in an allreduce job: rank 0 is the chief, rank r > 0 is worker r − 1.
pub(crate) fn allreduce_role(rank: usize) -> (Role, usize) {
    if rank == 0 {
        (Role::Chief, 0)
    } else {
        (Role::Worker, rank - 1)
    }
}

/// Replica counts of an allreduce job of `world_size` ranks.
pub(crate) fn allreduce_replicas(world_size: usize) -> BTreeMap<Role, usize> {
    let mut m = BTreeMap::new();
    m.insert(Role::Chief, 1.min(world_size));
    if world_size > 1 {
        m.insert(Role::Worker, world_size - 1);
    }
    m
}
