//! The gRPC edge of a parameter server: receiving streamed pushes, answering pulls, declaring,
//! and mapping every failure to a `Status` with a typed reason ([`crate::failure`]). Handlers only
//! move bytes and wait: applying gradients runs off the async runtime ([`super::step`]). Its
//! parts: `push.rs` (a push from its arrival to its answer), `streamed.rs` (pushes applied as they
//! are read), `same_host.rs` (the same-machine data plane), `rows.rs` (sparse rows), `leases.rs`,
//! `replication.rs`, and the parts that own state: `intake.rs`, `checkpoints.rs`; the checks of
//! what a declaration may ask are in [`super::convert`]. Nothing below the service imports it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::Stream;
use tandem_core::compression::Compression;
use tokio::sync::{Notify, OnceCell};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

use super::checkpoint::Snapshot;
use super::convert::{mode_from, optimizer_from, partition_from};
use super::model::{Key, Model};
use super::pull::PulledChunks;
use super::runtime::{blocking, shutting_down};
use super::step::{Contribution, PushResult, Stepper, apply_async, wait_staleness};
use crate::failure::{invalid, status};
use crate::pb;
use crate::pb::Reason;
use crate::pb::parameter_server_server::ParameterServer;
use same_host::SameHost;

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes per streamed chunk sent by the server.
    pub chunk_bytes: usize,
    /// Pushes received at once; the others wait (HTTP/2 flow control holds their senders), so the
    /// server's receive buffers stay at this many times its share of the parameters.
    pub concurrent_pushes: usize,
    /// Longest wait a pull or a staleness bound may impose.
    pub max_wait: Duration,
    /// Longest wait for the next chunk of a push being read (a worker gone silent mid-push).
    pub receive_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            chunk_bytes: 1 << 20,
            concurrent_pushes: 2,
            max_wait: Duration::from_secs(3600),
            receive_wait: Duration::from_secs(30),
        }
    }
}

/// The declared model and, in sync mode, the thread that owns its step.
#[derive(Clone)]
pub(super) struct Declared {
    /// The model.
    pub(super) model: Arc<Model>,
    /// Its step thread (sync mode).
    pub(super) stepper: Option<Stepper>,
}

/// The parameter-server service of one server process.
#[derive(Clone)]
pub struct Service {
    /// The model once declared (or restored).
    pub(super) declared: Arc<OnceCell<Declared>>,
    /// When and where it checkpoints.
    pub(super) checkpoints: Checkpoints,
    /// This server process's random incarnation: workers detect a restart by it.
    pub(super) incarnation: u64,
    /// One declaration at a time.
    declare_lock: Arc<tokio::sync::Mutex<()>>,
    /// The server's limits.
    pub(super) limits: Limits,
    /// Pushes in flight: how many are received at once, and async pushes sent again.
    pub(super) intake: intake::Intake,
    /// The same-machine data plane.
    pub(super) same_host: Arc<SameHost>,
    /// The workers: when each was last heard from, its calls in progress (the leases), and
    /// which said done.
    pub(super) roster: super::lease::Roster,
    /// The standby following this server, if any (primary-backup replication).
    pub replication: Arc<super::replica::Replication>,
    /// The compression workers must declare (`auto`: each worker's own).
    pub(super) compression: Compression,
}

