//! The process group: the collective API users call, in blocking and async forms.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ndarray::{ArrayBase, DataMut, Dimension};
use tandem_core::cluster::Vars;
use tandem_core::{ClusterSpec, DType, Element, Error, ReduceOp, Result, Tensor, TensorMut};
use tandem_rendezvous::{JobToken, Session, TOKEN_VAR};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::backend::tcp_ring::{SameHost, TcpRing, Tuning};
use crate::backend::{Backend, BackendKind, resolve};
use crate::transport::frame::group_id;
use crate::transport::mesh::{MeshSpec, establish};
use crate::transport::peer_memory::{LocalWord, PeerMemory};

/// How a group is formed and how long its operations may take.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Name of the group; groups of one job need distinct names.
    pub name: String,
    /// Default deadline of each operation (`TANDEM_TIMEOUT`, seconds; default 300).
    pub timeout: Duration,
    /// Deadline for meeting the other ranks (`TANDEM_CONNECT_TIMEOUT`, seconds; default 120).
    pub connect_timeout: Duration,
    /// Pipeline segment in bytes (`TANDEM_SEGMENT_BYTES`; default 256 KiB).
    pub segment_bytes: usize,
    /// Allreduces whose buffer times `world - 1` is at most this many bytes go to every rank in one
    /// hop instead of around the ring (`TANDEM_DIRECT_BYTES`; default 64 KiB; 0 turns it off).
    pub direct_bytes: usize,
    /// Which backend (`TANDEM_BACKEND`).
    pub backend: BackendKind,
    /// Whether ranks on one machine may copy ring chunks straight from each other's memory
    /// (`TANDEM_SAME_HOST`: `auto`, the default, uses it when every rank's probe succeeds; `tcp`
    /// keeps every byte on the sockets).
    pub same_host: bool,
    /// Smallest ring buffer copied by address (`TANDEM_SAME_HOST_MIN_BYTES`; default 256 KiB):
    /// below it a copy's descriptor and acknowledgement per step cost more than the bytes.
    pub same_host_min_bytes: usize,
    /// Host other ranks should connect to (`TANDEM_ADVERTISE_HOST`); default: derived from the
    /// rendezvous address (loopback for local jobs, this machine's outgoing address otherwise).
    pub advertise_host: Option<String>,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            name: "default".into(),
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(120),
            segment_bytes: 256 << 10,
            direct_bytes: 64 << 10,
            backend: BackendKind::Auto,
            same_host: true,
            same_host_min_bytes: 256 << 10,
            advertise_host: None,
        }
    }
}

