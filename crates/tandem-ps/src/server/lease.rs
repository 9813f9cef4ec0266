//! Leases on the workers. Every call that carries a worker id counts as hearing from it, and a
//! call in progress (a pull waiting for its step, a push being received) keeps its worker alive.
//! Two uses:
//!
//! - `--worker-timeout` (`Service::silent_workers`): when every worker the server still waits
//!   for has gone silent (cut off, or gone), stop with a final checkpoint instead of serving
//!   nobody forever.
//! - `--worker-lease` (`Service::expire_leases`): a worker silent past its lease, with no call in
//!   progress, is gone: sync steps need the live workers only and the bounded-staleness wait stops
//!   waiting for it. Its late push (for a step applied without it) is refused with
//!   `LEASE_EXPIRED`; when it pushes for the server's current step it is back. A lease must be
//!   longer than a worker's compute between a pull and its push.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tonic::{Code, Status};

use super::model::Model;
use crate::failure::status;
use crate::pb::Reason;

/// Workers tracked at most (ids come from peers; a real job has far fewer).
const TRACKED: usize = 1 << 16;

/// When each worker was last heard from and how many of its calls are in progress.
#[derive(Debug)]
pub(crate) struct Heard {
    /// When the service started (the time of workers never heard from).
    started: Instant,
    /// When each worker was last heard from.
    last: HashMap<u32, Instant>,
    /// Each worker's calls in progress.
    calls: HashMap<u32, u32>,
}

impl Default for Heard {
    fn default() -> Self {
        Heard {
            started: Instant::now(),
            last: HashMap::new(),
            calls: HashMap::new(),
        }
    }
}

/// The workers as the server sees them, one part of the service with its own state: when each
/// was last heard from, its calls in progress (the leases), and which said done (the last of them
/// notifies `all_done`).
#[derive(Clone)]
pub(crate) struct Roster {
    /// When each worker was heard from, and its calls.
    heard: Arc<Mutex<Heard>>,
    /// The workers that said done.
    done: Arc<Mutex<BTreeSet<u32>>>,
    /// Notified when the last worker said done.
    all_done: Arc<Notify>,
}

impl Roster {
    /// Nobody heard from yet; `all_done` is notified when every worker has said done.
    pub(crate) fn new(all_done: Arc<Notify>) -> Roster {
        Roster {
            heard: Arc::default(),
            done: Arc::default(),
            all_done,
        }
    }

    /// A call of worker `worker` starts: it is heard from now, and its lease holds until the
    /// returned guard is dropped.
    pub(crate) fn calling(&self, worker: u32) -> Call {
        let mut h = self.heard();
        if h.last.len() < TRACKED || h.last.contains_key(&worker) {
            h.last.insert(worker, Instant::now());
            *h.calls.entry(worker).or_default() += 1;
        }
        Call {
            heard: self.heard.clone(),
            worker,
        }
    }

    /// Worker `worker` of `workers` said done; returns how many have not (at 0, `all_done` is
    /// notified).
    pub(crate) fn said_done(&self, worker: u32, workers: u32) -> u32 {
        let remaining = {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.insert(worker);
            workers.saturating_sub(d.len() as u32)
        };
        if remaining == 0 && workers > 0 {
            tracing::info!("every worker is done");
            self.all_done.notify_one();
        }
        remaining
    }

    /// How long worker `w` has been silent (since the service started when never heard from),
    /// or `None` while a call of it is in progress.
    pub(crate) fn silent(&self, w: u32) -> Option<Duration> {
        let h = self.heard();
        if h.calls.get(&w).copied().unwrap_or(0) > 0 {
            return None;
        }
        Some(h.last.get(&w).unwrap_or(&h.started).elapsed())
    }

    /// How long each of `workers` has been silent, calls in progress or not (when `workers` is
    /// empty: those heard from, or worker 0 when nobody was).
    pub(crate) fn silences(&self, workers: &[u32]) -> Vec<(u32, Duration)> {
        let h = self.heard();
        let mut expected = workers.to_vec();
        if expected.is_empty() {
            expected = h.last.keys().copied().collect();
            if expected.is_empty() {
                expected.push(0);
            }
        }
        expected
            .into_iter()
            .map(|w| (w, h.last.get(&w).unwrap_or(&h.started).elapsed()))
            .collect()
    }

    /// The workers that said done.
    pub(crate) fn done(&self) -> BTreeSet<u32> {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When each worker was heard from, locked.
    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call of one worker in progress: keeps its lease while it lasts, and counts as hearing from
/// the worker when it starts and when it ends.
pub(crate) struct Call {
    /// The roster's record of calls.
    heard: Arc<Mutex<Heard>>,
    /// The worker calling.
    worker: u32,
}

impl Drop for Call {
    fn drop(&mut self) {
        let mut h = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        h.last.insert(self.worker, Instant::now());
        if let Some(n) = h.calls.get_mut(&self.worker) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A worker the server goes on without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone {
    /// The server's version when the lease expired.
    pub at: u64,
    /// How long it had been silent then.
    pub silent: Duration,
    /// The lease.
    pub lease: Duration,
}

impl Gone {
    /// The refusal of a gradient for `step` from a worker gone since `self.at`, the server being
    /// at `now`.
    pub(crate) fn refusal(&self, worker: u32, step: u64, now: u64) -> Status {
        status(
            Code::FailedPrecondition,
            Reason::LeaseExpired,
            format!(
                "worker {worker}'s gradient for step {step} refused: the worker was silent for {:.1} s, past its {:.1} s lease, and steps {}..{now} were applied without it; nothing of this gradient was applied. Pull the current parameters and push for step {now} to rejoin",
                self.silent.as_secs_f64(),
                self.lease.as_secs_f64(),
                self.at.min(now),
            ),
        )
    }
}

impl Model {
    /// How many gradients the current sync step needs: K, or every live worker when fewer live.
    pub fn needed(&self) -> u32 {
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner()).len() as u32;
        let live = self.mode.workers.saturating_sub(gone);
        self.mode.replicas_to_aggregate.min(live).max(1)
    }

    /// Whether worker `worker` is gone; takes it back (it pushed for the current step, or pushes
    /// again in async mode) when `rejoin`. Returns what was recorded of it.
    pub fn gone_worker(&self, worker: u32, rejoin: bool) -> Option<Gone> {
        let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        let g = gone.get(&worker).copied()?;
        if rejoin {
            gone.remove(&worker);
            tracing::info!(
                worker,
                version = *self.version.borrow(),
                "worker back after its lease expired: it takes part again"
            );
        }
        Some(g)
    }
}
