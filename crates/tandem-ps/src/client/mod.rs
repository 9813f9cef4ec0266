//! The worker side: connect to every server, declare the partition map, push gradients and pull
//! parameters in chunks, talking to all servers in parallel.
//!
//! Why the client, not the servers, drives placement: every worker computes the same partition map
//! from the same declarations, declares it on every server, and the servers refuse a worker whose
//! map differs (its hash), so no coordinator is needed and a mismatch fails loudly at start.
//! Per server, the client picks the data plane once (attach: by address on the same machine, else
//! the gRPC streams) and falls back to the streams only on a typed reason that says nothing was
//! applied. A server that restarts from its checkpoint is noticed by its incarnation and the
//! worker resumes from the server's step instead of waiting for a version that will not come.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tandem_core::compression::Compression;
use tandem_core::{Error, Result};
use tandem_rendezvous::JobToken;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::optimizer::Optimizer;
use crate::pb;
use crate::placement::PartitionMap;

mod compress;
mod connect;
mod failover;
pub(crate) use crate::protocol::connect_one;
mod retry;
mod rows;
mod same_host;
mod stream;

use connect::status_error;

/// Rows of one partition: its index in the map, the local row ids, and their positions in the request.
type RowGroup = (usize, Vec<u64>, Vec<usize>);

pub(crate) use crate::protocol::Grpc;

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
    /// Per server: the incarnation it last answered with (a restart shows as a new one).
    incarnations: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    /// Per server: its process id when both sides proved they can read each other's memory (same
    /// machine), so tensors move by address; 0 when they go through the gRPC stream.
    shared: std::sync::Arc<Vec<AtomicU32>>,
    /// Each server's channel and address, switched to its standby when it fails.
    routes: std::sync::Arc<failover::Routes>,
    /// The job's token, sent on every call.
    token: JobToken,
    /// How connections are secured (also to standbys).
    security: tandem_tls::Security,
    /// Where every partition lives.
    map: PartitionMap,
    /// This worker's index.
    worker: u32,
    /// Bytes per pushed chunk.
    chunk_bytes: usize,
    /// Deadline of each call.
    timeout: Duration,
    /// Sync or async training, as declared.
    mode: TrainingMode,
    /// The next push's id: random start, so a restarted worker never reuses its ids.
    push_ids: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// How gradients and parameters travel through the gRPC streams (settled with the servers
    /// when connecting; `auto` resolved). See [`crate::wire`].
    compression: Compression,
    /// Top-k: per partition, what earlier pushes did not send yet (error feedback).
    residuals: std::sync::Arc<std::sync::Mutex<Residuals>>,
}

/// Top-k's residual of each partition (param, part) this worker pushed.
type Residuals = HashMap<(String, u32), Vec<f32>>;

/// One server's answer to a pull: the streamed chunks, or where to read the values.
#[derive(Debug, Clone)]
enum Reply {
    /// Values streamed in chunks.
    Chunks(Vec<pb::PullChunk>),
    /// Values written into this worker's memory by the server (same machine).
    Shared(pb::SharedPull),
}

impl Reply {
    /// The incarnation of the server that answered (0 when it said nothing).
    fn incarnation(&self) -> u64 {
        match self {
            Reply::Chunks(c) => c.first().map_or(0, |c| c.incarnation),
            Reply::Shared(s) => s.incarnation,
        }
    }

    /// The server's standby, as its answer says (empty: none).
    fn standby(&self) -> &str {
        match self {
            Reply::Chunks(c) => c.first().map_or("", |c| c.standby.as_str()),
            Reply::Shared(s) => s.standby.as_str(),
        }
    }
}

/// The partitions whose chunks came from more than one update.
fn torn_parts(chunks: &[pb::PullChunk]) -> Vec<(String, u32)> {
    let mut seen: HashMap<(&str, u32), u64> = HashMap::new();
    let mut torn: Vec<(String, u32)> = Vec::new();
    for c in chunks {
        let v = *seen
            .entry((c.param.as_str(), c.part))
            .or_insert(c.part_version);
        if v != c.part_version && !torn.iter().any(|(p, i)| p == &c.param && *i == c.part) {
            torn.push((c.param.clone(), c.part));
        }
    }
    torn
}

