//! The gRPC service: decoding requests, validating them against the model, and mapping every error to
//! a `Status` here and only here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{Notify, OnceCell};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use std::path::PathBuf;

use super::checkpoint::{self, Snapshot};
use super::model::{GradientSource, Key, Mode, Model, PIECE, Pending, SyncStep};
use crate::init::Init;
use crate::optimizer::{Kind, Optimizer};
use crate::pb;
use crate::pb::parameter_server_server::ParameterServer;

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            chunk_bytes: 1 << 20,
            concurrent_pushes: 2,
            max_wait: Duration::from_secs(3600),
        }
    }
}

/// Where and how often a server checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// Directory of the checkpoint files.
    pub dir: PathBuf,
    /// This server's index (names its file).
    pub index: usize,
    /// Write every this many versions (0: only on request).
    pub every: u64,
}

/// The parameter-server service of one server process.
#[derive(Clone)]
pub struct Service {
    model: Arc<OnceCell<Arc<Model>>>,
    checkpoint: Option<CheckpointPolicy>,
    incarnation: u64,
    declare_lock: Arc<tokio::sync::Mutex<()>>,
    done: Arc<Mutex<std::collections::BTreeSet<u32>>>,
    all_done: Arc<Notify>,
    limits: Limits,
    receiving: Arc<tokio::sync::Semaphore>,
    same_host: Arc<SameHost>,
}

/// Workers on this machine whose memory this server has proven it can read, and this server's word
/// for them to prove the converse.
#[derive(Debug)]
struct SameHost {
    enabled: bool,
    word: tandem_peer_memory::LocalWord,
    attached: Mutex<std::collections::HashSet<u32>>,
}

impl Service {
    /// A service with no parameters yet; `all_done` is notified when every worker has said done.
    pub fn new(
        limits: Limits,
        all_done: Arc<Notify>,
        checkpoint: Option<CheckpointPolicy>,
    ) -> Self {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| {
                d.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
            })
            | 1;
        let enabled = tandem_peer_memory::allowed_by_env();
        Service {
            same_host: Arc::new(SameHost {
                enabled,
                word: tandem_peer_memory::LocalWord::new(),
                attached: Mutex::default(),
            }),
            receiving: Arc::new(tokio::sync::Semaphore::new(limits.concurrent_pushes.max(1))),
            model: Arc::new(OnceCell::new()),
            checkpoint,
            incarnation,
            declare_lock: Arc::new(tokio::sync::Mutex::new(())),
            done: Arc::default(),
            all_done,
            limits,
        }
    }

    /// Resumes from a checkpoint: the model exists before any worker declares it.
    pub fn restore(&self, model: Model) {
        tracing::info!(
            version = *model.version.borrow(),
            "restored from checkpoint"
        );
        let _ = self.model.set(Arc::new(model));
    }

    /// Writes the snapshot in the background (the caller holds whatever lock made it consistent).
    fn write_in_background(&self, snap: Snapshot) {
        if let Some(policy) = self.checkpoint.clone() {
            tokio::task::spawn_blocking(move || {
                match checkpoint::write(&policy.dir, policy.index, &snap) {
                    Ok(p) => {
                        tracing::info!(version = snap.version, path = %p.display(), "checkpoint written")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "checkpoint failed; the previous one is intact")
                    }
                }
            });
        }
    }

    fn due(&self, version: u64) -> bool {
        self.checkpoint
            .as_ref()
            .is_some_and(|c| c.every > 0 && version > 0 && version.is_multiple_of(c.every))
    }

    /// The model, once declared.
    pub fn model(&self) -> Option<Arc<Model>> {
        self.model.get().cloned()
    }

    fn declared(&self) -> Result<Arc<Model>, Status> {
        self.model().ok_or_else(|| {
            Status::failed_precondition("no parameters are declared on this server yet")
        })
    }
}

fn optimizer_from(o: Option<pb::Optimizer>) -> Result<Optimizer, Status> {
    let o = o.ok_or_else(|| Status::invalid_argument("declaration has no optimizer"))?;
    let kind =
        Optimizer::kind_from_name(&o.kind).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut opt = match kind {
        Kind::Sgd => Optimizer::sgd(o.lr as f32),
        Kind::Momentum => Optimizer::momentum(o.lr as f32, o.momentum as f32),
        Kind::Nesterov => Optimizer::nesterov(o.lr as f32, o.momentum as f32),
        Kind::Adagrad => Optimizer::adagrad(o.lr as f32),
        Kind::Adam => Optimizer::adam(o.lr as f32),
        Kind::AdamW => Optimizer::adamw(o.lr as f32, o.weight_decay as f32),
    };
    if o.beta1 > 0.0 {
        opt.beta1 = o.beta1 as f32;
    }
    if o.beta2 > 0.0 {
        opt.beta2 = o.beta2 as f32;
    }
    if o.eps > 0.0 {
        opt.eps = o.eps as f32;
    }
    opt.weight_decay = o.weight_decay as f32;
    opt.clip_norm = o.clip_norm as f32;
    if o.decay_steps > 0 {
        opt.decay_rate = o.decay_rate as f32;
        opt.decay_steps = o.decay_steps;
    }
    opt.validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(opt)
}