impl Service {
    /// A service with no parameters yet; `all_done` is notified when every worker has said done.
    pub fn new(
        limits: Limits,
        all_done: Arc<Notify>,
        checkpoint: Option<CheckpointPolicy>,
        compression: Compression,
    ) -> Self {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| {
                d.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
            })
            | 1;
        Service {
            same_host: Arc::new(SameHost::from_env()),
            intake: intake::Intake::new(limits.concurrent_pushes),
            declared: Arc::new(OnceCell::new()),
            checkpoints: Checkpoints::new(checkpoint),
            incarnation,
            declare_lock: Arc::new(tokio::sync::Mutex::new(())),
            limits,
            roster: super::lease::Roster::new(all_done),
            replication: Arc::default(),
            compression,
        }
    }

    /// Installs the model (and, in sync mode, starts the thread that owns its step).
    fn install(&self, model: Model) -> Result<(), Status> {
        let model = Arc::new(model);
        let stepper = if model.mode.sync {
            // Not the service itself: it holds this thread's sender, and the thread must end when
            // the service is dropped.
            let checkpoints = self.checkpoints.clone();
            let due = move |v| checkpoints.due(v);
            let replication = self.replication.clone();
            Some(
                Stepper::start(model.clone(), due, replication).map_err(|e| {
                    status(
                        Code::Internal,
                        Reason::Internal,
                        format!("starting the step thread: {e}"),
                    )
                })?,
            )
        } else {
            None
        };
        let _ = self.declared.set(Declared { model, stepper });
        Ok(())
    }

    /// Resumes from a checkpoint: the model exists before any worker declares it.
    pub fn restore(&self, model: Model) -> tandem_core::Result<()> {
        tracing::info!(
            version = *model.version.borrow(),
            "restored from checkpoint"
        );
        self.install(model)
            .map_err(|st| tandem_core::Error::transport("restoring", st.message().to_string()))
    }

    /// Writes the snapshot in the background.
    pub(super) fn write_in_background(&self, snap: Snapshot) {
        self.checkpoints.write_in_background(snap);
    }

    /// Whether a checkpoint is due at `version`.
    pub(super) fn due(&self, version: u64) -> bool {
        self.checkpoints.due(version)
    }

    /// An async push applied on this (blocking-pool) thread: `apply` gets the version it applies
    /// to and a scratch piece lent from the model's pool; [`apply_async`] counts, replicates and
    /// publishes around it, with this service's checkpoint schedule and replication.
    pub(super) fn apply_async_pooled(
        &self,
        model: &Model,
        worker: u32,
        step: u64,
        apply: impl FnOnce(u64, &mut Vec<f32>) -> Result<(), (Status, bool)>,
    ) -> PushResult {
        let mut scratch = model.pool.take(super::model::PIECE);
        let r = apply_async(
            model,
            worker,
            step,
            |version| apply(version, &mut scratch),
            &|v| self.due(v),
            &self.replication,
        );
        model.pool.give(scratch);
        r
    }

    /// The model, once declared.
    pub fn model(&self) -> Option<Arc<Model>> {
        self.declared.get().map(|d| d.model.clone())
    }

    /// The model, or FailedPrecondition before any declaration.
    pub(super) fn declared(&self) -> Result<Arc<Model>, Status> {
        self.model().ok_or_else(not_declared)
    }

    /// The model and, in sync mode, its step thread.
    pub(super) fn declared_with_stepper(&self) -> Result<(Arc<Model>, Option<Stepper>), Status> {
        let d = self.declared.get().ok_or_else(not_declared)?;
        Ok((d.model.clone(), d.stepper.clone()))
    }
}

/// The refusal of a call that needs parameters before any were declared.
fn not_declared() -> Status {
    status(
        Code::FailedPrecondition,
        Reason::NotDeclared,
        "no parameters are declared on this server yet",
    )
}

pub(super) use crate::finite::all_finite;

/// The partition `key` of this server, or NotFound naming it.
pub(super) fn part_of<'m>(
    model: &'m Model,
    key: &Key,
) -> Result<&'m super::model::PartEntry, Status> {
    model.parts.get(key).ok_or_else(|| {
        status(
            Code::NotFound,
            Reason::UnknownPartition,
            format!(
                "unknown parameter {:?} partition {} on this server",
                key.0, key.1
            ),
        )
    })
}

/// A worker index must be below the declared number of workers.
pub(super) fn check_worker(model: &Model, worker: u32) -> Result<(), Status> {
    if worker >= model.mode.workers {
        return Err(invalid(format!(
            "worker {worker} is not below the {} workers",
            model.mode.workers
        )));
    }
    Ok(())
}