impl GroupConfig {
    /// Defaults overridden by the `TANDEM_*` variables in `vars`.
    pub fn from_vars(vars: &(impl Vars + ?Sized)) -> Result<Self> {
        let mut c = GroupConfig::default();
        let secs = |name: &str| -> Result<Option<Duration>> {
            vars.var(name)
                .map(|v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(Duration::from_secs_f64)
                        .ok_or_else(|| {
                            Error::config(
                                name,
                                format!("expected a positive number of seconds, got {v:?}"),
                            )
                        })
                })
                .transpose()
        };
        if let Some(t) = secs("TANDEM_TIMEOUT")? {
            c.timeout = t;
        }
        if let Some(t) = secs("TANDEM_CONNECT_TIMEOUT")? {
            c.connect_timeout = t;
        }
        if let Some(v) = vars.var("TANDEM_SEGMENT_BYTES") {
            c.segment_bytes = v
                .parse::<usize>()
                .ok()
                .filter(|b| (4096..=(64 << 20)).contains(b))
                .ok_or_else(|| {
                    Error::config(
                        "TANDEM_SEGMENT_BYTES",
                        format!("expected 4096 to 67108864, got {v:?}"),
                    )
                })?;
        }
        if let Some(v) = vars.var("TANDEM_DIRECT_BYTES") {
            c.direct_bytes = v
                .parse::<usize>()
                .ok()
                .filter(|b| *b <= (16 << 20))
                .ok_or_else(|| {
                    Error::config(
                        "TANDEM_DIRECT_BYTES",
                        format!("expected 0 to 16777216, got {v:?}"),
                    )
                })?;
        }
        if let Some(v) = vars.var("TANDEM_BACKEND") {
            c.backend = v.parse()?;
        }
        if let Some(v) = vars.var("TANDEM_SAME_HOST_MIN_BYTES") {
            c.same_host_min_bytes = v.parse::<usize>().map_err(|_| {
                Error::config(
                    "TANDEM_SAME_HOST_MIN_BYTES",
                    format!("expected a number of bytes, got {v:?}"),
                )
            })?;
        }
        if let Some(v) = vars.var(tandem_peer_memory::SAME_HOST_VAR) {
            c.same_host = match v.as_str() {
                "auto" => true,
                "tcp" => false,
                _ => {
                    return Err(Error::config(
                        tandem_peer_memory::SAME_HOST_VAR,
                        format!("expected auto or tcp, got {v:?}"),
                    ));
                }
            };
        }
        c.advertise_host = vars.var("TANDEM_ADVERTISE_HOST");
        Ok(c)
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The outcome of an async operation.
///
/// ```no_run
/// # fn demo(pg: &tandem_collective::ProcessGroup) -> tandem_core::Result<()> {
/// use tandem_core::{DType, ReduceOp, TensorMut};
/// let grads = TensorMut::zeros(DType::F32, &[1 << 20])?;
/// let work = pg.allreduce_async(grads, ReduceOp::Avg);
/// // ... compute the next layer's gradients meanwhile ...
/// let grads = work.wait()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Work<T> {
    rx: mpsc::Receiver<Result<T>>,
    done: Arc<AtomicBool>,
}

impl<T> Work<T> {
    /// Blocks until the operation finished and returns its result.
    pub fn wait(self) -> Result<T> {
        self.rx.recv().unwrap_or_else(|_| {
            Err(Error::Unusable {
                what: "process group".into(),
                reason: "its worker thread stopped".into(),
            })
        })
    }

    /// Waits up to `timeout`: `Some(result)` when the operation finished (the result is then taken,
    /// and a later wait reports that), `None` when it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<T>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(Error::Unusable {
                what: "async operation".into(),
                reason: "its result was already taken, or its worker thread stopped".into(),
            })),
        }
    }

    /// Whether the operation has finished (so [`Work::wait`] will not block).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct Queue {
    submitted: u64,
    completed: u64,
}

struct Control {
    rt: Runtime,
    session: Mutex<Option<Session>>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    name: String,
    kind: BackendKind,
    rank: usize,
    world: usize,
    backend: Option<Box<dyn Backend>>,
    queue: Mutex<Queue>,
    drained: Condvar,
    engine: Mutex<Option<mpsc::Sender<Job>>>,
    control: Option<Control>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(c) = &self.control
            && let Ok(mut w) = c.watcher.lock()
            && let Some(h) = w.take()
        {
            h.abort();
        }
    }
}

/// A group of ranks that run collectives together.
///
/// Every operation has a deadline (the group's default, or [`ProcessGroup::with_timeout`]); a peer that
/// dies, stops answering or calls a different operation makes every rank return an error that names it.
/// After such an error the group is unusable and says so.
///
/// ```no_run
/// use tandem_collective::ProcessGroup;
/// use tandem_core::ReduceOp;
/// let pg = ProcessGroup::from_env()?;          // RANK/WORLD_SIZE, TF_CONFIG, Slurm, ...
/// let mut grads = vec![1.0f32; 1024];
/// pg.allreduce(&mut grads, ReduceOp::Avg)?;
/// pg.shutdown()?;
/// # Ok::<(), tandem_core::Error>(())
/// ```
#[derive(Clone)]
pub struct ProcessGroup {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.shared.rank)
            .field("world", &self.shared.world)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn advertise_host(rendezvous: &str) -> String {
    let addr: Option<SocketAddr> = rendezvous.to_socket_addrs().ok().and_then(|mut a| a.next());
    match addr {
        Some(a) if a.ip().is_loopback() => a.ip().to_string(),
        Some(a) => {
            // The address this machine uses to reach the rendezvous is one its peers can reach.
            let probe =
                UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).and_then(|s| {
                    s.connect(a)?;
                    s.local_addr()
                });
            probe
                .map(|l| l.ip().to_string())
                .unwrap_or_else(|_| "127.0.0.1".into())
        }
        None => "127.0.0.1".into(),
    }
}