fn mode_from(m: Option<pb::Mode>) -> Result<Mode, Status> {
    let m = m.ok_or_else(|| Status::invalid_argument("declaration has no mode"))?;
    if m.workers == 0 {
        return Err(Status::invalid_argument("mode.workers must be at least 1"));
    }
    let k = if m.replicas_to_aggregate == 0 {
        m.workers
    } else {
        m.replicas_to_aggregate
    };
    if k > m.workers {
        return Err(Status::invalid_argument(format!(
            "replicas_to_aggregate {k} exceeds the {} workers",
            m.workers
        )));
    }
    Ok(Mode {
        sync: m.sync,
        workers: m.workers,
        replicas_to_aggregate: k,
        staleness: m.bounded.then_some(m.staleness),
        reject_non_finite: m.reject_non_finite,
    })
}

/// A push being received: one buffer per partition, filled in order.
struct Incoming {
    worker: u32,
    step: u64,
    /// Each partition's gradient, written straight into f32 storage, and the bytes received.
    parts: HashMap<Key, (Vec<f32>, usize)>,
}

/// How long a sync push from this machine keeps its gradient in the worker, waiting for the step to
/// be applied, before the server copies it into the step's sum and lets the worker go on.
const PENDING_PATIENCE: Duration = Duration::from_secs(1);

/// A gradient that stays in a worker's memory on this machine while its push is open.
#[derive(Debug)]
struct SharedGradient {
    peer: tandem_peer_memory::PeerMemory,
    worker: u32,
    /// Address of the worker's word, which holds `tag` while the push is open.
    word: u64,
    tag: u64,
    /// Each partition's gradient: its key, elements and address in the worker.
    regions: Vec<(Key, usize, usize)>,
}

impl GradientSource for SharedGradient {
    fn covers(&self, key: &Key) -> bool {
        self.regions.iter().any(|(k, ..)| k == key)
    }

    fn partitions(&self) -> Vec<Key> {
        self.regions.iter().map(|(k, ..)| k.clone()).collect()
    }

    fn read(&self, key: &Key, at: usize, dst: &mut [f32]) -> Result<(), String> {
        let addr = self
            .regions
            .iter()
            .find(|(k, ..)| k == key)
            .map(|(_, _, addr)| *addr)
            .ok_or_else(|| format!("no gradient for {:?} partition {}", key.0, key.1))?;
        self.read_at(key, addr, at, dst)
            .and_then(|()| self.still_in())
            .map_err(|st| st.message().to_string())
    }
}

/// Withdraws a worker's gradient from a sync step it is waiting on if its push ends before the step
/// is applied (deadline, or the worker cancelled the call): its memory is about to be reused, and a
/// retry must be accepted.
struct Withdraw<'a> {
    model: &'a Model,
    worker: u32,
    step: u64,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.model.sync.lock().unwrap_or_else(|p| p.into_inner());
        if st.step == self.step {
            st.pending.retain(|p| p.worker != self.worker);
            st.contributors.remove(&self.worker);
            tracing::warn!(
                worker = self.worker,
                step = self.step,
                "gradient withdrawn: the push ended before its step was applied"
            );
        }
    }
}

impl SharedGradient {
    /// Copies elements `at..at + dst.len()` of the partition gradient at `addr`.
    fn read_at(&self, key: &Key, addr: usize, at: usize, dst: &mut [f32]) -> Result<(), Status> {
        let read = at
            .checked_mul(4)
            .and_then(|off| addr.checked_add(off))
            .ok_or_else(|| std::io::Error::other("the address overflows"))
            .and_then(|base| self.peer.read(base, bytemuck::cast_slice_mut(dst)));
        read.map_err(|e| {
            Status::aborted(format!(
                "reading worker {}'s gradient for {:?} from its memory: {e}",
                self.worker, key.0
            ))
        })
    }

