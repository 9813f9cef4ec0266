//! The worker side: connect to every server, declare the partition map, push gradients and pull
//! parameters in chunks, talking to all servers in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_core::{Error, Result};
use tandem_rendezvous::{AttachToken, JobToken};
use tokio::time::Instant;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::optimizer::Optimizer;
use crate::pb;
use crate::pb::parameter_server_client::ParameterServerClient;
use crate::placement::PartitionMap;
use crate::server::MAX_MESSAGE;

/// Rows of one partition: its index in the map, the local row ids, and their positions in the request.
type RowGroup = (usize, Vec<u64>, Vec<usize>);

type Grpc = ParameterServerClient<InterceptedService<Channel, AttachToken>>;

/// How workers train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingMode {
    /// Synchronous steps (else asynchronous).
    pub sync: bool,
    /// Number of workers.
    pub workers: u32,
    /// Sync: gradients aggregated per step (0: all workers).
    pub replicas_to_aggregate: u32,
    /// Async: staleness bound (`None`: unbounded).
    pub staleness: Option<u32>,
    /// Refuse NaN/Inf gradients (default true).
    pub reject_non_finite: bool,
}

impl TrainingMode {
    /// Synchronous SGD over `workers`, all aggregated.
    pub fn sync(workers: u32) -> Self {
        TrainingMode {
            sync: true,
            workers,
            replicas_to_aggregate: workers,
            staleness: None,
            reject_non_finite: true,
        }
    }
    /// Asynchronous SGD over `workers`, optionally with a staleness bound.
    pub fn asynchronous(workers: u32, staleness: Option<u32>) -> Self {
        TrainingMode {
            sync: false,
            workers,
            replicas_to_aggregate: workers,
            staleness,
            reject_non_finite: true,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// Whether every server used the gradient.
    pub applied: bool,
    /// Whether some server dropped it as late (sync with backup workers).
    pub dropped: bool,
    /// The lowest version reported by the servers after the push.
    pub version: u64,
}

/// A worker's connection to every parameter server.
///
/// ```no_run
/// # async fn demo(addrs: Vec<String>) -> tandem_core::Result<()> {
/// use std::time::Duration;
/// use tandem_ps::client::{Client, TrainingMode};
/// use tandem_ps::init::Init;
/// use tandem_ps::optimizer::Optimizer;
/// use tandem_ps::placement::{ParamDecl, place};
/// use tandem_rendezvous::JobToken;
/// let map = place(&[ParamDecl::new("w", &[10, 1], Init::Zeros)], addrs.len(), 1 << 20)?;
/// let token = JobToken::new("job-secret-token")?;
/// let c = Client::connect(&addrs, &token, 0, map, Optimizer::sgd(0.1), TrainingMode::sync(4), Duration::from_secs(60)).await?;
/// let (version, params) = c.pull(0).await?;
/// let grad = vec![0.0f32; 10];
/// c.push(version, &[("w", &grad)]).await?;
/// c.done().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    incarnations: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    /// Per server: its process id when both sides proved they can read each other's memory (same
    /// machine), so tensors move by address; 0 when they go through the gRPC stream.
    shared: std::sync::Arc<Vec<AtomicU32>>,
    servers: Vec<Grpc>,
    addrs: Vec<String>,
    map: PartitionMap,
    worker: u32,
    chunk_bytes: usize,
    timeout: Duration,
}

/// One server's answer to a pull: the streamed chunks, or where to read the values.
#[derive(Debug, Clone)]
enum Reply {
    Chunks(Vec<pb::PullChunk>),
    Shared(pb::SharedPull),
}

impl Reply {
    fn incarnation(&self) -> u64 {
        match self {
            Reply::Chunks(c) => c.first().map_or(0, |c| c.incarnation),
            Reply::Shared(s) => s.incarnation,
        }
    }
}

/// A call that failed: the server's answer, or no answer.
enum Failed {
    Status(Status),
    Other(Error),
}

/// How long a worker keeps retrying a copy out of a server's memory that raced an update before it
/// pulls through the stream instead.
const SHARED_READ_PATIENCE: Duration = Duration::from_millis(100);

/// The outcome of one push over the servers' answers.
fn outcome(results: &[pb::PushResponse]) -> PushOutcome {
    PushOutcome {
        applied: results.iter().all(|r| r.applied),
        dropped: results.iter().any(|r| r.dropped),
        version: results.iter().map(|r| r.version).min().unwrap_or(0),
    }
}

/// The Tandem error for a failed call, decided on the status code and the typed reason the server
/// attached (never on the message text).
fn status_error(addr: &str, what: &str, s: Status, waited: Duration) -> Error {
    let ctx = format!("{what} at the parameter server {addr}");
    if crate::failure::reason_of(&s) == crate::pb::Reason::PartiallyApplied {
        return Error::PartiallyApplied {
            context: ctx,
            applied: s.message().to_string(),
        };
    }
    match s.code() {
        Code::Unauthenticated => Error::Authentication {
            peer: format!("parameter server {addr}"),
            reason: s.message().into(),
        },
        Code::FailedPrecondition => Error::Precondition {
            context: ctx,
            problem: s.message().to_string(),
        },
        Code::NotFound | Code::InvalidArgument | Code::AlreadyExists | Code::OutOfRange => {
            Error::invalid(ctx, s.message().to_string())
        }
        Code::DeadlineExceeded => Error::timeout(format!("{ctx}: {}", s.message()), waited),
        _ => Error::transport(ctx, s.message().to_string()),
    }
}

async fn connect_one(addr: &str, token: &JobToken, deadline: Instant) -> Result<Grpc> {
    tandem_core::cluster::check_address("parameter server address", addr)?;
    let header: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token.as_str()).parse().map_err(|_| {
            Error::config(
                "TANDEM_JOB_TOKEN",
                "the token cannot be sent as gRPC metadata",
            )
        })?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::config("parameter server address", format!("{addr:?}: {e}")))?
        .tcp_nodelay(true)
        // The server buffers at most this much of a pull per worker before the worker reads it.
        .initial_stream_window_size(crate::server::STREAM_WINDOW)
        .initial_connection_window_size(crate::server::CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = endpoint
            .clone()
            .connect_timeout(left.clamp(Duration::from_millis(10), Duration::from_secs(3)));
        let err = match tokio::time::timeout(left, attempt.connect()).await {
            Ok(Ok(ch)) => {
                return Ok(ParameterServerClient::with_interceptor(
                    ch,
                    AttachToken::from_token(header.clone()),
                )
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_string(),
        };
        if Instant::now() + backoff >= deadline {
            return Err(Error::timeout(
                format!("the parameter server at {addr} (last error: {err})"),
                left,
            ));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

impl Client {
    /// Connects to every server (retrying until `deadline`) and declares the partition map on each.
    pub async fn connect(
        addrs: &[String],
        token: &JobToken,
        worker: u32,
        map: PartitionMap,
        optimizer: Optimizer,
        mode: TrainingMode,
        deadline: Duration,
    ) -> Result<Client> {
        if addrs.len() != map.servers {
            return Err(Error::invalid(
                "servers",
                format!(
                    "{} addresses for a map of {} servers",
                    addrs.len(),
                    map.servers
                ),
            ));
        }
        if worker >= mode.workers {
            return Err(Error::invalid(
                "worker",
                format!("worker {worker} is not below the {} workers", mode.workers),
            ));
        }
        optimizer.validate()?;
        let end = Instant::now() + deadline;
        let servers =
            futures::future::try_join_all(addrs.iter().map(|a| connect_one(a, token, end))).await?;
        let client = Client {
            incarnations: std::sync::Arc::new(std::sync::Mutex::new(vec![0; servers.len()])),
            shared: std::sync::Arc::new((0..servers.len()).map(|_| AtomicU32::new(0)).collect()),
            servers,
            addrs: addrs.to_vec(),
            map,
            worker,
            chunk_bytes: 1 << 20,
            timeout: deadline,
        };
        let mode_pb = pb::Mode {
            sync: mode.sync,
            workers: mode.workers,
            replicas_to_aggregate: mode.replicas_to_aggregate,
            bounded: mode.staleness.is_some(),
            staleness: mode.staleness.unwrap_or(0),
            reject_non_finite: mode.reject_non_finite,
        };
        let opt_pb = pb::Optimizer {
            kind: optimizer.kind_name().into(),
            lr: optimizer.lr as f64,
            momentum: optimizer.momentum as f64,
            beta1: optimizer.beta1 as f64,
            beta2: optimizer.beta2 as f64,
            eps: optimizer.eps as f64,
            weight_decay: optimizer.weight_decay as f64,
            clip_norm: optimizer.clip_norm as f64,
            decay_rate: optimizer.decay_rate as f64,
            decay_steps: optimizer.decay_steps,
        };
        let hash = client.map.hash();
        let declares = (0..client.servers.len()).map(|s| {
            let partitions: Vec<pb::Partition> = client
                .map
                .parts
                .iter()
                .filter(|p| p.server == s)
                .map(|p| {
                    let decl = client.map.param(&p.param);
                    let (kind, a, b, seed) =
                        decl.map_or(("zeros", 0.0, 0.0, 0), |d| d.init.to_wire());
                    let shape: Vec<u64> = match decl.map(|d| d.shape.as_slice()) {
                        Some([]) | None => vec![1],
                        Some(s) => s.iter().map(|d| *d as u64).collect(),
                    };
                    pb::Partition {
                        param: p.param.clone(),
                        part: p.part,
                        shape,
                        row_start: p.row_start as u64,
                        rows: p.rows as u64,
                        dtype: "f32".into(),
                        init: Some(pb::Initializer {
                            kind: kind.into(),
                            a,
                            b,
                            seed,
                        }),
                    }
                })
                .collect();
            let req = pb::DeclareRequest {
                partitions,
                optimizer: Some(opt_pb.clone()),
                mode: Some(mode_pb),
                map_hash: hash,
            };
            let mut c = client.servers[s].clone();
            let addr = client.addrs[s].clone();
            async move {
                c.declare(req)
                    .await
                    .map_err(|e| status_error(&addr, "declaring parameters", e, deadline))
            }
        });
        futures::future::try_join_all(declares).await?;
        if tandem_peer_memory::allowed_by_env() {
            client.attach_all().await;
        }
        Ok(client)
    }

    /// Tries the same-machine data plane with every server: each side reads the other's word. A
    /// server where that fails (another machine, a kernel or container that forbids it) is used
    /// through the gRPC stream; the outcome is logged once per server.
    async fn attach_all(&self) {
        let word = tandem_peer_memory::LocalWord::new();
        let advert = word.advert();
        let calls = (0..self.servers.len()).map(|s| {
            let mut c = self.servers[s].clone();
            let req = pb::AttachRequest {
                advert: advert.clone(),
            };
            async move {
                let r = tokio::time::timeout(Duration::from_secs(10), c.attach(req)).await;
                (s, r)
            }
        });
        for (s, r) in futures::future::join_all(calls).await {
            let addr = &self.addrs[s];
            let outcome = match r {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    if !resp.ok {
                        Err(resp.reason)
                    } else {
                        match tandem_peer_memory::PeerMemory::parse(&resp.advert) {
                            Some(peer) => peer.probe().map(|()| peer.pid()).map_err(|e| {
                                format!("the worker cannot read the server's memory: {e}")
                            }),
                            None => Err(format!("unreadable advert {:?}", resp.advert)),
                        }
                    }
                }
                Ok(Err(st)) => Err(st.message().to_string()),
                Err(_) => Err("no answer to attach within 10 s".into()),
            };
            match outcome {
                Ok(pid) => {
                    self.shared[s].store(pid, Ordering::Relaxed);
                    tracing::debug!(%addr, "tensors move by same-host memory reads");
                }
                Err(why) => {
                    tracing::info!(%addr, reason = %why, "tensors move through the gRPC stream")
                }
            }
        }
    }

    /// The server's pid when the same-machine data plane is on for server `s`.
    fn shared_pid(&self, s: usize) -> Option<u32> {
        Some(self.shared[s].load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Turns the same-machine data plane off for server `s` (it restarted, or a read failed).
    fn unshare(&self, s: usize, why: &str) {
        if self.shared[s].swap(0, Ordering::Relaxed) != 0 {
            tracing::warn!(addr = %self.addrs[s], reason = %why, "falling back to the gRPC stream");
        }
    }

    /// Whether every server is reached through the same-machine data plane.
    pub fn same_host(&self) -> bool {
        (0..self.servers.len()).all(|s| self.shared_pid(s).is_some())
    }

    /// Calls server `s`, retrying with backoff while it is unreachable (restarting, say) until the
    /// client's deadline; other errors return at once.
    async fn call<T, F, Fut>(&self, s: usize, what: &str, wait: Duration, f: F) -> Result<T>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        self.call_raw(s, what, wait, f).await.map_err(|e| match e {
            Failed::Status(st) => status_error(&self.addrs[s], what, st, wait),
            Failed::Other(e) => e,
        })
    }

    /// Like [`Client::call`], handing back the server's status when it answered with one, so the
    /// caller can act on its typed reason.
    async fn call_raw<T, F, Fut>(
        &self,
        s: usize,
        what: &str,
        wait: Duration,
        mut f: F,
    ) -> std::result::Result<T, Failed>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let addr = &self.addrs[s];
        let end = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            match tokio::time::timeout(wait, f(self.servers[s].clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(st)) if st.code() == Code::Unavailable || st.code() == Code::Unknown => {
                    if Instant::now() + backoff >= end {
                        return Err(Failed::Status(st));
                    }
                    tracing::warn!(%addr, error = %st.message(), "parameter server unreachable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(Err(st)) => return Err(Failed::Status(st)),
                Err(_) => {
                    return Err(Failed::Other(Error::timeout(
                        format!("{what} at the parameter server {addr}"),
                        wait,
                    )));
                }
            }
        }
    }

    /// Pulls from one server, letting it wait at most `wait` for `min_version`; `None` when the
    /// version was not reached in that time.
    async fn pull_one(
        &self,
        s: usize,
        min_version: u64,
        incarnation: u64,
        wait: Duration,
    ) -> Result<Option<Reply>> {
        let req = pb::PullRequest {
            worker: self.worker,
            min_version,
            parts: vec![],
            timeout_ms: wait.as_millis().min(u64::MAX as u128) as u64,
            incarnation,
        };
        if self.shared_pid(s).is_some() {
            let r = self
                .call(
                    s,
                    "pulling",
                    wait + Duration::from_secs(10),
                    move |mut c| {
                        let req = req.clone();
                        async move {
                            match c.pull_shared(req).await {
                                Ok(r) => Ok(Some(r.into_inner())),
                                Err(st) if st.code() == Code::DeadlineExceeded => Ok(None),
                                Err(st) => Err(st),
                            }
                        }
                    },
                )
                .await?;
            return Ok(r.map(Reply::Shared));
        }
        self.pull_stream(s, req, wait)
            .await
            .map(|r| r.map(Reply::Chunks))
    }

    /// Pulls from server `s` through the gRPC stream.
    async fn pull_stream(
        &self,
        s: usize,
        req: pb::PullRequest,
        wait: Duration,
    ) -> Result<Option<Vec<pb::PullChunk>>> {
        self.call(
            s,
            "pulling",
            wait + Duration::from_secs(10),
            move |mut c| {
                let req = req.clone();
                async move {
                    let mut stream = match c.pull(req).await {
                        Ok(r) => r.into_inner(),
                        Err(st) if st.code() == Code::DeadlineExceeded => return Ok(None),
                        Err(st) => return Err(st),
                    };
                    let mut chunks = Vec::new();
                    while let Some(ch) = stream.message().await? {
                        chunks.push(ch);
                    }
                    Ok(Some(chunks))
                }
            },
        )
        .await
    }

    /// The incarnation of every server, from their stats.
    async fn incarnations_now(&self) -> Result<Vec<u64>> {
        let calls = (0..self.servers.len()).map(|s| {
            self.call(s, "stats", Duration::from_secs(10), |mut c| async move {
                c.stats(pb::StatsRequest {})
                    .await
                    .map(|r| r.into_inner().incarnation)
            })
        });
        futures::future::try_join_all(calls).await
    }

    /// Pulls from every server in parallel, waiting in slices of at most 2 s. If a server turns out
    /// to have restarted from a checkpoint (seen in a reply, or in its stats while waiting), the
    /// others are asked again without waiting, so the worker learns the restored step instead of
    /// waiting for a version that needs its own gradients first.
    async fn pull_all(&self, min_version: u64) -> Result<Vec<Reply>> {
        use futures::stream::{FuturesUnordered, StreamExt as _};
        let known: Vec<u64> = self
            .incarnations
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let n = self.servers.len();
        let end = Instant::now() + self.timeout;
        let mut results: Vec<Option<Reply>> = (0..n).map(|_| None).collect();
        let changed = |s: usize, inc: u64| known.get(s).is_some_and(|k| *k != 0 && *k != inc);
        let mut restarted = false;
        while !restarted && results.iter().any(Option::is_none) {
            let slice = end
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            {
                let mut pending: FuturesUnordered<_> = (0..n)
                    .filter(|s| results[*s].is_none())
                    .map(|s| {
                        let inc = known.get(s).copied().unwrap_or(0);
                        async move { (s, self.pull_one(s, min_version, inc, slice).await) }
                    })
                    .collect();
                while let Some((s, r)) = pending.next().await {
                    if let Some(reply) = r? {
                        restarted |= changed(s, reply.incarnation());
                        results[s] = Some(reply);
                        if restarted {
                            break;
                        }
                    }
                }
            }
            if restarted || results.iter().all(Option::is_some) {
                break;
            }
            let now = self.incarnations_now().await?;
            restarted = now.iter().enumerate().any(|(s, inc)| changed(s, *inc));
            if !restarted && Instant::now() >= end {
                return Err(Error::timeout(
                    format!(
                        "parameters at version {min_version} from every parameter server (a worker may be missing)"
                    ),
                    self.timeout,
                ));
            }
        }
        if restarted {
            tracing::warn!("a parameter server restarted; resuming from its step");
            for (s, slot) in results.iter_mut().enumerate() {
                if slot.is_none() {
                    *slot = self.pull_one(s, 0, 0, Duration::ZERO).await?;
                }
            }
        }
        results
            .into_iter()
            .enumerate()
            .map(|(s, r)| {
                r.ok_or_else(|| {
                    Error::transport("pulling", format!("server {} sent nothing", self.addrs[s]))
                })
            })
            .collect()
    }

    /// Writes a checkpoint on every server now; returns the versions written.
    pub async fn checkpoint(&self) -> Result<Vec<u64>> {
        let calls = (0..self.servers.len()).map(|s| {
            self.call(s, "checkpoint", self.timeout, |mut c| async move {
                c.checkpoint(pb::CheckpointRequest {})
                    .await
                    .map(|r| r.into_inner().version)
            })
        });
        futures::future::try_join_all(calls).await
    }

    /// The partition map in use.
    pub fn map(&self) -> &PartitionMap {
        &self.map
    }

    /// Pulls every parameter once each server has reached `min_version` (sync: the step whose
    /// parameters you want). Returns the lowest server version and the full tensors by name.
    pub async fn pull(&self, min_version: u64) -> Result<(u64, HashMap<String, Vec<f32>>)> {
        let mut out = HashMap::new();
        let version = self.pull_into(min_version, &mut out).await?;
        Ok((version, out))
    }

    /// Like [`Client::pull`], writing into `out` and reusing its vectors (a training loop that pulls
    /// every step then allocates nothing); returns the version.
    pub async fn pull_into(
        &self,
        min_version: u64,
        out: &mut HashMap<String, Vec<f32>>,
    ) -> Result<u64> {
        for p in &self.map.params {
            let v = out.entry(p.name.clone()).or_default();
            if v.len() != p.numel() {
                v.clear();
                v.resize(p.numel(), 0.0);
            }
        }
        out.retain(|name, _| self.map.param(name).is_some());
        let results = self.pull_all(min_version).await?;
        let mut version = u64::MAX;
        let mut filled: HashMap<(String, u32), usize> = HashMap::new();
        for (s, reply) in results.into_iter().enumerate() {
            if let Ok(mut inc) = self.incarnations.lock() {
                let i = reply.incarnation();
                if i != 0 {
                    inc[s] = i;
                }
            }
            let chunks = match reply {
                Reply::Chunks(chunks) => chunks,
                Reply::Shared(sp) => match self.read_shared(s, &sp, out).await {
                    Ok(()) => {
                        version = version.min(sp.version);
                        for p in &sp.parts {
                            *filled.entry((p.param.clone(), p.part)).or_default() += p.len as usize;
                        }
                        continue;
                    }
                    Err(why) => {
                        // Raced with an update, or the server is not the process attached: ask
                        // again through the stream for the version it just reported.
                        self.unshare_if_gone(s, &sp, &why);
                        let req = pb::PullRequest {
                            worker: self.worker,
                            min_version: sp.version,
                            parts: vec![],
                            timeout_ms: self.timeout.as_millis().min(u64::MAX as u128) as u64,
                            incarnation: sp.incarnation,
                        };
                        self.pull_stream(s, req, self.timeout)
                            .await?
                            .ok_or_else(|| {
                                Error::timeout(
                                    format!("parameters from {} after a torn read", self.addrs[s]),
                                    self.timeout,
                                )
                            })?
                    }
                },
            };
            for ch in chunks {
                version = version.min(ch.version);
                let part = self
                    .map
                    .parts
                    .iter()
                    .find(|p| p.param == ch.param && p.part == ch.part && p.server == s)
                    .ok_or_else(|| {
                        Error::transport(
                            "pulling",
                            format!("server {s} sent unknown partition {}/{}", ch.param, ch.part),
                        )
                    })?;
                let dst = out
                    .get_mut(&ch.param)
                    .ok_or_else(|| Error::transport("pulling", "unknown parameter"))?;
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut dst[part.range()]);
                let off = ch.offset as usize;
                if off + ch.data.len() > bytes.len() {
                    return Err(Error::transport(
                        "pulling",
                        format!("chunk of {}/{} overruns the partition", ch.param, ch.part),
                    ));
                }
                bytes[off..off + ch.data.len()].copy_from_slice(&ch.data);
                *filled.entry((ch.param, ch.part)).or_default() += ch.data.len();
            }
        }
        for p in &self.map.parts {
            let got = filled.get(&(p.param.clone(), p.part)).copied().unwrap_or(0);
            if got != p.numel() * 4 {
                return Err(Error::transport(
                    "pulling",
                    format!(
                        "partition {}/{} arrived with {got} of {} bytes",
                        p.param,
                        p.part,
                        p.numel() * 4
                    ),
                ));
            }
        }
        Ok(if version == u64::MAX {
            min_version
        } else {
            version
        })
    }

    /// Copies server `s`'s partitions straight out of its memory into `out`, checking each
    /// partition's sequence word before and after (a torn read is an error, never silent).
    async fn read_shared(
        &self,
        s: usize,
        sp: &pb::SharedPull,
        out: &mut HashMap<String, Vec<f32>>,
    ) -> std::result::Result<(), String> {
        if self.shared_pid(s) != Some(sp.pid) {
            return Err(format!("the server now runs as process {}", sp.pid));
        }
        let peer = tandem_peer_memory::PeerMemory::of_process(sp.pid)
            .ok_or_else(|| format!("bad pid {}", sp.pid))?;
        for sp_part in &sp.parts {
            let part = self
                .map
                .parts
                .iter()
                .find(|p| p.param == sp_part.param && p.part == sp_part.part && p.server == s)
                .ok_or_else(|| format!("unknown partition {}/{}", sp_part.param, sp_part.part))?;
            let dst = out
                .get_mut(&sp_part.param)
                .ok_or_else(|| format!("unknown parameter {}", sp_part.param))?;
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut dst[part.range()]);
            if sp_part.len != bytes.len() as u64 {
                return Err(format!(
                    "partition {}/{} is {} bytes on the server, {} here",
                    sp_part.param,
                    sp_part.part,
                    sp_part.len,
                    bytes.len()
                ));
            }
            let to_addr = |a: u64| usize::try_from(a).map_err(|e| e.to_string());
            let (addr, seq_addr) = (to_addr(sp_part.addr)?, to_addr(sp_part.seq_addr)?);
            let seq_now = |peer: &tandem_peer_memory::PeerMemory| {
                peer.read_u64(seq_addr).map_err(|e| e.to_string())
            };
            // A seqlock read: the copy counts if the word was even (no update being written) and
            // unchanged around it. An update racing the copy (async mode) is waited out a few
            // times before the caller falls back to the stream; values newer than the reply's
            // version are fine, since a pull asks for at least a version.
            let deadline = Instant::now() + SHARED_READ_PATIENCE;
            loop {
                let before = seq_now(&peer)?;
                if before < sp_part.seq {
                    return Err(format!(
                        "sequence word went back from {} to {before}",
                        sp_part.seq
                    ));
                }
                if before % 2 == 0 {
                    peer.read(addr, bytes).map_err(|e| e.to_string())?;
                    if seq_now(&peer)? == before {
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    return Err("updated during every copy".into());
                }
                // Never a thread sleep here: this runs on the async runtime.
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        }
        Ok(())
    }

    /// After a failed shared read: stops using the data plane with a server that is not the
    /// process attached (restarted); a read that merely raced an update keeps it.
    fn unshare_if_gone(&self, s: usize, sp: &pb::SharedPull, why: &str) {
        if self.shared_pid(s) != Some(sp.pid) || !why.starts_with("updated") {
            self.unshare(s, why);
        } else {
            tracing::debug!(addr = %self.addrs[s], reason = %why, "pull raced an update; streaming it");
        }
    }

    /// Pushes through the same-machine data plane: each server copies its partitions out of
    /// `grads` while the call is open. Returns the servers that must be pushed through the stream
    /// instead (not attached any more, or a read failed) with the outcomes of the others.
    async fn push_shared(
        &self,
        step: u64,
        grads: &[(&str, &[u8])],
    ) -> Result<(Vec<pb::PushResponse>, Vec<usize>)> {
        let word = tandem_peer_memory::LocalWord::new();
        let mut per_server: Vec<Vec<pb::Region>> = vec![Vec::new(); self.servers.len()];
        for (name, all) in grads {
            for p in self.map.parts_of(name) {
                let r = p.range();
                let bytes = &all[r.start * 4..r.end * 4];
                per_server[p.server].push(pb::Region {
                    param: p.param.clone(),
                    part: p.part,
                    addr: bytes.as_ptr() as usize as u64,
                    len: bytes.len() as u64,
                });
            }
        }
        let wait = self.timeout + Duration::from_secs(10);
        let pushes = per_server
            .into_iter()
            .enumerate()
            .filter(|(_, regions)| !regions.is_empty())
            .map(|(s, regions)| {
                let req = pb::SharedPush {
                    worker: self.worker,
                    step,
                    pid: std::process::id(),
                    word: word.address() as u64,
                    tag: word.nonce(),
                    parts: regions,
                };
                async move {
                    let r = self
                        .call_raw(s, "pushing", wait, move |mut c| {
                            let req = req.clone();
                            async move { c.push_shared(req).await.map(|r| r.into_inner()) }
                        })
                        .await;
                    (s, r)
                }
            });
        let results = futures::future::join_all(pushes).await;
        // The servers have read what they will read: from here the gradients are the caller's.
        drop(word);
        let mut done = Vec::new();
        let mut again = Vec::new();
        for (s, r) in results {
            match r {
                Ok(resp) => done.push(resp),
                // Nothing of this gradient was applied there: the same gradient goes through the
                // stream. Any other failure (a part applied included) is the caller's.
                Err(Failed::Status(st)) if crate::failure::may_push_through_stream(&st) => {
                    self.unshare(s, st.message());
                    again.push(s);
                }
                Err(Failed::Status(st)) => {
                    return Err(status_error(&self.addrs[s], "pushing", st, wait));
                }
                Err(Failed::Other(e)) => return Err(e),
            }
        }
        Ok((done, again))
    }

    /// Pushes `grads` (whole tensors as bytes) to the servers `only` through the gRPC stream.
    async fn push_streamed_to(
        &self,
        step: u64,
        grads: &[(&str, &[u8])],
        only: &[usize],
    ) -> Result<Vec<pb::PushResponse>> {
        let whole: Vec<(String, Bytes)> = grads
            .iter()
            .map(|(n, b)| (n.to_string(), Bytes::copy_from_slice(b)))
            .collect();
        self.push_chunks(step, whole, Some(only)).await
    }

    /// Pushes by address to the servers on this machine and through the stream to the others.
    async fn push_views(&self, step: u64, grads: &[(&str, &[u8])]) -> Result<PushOutcome> {
        let (mut results, again) = self.push_shared(step, grads).await?;
        if !again.is_empty() {
            results.extend(self.push_streamed_to(step, grads, &again).await?);
        }
        Ok(outcome(&results))
    }

    /// Pushes gradients for `step` (every parameter named must be declared and have its full size).
    pub async fn push(&self, step: u64, grads: &[(&str, &[f32])]) -> Result<PushOutcome> {
        for (name, g) in grads {
            self.check_grad(name, g.len())?;
        }
        if self.same_host() {
            let views: Vec<(&str, &[u8])> = grads
                .iter()
                .map(|(n, g)| (*n, bytemuck::cast_slice::<f32, u8>(g)))
                .collect();
            return self.push_views(step, &views).await;
        }
        let mut whole = Vec::with_capacity(grads.len());
        for (name, g) in grads {
            whole.push((
                name.to_string(),
                Bytes::copy_from_slice(bytemuck::cast_slice(g)),
            ));
        }
        self.push_bytes(step, whole).await
    }

    /// Like [`Client::push`], taking the gradients by value so they are sent without a copy.
    pub async fn push_owned(
        &self,
        step: u64,
        grads: Vec<(String, Vec<f32>)>,
    ) -> Result<PushOutcome> {
        for (name, g) in &grads {
            self.check_grad(name, g.len())?;
        }
        if self.same_host() {
            let views: Vec<(&str, &[u8])> = grads
                .iter()
                .map(|(n, g)| (n.as_str(), bytemuck::cast_slice::<f32, u8>(g)))
                .collect();
            return self.push_views(step, &views).await;
        }
        let mut whole = Vec::with_capacity(grads.len());
        for (name, g) in grads {
            let n = g.len();
            whole.push((name, tandem_core::Tensor::from_vec(g, &[n])?.into_bytes()));
        }
        self.push_bytes(step, whole).await
    }

    fn check_grad(&self, name: &str, len: usize) -> Result<()> {
        let decl = self
            .map
            .param(name)
            .ok_or_else(|| Error::invalid("gradient", format!("unknown parameter {name:?}")))?;
        if len != decl.numel() {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: decl.shape.clone(),
                got: vec![len],
            });
        }
        Ok(())
    }

    /// Cuts each whole gradient into its partitions' chunks (zero-copy slices) and streams them.
    async fn push_bytes(&self, step: u64, grads: Vec<(String, Bytes)>) -> Result<PushOutcome> {
        let results = self.push_chunks(step, grads, None).await?;
        Ok(outcome(&results))
    }

    /// Streams the chunks of `grads` to every server holding a partition (or only to `only`).
    async fn push_chunks(
        &self,
        step: u64,
        grads: Vec<(String, Bytes)>,
        only: Option<&[usize]>,
    ) -> Result<Vec<pb::PushResponse>> {
        let mut per_server: Vec<Vec<pb::PushChunk>> = vec![Vec::new(); self.servers.len()];
        for (name, all) in &grads {
            for p in self.map.parts_of(name) {
                let r = p.range();
                let bytes = all.slice(r.start * 4..r.end * 4);
                let mut off = 0;
                while off < bytes.len() {
                    let end = (off + self.chunk_bytes).min(bytes.len());
                    per_server[p.server].push(pb::PushChunk {
                        worker: self.worker,
                        step,
                        param: p.param.clone(),
                        part: p.part,
                        offset: off as u64,
                        data: bytes.slice(off..end),
                    });
                    off = end;
                }
            }
        }
        let wait = self.timeout + Duration::from_secs(10);
        let pushes = per_server
            .into_iter()
            .enumerate()
            .filter(|(s, c)| !c.is_empty() && only.is_none_or(|o| o.contains(s)))
            .map(|(s, chunks)| {
                self.call(s, "pushing", wait, move |mut c| {
                    let chunks = chunks.clone();
                    async move {
                        c.push(tokio_stream::iter(chunks))
                            .await
                            .map(|r| r.into_inner())
                    }
                })
            });
        futures::future::try_join_all(pushes).await
    }

    /// Splits global row `ids` of `name` by partition: `(part index in the map, local rows, positions)`.
    fn rows_by_part(&self, name: &str, ids: &[u64]) -> Result<(usize, Vec<RowGroup>)> {
        let decl = self
            .map
            .param(name)
            .ok_or_else(|| Error::invalid("rows", format!("unknown parameter {name:?}")))?;
        let (rows, row_len) = decl.rows_and_row_len();
        let parts: Vec<(usize, &crate::placement::Part)> = self
            .map
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.param == name)
            .collect();
        let mut groups: Vec<(usize, Vec<u64>, Vec<usize>)> = parts
            .iter()
            .map(|(i, _)| (*i, Vec::new(), Vec::new()))
            .collect();
        for (pos, id) in ids.iter().enumerate() {
            if *id as usize >= rows {
                return Err(Error::invalid(
                    "rows",
                    format!("row {id} of {name:?} is beyond its {rows} rows"),
                ));
            }
            let (k, (_, p)) = parts
                .iter()
                .enumerate()
                .find(|(_, (_, p))| (p.row_start..p.row_start + p.rows).contains(&(*id as usize)))
                .ok_or_else(|| {
                    Error::invalid("rows", format!("row {id} of {name:?} is in no partition"))
                })?;
            groups[k].1.push(*id - p.row_start as u64);
            groups[k].2.push(pos);
        }
        Ok((
            row_len,
            groups.into_iter().filter(|g| !g.1.is_empty()).collect(),
        ))
    }

    /// Reads rows `ids` of the table `name`: `ids.len() * row length` values, in the order asked.
    pub async fn pull_rows(&self, name: &str, ids: &[u64]) -> Result<Vec<f32>> {
        let (row_len, groups) = self.rows_by_part(name, ids)?;
        let calls = groups.iter().map(|(pi, local, _)| {
            let p = &self.map.parts[*pi];
            let req = pb::RowsRequest {
                param: p.param.clone(),
                part: p.part,
                rows: local.clone(),
            };
            self.call(p.server, "pulling rows", self.timeout, move |mut c| {
                let req = req.clone();
                async move { c.pull_rows(req).await.map(|r| r.into_inner().data) }
            })
        });
        let results = futures::future::try_join_all(calls).await?;
        let mut out = vec![0.0f32; ids.len() * row_len];
        for ((_, local, positions), data) in groups.iter().zip(results) {
            if data.len() != local.len() * row_len * 4 {
                return Err(Error::transport(
                    "pulling rows",
                    format!("{} bytes for {} rows", data.len(), local.len()),
                ));
            }
            for (k, pos) in positions.iter().enumerate() {
                let dst: &mut [u8] =
                    bytemuck::cast_slice_mut(&mut out[pos * row_len..(pos + 1) * row_len]);
                dst.copy_from_slice(&data[k * row_len * 4..(k + 1) * row_len * 4]);
            }
        }
        Ok(out)
    }

    /// Applies gradients to rows `ids` of the table `name` (`grads` holds `ids.len() * row length`
    /// values); only those rows and their optimizer state change. Repeated ids add up.
    pub async fn push_rows(&self, name: &str, ids: &[u64], grads: &[f32]) -> Result<()> {
        let (row_len, groups) = self.rows_by_part(name, ids)?;
        if grads.len() != ids.len() * row_len {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![ids.len(), row_len],
                got: vec![grads.len()],
            });
        }
        let rows_per_call = ((1usize << 20) / (row_len * 4).max(1)).max(1);
        let mut calls = Vec::new();
        for (pi, local, positions) in &groups {
            let p = &self.map.parts[*pi];
            for (lc, pc) in local
                .chunks(rows_per_call)
                .zip(positions.chunks(rows_per_call))
            {
                let mut data = Vec::with_capacity(lc.len() * row_len * 4);
                for pos in pc {
                    data.extend_from_slice(bytemuck::cast_slice(
                        &grads[pos * row_len..(pos + 1) * row_len],
                    ));
                }
                let req = pb::RowsPush {
                    worker: self.worker,
                    param: p.param.clone(),
                    part: p.part,
                    rows: lc.to_vec(),
                    data: data.into(),
                };
                calls.push(
                    self.call(p.server, "pushing rows", self.timeout, move |mut c| {
                        let req = req.clone();
                        async move { c.push_rows(req).await.map(|_| ()) }
                    }),
                );
            }
        }
        futures::future::try_join_all(calls).await.map(|_| ())
    }

    /// Says this worker is done; servers stop once every worker has.
    pub async fn done(&self) -> Result<()> {
        let calls = (0..self.servers.len()).map(|s| {
            let mut c = self.servers[s].clone();
            let addr = self.addrs[s].clone();
            let worker = self.worker;
            async move {
                c.done(pb::DoneRequest { worker })
                    .await
                    .map_err(|e| status_error(&addr, "done", e, Duration::ZERO))
            }
        });
        futures::future::try_join_all(calls).await.map(|_| ())
    }

    /// Each server's counters.
    pub async fn stats(&self) -> Result<Vec<pb::StatsResponse>> {
        let calls = (0..self.servers.len()).map(|s| {
            let mut c = self.servers[s].clone();
            let addr = self.addrs[s].clone();
            async move {
                c.stats(pb::StatsRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| status_error(&addr, "stats", e, Duration::ZERO))
            }
        });
        futures::future::try_join_all(calls).await
    }
}