fn bind_host(advertised: &str) -> &'static str {
    match advertised.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => "127.0.0.1",
        Ok(IpAddr::V6(_)) => "[::]",
        _ => "0.0.0.0",
    }
}

/// Finds out whether every rank can read its left neighbour's memory: each publishes its word, reads
/// its left neighbour's, and publishes the outcome; the ring copies directly only when all succeeded.
/// Logs once why not, otherwise.
async fn negotiate_same_host(
    client: &tandem_rendezvous::Client,
    prefix: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Option<SameHost>> {
    let word = LocalWord::new();
    client
        .set(&format!("{prefix}/memory/{rank}"), word.advert())
        .await?;
    let left = (rank + world - 1) % world;
    let advert = client
        .wait(&[&format!("{prefix}/memory/{left}")], timeout)
        .await?;
    let advert = advert
        .first()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let probed = match PeerMemory::parse(&advert) {
        Some(peer) => peer.probe().map(|()| peer).map_err(|e| e.to_string()),
        None => Err(format!("unreadable advert {advert:?}")),
    };
    let verdict = match &probed {
        Ok(_) => "ok".to_string(),
        Err(why) => format!("rank {rank} cannot read rank {left}'s memory: {why}"),
    };
    client
        .set(&format!("{prefix}/memory-ok/{rank}"), verdict)
        .await?;
    let keys: Vec<String> = (0..world)
        .map(|r| format!("{prefix}/memory-ok/{r}"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let verdicts = client.wait(&keys, timeout).await?;
    let refusal = verdicts
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .find(|v| v != "ok");
    match (refusal, probed) {
        (None, Ok(peer)) => Ok(Some(SameHost { word, left: peer })),
        (Some(why), _) => {
            if rank == 0 {
                tracing::info!("ring chunks travel over TCP: {why}");
            }
            Ok(None)
        }
        (None, Err(_)) => Ok(None),
    }
}

impl ProcessGroup {
    /// Forms the group described by the environment (cluster spec, `TANDEM_JOB_TOKEN`, `TANDEM_*`).
    pub fn from_env() -> Result<ProcessGroup> {
        let env = tandem_core::cluster::ProcessEnv;
        let spec = ClusterSpec::from_env()?;
        let token = JobToken::from_env()?;
        Self::init(&spec, token.as_ref(), GroupConfig::from_vars(&env)?)
    }

    /// Forms a group of the spec's ranks: joins the rendezvous (rank 0 hosts it unless
    /// `TANDEM_RENDEZVOUS_EXTERNAL=1`), exchanges listener addresses and connects the mesh.
    /// A world of one needs no rendezvous, no token and no sockets.
    pub fn init(
        spec: &ClusterSpec,
        token: Option<&JobToken>,
        config: GroupConfig,
    ) -> Result<ProcessGroup> {
        let (rank, world) = (spec.rank(), spec.world_size());
        resolve(config.backend)?;
        if world == 1 {
            let shared = Shared {
                name: config.name.clone(),
                kind: config.backend,
                rank,
                world,
                backend: None,
                queue: Mutex::default(),
                drained: Condvar::new(),
                engine: Mutex::new(None),
                control: None,
            };
            return Ok(ProcessGroup {
                shared: Arc::new(shared),
                timeout: config.timeout,
            });
        }
        let token = token.ok_or_else(|| {
            Error::config(
                TOKEN_VAR,
                "is not set; every process of a job needs the same token",
            )
        })?;
        let rendezvous = spec.require_rendezvous()?.to_string();
        let control_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tandem-control")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the control runtime", e))?;
        let ring_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the ring runtime", e))?;
        let external = std::env::var(tandem_rendezvous::EXTERNAL_VAR).is_ok_and(|v| v == "1");
        let bind = std::env::var(tandem_rendezvous::BIND_VAR)
            .ok()
            .filter(|s| !s.is_empty());
        let session = control_rt.block_on(Session::join(
            spec,
            token,
            bind.as_deref(),
            external,
            config.connect_timeout,
        ))?;
        let prefix = format!("tandem/pg/{}", config.name);

        let host = config
            .advertise_host
            .clone()
            .unwrap_or_else(|| advertise_host(&rendezvous));
        let listener = ring_rt
            .block_on(tokio::net::TcpListener::bind(format!(
                "{}:0",
                bind_host(&host)
            )))
            .map_err(|e| Error::io("binding the ring listener", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("reading the ring listener address", e))?
            .port();
        let client = session.client.clone();
        let addrs = control_rt.block_on(async {
            client
                .set(&format!("{prefix}/addr/{rank}"), format!("{host}:{port}"))
                .await?;
            let keys: Vec<String> = (0..world).map(|r| format!("{prefix}/addr/{r}")).collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            client.wait(&keys, config.connect_timeout).await
        })?;
        let addrs: Vec<String> = addrs
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mesh_spec = MeshSpec {
            rank,
            addrs: &addrs,
            token,
            group: group_id(&config.name),
        };
        let mesh = ring_rt.block_on(establish(&listener, &mesh_spec, deadline))?;
        drop(listener);
        let same_host = if config.same_host {
            control_rt.block_on(negotiate_same_host(
                &client,
                &prefix,
                rank,
                world,
                config.connect_timeout,
            ))?
        } else {
            None
        };
        let copies = if same_host.is_some() {
            "same-host copies"
        } else {
            "sockets"
        };
        control_rt.block_on(client.barrier(
            &format!("{prefix}/ready"),
            world,
            rank,
            config.connect_timeout,
        ))?;

        let (abort_tx, abort_rx) = watch::channel(None);
        let abort_key = format!("{prefix}/abort");
        let hosted_by_rank0 = !external;
        let watcher = {
            let client = client.clone();
            let key = abort_key.clone();
            control_rt.spawn(async move {
                loop {
                    match client.wait(&[&key], Duration::from_secs(3600)).await {
                        Ok(v) => {
                            let msg = v
                                .first()
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                                .unwrap_or_default();
                            let _ = abort_tx.send(Some(msg));
                            return;
                        }
                        Err(Error::Timeout { .. }) => continue,
                        Err(e) => {
                            let msg = if hosted_by_rank0 {
                                format!("peer_lost\t0\tlost the rendezvous hosted by rank 0 ({e})")
                            } else {
                                format!("other\t{rank}\tlost the rendezvous ({e})")
                            };
                            let _ = abort_tx.send(Some(msg));
                            return;
                        }
                    }
                }
            })
        };
        let publish = {
            let client = client.clone();
            let handle = control_rt.handle().clone();
            Box::new(move |msg: String| {
                let c = client.clone();
                let key = abort_key.clone();
                let _ = handle.block_on(async move {
                    tokio::time::timeout(Duration::from_secs(2), c.compare_and_set(&key, None, msg))
                        .await
                });
            })
        };
        let ring = TcpRing::new(
            rank,
            world,
            ring_rt,
            mesh,
            Tuning {
                segment_bytes: config.segment_bytes,
                direct_bytes: config.direct_bytes,
                shared_min_bytes: config.same_host_min_bytes,
            },
            abort_rx,
            publish,
            same_host,
        );
        tracing::info!(rank, world, group = %config.name, "process group ready (tcp ring, {copies})");
        let shared = Shared {
            name: config.name.clone(),
            kind: config.backend,
            rank,
            world,
            backend: Some(Box::new(ring)),
            queue: Mutex::default(),
            drained: Condvar::new(),
            engine: Mutex::new(None),
            control: Some(Control {
                rt: control_rt,
                session: Mutex::new(Some(session)),
                watcher: Mutex::new(Some(watcher)),
            }),
        };
        Ok(ProcessGroup {
            shared: Arc::new(shared),
            timeout: config.timeout,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.shared.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Whether large ring steps copy straight from the neighbouring rank's memory (all ranks on one
    /// machine and the kernel allows it) instead of streaming through TCP sockets.
    pub fn same_host(&self) -> bool {
        self.shared.backend.as_ref().is_some_and(|b| b.same_host())
    }

    /// The backend in use (`"tcp"`, or `"local"` for a world of one).
    pub fn backend_name(&self) -> &'static str {
        self.shared.backend.as_ref().map_or("local", |b| b.name())
    }

    /// A handle on the same group whose operations use `timeout` instead of the default.
    pub fn with_timeout(&self, timeout: Duration) -> ProcessGroup {
        ProcessGroup {
            shared: self.shared.clone(),
            timeout,
        }
    }

    /// The deadline operations of this handle use.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits until the async operations submitted before this call have finished, so blocking
    /// operations keep the order in which this rank issued them.
    fn fence(&self) -> Result<()> {
        let mut q = self.shared.queue.lock().map_err(|_| poisoned_queue())?;
        let pending = q.submitted - q.completed;
        if pending == 0 {
            return Ok(());
        }
        let limit = self.timeout * (pending as u32).saturating_add(1) + Duration::from_secs(10);
        let (guard, res) = self
            .shared
            .drained
            .wait_timeout_while(q, limit, |q| q.completed < q.submitted)
            .map_err(|_| poisoned_queue())?;
        q = guard;
        if res.timed_out() && q.completed < q.submitted {
            return Err(Error::timeout("earlier async operations to finish", limit));
        }
        Ok(())
    }

    fn backend(&self) -> Result<&dyn Backend> {
        self.shared
            .backend
            .as_deref()
            .ok_or_else(|| Error::invalid("world", "a world of one has no backend"))
    }

    fn check_root(&self, name: &str, root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(Error::invalid(
                name,
                format!(
                    "rank {root} is not below the world size {}",
                    self.shared.world
                ),
            ));
        }
        Ok(())
    }

    /// In-place allreduce of raw little-endian bytes of `dtype`.
    pub fn allreduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.allreduce(buf, dtype, op, self.timeout)
    }

    /// In-place broadcast of raw bytes from `root`.
    pub fn broadcast_bytes(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_root("root", root)?;
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.broadcast(buf, dtype, root, self.timeout)
    }

    /// Allgather of raw bytes: `output` holds `world` blocks of `input.len()` bytes, block `r` from rank `r`.
    pub fn allgather_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        check_len("input", input.len(), dtype)?;
        let want = input.len() * self.shared.world;
        if output.len() != want {
            return Err(Error::invalid(
                "output",
                format!(
                    "holds {} bytes; allgather of {} bytes over {} ranks needs {want}",
                    output.len(),
                    input.len(),
                    self.shared.world
                ),
            ));
        }
        if self.shared.world == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        self.fence()?;
        self.backend()?
            .allgather(input, output, dtype, self.timeout)
    }

    /// In-place reduce-scatter of raw bytes; returns the element range of `buf` that holds this rank's
    /// reduced part (the ranks' parts differ by at most one element).
    pub fn reduce_scatter_bytes(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Range<usize>> {
        check_len("buffer", buf.len(), dtype)?;
        if self.shared.world == 1 {
            return Ok(0..buf.len() / dtype.size());
        }
        self.fence()?;
        self.backend()?.reduce_scatter(buf, dtype, op, self.timeout)
    }

    /// Reduce of raw bytes into `root`'s buffer. Other ranks' buffers are used as scratch.
    pub fn reduce_bytes(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_root("root", root)?;
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.reduce(buf, dtype, op, root, self.timeout)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.barrier(self.timeout)
    }

    /// Sends raw bytes to rank `to`; it must call a matching receive.
    pub fn send_bytes(&self, buf: &[u8], dtype: DType, to: usize) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_peer("to", to)?;
        self.fence()?;
        self.backend()?.send(buf, dtype, to, self.timeout)
    }

    /// Receives raw bytes from rank `from`; the sender's dtype and length must match.
    pub fn recv_bytes(&self, buf: &mut [u8], dtype: DType, from: usize) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_peer("from", from)?;
        self.fence()?;
        self.backend()?.recv(buf, dtype, from, self.timeout)
    }

    fn check_peer(&self, name: &str, peer: usize) -> Result<()> {
        self.check_root(name, peer)?;
        if peer == self.shared.rank {
            return Err(Error::invalid(
                name,
                format!("rank {peer} is this rank; a rank cannot message itself"),
            ));
        }
        Ok(())
    }

    /// In-place allreduce of a typed slice.
    pub fn allreduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.allreduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// In-place allreduce of an `ndarray` array in standard (C) layout, without copying it.
    pub fn allreduce_array<T: Element, S: DataMut<Elem = T>, D: Dimension>(
        &self,
        a: &mut ArrayBase<S, D>,
        op: ReduceOp,
    ) -> Result<()> {
        self.allreduce(contiguous(a)?, op)
    }

    /// In-place broadcast of a typed slice from `root`.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, root)
    }

    /// In-place broadcast of an `ndarray` array in standard layout.
    pub fn broadcast_array<T: Element, S: DataMut<Elem = T>, D: Dimension>(
        &self,
        a: &mut ArrayBase<S, D>,
        root: usize,
    ) -> Result<()> {
        self.broadcast(contiguous(a)?, root)
    }

    /// Allgather of typed slices: `output.len() == input.len() * world_size()`.
    pub fn allgather<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.allgather_bytes(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
        )
    }

    /// In-place reduce-scatter of a typed slice; returns this rank's range of reduced elements.
    pub fn reduce_scatter<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<Range<usize>> {
        self.reduce_scatter_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// Reduce of a typed slice into `root`'s buffer.
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op, root)
    }

    /// Sends a typed slice to rank `to`.
    pub fn send<T: Element>(&self, buf: &[T], to: usize) -> Result<()> {
        self.send_bytes(bytemuck::cast_slice(buf), T::DTYPE, to)
    }

    /// Receives a typed slice from rank `from`.
    pub fn recv<T: Element>(&self, buf: &mut [T], from: usize) -> Result<()> {
        self.recv_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, from)
    }

    /// Queues `job` on the group's worker thread, after every operation submitted before it.
    fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(&DirectGroup<'_>) -> Result<T> + Send + 'static,
    ) -> Work<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let done = Arc::new(AtomicBool::new(false));
        let work = Work {
            rx,
            done: done.clone(),
        };
        let pg = self.clone();
        let run: Job = Box::new(move || {
            let r = job(&pg.direct());
            done.store(true, Ordering::Release);
            let _ = tx.send(r);
            if let Ok(mut q) = pg.shared.queue.lock() {
                q.completed += 1;
            }
            pg.shared.drained.notify_all();
        });
        if let Err(e) = self.enqueue(run) {
            let (tx, rx) = mpsc::sync_channel(1);
            let _ = tx.send(Err(e));
            return Work {
                rx,
                done: Arc::new(AtomicBool::new(true)),
            };
        }
        work
    }

    fn enqueue(&self, job: Job) -> Result<()> {
        let mut engine = self.shared.engine.lock().map_err(|_| poisoned_queue())?;
        if engine.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name(format!("tandem-collective-{}", self.shared.rank))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .map_err(|e| Error::io("starting the collective worker thread", e))?;
            *engine = Some(tx);
        }
        self.shared
            .queue
            .lock()
            .map_err(|_| poisoned_queue())?
            .submitted += 1;
        let sent = engine.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            if let Ok(mut q) = self.shared.queue.lock() {
                q.submitted -= 1;
            }
            return Err(Error::Unusable {
                what: "process group".into(),
                reason: "its worker thread stopped".into(),
            });
        }
        Ok(())
    }

    /// A handle for the worker thread: same group, but operations skip the fence (they are the queue).
    fn direct(&self) -> DirectGroup<'_> {
        DirectGroup(self)
    }

    /// Starts an allreduce on the worker thread; the tensor comes back from [`Work::wait`].
    pub fn allreduce_async(&self, mut t: TensorMut, op: ReduceOp) -> Work<TensorMut> {
        self.submit(move |pg| {
            let dtype = t.dtype();
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?.allreduce(t.bytes_mut(), dtype, op, to)?;
                }
                Ok(())
            })?;
            Ok(t)
        })
    }

    /// Starts a broadcast from `root` on the worker thread.
    pub fn broadcast_async(&self, mut t: TensorMut, root: usize) -> Work<TensorMut> {
        if let Err(e) = self.check_root("root", root) {
            return self.submit(move |_| Err(e));
        }
        self.submit(move |pg| {
            let dtype = t.dtype();
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?.broadcast(t.bytes_mut(), dtype, root, to)?;
                }
                Ok(())
            })?;
            Ok(t)
        })
    }

    /// Starts an allgather; the result has shape `[world, ..input shape]`.
    pub fn allgather_async(&self, t: Tensor) -> Work<TensorMut> {
        let world = self.shared.world;
        self.submit(move |pg| {
            let mut shape = vec![world];
            shape.extend_from_slice(t.shape());
            let mut out = TensorMut::zeros(t.dtype(), &shape)?;
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?
                        .allgather(t.bytes(), out.bytes_mut(), t.dtype(), to)
                } else {
                    out.bytes_mut().copy_from_slice(t.bytes());
                    Ok(())
                }
            })?;
            Ok(out)
        })
    }

    /// Starts a barrier on the worker thread.
    pub fn barrier_async(&self) -> Work<()> {
        self.submit(|pg| {
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?.barrier(to)
                } else {
                    Ok(())
                }
            })
        })
    }

    /// The backend kind the group was configured with (`TANDEM_BACKEND`).
    pub fn backend_kind(&self) -> BackendKind {
        self.shared.kind
    }

    /// Shares a small blob through the rendezvous: the rank that passes `Some(value)` publishes it
    /// under `key`, and every rank returns it once it exists (within the group's timeout). This is
    /// how ranks agree on a bootstrap value such as NCCL's unique id. A world of one returns `value`.
    pub fn share(&self, key: &str, value: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let Some(control) = &self.shared.control else {
            return value.ok_or_else(|| {
                Error::invalid("share", format!("nothing was published under {key:?}"))
            });
        };
        let client = control
            .session
            .lock()
            .map_err(|_| poisoned_queue())?
            .as_ref()
            .map(|s| s.client.clone())
            .ok_or_else(|| Error::Unusable {
                what: "process group".into(),
                reason: "it was shut down".into(),
            })?;
        let full = format!("tandem/pg/{}/share/{key}", self.shared.name);
        let timeout = self.timeout;
        control.rt.block_on(async move {
            if let Some(v) = value {
                client.set(&full, v).await?;
            }
            let got = client.wait(&[&full], timeout).await?;
            got.into_iter()
                .next()
                .map(|b| b.to_vec())
                .ok_or_else(|| Error::transport("the rendezvous", format!("no value for {full:?}")))
        })
    }

    /// Every rank says whether something worked for it (`Err` with why, at most 255 bytes of it kept);
    /// every rank learns whether it worked on all of them, and if not, why on the lowest rank where
    /// it did not ("rank 2: …"; a rank's own reason comes back as it gave it). A collective: every
    /// rank calls it, in the same order as its other operations. This is how ranks decide together
    /// to use a faster path or not, so that no rank takes one the others skip.
    ///
    /// ```no_run
    /// # fn main() -> tandem_core::Result<()> {
    /// let pg = tandem_collective::ProcessGroup::from_env()?;
    /// let here = if std::path::Path::new("/dev/nvidia0").exists() { Ok(()) } else { Err("no GPU") };
    /// match pg.agree(here)? {
    ///     Ok(()) => println!("every rank has a GPU"),
    ///     Err(why) => println!("staying on the CPU: {why}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn agree(
        &self,
        mine: std::result::Result<(), &str>,
    ) -> Result<std::result::Result<(), String>> {
        const RECORD: usize = 256;
        let mut record = [0u8; RECORD];
        if let Err(why) = mine {
            record[0] = 1;
            let n = why.len().min(RECORD - 1);
            record[1..=n].copy_from_slice(&why.as_bytes()[..n]);
        }
        let mut all = vec![0u8; RECORD * self.world_size()];
        self.allgather(&record[..], &mut all)?;
        for (r, rec) in all.chunks_exact(RECORD).enumerate() {
            if rec[0] != 0 {
                let end = rec[1..]
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(RECORD, |i| i + 1);
                let why = String::from_utf8_lossy(&rec[1..end]).into_owned();
                return Ok(Err(if r == self.rank() {
                    why
                } else {
                    format!("rank {r}: {why}")
                }));
            }
        }
        Ok(Ok(()))
    }

    /// Aborts the group on every rank, e.g. when this process is interrupted: operations in flight
    /// here and on the other ranks fail promptly with an error naming this rank and `reason`, and
    /// the group is unusable afterwards. A world of one has nothing to abort.
    pub fn abort(&self, reason: &str) -> Result<()> {
        let Some(control) = &self.shared.control else {
            return Ok(());
        };
        let client = control
            .session
            .lock()
            .map_err(|_| poisoned_queue())?
            .as_ref()
            .map(|s| s.client.clone());
        let Some(client) = client else {
            return Ok(());
        };
        let key = format!("tandem/pg/{}/abort", self.shared.name);
        let msg = format!("aborted\t{}\t{reason}", self.shared.rank);
        control.rt.block_on(async move {
            match tokio::time::timeout(
                Duration::from_secs(5),
                client.compare_and_set(&key, None, msg),
            )
            .await
            {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(Error::timeout(
                    "the rendezvous to record the abort",
                    Duration::from_secs(5),
                )),
            }
        })
    }

    /// Leaves the group: waits for queued operations, then passes the rendezvous' final barrier so the
    /// rank hosting it stops last.
    pub fn shutdown(self) -> Result<()> {
        self.fence()?;
        let Some(control) = &self.shared.control else {
            return Ok(());
        };
        if let Ok(mut w) = control.watcher.lock()
            && let Some(h) = w.take()
        {
            h.abort();
        }
        let session = control.session.lock().ok().and_then(|mut s| s.take());
        match session {
            Some(s) => control.rt.block_on(s.leave(self.timeout)),
            None => Ok(()),
        }
    }
}