    /// Whether the worker is still in the push (so what was read before is what it sent).
    fn still_in(&self) -> Result<(), Status> {
        let now = usize::try_from(self.word)
            .map_err(std::io::Error::other)
            .and_then(|w| self.peer.read_u64(w));
        match now {
            Ok(v) if v == self.tag => Ok(()),
            _ => Err(Status::aborted(format!(
                "worker {} left the push while its gradient was being read",
                self.worker
            ))),
        }
    }
}

/// Whether every value is finite (no NaN, no Inf). Branch-free within blocks so that it compiles to
/// vector instructions: a gradient is checked at memory speed.
fn all_finite(xs: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    xs.chunks(4096).all(|block| {
        block.iter().fold(0u32, |bad, v| {
            bad | u32::from(v.to_bits() & EXPONENT == EXPONENT)
        }) == 0
    })
}

/// `st` with "nothing applied" added to its message.
fn nothing_applied(st: Status) -> Status {
    Status::new(st.code(), format!("{}; nothing applied", st.message()))
}

/// The partition `key` of this server, or NotFound naming it.
fn part_of<'m>(model: &'m Model, key: &Key) -> Result<&'m super::model::PartEntry, Status> {
    model.parts.get(key).ok_or_else(|| {
        Status::not_found(format!(
            "unknown parameter {:?} partition {} on this server",
            key.0, key.1
        ))
    })
}

/// Every row index must fall inside the partition.
fn check_rows(entry: &super::model::PartEntry, key: &Key, rows: &[u64]) -> Result<(), String> {
    match rows.iter().find(|x| **x >= entry.rows) {
        Some(bad) => Err(format!(
            "row {bad} of {:?} partition {} is beyond its {} rows",
            key.0, key.1, entry.rows
        )),
        None => Ok(()),
    }
}

