//! The primary side of primary-backup replication: a standby (another server process, on a port of
//! its own) follows this server through `Follow`; every update is sent to it, whole state, and only
//! published (the version advanced, the waiting pulls answered) once the standby acknowledged it,
//! so a standby promoted after this server dies holds every update a worker could have seen.
//!
//! Why whole states and not gradients: the standby then needs no optimizer run of its own, nothing
//! can drift between the two (summation order, learning-rate schedule), and one encoding (the
//! checkpoint's, with its checksum) serves files and replicas. What it costs is in BENCHMARKS.md.
//!
//! Failures: a standby that stops acknowledging within [`REPLICA_WAIT`] (dead, cut off) is dropped
//! and this server goes on without a replica, logging it, until a standby follows again. A standby
//! that says it was promoted (a worker could not reach this server) makes this server stop
//! ([`Replication::replaced`]): two servers never serve the same partitions.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tonic::Status;

use super::checkpoint::{self, encode_with};
use super::model::Model;
use crate::pb;

/// The chunks a primary streams to its standby.
pub type FollowStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ReplicaChunk, Status>> + Send>>;

/// Longest wait for a standby to take an update before this server goes on without it.
pub const REPLICA_WAIT: Duration = Duration::from_secs(10);

/// Bytes per replica chunk.
const CHUNK: usize = 1 << 20;

/// What became of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replicated {
    /// No standby follows this server.
    Unreplicated,
    /// The standby holds it.
    Acked,
    /// The standby was promoted: this server must stop, the update unpublished.
    Replaced(String),
}

/// The chunks sent to one standby, and its acknowledgements.
struct Follower {
    /// The standby's address.
    addr: String,
    /// Where its chunks go (the follow stream).
    chunks: tokio::sync::mpsc::Sender<Result<pb::ReplicaChunk, Status>>,
    /// Its acknowledgements.
    acks: std::sync::mpsc::Receiver<pb::FollowAck>,
    /// The runtime that sends the chunks.
    runtime: tokio::runtime::Handle,
}

/// This server's replication: its standby, if one follows, and whether it was replaced.
#[derive(Default)]
pub struct Replication {
    /// The standby following, if any.
    follower: Mutex<Option<Follower>>,
    /// The encoding buffer, kept between updates (a state is large; a fresh allocation per update
    /// costs its pages again).
    buf: Mutex<Vec<u8>>,
    /// The standby's address, told to workers (empty without one).
    standby: Mutex<String>,
    /// The standby that replaced this server, once one did.
    replaced: OnceLock<String>,
    /// Notified when this server was replaced.
    replaced_notify: Notify,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("standby", &self.standby())
            .field("replaced", &self.replaced.get())
            .finish()
    }
}