/// The group as seen from its worker thread.
struct DirectGroup<'a>(&'a ProcessGroup);

impl DirectGroup<'_> {
    fn run<T>(&self, f: impl FnOnce(&ProcessGroup, Duration) -> Result<T>) -> Result<T> {
        f(self.0, self.0.timeout)
    }
}

fn check_len(name: &str, len: usize, dtype: DType) -> Result<()> {
    if !len.is_multiple_of(dtype.size()) {
        return Err(Error::invalid(
            name,
            format!("{len} bytes are not a whole number of {dtype} elements"),
        ));
    }
    Ok(())
}

fn contiguous<T, S: DataMut<Elem = T>, D: Dimension>(a: &mut ArrayBase<S, D>) -> Result<&mut [T]> {
    let shape = a.shape().to_vec();
    a.as_slice_mut().ok_or_else(|| {
        Error::invalid(
            "array",
            format!(
                "array of shape {shape:?} is not contiguous in C order; use .as_standard_layout()"
            ),
        )
    })
}

fn poisoned_queue() -> Error {
    Error::Unusable {
        what: "process group".into(),
        reason: "its queue was poisoned by a panic".into(),
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn same_host_settings_are_read_and_bad_values_are_named() {
        let c = GroupConfig::from_vars(&vars(&[])).expect("defaults");
        assert!(c.same_host);
        assert_eq!(c.same_host_min_bytes, 256 << 10);
        let c = GroupConfig::from_vars(&vars(&[
            ("TANDEM_SAME_HOST", "tcp"),
            ("TANDEM_SAME_HOST_MIN_BYTES", "0"),
        ]))
        .expect("valid");
        assert!(!c.same_host);
        assert_eq!(c.same_host_min_bytes, 0);
        for (k, v) in [
            ("TANDEM_SAME_HOST", "shm"),
            ("TANDEM_SAME_HOST_MIN_BYTES", "-1"),
        ] {
            let e = GroupConfig::from_vars(&vars(&[(k, v)])).expect_err("invalid");
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