type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ParameterServer for Service {
    async fn declare(
        &self,
        req: Request<pb::DeclareRequest>,
    ) -> Result<Response<pb::DeclareResponse>, Status> {
        let r = req.into_inner();
        let optimizer = optimizer_from(r.optimizer)?;
        let mode = mode_from(r.mode)?;
        let _guard = self.declare_lock.lock().await;
        if let Some(m) = self.model() {
            if m.map_hash != r.map_hash || m.mode != mode || m.optimizer != optimizer {
                return Err(Status::failed_precondition(format!(
                    "this declaration (partition map {:016x}) differs from the one this server holds ({:016x}); every worker must declare the same parameters, optimizer and mode",
                    r.map_hash, m.map_hash
                )));
            }
            return Ok(Response::new(pb::DeclareResponse {
                version: *m.version.borrow(),
            }));
        }
        let mut decls = Vec::new();
        for p in r.partitions {
            if p.dtype != "f32" {
                return Err(Status::invalid_argument(format!(
                    "parameter {:?}: only f32 parameters are supported, got {}",
                    p.param, p.dtype
                )));
            }
            let rows_total = p.shape.first().copied().unwrap_or(1);
            if p.rows == 0 || p.row_start + p.rows > rows_total {
                return Err(Status::invalid_argument(format!(
                    "parameter {:?} partition {}: rows out of range",
                    p.param, p.part
                )));
            }
            let row_len: u64 = p.shape.iter().skip(1).product();
            if (p.rows as u128) * (row_len as u128) > (1u128 << 34) {
                return Err(Status::invalid_argument(format!(
                    "parameter {:?} partition {} is too large",
                    p.param, p.part
                )));
            }
            let init = p.init.unwrap_or_default();
            let init = Init::from_wire(&init.kind, init.a, init.b, init.seed)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            decls.push(((p.param, p.part), p.shape, p.row_start, p.rows, init));
        }
        let model = Arc::new(Model::new(r.map_hash, optimizer, mode, decls));
        tracing::info!(
            partitions = model.parts.len(),
            sync = mode.sync,
            "parameters declared"
        );
        let _ = self.model.set(model);
        Ok(Response::new(pb::DeclareResponse { version: 0 }))
    }

    async fn push(
        &self,
        req: Request<Streaming<pb::PushChunk>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let model = self.declared()?;
        let mut stream = req.into_inner();
        // Bounded memory: only a few pushes are received at a time. The permit covers receiving
        // only, so a push waiting on the staleness bound never blocks the pushes it waits for.
        let receiving = self
            .receiving
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        let mut incoming: Option<Incoming> = None;
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            let inc = incoming.get_or_insert_with(|| Incoming {
                worker: c.worker,
                step: c.step,
                parts: HashMap::new(),
            });
            let key = (c.param, c.part);
            let entry = part_of(&model, &key)?;
            let want = entry.numel * 4;
            let (buf, filled) = inc
                .parts
                .entry(key.clone())
                .or_insert_with(|| (model.pool.take(entry.numel), 0));
            if c.offset as usize != *filled || *filled + c.data.len() > want {
                model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(Status::invalid_argument(format!(
                    "gradient for {:?} partition {}: chunk at byte {} of {} bytes does not follow the {} bytes received (partition holds {want} bytes); nothing applied",
                    key.0,
                    key.1,
                    c.offset,
                    c.data.len(),
                    *filled
                )));
            }
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf.as_mut_slice());
            bytes[*filled..*filled + c.data.len()].copy_from_slice(&c.data);
            *filled += c.data.len();
            model
                .counters
                .bytes_in
                .fetch_add(c.data.len() as u64, Ordering::Relaxed);
        }
        drop(receiving);
        let inc = incoming.ok_or_else(|| Status::invalid_argument("empty push"))?;
        self.accept(&model, inc).await
    }

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let advert = req.into_inner().advert;
        let refuse = |reason: String| {
            Ok(Response::new(pb::AttachResponse {
                ok: false,
                advert: String::new(),
                reason,
            }))
        };
        if !self.same_host.enabled {
            return refuse("TANDEM_SAME_HOST=tcp on the server".into());
        }
        let peer = tandem_peer_memory::PeerMemory::parse(&advert).ok_or_else(|| {
            Status::invalid_argument(format!("unreadable attach advert {advert:?}"))
        })?;
        if let Err(e) = peer.probe() {
            return refuse(format!("the server cannot read the worker's memory: {e}"));
        }
        self.same_host
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.pid());
        Ok(Response::new(pb::AttachResponse {
            ok: true,
            advert: self.same_host.word.advert(),
            reason: String::new(),
        }))
    }

    async fn push_shared(
        &self,
        req: Request<pb::SharedPush>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let model = self.declared()?;
        let r = req.into_inner();
        let attached = self
            .same_host
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&r.pid);
        let peer = tandem_peer_memory::PeerMemory::of_process(r.pid)
            .filter(|_| attached)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "not attached: process {} has not attached to this server; push through the stream",
                    r.pid
                ))
            })?;
        if r.worker >= model.mode.workers {
            return Err(Status::invalid_argument(format!(
                "worker {} is not below the {} workers",
                r.worker, model.mode.workers
            )));
        }
        // Every region is checked against the partitions before anything is read.
        let mut regions: Vec<(Key, usize, usize)> = Vec::with_capacity(r.parts.len());
        for region in r.parts {
            let key = (region.param, region.part);
            let entry = part_of(&model, &key)?;
            let want = entry.numel * 4;
            if region.len != want as u64 || regions.iter().any(|(k, ..)| *k == key) {
                model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(Status::invalid_argument(format!(
                    "gradient for {:?} partition {}: {} bytes offered (partition holds {want} bytes, once); nothing applied",
                    key.0, key.1, region.len
                )));
            }
            let addr = usize::try_from(region.addr).map_err(|_| {
                Status::invalid_argument(format!(
                    "gradient for {:?}: address {:#x} does not fit this machine",
                    key.0, region.addr
                ))
            })?;
            regions.push((key, entry.numel, addr));
        }
        let from = SharedGradient {
            peer,
            worker: r.worker,
            word: r.word,
            tag: r.tag,
            regions,
        };
        // The gradient stays in the worker's memory: it is read twice, a piece at a time, so the
        // server holds one piece-sized buffer per push instead of a copy of the push. The first
        // pass checks every value (and takes each partition's squared norm for clipping) before
        // anything is used, so a bad gradient changes nothing; the second adds or applies it.
        let receiving = self
            .receiving
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        let mut scratch = model.pool.take(PIECE);
        let clip = !model.mode.sync && model.optimizer.clip_norm > 0.0;
        let mut norms = vec![0.0f32; from.regions.len()];
        if model.mode.reject_non_finite || clip {
            for ((key, numel, addr), norm_sq) in from.regions.iter().zip(norms.iter_mut()) {
                let mut at = 0;
                while at < *numel {
                    let piece = &mut scratch[..PIECE.min(numel - at)];
                    if let Err(st) = from.read_at(key, *addr, at, piece) {
                        model.pool.give(scratch);
                        return Err(nothing_applied(st));
                    }
                    if model.mode.reject_non_finite && !all_finite(piece) {
                        model.pool.give(scratch);
                        model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        return Err(Status::invalid_argument(format!(
                            "gradient for {:?} holds NaN or Inf; nothing applied",
                            key.0
                        )));
                    }
                    if clip {
                        *norm_sq = crate::optimizer::add_squares(*norm_sq, piece);
                    }
                    at += piece.len();
                }
            }
        }
        // The worker was still in the push after the first pass, so what was checked is what it sent.
        if let Err(st) = from.still_in() {
            model.pool.give(scratch);
            return Err(nothing_applied(st));
        }
        drop(receiving);
        let bytes: usize = from.regions.iter().map(|(_, n, _)| n * 4).sum();
        model
            .counters
            .bytes_in
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let (worker, step) = (r.worker, r.step);
        if model.mode.sync {
            // The gradient stays in the worker until the step is applied: the push returns then,
            // so the worker is still in the call and its buffer unchanged when the server reads it,
            // summed piece by piece with the others (no sum buffer for it here).
            model.pool.give(scratch);
            let (mut response, snapshot) = push_sync(
                &model,
                worker,
                step,
                |st| {
                    st.pending.push(Pending {
                        worker,
                        source: Box::new(from),
                    });
                    Ok(())
                },
                |v| self.due(v),
            )?;
            if let Some(snap) = snapshot {
                self.write_in_background(snap);
            }
            if response.applied && response.version <= step {
                let mut withdraw = Withdraw {
                    model: &model,
                    worker,
                    step,
                    armed: true,
                };
                let mut rx = model.version.subscribe();
                match tokio::time::timeout(PENDING_PATIENCE, rx.wait_for(|v| *v > step)).await {
                    Ok(Ok(v)) => {
                        response.version = *v;
                        withdraw.armed = false;
                    }
                    Ok(Err(_)) => return Err(Status::unavailable("the server is shutting down")),
                    Err(_) => {
                        // The step is slow to complete (a straggler; a restarted server the other
                        // workers are catching up with): the gradient is copied into the step's
                        // sum and the worker goes on, rather than wait on workers that may be
                        // waiting on it elsewhere.
                        withdraw.armed = false;
                        let mut st = model.sync.lock().unwrap_or_else(|p| p.into_inner());
                        if st.step == step
                            && let Err(why) = model.copy_in(&mut st, worker)
                        {
                            return Err(Status::aborted(format!(
                                "worker {worker}'s gradient for step {step} could not be copied in ({why}); withdrawn"
                            )));
                        }
                        response.version = st.step;
                    }
                }
            }
            return Ok(Response::new(response));
        }
        // Async: applied now, piece by piece; each piece is used only if the worker was still in
        // the push after it was read (it clears its word before reusing its buffer).
        let piece_of = |key: &Key, addr: usize, at: usize, dst: &mut [f32]| {
            from.read_at(key, addr, at, dst)
                .and_then(|()| from.still_in())
                .map_err(|st| {
                    tracing::warn!(worker = from.worker, "{}", st.message());
                    Status::aborted(format!(
                        "{}; the pieces read before it were used",
                        st.message()
                    ))
                })
        };
        let result = push_async(
            &model,
            worker,
            step,
            |version| {
                for ((key, _, addr), norm_sq) in from.regions.iter().zip(&norms) {
                    model.apply_pieces(key, version, *norm_sq, &mut scratch, |at, dst| {
                        piece_of(key, *addr, at, dst)
                    })?;
                }
                Ok(())
            },
            self.limits.max_wait,
            |v| self.due(v),
        )
        .await;
        model.pool.give(scratch);
        self.answer(result)
    }

    async fn pull_shared(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<pb::SharedPull>, Status> {
        let model = self.declared()?;
        let r = req.into_inner();
        let version = self.wait_version(&model, &r).await?;
        let mut parts = Vec::new();
        for key in requested(&model, r.parts) {
            let at = part_of(&model, &key)?.locate();
            parts.push(pb::SharedPart {
                param: key.0,
                part: key.1,
                addr: at.addr as u64,
                len: at.len as u64,
                seq_addr: at.seq_addr as u64,
                seq: at.seq,
            });
        }
        let total: u64 = parts.iter().map(|p| p.len).sum();
        model.counters.bytes_out.fetch_add(total, Ordering::Relaxed);
        Ok(Response::new(pb::SharedPull {
            version,
            incarnation: self.incarnation,
            pid: std::process::id(),
            parts,
        }))
    }

    type PullStream = PullStream;

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<PullStream>, Status> {
        let model = self.declared()?;
        let r = req.into_inner();
        let version = self.wait_version(&model, &r).await?;
        let keys = requested(&model, r.parts);
        let mut chunks = Vec::new();
        for key in keys {
            let entry = part_of(&model, &key)?;
            let snapshot = entry.bytes();
            let mut off = 0;
            while off < snapshot.len() || (off == 0 && snapshot.is_empty()) {
                let end = (off + self.limits.chunk_bytes).min(snapshot.len());
                chunks.push(pb::PullChunk {
                    param: key.0.clone(),
                    part: key.1,
                    offset: off as u64,
                    version,
                    data: snapshot.slice(off..end),
                    incarnation: self.incarnation,
                });
                if end == off {
                    break;
                }
                off = end;
            }
        }
        let total: usize = chunks.iter().map(|c| c.data.len()).sum();
        model
            .counters
            .bytes_out
            .fetch_add(total as u64, Ordering::Relaxed);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn done(
        &self,
        req: Request<pb::DoneRequest>,
    ) -> Result<Response<pb::DoneResponse>, Status> {
        let worker = req.into_inner().worker;
        let workers = self.model().map_or(0, |m| m.mode.workers);
        let remaining = {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.insert(worker);
            workers.saturating_sub(d.len() as u32)
        };
        if remaining == 0 && workers > 0 {
            tracing::info!("every worker is done");
            self.all_done.notify_one();
        }
        Ok(Response::new(pb::DoneResponse { remaining }))
    }

    async fn pull_rows(
        &self,
        req: Request<pb::RowsRequest>,
    ) -> Result<Response<pb::RowsResponse>, Status> {
        let model = self.declared()?;
        let r = req.into_inner();
        let key = (r.param, r.part);
        let entry = part_of(&model, &key)?;
        let row_len = entry.row_len();
        check_rows(entry, &key, &r.rows).map_err(Status::invalid_argument)?;
        let mut out: Vec<f32> = Vec::with_capacity(r.rows.len() * row_len);
        let d = entry.data.read().unwrap_or_else(|p| p.into_inner());
        for row in &r.rows {
            let at = *row as usize * row_len;
            out.extend_from_slice(&d.values[at..at + row_len]);
        }
        let version = d.version;
        drop(d);
        let data = Bytes::copy_from_slice(bytemuck::cast_slice(&out));
        model
            .counters
            .bytes_out
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Response::new(pb::RowsResponse { data, version }))
    }

    async fn push_rows(
        &self,
        req: Request<pb::RowsPush>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let model = self.declared()?;
        let r = req.into_inner();
        let key = (r.param, r.part);
        let entry = part_of(&model, &key)?;
        let row_len = entry.row_len();
        let reject = |m: String| {
            model.counters.rejected.fetch_add(1, Ordering::Relaxed);
            Err(Status::invalid_argument(m))
        };
        if r.data.len() != r.rows.len() * row_len * 4 {
            return reject(format!(
                "row gradients for {:?}: {} bytes for {} rows of {row_len}; nothing applied",
                key.0,
                r.data.len(),
                r.rows.len()
            ));
        }
        if let Err(m) = check_rows(entry, &key, &r.rows) {
            return reject(format!("{m}; nothing applied"));
        }
        let g: Vec<f32> = r
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if model.mode.reject_non_finite && !all_finite(&g) {
            return reject(format!(
                "row gradients for {:?} hold NaN or Inf; nothing applied",
                key.0
            ));
        }
        // Repeated ids add up, as an embedding lookup used twice contributes twice.
        let mut merged: std::collections::BTreeMap<usize, Vec<f32>> =
            std::collections::BTreeMap::new();
        for (row, grad) in r.rows.iter().zip(g.chunks_exact(row_len.max(1))) {
            let acc = merged
                .entry(*row as usize)
                .or_insert_with(|| vec![0.0; row_len]);
            acc.iter_mut().zip(grad).for_each(|(a, b)| *a += b);
        }
        let mut rows: Vec<(usize, Vec<f32>)> = merged.into_iter().collect();
        model
            .counters
            .bytes_in
            .fetch_add(r.data.len() as u64, Ordering::Relaxed);
        let version = {
            let mut d = entry.write();
            let super::model::PartData {
                values,
                state,
                version,
            } = &mut *d;
            crate::optimizer::apply_rows(
                &model.optimizer,
                state,
                values,
                row_len,
                &mut rows,
                *version,
            );
            *version += 1;
            *version
        };
        model.counters.applied.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::PushResponse {
            applied: true,
            dropped: false,
            version,
        }))
    }

    async fn checkpoint(
        &self,
        _req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let model = self.declared()?;
        let policy = self.checkpoint.clone().ok_or_else(|| {
            Status::failed_precondition("this server was started without a checkpoint directory")
        })?;
        let snap = if model.mode.sync {
            let _step = model.sync.lock().unwrap_or_else(|p| p.into_inner());
            model.snapshot()
        } else {
            model.snapshot()
        };
        let version = snap.version;
        let written = tokio::task::spawn_blocking(move || {
            checkpoint::write(&policy.dir, policy.index, &snap)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
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
        }))
    }
}