impl Replication {
    /// The address of the standby following this server (empty: none).
    pub fn standby(&self) -> String {
        self.standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves with the standby's address once a standby was promoted in this server's place.
    pub async fn replaced(&self) -> String {
        loop {
            let notified = self.replaced_notify.notified();
            if let Some(a) = self.replaced.get() {
                return a.clone();
            }
            notified.await;
        }
    }

    /// Whether a standby follows this server now.
    pub fn follows(&self) -> bool {
        self.follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether a standby was promoted in this server's place.
    pub fn is_replaced(&self) -> bool {
        self.replaced.get().is_some()
    }

    /// Records that a worker failed over to standby `by`: this server stops serving (once).
    pub(super) fn replace(&self, by: String) {
        if self.replaced.set(by.clone()).is_ok() {
            tracing::error!(standby = %by, "a worker failed over to this server's standby: this server stops so the two never serve the same partitions");
        }
        self.replaced_notify.notify_waiters();
    }

    /// A standby at `addr` follows from now on (replacing any earlier one).
    pub(super) fn register(
        &self,
        addr: String,
        chunks: tokio::sync::mpsc::Sender<Result<pb::ReplicaChunk, Status>>,
        acks: std::sync::mpsc::Receiver<pb::FollowAck>,
        runtime: tokio::runtime::Handle,
    ) {
        tracing::info!(standby = %addr, "a standby follows this server");
        *self.standby.lock().unwrap_or_else(|p| p.into_inner()) = addr.clone();
        *self.follower.lock().unwrap_or_else(|p| p.into_inner()) = Some(Follower {
            addr,
            chunks,
            acks,
            runtime,
        });
    }

    /// Sends the model's whole state, as of `version`, to the standby and waits for its
    /// acknowledgement. Blocking: call it off the async runtime (the step thread, the blocking
    /// pool). Updates are sent one at a time, in the order this is called.
    pub fn replicate(&self, model: &Model, version: u64) -> Replicated {
        if let Some(by) = self.replaced.get() {
            return Replicated::Replaced(by.clone());
        }
        let mut guard = self.follower.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = guard.as_mut() else {
            return Replicated::Unreplicated;
        };
        let mut buf = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()));
        model.encode_state(version, &mut buf);
        let bytes = Bytes::from(buf);
        let sent = send(f, bytes.clone(), version);
        // Every chunk was consumed once acknowledged: the buffer is ours again.
        if let Ok(m) = bytes.try_into_mut() {
            *self.buf.lock().unwrap_or_else(|p| p.into_inner()) = Vec::from(m);
        }
        match sent {
            Ok(ack) if ack.promoted => {
                let by = f.addr.clone();
                *guard = None;
                self.replace(by.clone());
                Replicated::Replaced(by)
            }
            Ok(_) => Replicated::Acked,
            Err(why) => {
                tracing::warn!(standby = %f.addr, version, "standby lost ({why}): serving without a replica until a standby follows again");
                *guard = None;
                self.standby
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                Replicated::Unreplicated
            }
        }
    }
}

/// Sends one encoded state in chunks, then waits for an ack of its version (or a promotion).
fn send(f: &Follower, bytes: Bytes, version: u64) -> tandem_core::Result<pb::FollowAck> {
    let lost = |why: String| tandem_core::Error::transport("replicating to the standby", why);
    let total = bytes.len();
    let mut at = 0;
    while at < total || at == 0 {
        let end = (at + CHUNK).min(total);
        let chunk = pb::ReplicaChunk {
            version,
            data: bytes.slice(at..end),
            last: end == total,
        };
        let sent = f
            .runtime
            .block_on(async { tokio::time::timeout(REPLICA_WAIT, f.chunks.send(Ok(chunk))).await });
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(lost("its stream closed".into())),
            Err(_) => {
                return Err(tandem_core::Error::timeout(
                    "the standby to take the replicated state",
                    REPLICA_WAIT,
                ));
            }
        }
        at = end;
        if end == total {
            break;
        }
    }
    let deadline = std::time::Instant::now() + REPLICA_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match f.acks.recv_timeout(left) {
            Ok(ack) if ack.promoted || ack.version >= version => return Ok(ack),
            Ok(_) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(tandem_core::Error::timeout(
                    format!("the standby's acknowledgement of version {version}"),
                    REPLICA_WAIT,
                ));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(lost("its stream closed".into()));
            }
        }
    }
}

