//! Leases on the workers. Every call that carries a worker id counts as hearing from it, and a
//! call in progress (a pull waiting for its step, a push being received) keeps its worker alive.
//! Two uses:
//!
//! - `--worker-timeout` ([`Service::silent_workers`]): when every worker the server still waits
//!   for has gone silent (cut off, or gone), stop with a final checkpoint instead of serving
//!   nobody forever.
//! - `--worker-lease` ([`Service::expire_leases`]): a worker silent past its lease, with no call in
//!   progress, is gone: sync steps need the live workers only and the bounded-staleness wait stops
//!   waiting for it. Its late push (for a step applied without it) is refused with
//!   `LEASE_EXPIRED`; when it pushes for the server's current step it is back. A lease must be
//!   longer than a worker's compute between a pull and its push.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tonic::{Code, Status};

use super::model::Model;
use super::same_host::blocking;
use super::service::Service;
use crate::failure::status;
use crate::pb::Reason;

/// Workers tracked at most (ids come from peers; a real job has far fewer).
const TRACKED: usize = 1 << 16;

/// When each worker was last heard from and how many of its calls are in progress.
#[derive(Debug)]
pub(crate) struct Heard {
    /// When the service started (the time of workers never heard from).
    started: Instant,
    last: HashMap<u32, Instant>,
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
    heard: Arc<Mutex<Heard>>,
    done: Arc<Mutex<BTreeSet<u32>>>,
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

    /// The workers that said done.
    fn done(&self) -> BTreeSet<u32> {
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
    heard: Arc<Mutex<Heard>>,
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

impl Service {
    /// A call of worker `worker` starts: it is heard from now, and its lease holds until the
    /// returned guard is dropped.
    pub(crate) fn calling(&self, worker: u32) -> Call {
        self.roster.calling(worker)
    }

    /// Marks as gone every worker (not done, not gone already) with no call in progress that has
    /// been silent for at least `lease`; returns them. Sync steps then need the live workers only.
    pub fn expire_leases(&self, lease: Duration) -> Vec<u32> {
        let Some(model) = self.model() else {
            return Vec::new();
        };
        let done = self.roster.done();
        let h = self.roster.heard();
        let mut gone = model.gone.lock().unwrap_or_else(|p| p.into_inner());
        let at = *model.version.borrow();
        let mut expired = Vec::new();
        for w in 0..model.mode.workers {
            if done.contains(&w) || gone.contains_key(&w) {
                continue;
            }
            if h.calls.get(&w).copied().unwrap_or(0) > 0 {
                continue;
            }
            let silent = h.last.get(&w).unwrap_or(&h.started).elapsed();
            if silent >= lease {
                gone.insert(w, Gone { at, silent, lease });
                expired.push(w);
            }
        }
        if !expired.is_empty() {
            tracing::warn!(
                workers = ?expired,
                lease_s = lease.as_secs_f64(),
                version = at,
                "workers silent past their lease: going on without them until they push again"
            );
        }
        expired
    }

    /// When every worker that has not said done has been silent for at least `timeout`: which
    /// ones, and for how long (`None` while any of them was heard from more recently, or when
    /// there is nobody left to wait for).
    pub fn silent_workers(&self, timeout: Duration) -> Option<String> {
        let workers = self.model().map_or(0, |m| m.mode.workers);
        let done = self.roster.done();
        let h = self.roster.heard();
        let (started, heard) = (&h.started, &h.last);
        // Before any declaration the workers are not known: those heard from, or worker 0.
        let expected: Vec<u32> = if workers > 0 {
            (0..workers).filter(|w| !done.contains(w)).collect()
        } else {
            let mut known: Vec<u32> = heard.keys().copied().collect();
            if known.is_empty() {
                known.push(0);
            }
            known
        };
        if expected.is_empty() {
            return None;
        }
        let silent: Vec<(u32, Duration)> = expected
            .iter()
            .map(|w| (*w, heard.get(w).unwrap_or(started).elapsed()))
            .collect();
        if silent.iter().any(|(_, d)| *d < timeout) {
            return None;
        }
        let names: Vec<String> = silent
            .iter()
            .map(|(w, d)| format!("worker {w} ({:.0} s)", d.as_secs_f64()))
            .collect();
        Some(format!("silent workers: {}", names.join(", ")))
    }

    /// Expires the leases of workers silent for `lease` every `lease / 4` (at most every second),
    /// forever: sync steps that now have every live worker's gradient are applied, and async
    /// workers waiting on the staleness bound for a gone worker go on.
    pub async fn enforce_leases(&self, lease: Duration) {
        let every = (lease / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            if self.expire_leases(lease).is_empty() {
                continue;
            }
            let Some(d) = self.declared.get() else {
                continue;
            };
            match &d.stepper {
                Some(stepper) => match stepper.workers_gone().await {
                    Ok(Some(snap)) => self.write_in_background(snap),
                    Ok(None) => {}
                    Err(_) => return,
                },
                // Wakes the pushes waiting on the staleness bound.
                None => d.model.worker_steps.send_modify(|_| {}),
            }
        }
    }

    /// Writes a checkpoint now, if the server has a checkpoint directory and parameters.
    pub async fn final_checkpoint(&self) -> tandem_core::Result<Option<PathBuf>> {
        let (true, Some(d)) = (self.checkpoints.enabled(), self.declared.get().cloned()) else {
            return Ok(None);
        };
        let snap = match &d.stepper {
            Some(stepper) => stepper.snapshot().await.map_err(|st| {
                tandem_core::Error::transport("the final checkpoint", st.message().to_string())
            })?,
            None => {
                let model = d.model.clone();
                blocking(move || model.snapshot()).await.map_err(|st| {
                    tandem_core::Error::transport("the final checkpoint", st.message().to_string())
                })?
            }
        };
        let checkpoints = self.checkpoints.clone();
        blocking(move || checkpoints.write(&snap))
            .await
            .map_err(|st| {
                tandem_core::Error::transport("the final checkpoint", st.message().to_string())
            })?
            .transpose()
    }
}
