//! One reader per launcher convention. Each returns `Ok(None)` when its variables are absent.
//!
//! Why one reader per convention: each scheduler describes a job its own way (torchrun and a
//! PyTorchJob give `RANK`/`WORLD_SIZE`/`MASTER_ADDR`; Slurm gives `SLURM_PROCID`, a compressed node
//! list and tasks per node; Open MPI and PMI their own ranks), and a process must find its place
//! from whatever it was given without being told which. Each reader turns one convention into the
//! same [`ClusterSpec`] and refuses values that contradict themselves (a rank beyond the world, a
//! node list that does not match the task counts), naming the variable; the caller (`mod.rs`)
//! decides which convention applies and refuses disagreeing ones.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

use super::hostlist::{expand_hostlist, expand_tasks_per_node};
use super::spec::{ClusterSpec, Convention, Role, allreduce_replicas, allreduce_role};
use crate::vars::{Vars, check_address, count_var, first_count, first_var, parse_count};

/// Port of the rendezvous under Slurm when none is configured: 15000 + job id mod 5000, so two jobs
/// sharing a node rarely collide.
pub fn slurm_default_port(job_id: Option<usize>) -> u16 {
    15000 + (job_id.unwrap_or(0) % 5000) as u16
}

/// The fields an allreduce-style launcher gives.
struct Flat {
    source: Convention,
    variable: &'static str,
    rank: usize,
    world_size: usize,
    local: Option<(usize, usize)>,
    node_rank: Option<usize>,
    rendezvous: Option<String>,
    peers: BTreeMap<Role, BTreeMap<usize, String>>,
}

impl Flat {
    fn build(self) -> Result<ClusterSpec> {
        let (role, index) = allreduce_role(self.rank);
        let (local_rank, local_world_size) = self.local.unwrap_or((0, 1));
        ClusterSpec {
            source: self.source,
            role,
            index,
            rank: self.rank,
            world_size: self.world_size,
            local_rank,
            local_world_size,
            node_rank: self.node_rank,
            replicas: allreduce_replicas(self.world_size),
            peers: self.peers,
            rendezvous: self.rendezvous,
        }
        .validate(self.variable)
    }
}

fn require(vars: &(impl Vars + ?Sized), name: &str, because: &str) -> Result<usize> {
    count_var(vars, name)?
        .ok_or_else(|| Error::config(name, format!("is not set, but {because} is")))
}

fn local_pair(
    vars: &(impl Vars + ?Sized),
    rank_names: &[&str],
    size_names: &[&str],
) -> Result<Option<(usize, usize)>> {
    let rank = first_count(vars, rank_names)?;
    let size = first_count(vars, size_names)?;
    Ok(match (rank, size) {
        (None, None) => None,
        (Some(r), None) => Some((r, r + 1)),
        (None, Some(s)) => Some((0, s)),
        (Some(r), Some(s)) => Some((r, s)),
    })
}

/// `MASTER_ADDR` + `MASTER_PORT` (or their `PET_` forms) as an endpoint.
fn master_endpoint(vars: &(impl Vars + ?Sized)) -> Result<Option<String>> {
    let addr = first_var(vars, &["MASTER_ADDR", "PET_MASTER_ADDR"]);
    let port = first_var(vars, &["MASTER_PORT", "PET_MASTER_PORT"]);
    match (addr, port) {
        (None, None) => Ok(None),
        (Some((n, _)), None) => Err(Error::config(
            "MASTER_PORT",
            format!("is not set, but {n} is"),
        )),
        (None, Some((n, _))) => Err(Error::config(
            "MASTER_ADDR",
            format!("is not set, but {n} is"),
        )),
        (Some((_, host)), Some((pname, port))) => {
            let endpoint = format!("{host}:{port}");
            check_address(&pname, &endpoint)?;
            Ok(Some(endpoint))
        }
    }
}

/// Tandem's own variables: `TANDEM_RANK`, `TANDEM_WORLD_SIZE`, `TANDEM_LOCAL_RANK`,
/// `TANDEM_LOCAL_WORLD_SIZE`, and optionally `TANDEM_ROLE` with `TANDEM_ROLE_INDEX`.
pub(crate) fn tandem(vars: &(impl Vars + ?Sized)) -> Result<Option<ClusterSpec>> {
    use crate::settings::{self as s, Setting};
    let require = |it: &Setting, because: &Setting| -> Result<usize> {
        it.count(vars)?
            .ok_or_else(|| Error::config(it.name, format!("is not set, but {} is", because.name)))
    };
    if vars.var(s::RANK.name).is_none() && vars.var(s::WORLD_SIZE.name).is_none() {
        return Ok(None);
    }
    let rank = require(&s::RANK, &s::WORLD_SIZE)?;
    let world_size = require(&s::WORLD_SIZE, &s::RANK)?;
    let local = match (s::LOCAL_RANK.count(vars)?, s::LOCAL_WORLD_SIZE.count(vars)?) {
        (None, None) => None,
        (Some(r), None) => Some((r, r + 1)),
        (None, Some(n)) => Some((0, n)),
        (Some(r), Some(n)) => Some((r, n)),
    };
    let mut spec = Flat {
        source: Convention::Tandem,
        variable: s::RANK.name,
        rank,
        world_size,
        local,
        node_rank: s::NODE_RANK.count(vars)?,
        rendezvous: master_endpoint(vars)?,
        peers: BTreeMap::new(),
    }
    .build()?;
    if let Some(role) = s::ROLE.choice(vars)? {
        spec.role = role.parse()?;
        spec.index = require(&s::ROLE_INDEX, &s::ROLE)?;
    }
    Ok(Some(spec))
}

