//! `tandem launch`: start a whole job on this machine.
//!
//! A launcher hosts the job's rendezvous, gives every process exactly the environment it would get
//! from Kubeflow (`TF_CONFIG` for parameter-server jobs; `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT` for allreduce jobs) plus a fresh job token, prefixes and files every
//! process's output, restarts failed processes when asked, and stops the whole job when one fails for
//! good or when it is interrupted.
//!
//! The planning ([`plan`]) is a pure function; [`run`] starts and supervises the processes.
//!
//! ```
//! use tandem_launch::{JobSpec, Layout, plan};
//! let spec = JobSpec::new(Layout::Allreduce { nproc: 2 }, vec!["python".into(), "train.py".into()]);
//! let procs = plan(&spec, "127.0.0.1:29500", &[]).unwrap();
//! assert_eq!(procs[1].env_var("RANK"), Some("1"));
//! assert_eq!(procs[1].env_var("MASTER_PORT"), Some("29500"));
//! ```

mod args;
mod exe;
mod gpus;
mod plan;
mod supervise;
mod tls;

pub use args::{LaunchArgs, RestartArg};
pub use exe::{cli_command, python, resolve_command};
pub use gpus::assign as assign_gpus;
pub use plan::{JobSpec, Layout, LineSink, Planned, Restart, plan};
pub use supervise::{Outcome, run};