impl Service {
    /// Checks a received push (worker index, sizes, finiteness) and hands it to the sync step or
    /// applies it (async).
    async fn accept(
        &self,
        model: &Model,
        inc: Incoming,
    ) -> Result<Response<pb::PushResponse>, Status> {
        if inc.worker >= model.mode.workers {
            return Err(Status::invalid_argument(format!(
                "worker {} is not below the {} workers",
                inc.worker, model.mode.workers
            )));
        }
        let mut grads: HashMap<Key, Vec<f32>> = HashMap::new();
        for (key, (g, filled)) in inc.parts {
            let entry = &model.parts[&key];
            if filled != entry.numel * 4 {
                model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(Status::invalid_argument(format!(
                    "gradient for {:?} partition {} is truncated: {} of {} bytes; nothing applied",
                    key.0,
                    key.1,
                    filled,
                    entry.numel * 4
                )));
            }
            if model.mode.reject_non_finite && !all_finite(&g) {
                model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(Status::invalid_argument(format!(
                    "gradient for {:?} holds NaN or Inf; nothing applied",
                    key.0
                )));
            }
            grads.insert(key, g);
        }
        let result = if model.mode.sync {
            push_sync(
                model,
                inc.worker,
                inc.step,
                |st| {
                    st.add(grads, &model.pool);
                    Ok(())
                },
                |v| self.due(v),
            )
        } else {
            push_async(
                model,
                inc.worker,
                inc.step,
                |version| {
                    for (key, mut g) in grads {
                        model.apply(&key, &mut g, version);
                        model.pool.give(g);
                    }
                    Ok(())
                },
                self.limits.max_wait,
                |v| self.due(v),
            )
            .await
        };
        self.answer(result)
    }