/// A call that failed: the server's answer, or no answer.
enum Failed {
    /// The server answered with this status.
    Status(Status),
    /// No answer (a broken connection, a deadline).
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

impl Client {
    /// Writes a checkpoint on every server now; returns the versions written.
    pub async fn checkpoint(&self) -> Result<Vec<u64>> {
        let calls = (0..self.server_count()).map(|s| {
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
        let count = self.map.params.iter().map(|p| p.numel() as u64).sum();
        let servers = self.server_count();
        crate::observe::traced(
            crate::observe::Call::Pull,
            min_version,
            count,
            servers,
            self.pull_into_untraced(min_version, out),
        )
        .await
    }

    /// [`Client::pull_into`] without its recording: pulls every partition at `min_version` or later
    /// into `out`; returns the oldest version pulled.
    async fn pull_into_untraced(
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
            self.learn_standby(s, reply.standby());
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
                    // Raced with an update, or the server is not the process attached: ask
                    // again through the stream for the version it just reported.
                    Err(why) => self.pull_again_streamed(s, &sp, &why).await?,
                },
            };
            let chunks = self.untorn(s, chunks).await?;
            version = version.min(self.copy_chunks(s, chunks, out, &mut filled)?);
        }
        self.check_filled(&filled)?;
        Ok(if version == u64::MAX {
            min_version
        } else {
            version
        })
    }