impl Model {
    /// Encodes the whole state as of `version` into `out` (the checkpoint encoding), each
    /// partition copied under its read lock: one copy, no intermediate snapshot.
    pub fn encode_state(&self, version: u64, out: &mut Vec<u8>) {
        let header = checkpoint::Header {
            map_hash: self.map_hash,
            version,
            mode: self.mode,
            optimizer: self.optimizer,
        };
        encode_with(out, &header, self.parts.len(), |write| {
            for ((param, part), e) in &self.parts {
                let d = e.data.read().unwrap_or_else(|p| p.into_inner());
                write(checkpoint::PartView {
                    param,
                    part: *part,
                    shape: &e.shape,
                    row_start: e.row_start,
                    rows: e.rows,
                    t: d.state.t,
                    version: d.version,
                    values: &d.values,
                    m: &d.state.m,
                    v: &d.state.v,
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::optimizer::Optimizer;
    use crate::server::Mode;
    use crate::server::step::{Contribution, Stepper};

    fn model() -> Arc<Model> {
        let mode = Mode::sync_for_test(1, 1);
        Arc::new(Model::one_partition_for_test(
            1,
            Optimizer::sgd(1.0),
            mode,
            3,
        ))
    }

    fn grad(v: f32) -> Contribution {
        let mut g = std::collections::HashMap::new();
        g.insert(("w".to_string(), 0), vec![v; 3]);
        Contribution::Streamed(g)
    }

    /// Receives one whole state from the primary.
    async fn receive(
        rx: &mut tokio::sync::mpsc::Receiver<Result<pb::ReplicaChunk, Status>>,
    ) -> checkpoint::Snapshot {
        let mut buf = Vec::new();
        loop {
            let c = rx.recv().await.expect("chunk").expect("ok");
            buf.extend_from_slice(&c.data);
            if c.last {
                return checkpoint::decode(&buf, "test".into()).expect("decode");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_is_published_only_once_the_standby_holds_it() {
        let model = model();
        let replication = Arc::new(Replication::default());
        let (chunks, mut rx) = tokio::sync::mpsc::channel(8);
        let (acks, ack_rx) = std::sync::mpsc::channel();
        replication.register(
            "127.0.0.1:9".into(),
            chunks,
            ack_rx,
            tokio::runtime::Handle::current(),
        );
        assert_eq!(replication.standby(), "127.0.0.1:9");
        let stepper =
            Stepper::start(model.clone(), |_| false, replication.clone()).expect("thread");
        let push = tokio::spawn({
            let stepper = stepper.clone();
            async move { stepper.push(0, 0, grad(2.0)).await }
        });
        let state = receive(&mut rx).await;
        assert_eq!(state.version, 1);
        assert_eq!(
            state.parts[0].values,
            vec![-2.0; 3],
            "the applied step is sent"
        );
        assert_eq!(*model.version.borrow(), 0, "not published before the ack");
        acks.send(pb::FollowAck {
            version: 1,
            ..Default::default()
        })
        .expect("ack");
        let (r, _) = push.await.expect("task").expect("push");
        assert_eq!(r.version, 1);
        assert_eq!(*model.version.borrow(), 1, "published once acknowledged");
        // A standby that says it was promoted: the next step is not published and the primary
        // knows it was replaced.
        let push = tokio::spawn({
            let stepper = stepper.clone();
            async move { stepper.push(0, 1, grad(1.0)).await }
        });
        let state = receive(&mut rx).await;
        assert_eq!(state.version, 2);
        acks.send(pb::FollowAck {
            promoted: true,
            ..Default::default()
        })
        .expect("ack");
        assert!(
            push.await.expect("task").is_err(),
            "a replaced primary answers no push"
        );
        assert_eq!(*model.version.borrow(), 1, "the step is not published");
        assert!(replication.is_replaced());
        assert_eq!(replication.replaced().await, "127.0.0.1:9");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_that_goes_away_leaves_the_primary_serving_unreplicated() {
        let model = model();
        let replication = Arc::new(Replication::default());
        let (chunks, rx) = tokio::sync::mpsc::channel(8);
        let (_acks, ack_rx) = std::sync::mpsc::channel::<pb::FollowAck>();
        replication.register(
            "127.0.0.1:9".into(),
            chunks,
            ack_rx,
            tokio::runtime::Handle::current(),
        );
        drop(rx);
        let stepper =
            Stepper::start(model.clone(), |_| false, replication.clone()).expect("thread");
        let (r, _) = stepper.push(0, 0, grad(2.0)).await.expect("push");
        assert_eq!(r.version, 1, "published without a replica");
        assert_eq!(replication.standby(), "", "the lost standby is forgotten");
        assert!(!replication.is_replaced());
        // Without a follower, nothing waits.
        assert_eq!(replication.replicate(&model, 1), Replicated::Unreplicated);
    }
}