    /// The response to a push, after starting the checkpoint it made due, if any.
    fn answer(&self, result: PushResult) -> Result<Response<pb::PushResponse>, Status> {
        let (response, snapshot) = result?;
        if let Some(snap) = snapshot {
            self.write_in_background(snap);
        }
        Ok(Response::new(response))
    }

    /// Waits until the parameters reach the pull's `min_version` (a restarted server answers at once).
    async fn wait_version(&self, model: &Model, r: &pb::PullRequest) -> Result<u64, Status> {
        let wait = Duration::from_millis(r.timeout_ms).min(self.limits.max_wait);
        let mut rx = model.version.subscribe();
        // A worker that last saw another incarnation is told at once where this one stands.
        let restarted = r.incarnation != 0 && r.incarnation != self.incarnation;
        let min_version = if restarted { 0 } else { r.min_version };
        let reached = tokio::time::timeout(wait, rx.wait_for(|v| *v >= min_version)).await;
        match reached {
            Ok(Ok(v)) => Ok(*v),
            Ok(Err(_)) => Err(Status::unavailable("server is shutting down")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "version {} not reached within {wait:?} (server at {}); a worker may be missing",
                r.min_version,
                *model.version.borrow()
            ))),
        }
    }
}

/// The partitions a pull names, or all of this server's.
fn requested(model: &Model, parts: Vec<pb::PartRef>) -> Vec<Key> {
    if parts.is_empty() {
        model.parts.keys().cloned().collect()
    } else {
        parts.into_iter().map(|p| (p.param, p.part)).collect()
    }
}