    /// Sync mode: every partition in `chunks` from one update. A partition whose chunks carry two
    /// values of `part_version` raced a step (backup workers let a step finish while a slow worker
    /// pulls): it is pulled again, a bounded number of times. Async mode takes chunks as they come
    /// (each chunk is whole; consecutive chunks may straddle an update, as in any asynchronous
    /// parameter server).
    async fn untorn(&self, s: usize, mut chunks: Vec<pb::PullChunk>) -> Result<Vec<pb::PullChunk>> {
        /// Pulls tried again for torn partitions before giving up.
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let torn = torn_parts(&chunks);
            if torn.is_empty() || !self.mode.sync {
                return Ok(chunks);
            }
            let min_version = chunks.iter().map(|c| c.version).max().unwrap_or(0);
            let parts = torn
                .iter()
                .map(|(param, part)| pb::PartRef {
                    param: param.clone(),
                    part: *part,
                })
                .collect();
            let req = self.pull_request(min_version, parts, self.timeout, 0);
            let again = self
                .pull_stream(s, req, self.timeout)
                .await?
                .ok_or_else(|| {
                    Error::timeout(
                        format!("partitions from {} after a pull raced a step", self.addr(s)),
                        self.timeout,
                    )
                })?;
            chunks.retain(|c| !torn.contains(&(c.param.clone(), c.part)));
            chunks.extend(again);
        }
        Err(Error::transport(
            "pulling",
            format!(
                "server {} kept updating partitions while they were pulled ({ATTEMPTS} attempts)",
                self.addr(s)
            ),
        ))
    }

    /// After a failed read by address: server `s`'s partitions through the stream, at the version
    /// it reported.
    async fn pull_again_streamed(
        &self,
        s: usize,
        sp: &pb::SharedPull,
        why: &same_host::SharedPullError,
    ) -> Result<Vec<pb::PullChunk>> {
        self.unshare_if_gone(s, sp, why);
        let req = self.pull_request(sp.version, vec![], self.timeout, sp.incarnation);
        self.pull_stream(s, req, self.timeout)
            .await?
            .ok_or_else(|| {
                Error::timeout(
                    format!("parameters from {} after a torn read", self.addr(s)),
                    self.timeout,
                )
            })
    }

    /// Copies server `s`'s streamed chunks into `out` (each inside its partition); returns the
    /// lowest version among them (`u64::MAX` for none).
    fn copy_chunks(
        &self,
        s: usize,
        chunks: Vec<pb::PullChunk>,
        out: &mut HashMap<String, Vec<f32>>,
        filled: &mut HashMap<(String, u32), usize>,
    ) -> Result<u64> {
        let mut version = u64::MAX;
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
            let got = self.place_pulled(&ch, &mut dst[part.range()])?;
            *filled.entry((ch.param, ch.part)).or_default() += got;
        }
        Ok(version)
    }

    /// Every partition arrived whole.
    fn check_filled(&self, filled: &HashMap<(String, u32), usize>) -> Result<()> {
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
        Ok(())
    }

    /// Pushes gradients for `step` (every parameter named must be declared and have its full size).
    pub async fn push(&self, step: u64, grads: &[(&str, &[f32])]) -> Result<PushOutcome> {
        let count = grads.iter().map(|(_, g)| g.len() as u64).sum();
        self.traced_push(step, count, self.push_untraced(step, grads))
            .await
    }

    /// [`Client::push`] without its recording.
    async fn push_untraced(&self, step: u64, grads: &[(&str, &[f32])]) -> Result<PushOutcome> {
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
        let count = grads.iter().map(|(_, g)| g.len() as u64).sum();
        self.traced_push(step, count, self.push_owned_untraced(step, grads))
            .await
    }

    /// [`Client::push_owned`] without its recording.
    async fn push_owned_untraced(
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

    /// Pushes `grads` for `step` and pulls the next parameters into `out` at the same time; returns
    /// the push's outcome and the version pulled (sync: `step + 1` or later, the parameters to
    /// compute the next gradient on).
    ///
    /// Sync: each server streams every partition of the new step as soon as it applied it, while
    /// the gradients of later partitions are still arriving, so the pull overlaps the push (a
    /// model cut into several partitions gains most; see `placement::place_split`). The result
    /// is exactly a push followed by a pull; a failure of either ends both and is returned.
    /// Async: a push, then a pull, so the parameters include this gradient (pulling while
    /// pushing would leave it out: one more step of staleness, which slows convergence).
    ///
    /// ```no_run
    /// # async fn demo(c: tandem_ps::client::Client) -> tandem_core::Result<()> {
    /// let mut params = std::collections::HashMap::new();
    /// let mut step = c.pull_into(0, &mut params).await?;
    /// for _ in 0..10 {
    ///     let grad: Vec<f32> = params["w"].iter().map(|w| 2.0 * w).collect();
    ///     let (_, version) = c.push_pull_into(step, &[("w", &grad)], &mut params).await?;
    ///     step = version;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn push_pull_into(
        &self,
        step: u64,
        grads: &[(&str, &[f32])],
        out: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(PushOutcome, u64)> {
        self.with_next_pull(step, self.push(step, grads), out).await
    }

    /// Like [`Client::push_pull_into`], taking the gradients by value so they are sent without a
    /// copy.
    pub async fn push_owned_pull_into(
        &self,
        step: u64,
        grads: Vec<(String, Vec<f32>)>,
        out: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(PushOutcome, u64)> {
        self.with_next_pull(step, self.push_owned(step, grads), out)
            .await
    }

    /// Runs `push` (of `step`) with the pull of the parameters to use next: at once in sync mode
    /// (step + 1), after it in async mode.
    async fn with_next_pull(
        &self,
        step: u64,
        push: impl std::future::Future<Output = Result<PushOutcome>>,
        out: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(PushOutcome, u64)> {
        if !self.mode.sync {
            let pushed = push.await?;
            return Ok((pushed, self.pull_into(0, out).await?));
        }
        futures::try_join!(push, self.pull_into(step + 1, out))
    }

    /// Runs one push of `count` elements for `step`, recorded as such.
    async fn traced_push(
        &self,
        step: u64,
        count: u64,
        push: impl std::future::Future<Output = Result<PushOutcome>>,
    ) -> Result<PushOutcome> {
        crate::observe::traced(
            crate::observe::Call::Push,
            step,
            count,
            self.server_count(),
            push,
        )
        .await
    }

    /// Checks a gradient against its declaration: a declared name, the declared number of elements.
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

    /// Says this worker is done; servers stop once every worker has.
    pub async fn done(&self) -> Result<()> {
        let calls = (0..self.server_count()).map(|s| {
            let mut c = self.grpc(s);
            let addr = self.addr(s);
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
        let calls = (0..self.server_count()).map(|s| {
            let mut c = self.grpc(s);
            let addr = self.addr(s);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(param: &str, part: u32, part_version: u64) -> pb::PullChunk {
        pb::PullChunk {
            param: param.into(),
            part,
            part_version,
            ..Default::default()
        }
    }

    #[test]
    fn a_partition_is_torn_only_when_its_chunks_carry_two_versions() {
        let one_version = [chunk("w", 0, 3), chunk("w", 0, 3), chunk("w", 1, 4)];
        assert!(torn_parts(&one_version).is_empty(), "partitions may differ");
        let torn = [
            chunk("w", 0, 3),
            chunk("w", 1, 4),
            chunk("w", 0, 4),
            chunk("w", 0, 5),
            chunk("b", 1, 4),
            chunk("b", 0, 4),
        ];
        assert_eq!(torn_parts(&torn), vec![("w".to_string(), 0)], "named once");
        assert!(torn_parts(&[]).is_empty());
    }
}