/// torchrun and Kubeflow PyTorchJob: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
/// `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`; or the `PET_NNODES`, `PET_NPROC_PER_NODE`,
/// `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` forms the training operator injects for torchrun.
pub(crate) fn torchrun(vars: &(impl Vars + ?Sized)) -> Result<Option<ClusterSpec>> {
    let direct = vars.var("RANK").is_some() || vars.var("WORLD_SIZE").is_some();
    let pet = vars.var("PET_NODE_RANK").is_some() || vars.var("PET_NNODES").is_some();
    if !direct && !pet {
        return Ok(None);
    }
    let local = local_pair(
        vars,
        &["LOCAL_RANK"],
        &["LOCAL_WORLD_SIZE", "PET_NPROC_PER_NODE"],
    )?;
    let (rank, world_size, variable) = if direct {
        (
            require(vars, "RANK", "WORLD_SIZE")?,
            require(vars, "WORLD_SIZE", "RANK")?,
            "RANK",
        )
    } else {
        let node = require(vars, "PET_NODE_RANK", "PET_NNODES")?;
        let nnodes = require(vars, "PET_NNODES", "PET_NODE_RANK")?;
        let per_node = first_count(vars, &["PET_NPROC_PER_NODE"])?.unwrap_or(1);
        if node >= nnodes {
            return Err(Error::config(
                "PET_NODE_RANK",
                format!("node rank {node} is not below PET_NNODES={nnodes}"),
            ));
        }
        let local_rank = local.map(|l| l.0).unwrap_or(0);
        (
            node * per_node + local_rank,
            nnodes * per_node,
            "PET_NODE_RANK",
        )
    };
    let node_rank = first_count(vars, &["GROUP_RANK", "PET_NODE_RANK"])?;
    Flat {
        source: Convention::Torchrun,
        variable,
        rank,
        world_size,
        local,
        node_rank,
        rendezvous: master_endpoint(vars)?,
        peers: BTreeMap::new(),
    }
    .build()
    .map(Some)
}

/// Slurm: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_JOB_NODELIST`,
/// `SLURM_TASKS_PER_NODE` (the `SLURM_STEP_*` forms first, as they describe the running step).
///
/// Peer hosts assume Slurm's default block distribution (ranks filled node by node).
/// A named list, with the variable it came from.
type Named<T> = Option<(String, Vec<T>)>;