type PushResult = Result<(pb::PushResponse, Option<Snapshot>), Status>;

/// One worker's gradient for a sync step: `add` puts it into the step's sums once the step is known
/// to want it (an error from it is returned, and the worker is not counted).
fn push_sync(
    model: &Model,
    worker: u32,
    step: u64,
    add: impl FnOnce(&mut SyncStep) -> Result<(), Status>,
    due: impl Fn(u64) -> bool,
) -> PushResult {
    let mut st = model.sync.lock().unwrap_or_else(|p| p.into_inner());
    if step < st.step {
        model.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return Ok((
            pb::PushResponse {
                applied: false,
                dropped: true,
                version: st.step,
            },
            None,
        ));
    }
    if step > st.step {
        // Only after this server restarted from an older checkpoint: the worker learns the server's
        // step from the response and its next pull, and continues from there.
        tracing::warn!(
            worker,
            step,
            server_step = st.step,
            "gradient for a step ahead of this server dropped"
        );
        model.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return Ok((
            pb::PushResponse {
                applied: false,
                dropped: true,
                version: st.step,
            },
            None,
        ));
    }
    if st.contributors.contains(&worker) {
        // A retry (or a replay after a restart elsewhere): the first gradient for this step stands.
        tracing::warn!(worker, step, "second gradient for the same step ignored");
        model.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return Ok((
            pb::PushResponse {
                applied: false,
                dropped: true,
                version: st.step,
            },
            None,
        ));
    }
    add(&mut st)?;
    st.contributors.insert(worker);
    model.worker_steps.send_modify(|s| {
        if let Some(x) = s.get_mut(worker as usize) {
            *x = step + 1;
        }
    });
    model.counters.applied.fetch_add(1, Ordering::Relaxed);
    let mut snapshot = None;
    if st.contributors.len() as u32 >= model.mode.replicas_to_aggregate {
        model.finish_step(&mut st);
        if due(st.step) {
            snapshot = Some(model.snapshot());
        }
    }
    Ok((
        pb::PushResponse {
            applied: true,
            dropped: false,
            version: st.step,
        },
        snapshot,
    ))
}

