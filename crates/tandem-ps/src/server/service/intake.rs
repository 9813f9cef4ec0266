//! Pushes in flight, one part of the service with its own state: how many pushes are received at
//! once (the rest wait, HTTP/2 flow control holding their senders, so receive buffers stay
//! bounded), and each worker's last async push applied as it was read, so a push sent again after
//! a lost connection is answered as the first time instead of applied twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::pb;
use crate::server::runtime::shutting_down;

/// A push's answer as recorded for a push sent again.
pub(crate) type Answer = Result<pb::PushResponse, Status>;

/// A worker's last async push applied as read: its id, and its answer once known.
struct Recent {
    /// The push's id.
    id: u64,
    /// Its answer, once known.
    answer: Option<Answer>,
}

/// Pushes in flight (see the module doc).
#[derive(Clone)]
pub(crate) struct Intake {
    /// Room for the pushes received at once.
    receiving: Arc<Semaphore>,
    /// Each worker's last async push by id.
    recent: Arc<Mutex<HashMap<u32, Recent>>>,
}

/// What [`Intake::claim`] found for a push by id.
pub(crate) enum Claim {
    /// A new push: apply it, recording its answer through the [`Taking`].
    New(Taking),
    /// The same push was applied before: its answer.
    Answered(Answer),
    /// The same push is being applied by an earlier attempt.
    InProgress,
}

impl Intake {
    /// Room for `concurrent` pushes received at once (at least one).
    pub(crate) fn new(concurrent: usize) -> Intake {
        Intake {
            receiving: Arc::new(Semaphore::new(concurrent.max(1))),
            recent: Arc::default(),
        }
    }

    /// Waits for room to receive one more push; the room is freed when the permit drops.
    pub(crate) async fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.receiving
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| shutting_down())
    }

    /// Looks up push `id` of `worker` (async, applied as read), claiming it when it is new.
    pub(crate) fn claim(&self, worker: u32, id: u64) -> Result<Claim, Status> {
        let mut recent = self.recent.lock().map_err(|_| shutting_down())?;
        match recent.get(&worker) {
            Some(r) if r.id == id => Ok(match &r.answer {
                Some(a) => Claim::Answered(a.clone()),
                None => Claim::InProgress,
            }),
            _ => {
                recent.insert(worker, Recent { id, answer: None });
                Ok(Claim::New(Taking {
                    recent: self.recent.clone(),
                    worker,
                    id,
                    armed: true,
                }))
            }
        }
    }
}

/// An async push by id being taken: dropped before its outcome is owned ([`Taking::own`]: the
/// call ended while waiting on the staleness bound), it forgets the id, since nothing was applied.
pub(crate) struct Taking {
    /// The pushes by id.
    recent: Arc<Mutex<HashMap<u32, Recent>>>,
    /// The worker.
    worker: u32,
    /// The push's id.
    id: u64,
    /// Whether dropping it forgets the id (until its outcome is owned).
    armed: bool,
}

impl Taking {
    /// From here the caller owns the outcome and will [`Recorder::record`] it, whatever happens
    /// to the call that took the push.
    pub(crate) fn own(&mut self) -> Recorder {
        self.armed = false;
        Recorder {
            recent: self.recent.clone(),
            worker: self.worker,
            id: self.id,
        }
    }
}

impl Drop for Taking {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut recent) = self.recent.lock()
            && recent
                .get(&self.worker)
                .is_some_and(|r| r.id == self.id && r.answer.is_none())
        {
            recent.remove(&self.worker);
        }
    }
}

/// Records the answer of a push taken by id.
pub(crate) struct Recorder {
    /// The pushes by id.
    recent: Arc<Mutex<HashMap<u32, Recent>>>,
    /// The worker.
    worker: u32,
    /// The push's id.
    id: u64,
}

impl Recorder {
    /// Keeps `answer` for the push sent again.
    pub(crate) fn record(self, answer: Answer) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(
                self.worker,
                Recent {
                    id: self.id,
                    answer: Some(answer),
                },
            );
        }
    }
}
