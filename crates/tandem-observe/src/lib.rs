//! Seeing inside a running Tandem job: what each rank is doing, what it did last, and how long
//! everything takes.
//!
//! - [`recorder`]: the flight recorder, always on: the last operations of this process (collectives
//!   and parameter-server calls) in bounded rings ([`oplog`] for a group's collectives, written
//!   without a lock), [`dump`]ed to a file on a timeout, an abort, an error, or `SIGUSR1`.
//! - [`timeline`]: on demand (`TANDEM_TIMELINE=DIR`), every operation and every span the user marks,
//!   in Chrome's trace event format (Perfetto, `chrome://tracing`).
//! - [`metrics`]: Prometheus metrics of this process, served at `TANDEM_METRICS_ADDR`.
//! - [`analyze`]: merges the dumps or timelines of every rank into one trace and says who waited
//!   for whom (`tandem trace DIR`).
//!
//! A process has one [`Identity`] (its role and index in the job), set by the first process group
//! or parameter-server client or server it forms ([`identify`]); until then nothing is recorded.
//! `TANDEM_OBSERVE=off` turns the recorder and the metrics off (to measure what they cost).
//!
//! ```
//! use tandem_observe::{Identity, identify, recorder};
//! identify(Identity::new("rank", 0, 2));
//! let t = recorder::begin(recorder::Record::new(0, "allreduce", "f32", 1024, tandem_observe::now_us()));
//! recorder::end(t, recorder::Ending::default());
//! let last = recorder::snapshot().pop().unwrap();
//! assert_eq!((last.seq, last.outcome), (0, recorder::Outcome::Ok));
//! ```

pub mod analyze;
pub mod dump;
pub mod metrics;
pub mod oplog;
pub mod recorder;
mod serve;
mod sockets;
pub mod timeline;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use serve::{serve, serve_from_env};