/// The partitions a pull names, or all of this server's.
pub(super) fn requested(model: &Model, parts: Vec<pb::PartRef>) -> Vec<Key> {
    if parts.is_empty() {
        model.parts.keys().cloned().collect()
    } else {
        parts.into_iter().map(|p| (p.param, p.part)).collect()
    }
}

/// The stream of a pull's chunks.
type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullChunk, Status>> + Send>>;

/// Chunks of a pull copied ahead of the network: a pull holds this many chunks in the server
/// however large the model (no copy of the model per version).
const PULL_AHEAD: usize = 4;

#[tonic::async_trait]
impl ParameterServer for Service {
    async fn declare(
        &self,
        req: Request<pb::DeclareRequest>,
    ) -> Result<Response<pb::DeclareResponse>, Status> {
        let r = req.into_inner();
        decode::agree(self.compression, &r.compression)?;
        let compression = self.compression.to_string();
        let optimizer = optimizer_from(r.optimizer)?;
        let mode = mode_from(r.mode)?;
        let _guard = self.declare_lock.lock().await;
        if let Some(m) = self.model() {
            if m.map_hash != r.map_hash || m.mode != mode || m.optimizer != optimizer {
                return Err(status(
                    Code::FailedPrecondition,
                    Reason::DeclarationMismatch,
                    format!(
                        "this declaration (partition map {:016x}) differs from the one this server holds ({:016x}); every worker must declare the same parameters, optimizer and mode",
                        r.map_hash, m.map_hash
                    ),
                ));
            }
            return Ok(Response::new(pb::DeclareResponse {
                version: *m.version.borrow(),
                standby: self.replication.standby(),
                compression,
            }));
        }
        let decls = r
            .partitions
            .into_iter()
            .map(partition_from)
            .collect::<Result<Vec<_>, Status>>()?;
        let map_hash = r.map_hash;
        let model = blocking(move || Model::new(map_hash, optimizer, mode, decls)).await?;
        tracing::info!(
            partitions = model.parts.len(),
            sync = mode.sync,
            "parameters declared"
        );
        self.install(model)?;
        Ok(Response::new(pb::DeclareResponse {
            version: 0,
            standby: self.replication.standby(),
            compression,
        }))
    }