/// One worker's gradient in async mode: after the staleness bound lets it through, `apply(version)`
/// applies it (an error from it is returned, and the gradient is not counted as applied).
async fn push_async(
    model: &Model,
    worker: u32,
    step: u64,
    apply: impl FnOnce(u64) -> Result<(), Status>,
    max_wait: Duration,
    due: impl Fn(u64) -> bool,
) -> PushResult {
    if let Some(bound) = model.mode.staleness {
        // Stale-synchronous: wait while this worker is more than `bound` steps ahead of the slowest.
        let mut rx = model.worker_steps.subscribe();
        let ahead = |s: &Vec<u64>| {
            let mine = s.get(worker as usize).copied().unwrap_or(0);
            let slowest = s.iter().copied().min().unwrap_or(0);
            mine.saturating_sub(slowest) <= bound as u64
        };
        if tokio::time::timeout(max_wait, rx.wait_for(ahead))
            .await
            .is_err()
        {
            return Err(Status::deadline_exceeded(format!(
                "worker {worker} waited {max_wait:?} for the slowest worker to come within {bound} steps"
            )));
        }
    }
    let version = *model.version.borrow();
    model
        .counters
        .record_staleness(version.saturating_sub(step));
    apply(version)?;
    model.counters.applied.fetch_add(1, Ordering::Relaxed);
    model.worker_steps.send_modify(|s| {
        if let Some(x) = s.get_mut(worker as usize) {
            *x += 1;
        }
    });
    let mut now = 0;
    model.version.send_modify(|x| {
        *x += 1;
        now = *x;
    });
    let snapshot = due(now).then(|| model.snapshot());
    Ok((
        pb::PushResponse {
            applied: true,
            dropped: false,
            version: now,
        },
        snapshot,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_that_ends_before_its_step_takes_its_gradient_back() {
        let mode = Mode {
            sync: true,
            workers: 2,
            replicas_to_aggregate: 2,
            staleness: None,
            reject_non_finite: true,
        };
        let model = Model::new(1, Optimizer::sgd(1.0), mode, vec![]);
        let pending = |w| Pending {
            worker: w,
            source: Box::new(SharedGradient {
                peer: tandem_peer_memory::PeerMemory::of_process(std::process::id())
                    .expect("own pid"),
                worker: w,
                word: 0,
                tag: 0,
                regions: vec![],
            }),
        };
        {
            let mut st = model.sync.lock().unwrap();
            st.contributors.extend([0, 1]);
            st.pending.extend([pending(0), pending(1)]);
        }
        // Worker 1's push is applied (disarmed); worker 0's ends while waiting.
        drop(Withdraw {
            model: &model,
            worker: 1,
            step: 0,
            armed: false,
        });
        drop(Withdraw {
            model: &model,
            worker: 0,
            step: 0,
            armed: true,
        });
        let st = model.sync.lock().unwrap();
        assert_eq!(st.contributors, std::collections::BTreeSet::from([1]));
        assert_eq!(st.pending.len(), 1);
        assert_eq!(st.pending[0].worker, 1);
    }

    #[test]
    fn non_finite_values_are_found_anywhere() {
        let mut xs = vec![1.5f32; 10_000];
        assert!(all_finite(&xs));
        assert!(all_finite(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, 4095, 4096, 9_999] {
                xs[at] = bad;
                assert!(!all_finite(&xs), "{bad} at {at}");
                xs[at] = f32::MAX;
            }
        }
        assert!(
            all_finite(&xs),
            "MAX, MIN_POSITIVE and subnormals are finite"
        );
        assert!(all_finite(&[f32::MIN_POSITIVE, 1e-45, -0.0]));
    }
}