/// A file of observations (a flight-recorder dump, a timeline, a folder of them) that could not
/// be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file system said no.
    #[error("reading {}: {source}", .path.display())]
    Io {
        /// What was read.
        path: std::path::PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// It is not what it should be.
    #[error("{} is not a {what}: {detail}", .path.display())]
    NotA {
        /// What was read.
        path: std::path::PathBuf,
        /// What it should have been.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

pub use sockets::{SocketWatch, tcp_bytes, tcp_congestion, watch_counted, watch_socket};

/// `TANDEM_OBSERVE=off` turns the flight recorder and the metrics off.
pub const OBSERVE_VAR: &str = tandem_core::settings::OBSERVE.name;
/// The folder flight-recorder dumps go to.
pub const TRACE_DIR_VAR: &str = tandem_core::settings::TRACE_DIR.name;
/// The folder of the per-launch logs, set by `tandem launch`: dumps go under it by default.
pub const LOG_DIR_VAR: &str = tandem_core::settings::LOG_DIR.name;
/// How many operations the flight recorder keeps (default [`recorder::DEFAULT_ENTRIES`]).
pub const ENTRIES_VAR: &str = tandem_core::settings::TRACE_ENTRIES.name;
/// Write a timeline of every operation to this folder.
pub const TIMELINE_VAR: &str = tandem_core::settings::TIMELINE.name;
/// Serve Prometheus metrics at this `host:port` (rank r of a host at port + its local rank).
pub const METRICS_ADDR_VAR: &str = tandem_core::settings::METRICS_ADDR.name;
/// The job's name in metric labels and dumps (default `tandem`).
pub const JOB_NAME_VAR: &str = tandem_core::settings::JOB_NAME.name;

/// Who this process is in its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `rank` (a collective rank), `ps` (a parameter server) or `worker` (a parameter-server
    /// worker).
    pub role: String,
    /// Rank, or server / worker index.
    pub index: usize,
    /// How many processes share the role.
    pub world: usize,
    /// The job's name ([`JOB_NAME_VAR`]).
    pub job: String,
    /// Index among the processes of the role on this host (offsets the metrics port).
    pub local: usize,
    /// The address peers know this process by, when it has one.
    pub addr: String,
}

impl Identity {
    /// `role` `index` of `world`, in the job named by the environment, first on its host.
    pub fn new(role: &str, index: usize, world: usize) -> Identity {
        Identity {
            role: role.to_string(),
            index,
            world,
            job: tandem_core::settings::JOB_NAME
                .text(&tandem_core::cluster::ProcessEnv)
                .ok()
                .flatten()
                .unwrap_or_else(|| "tandem".into()),
            local: 0,
            addr: String::new(),
        }
    }

    /// The same identity, `local`-th of its role on its host.
    pub fn local(mut self, local: usize) -> Identity {
        self.local = local;
        self
    }

    /// The same identity, known to peers at `addr`.
    pub fn addr(mut self, addr: &str) -> Identity {
        self.addr = addr.to_string();
        self
    }

    /// The stem of this process's files: `rank-3`, `ps-0`, `worker-1`.
    pub fn stem(&self) -> String {
        format!("{}-{}", self.role, self.index)
    }
}

/// Who this process is, once it has said (a group formed, a client connected, a server started).
static IDENTITY: RwLock<Option<Identity>> = RwLock::new(None);
/// Whether anything is recorded: an identity is set and observation is switched on.
static ON: AtomicBool = AtomicBool::new(false);
/// `TANDEM_OBSERVE`, read once.
static SWITCH: OnceLock<bool> = OnceLock::new();

/// Whether the recorder and metrics are on for this process (`TANDEM_OBSERVE` is not `off`).
pub fn switched_on() -> bool {
    *SWITCH.get_or_init(|| tandem_core::settings::OBSERVE.switch_or(true))
}

/// Whether anything is being recorded: an identity is set and [`switched_on`].
#[inline]
pub fn active() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Pauses (`false`) or resumes (`true`) the recorder and the metrics of a process that has an
/// identity, to measure what they cost side by side (`tandem bench allreduce --observe-cost`).
/// Does nothing with `TANDEM_OBSERVE=off` or before [`identify`].
pub fn set_active(on: bool) {
    let identified = IDENTITY.read().is_ok_and(|i| i.is_some());
    ON.store(on && identified && switched_on(), Ordering::Relaxed);
}

/// Sets this process's identity; the first call wins (a process has one place in its job), later
/// ones return `false` and change nothing. The first call also starts what the environment asks
/// for: the timeline ([`TIMELINE_VAR`]), the metrics endpoint ([`METRICS_ADDR_VAR`]), and the
/// `SIGUSR1` handler that dumps the flight recorder.
pub fn identify(id: Identity) -> bool {
    {
        let Ok(mut slot) = IDENTITY.write() else {
            return false;
        };
        if slot.is_some() {
            return false;
        }
        *slot = Some(id.clone());
    }
    if switched_on() {
        metrics::init(&id);
        recorder::init();
        ON.store(true, Ordering::Relaxed);
        dump::install_signal();
        if let Err(e) = serve_from_env(id.local) {
            tracing::warn!("metrics endpoint not started: {e}");
        }
    }
    if let Some(dir) = std::env::var_os(TIMELINE_VAR).filter(|d| !d.is_empty())
        && let Err(e) = timeline::start(std::path::Path::new(&dir), &id)
    {
        tracing::warn!("no timeline: {e}");
    }
    true
}

/// Records the address peers know this process by, once it has one (after its identity was set).
pub fn set_addr(addr: &str) {
    let updated = match IDENTITY.write() {
        Ok(mut slot) => match slot.as_mut() {
            Some(id) if id.addr != addr => {
                id.addr = addr.to_string();
                Some(id.clone())
            }
            _ => None,
        },
        Err(_) => None,
    };
    if let Some(id) = updated {
        timeline::name_process(&id);
    }
}

/// This process's identity, once set.
pub fn identity() -> Option<Identity> {
    IDENTITY.read().ok().and_then(|i| i.clone())
}

/// The wall clock at one instant of the monotonic clock: later wall times are derived from the
/// monotonic clock (cheaper to read, and never goes back).
static BASE: OnceLock<(Instant, u64)> = OnceLock::new();

/// The monotonic instant and the wall clock (µs since the Unix epoch) read together once.
fn base() -> (Instant, u64) {
    *BASE.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(micros)
            .unwrap_or(0);
        (Instant::now(), wall)
    })
}

/// A duration in whole microseconds.
#[inline]
fn micros(d: Duration) -> u64 {
    d.as_secs() * 1_000_000 + u64::from(d.subsec_micros())
}

/// Microseconds since the Unix epoch (the clock every record and timeline uses, so that the files
/// of different hosts line up as well as their clocks do).
#[inline]
pub fn now_us() -> u64 {
    us_at(Instant::now())
}

/// [`now_us`] at `t`, an instant already read.
#[inline]
pub fn us_at(t: Instant) -> u64 {
    let (i, wall) = base();
    wall + micros(t.saturating_duration_since(i))
}