    async fn push(
        &self,
        req: Request<Streaming<pb::PushChunk>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let model = self.declared()?;
        // Whatever the worker's compression, everything below reads f32 chunks.
        let mut stream = decode::decoded(model.clone(), req.into_inner());
        let first = match stream.next().await {
            Some(c) => c?,
            None => return Err(invalid("empty push")),
        };
        let _call = self.calling(first.worker);
        if !first.parts.is_empty() || first.non_finite {
            return self.push_as_read(first, stream).await.map(Response::new);
        }
        let mut stream = futures::stream::iter([Ok(first)]).chain(stream);
        // Bounded memory: only a few pushes are received at a time. The permit covers receiving
        // only, so a push waiting on the staleness bound never blocks the pushes it waits for.
        let receiving = self.intake.admit().await?;
        let mut incoming: Option<Incoming> = None;
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            let inc = incoming.get_or_insert_with(|| Incoming {
                worker: c.worker,
                step: c.step,
                parts: HashMap::new(),
            });
            inc.take(&model, c)?;
        }
        drop(receiving);
        let inc = incoming.ok_or_else(|| invalid("empty push"))?;
        self.accept(model, inc).await.map(Response::new)
    }

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        self.attach_worker(&req.into_inner().advert)
            .map(Response::new)
    }

    async fn push_shared(
        &self,
        req: Request<pb::SharedPush>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let r = req.into_inner();
        let _call = self.calling(r.worker);
        self.push_by_address(r).await.map(Response::new)
    }

    async fn pull_shared(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<pb::SharedPull>, Status> {
        let r = req.into_inner();
        let _call = self.calling(r.worker);
        self.pull_by_address(r).await.map(Response::new)
    }

    type PullStream = PullStream;

    type FollowStream = super::replica::FollowStream;

    async fn follow(
        &self,
        req: Request<Streaming<pb::FollowAck>>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        self.followed_by(req.into_inner()).await.map(Response::new)
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<PullStream>, Status> {
        let model = self.declared()?;
        let mut r = req.into_inner();
        let _call = self.calling(r.worker);
        let mut keys = requested(&model, std::mem::take(&mut r.parts));
        for key in &keys {
            part_of(&model, key)?;
        }
        // In the order a sync step applies them, so a pull for the step being applied streams
        // each partition as soon as the step finished it (early.rs).
        keys.sort();
        let early = model.mode.sync.then(|| keys.first()).flatten();
        let wire = match r.wire() {
            pb::Wire::Topk => return Err(invalid("pulls come in f32, bf16 or fp16, not top-k")),
            w => w,
        };
        let (version, min_version) = self.wait_version(&model, &r, early).await?;
        let chunks = PulledChunks {
            wire,
            early: early.is_some().then(|| (min_version, self.pull_wait(&r))),
            model,
            keys,
            version,
            incarnation: self.incarnation,
            chunk_bytes: self.limits.chunk_bytes.max(4) / 4 * 4,
            standby: self.replication.standby(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(PULL_AHEAD);
        let (runtime, wait) = (tokio::runtime::Handle::current(), self.limits.receive_wait);
        // Copied a chunk at a time on the blocking pool, at most PULL_AHEAD ahead of the network.
        tokio::task::spawn_blocking(move || chunks.send(&tx, &runtime, wait));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn done(
        &self,
        req: Request<pb::DoneRequest>,
    ) -> Result<Response<pb::DoneResponse>, Status> {
        let worker = req.into_inner().worker;
        let _call = self.calling(worker);
        let workers = self.model().map_or(0, |m| m.mode.workers);
        let remaining = self.roster.said_done(worker, workers);
        Ok(Response::new(pb::DoneResponse { remaining }))
    }

    async fn pull_rows(
        &self,
        req: Request<pb::RowsRequest>,
    ) -> Result<Response<pb::RowsResponse>, Status> {
        self.read_rows(req.into_inner()).map(Response::new)
    }

    async fn push_rows(
        &self,
        req: Request<pb::RowsPush>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let r = req.into_inner();
        let _call = self.calling(r.worker);
        self.apply_rows(r).await.map(Response::new)
    }

    async fn checkpoint(
        &self,
        _req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let (model, stepper) = self.declared_with_stepper()?;
        if !self.checkpoints.enabled() {
            return Err(status(
                Code::FailedPrecondition,
                Reason::NoCheckpointDir,
                "this server was started without a checkpoint directory",
            ));
        }
        // In sync mode the step's owner takes it between two steps, so it is one consistent step.
        let snap = match stepper {
            Some(stepper) => stepper.snapshot().await?,
            None => blocking(move || model.snapshot()).await?,
        };
        let version = snap.version;
        let checkpoints = self.checkpoints.clone();
        let written = blocking(move || checkpoints.write(&snap))
            .await?
            .ok_or_else(|| status(Code::Internal, Reason::Internal, "no checkpoint folder"))?
            .map_err(|e| status(Code::Internal, Reason::Internal, e.to_string()))?;
        Ok(Response::new(pb::CheckpointResponse {
            version,
            path: written.display().to_string(),
        }))
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let m = self.declared()?;
        let c = &m.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(pb::StatsResponse {
            version: *m.version.borrow(),
            applied: ld(&c.applied),
            dropped: ld(&c.dropped),
            rejected: ld(&c.rejected),
            bytes_in: ld(&c.bytes_in),
            bytes_out: ld(&c.bytes_out),
            staleness_histogram: c.staleness.iter().map(ld).collect(),
            worker_steps: m.worker_steps.borrow().clone(),
            incarnation: self.incarnation,
            standby: self.replication.standby(),
            gone_workers: m
                .gone
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .collect(),
        }))
    }
}

mod checkpoints;
mod decode;
pub(super) mod intake;
mod leases;
mod replication;

pub use checkpoints::CheckpointPolicy;
use checkpoints::Checkpoints;
mod push;
mod rows;
mod same_host;
mod streamed;
use push::Incoming;
