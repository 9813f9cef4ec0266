//! The cluster spec: who this process is in its job, read from the launcher's environment.
//!
//! # Conventions, in the order they are tried
//! 1. [`ClusterSpec::builder`] in code (nothing is read).
//! 2. Tandem's own variables: `TANDEM_RANK`, `TANDEM_WORLD_SIZE`, `TANDEM_LOCAL_RANK`,
//!    `TANDEM_LOCAL_WORLD_SIZE`, `TANDEM_ROLE`, `TANDEM_ROLE_INDEX`.
//! 3. `TF_CONFIG` (Kubeflow TFJob, TensorFlow).
//! 4. torchrun / Kubeflow PyTorchJob: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!    `MASTER_ADDR`, `MASTER_PORT`, and the `PET_*` forms.
//! 5. Slurm: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_JOB_NODELIST`,
//!    `SLURM_TASKS_PER_NODE`.
//! 6. Open MPI: `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`, `_LOCAL_SIZE`.
//! 7. MPICH / Intel MPI: `PMI_RANK`, `PMI_SIZE`.
//!
//! When two conventions are present and disagree on the rank or the world size, resolution fails and
//! names both; `TANDEM_LAUNCHER=<name>` picks one explicitly. One exception is nesting inside a Slurm
//! allocation: when another launcher reports more processes than Slurm has tasks, it started them
//! inside a Slurm task and wins. `TANDEM_RENDEZVOUS_ADDR=host:port` overrides the rendezvous
//! endpoint of any convention.
//!
//! ```
//! use tandem_core::cluster::{ClusterSpec, Convention, Role};
//! let env = [("RANK", "2"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "job-master-0"), ("MASTER_PORT", "23456")];
//! let spec = ClusterSpec::from_vars(&env).unwrap();
//! assert_eq!(spec.source(), Convention::Torchrun);
//! assert_eq!((spec.role(), spec.index()), (Role::Worker, 1));
//! assert_eq!(spec.rendezvous(), Some("job-master-0:23456"));
//! ```

mod conventions;
mod hostlist;
mod listen;
mod spec;
mod tf_config;

pub use crate::vars::{ProcessEnv, Vars, check_address};
pub use conventions::slurm_default_port;
pub use hostlist::{MAX_EXPANDED, expand_hostlist, expand_tasks_per_node};
pub use listen::{listen_address, local_address_towards};
pub use spec::{Builder, ClusterSpec, Convention, Role};

use crate::error::{Error, Result};

type Reader = fn(&dyn Vars) -> Result<Option<ClusterSpec>>;

fn readers() -> [(Convention, Reader); 6] {
    [
        (Convention::Tandem, |v| conventions::tandem(v)),
        (Convention::TfConfig, |v| tf_config::tf_config(v)),
        (Convention::Torchrun, |v| conventions::torchrun(v)),
        (Convention::Slurm, |v| conventions::slurm(v)),
        (Convention::OpenMpi, |v| conventions::open_mpi(v)),
        (Convention::Pmi, |v| conventions::pmi(v)),
    ]
}

impl ClusterSpec {
    /// Resolves the spec from the current process's environment, after checking every
    /// `TANDEM_*` variable set in it ([`crate::settings::check_env`]): a bad value of any of them
    /// stops the start here with its name, and a name Tandem does not know is logged as a likely
    /// typo.
    pub fn from_env() -> Result<ClusterSpec> {
        crate::settings::check_env()?;
        Self::from_vars(&ProcessEnv)
    }

    /// Resolves the spec from any source of variables (tests pass fixtures here).
    pub fn from_vars(vars: &(impl Vars + ?Sized)) -> Result<ClusterSpec> {
        let vars = DynVars(vars);
        let mut spec = match crate::settings::LAUNCHER.choice(&vars)? {
            Some(name) => Self::forced(&vars, name)?,
            None => Self::detected(&vars)?,
        };
        if let Some(addr) = crate::settings::RENDEZVOUS_ADDR.text(&vars)? {
            spec.rendezvous = Some(addr);
        }
        Ok(spec)
    }

    fn forced(vars: &DynVars<'_, impl Vars + ?Sized>, name: &str) -> Result<ClusterSpec> {
        let names: Vec<&str> = readers().iter().map(|(c, _)| c.name()).collect();
        let (conv, read) = readers()
            .into_iter()
            .find(|(c, _)| c.name() == name.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::config(
                    "TANDEM_LAUNCHER",
                    format!(
                        "unknown launcher {name:?}; expected one of {}",
                        names.join(", ")
                    ),
                )
            })?;
        read(vars)?.ok_or_else(|| {
            Error::config(
                "TANDEM_LAUNCHER",
                format!("names {conv}, but none of its variables are set"),
            )
        })
    }

    fn detected(vars: &DynVars<'_, impl Vars + ?Sized>) -> Result<ClusterSpec> {
        let mut found: Vec<ClusterSpec> = Vec::new();
        for (_, read) in readers() {
            if let Some(spec) = read(vars)? {
                found.push(spec);
            }
        }
        let Some(first) = found.first().cloned() else {
            return Ok(single_process());
        };
        for other in &found[1..] {
            if other.rank == first.rank && other.world_size == first.world_size {
                continue;
            }
            let nested_in_slurm =
                other.source == Convention::Slurm && first.world_size > other.world_size;
            if nested_in_slurm {
                continue;
            }
            return Err(Error::config(
                "TANDEM_LAUNCHER",
                format!(
                    "launchers disagree: {} says rank {} of {}, but {} says rank {} of {}; set TANDEM_LAUNCHER={} (or {}) to choose",
                    first.source,
                    first.rank,
                    first.world_size,
                    other.source,
                    other.rank,
                    other.world_size,
                    first.source,
                    other.source
                ),
            ));
        }
        Ok(first)
    }
}

fn single_process() -> ClusterSpec {
    ClusterSpec {
        source: Convention::SingleProcess,
        role: Role::Chief,
        index: 0,
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        node_rank: None,
        replicas: spec::allreduce_replicas(1),
        peers: Default::default(),
        rendezvous: None,
    }
}

/// Lets the readers take `&dyn Vars` whatever the caller's concrete type.
struct DynVars<'a, V: Vars + ?Sized>(&'a V);

impl<V: Vars + ?Sized> Vars for DynVars<'_, V> {
    fn raw(&self, name: &str) -> Option<String> {
        self.0.raw(name)
    }
}

#[cfg(test)]
mod tests;