/// The allocation's nodes (expanded from the host list) and tasks per node, each with the
/// variable it was read from.
fn slurm_nodes_and_tasks(vars: &(impl Vars + ?Sized)) -> Result<(Named<String>, Named<usize>)> {
    let lists = [
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ];
    let nodes = match first_var(vars, &lists) {
        Some((name, list)) => Some((name.clone(), expand_hostlist(&name, &list)?)),
        None => None,
    };
    let tasks = match first_var(vars, &["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]) {
        Some((name, v)) => Some((name.clone(), expand_tasks_per_node(&name, &v)?)),
        None => None,
    };
    Ok((nodes, tasks))
}

pub(crate) fn slurm(vars: &(impl Vars + ?Sized)) -> Result<Option<ClusterSpec>> {
    if vars.var("SLURM_PROCID").is_none() {
        return Ok(None);
    }
    let rank = parse_count(
        "SLURM_PROCID",
        &vars.var("SLURM_PROCID").unwrap_or_default(),
    )?;
    let world_size = first_count(
        vars,
        &["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"],
    )?
    .ok_or_else(|| Error::config("SLURM_NTASKS", "is not set, but SLURM_PROCID is"))?;
    let local_rank = count_var(vars, "SLURM_LOCALID")?.unwrap_or(0);
    let node_id = count_var(vars, "SLURM_NODEID")?;
    let (nodes, tasks) = slurm_nodes_and_tasks(vars)?;
    let local_world_size = match &tasks {
        Some((tname, tasks)) => tasks_on_this_node(tname, tasks, world_size, node_id)?,
        None => None,
    };
    let mut peers = BTreeMap::new();
    let mut rendezvous = master_endpoint(vars)?;
    if let Some((nname, hosts)) = &nodes {
        if let Some((tname, tasks)) = &tasks {
            peers = slurm_peers(nname, hosts, tname, tasks)?;
        }
        if rendezvous.is_none() {
            let port = slurm_rendezvous_port(vars)?;
            rendezvous = hosts.first().map(|h| format!("{h}:{port}"));
        }
    }
    let local_world_size = local_world_size.unwrap_or(local_rank + 1);
    if node_id.is_some() && local_rank >= local_world_size {
        return Err(Error::config(
            "SLURM_LOCALID",
            format!("local id {local_rank} is not below the {local_world_size} tasks of this node"),
        ));
    }
    Flat {
        source: Convention::Slurm,
        variable: "SLURM_PROCID",
        rank,
        world_size,
        local: Some((local_rank, local_world_size)),
        node_rank: node_id,
        rendezvous,
        peers,
    }
    .build()
    .map(Some)
}

/// The tasks of node `node_id` (when known), after checking the per-node counts add up to the
/// world size.
fn tasks_on_this_node(
    tname: &str,
    tasks: &[usize],
    world_size: usize,
    node_id: Option<usize>,
) -> Result<Option<usize>> {
    let total: usize = tasks.iter().sum();
    if total != world_size {
        return Err(Error::config(
            tname,
            format!("gives {total} tasks in all, but SLURM_NTASKS is {world_size}"),
        ));
    }
    let Some(node) = node_id else {
        return Ok(None);
    };
    let n = tasks.get(node).ok_or_else(|| {
        Error::config(
            "SLURM_NODEID",
            format!("node {node} is beyond the {} nodes of {tname}", tasks.len()),
        )
    })?;
    Ok(Some(*n))
}

/// Every rank's host, from the node list and the tasks per node (Slurm's block distribution).
fn slurm_peers(
    nname: &str,
    hosts: &[String],
    tname: &str,
    tasks: &[usize],
) -> Result<BTreeMap<Role, BTreeMap<usize, String>>> {
    if tasks.len() != hosts.len() {
        return Err(Error::config(
            tname,
            format!(
                "lists {} nodes but {nname} lists {}",
                tasks.len(),
                hosts.len()
            ),
        ));
    }
    let (mut chief, mut workers) = (BTreeMap::new(), BTreeMap::new());
    let mut r = 0;
    for (host, n) in hosts.iter().zip(tasks) {
        for _ in 0..*n {
            let (role, index) = allreduce_role(r);
            if role == Role::Chief {
                chief.insert(index, host.clone());
            } else {
                workers.insert(index, host.clone());
            }
            r += 1;
        }
    }
    Ok(BTreeMap::from([
        (Role::Worker, workers),
        (Role::Chief, chief),
    ]))
}

/// `TANDEM_RENDEZVOUS_PORT`, or a port derived from the job id.
fn slurm_rendezvous_port(vars: &(impl Vars + ?Sized)) -> Result<u16> {
    match crate::settings::RENDEZVOUS_PORT.integer(vars)? {
        Some(p) => {
            u16::try_from(p).map_err(|_| crate::settings::RENDEZVOUS_PORT.invalid(&p.to_string()))
        }
        None => Ok(slurm_default_port(count_var(vars, "SLURM_JOB_ID")?)),
    }
}

/// Open MPI: `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`, `_LOCAL_SIZE`, `_NODE_RANK`.
pub(crate) fn open_mpi(vars: &(impl Vars + ?Sized)) -> Result<Option<ClusterSpec>> {
    if vars.var("OMPI_COMM_WORLD_RANK").is_none() && vars.var("OMPI_COMM_WORLD_SIZE").is_none() {
        return Ok(None);
    }
    Flat {
        source: Convention::OpenMpi,
        variable: "OMPI_COMM_WORLD_RANK",
        rank: require(vars, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")?,
        world_size: require(vars, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")?,
        local: local_pair(
            vars,
            &["OMPI_COMM_WORLD_LOCAL_RANK"],
            &["OMPI_COMM_WORLD_LOCAL_SIZE"],
        )?,
        node_rank: count_var(vars, "OMPI_COMM_WORLD_NODE_RANK")?,
        rendezvous: master_endpoint(vars)?,
        peers: BTreeMap::new(),
    }
    .build()
    .map(Some)
}

/// MPICH / Intel MPI (Hydra): `PMI_RANK`, `PMI_SIZE`, and `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`.
pub(crate) fn pmi(vars: &(impl Vars + ?Sized)) -> Result<Option<ClusterSpec>> {
    if vars.var("PMI_RANK").is_none() && vars.var("PMI_SIZE").is_none() {
        return Ok(None);
    }
    Flat {
        source: Convention::Pmi,
        variable: "PMI_RANK",
        rank: require(vars, "PMI_RANK", "PMI_SIZE")?,
        world_size: require(vars, "PMI_SIZE", "PMI_RANK")?,
        local: local_pair(
            vars,
            &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"],
            &["MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"],
        )?,
        node_rank: None,
        rendezvous: master_endpoint(vars)?,
        peers: BTreeMap::new(),
    }
    .build()
    .map(Some)
}
