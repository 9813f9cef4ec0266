//! Serving parameters: [`run`] on a listener the caller bound, until shutdown or until every worker
//! is done.
//!
//! Why the library never binds by itself: the caller knows which address a server should take (its
//! entry in `TF_CONFIG`, a Slurm node, a port the launcher reserved, `127.0.0.1:0` in a test) and
//! may want it before serving (to print it, or hand it to workers). A server's life is here too:
//! restored from its checkpoint when one exists, stopped by the caller's shutdown future, by every
//! worker saying done, or by the worker lease ([`ServerConfig::worker_timeout`]); stopping drains
//! open calls for at most [`DRAIN`]. Layout: `service.rs` (the gRPC edge), `step.rs` (who applies
//! gradients), `model.rs` and `sync_step.rs` (the state), `same_host.rs`, `rows.rs`, `convert.rs`,
//! `lease.rs`, `checkpoint.rs`, `pool.rs`.

pub mod checkpoint;
mod convert;
mod early;
mod lease;
mod metrics;
mod mode;
mod model;
mod pool;
mod pull;
pub mod replica;
mod runtime;
mod service;
mod standby;
mod step;
mod sync_step;

pub use convert::MAX_PARTITION_ELEMENTS;
pub use lease::Gone;
pub use metrics::{ServerMetrics, observe, summary};
pub use model::{Counters, Key, Mode, Model, Partial};
pub use service::{CheckpointPolicy, Limits, Service};
pub use standby::FollowConfig;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tandem_core::{Error, Result};
use tandem_rendezvous::{CheckToken, JobToken};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;

use crate::pb::parameter_server_server::ParameterServerServer;

pub use crate::protocol::{CONNECTION_WINDOW, MAX_MESSAGE, MAX_STREAMS, STREAM_WINDOW};

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The job token every request must carry.
    pub token: JobToken,
    /// Limits.
    pub limits: Limits,
    /// Stop when every worker has called `done`.
    pub exit_when_done: bool,
    /// Checkpoint directory and frequency; a server started with a directory holding its checkpoint
    /// resumes from it.
    pub checkpoint: Option<CheckpointPolicy>,
    /// When every worker that has not said done has been silent this long, the server writes a
    /// final checkpoint (if configured) and stops with an error naming them (a lease: the job's
    /// workers are gone, or cut off). `None`: wait for them forever.
    pub worker_timeout: Option<Duration>,
    /// A worker silent this long with no call in progress is gone: sync steps need the live
    /// workers only (K, or all live workers when fewer), the staleness bound stops waiting for it,
    /// and its late push is refused with `LEASE_EXPIRED`; it is back when it pushes for the
    /// current step. Must exceed a worker's compute between its pull and its push. `None`: every
    /// worker is awaited until the pull deadlines.
    pub worker_lease: Option<Duration>,
    /// Serve a standby of another server (primary-backup replication): it holds that server's
    /// state, updated before the primary publishes each update, and takes over its partitions
    /// when a worker cannot reach the primary. `None`: no standby here.
    pub follow: Option<FollowConfig>,
    /// How connections are secured; `None`: from the process's environment
    /// ([`tandem_tls::Security::from_env`]): mutual TLS with the job's certificates, plaintext on
    /// loopback only unless `TANDEM_INSECURE=1`.
    pub security: Option<tandem_tls::Security>,
    /// The compression every worker must declare (`auto`: each worker's own, measured when it
    /// connects); `None`: `TANDEM_COMPRESSION` from the environment. See [`crate::wire`].
    pub compression: Option<tandem_core::compression::Compression>,
}

/// How long a stopping server lets open calls finish before it closes their connections (workers
/// cut off by a dead link never close theirs).
pub const DRAIN: Duration = Duration::from_secs(2);

impl ServerConfig {
    /// Defaults: 1 MiB chunks, stop when the workers are done.
    pub fn new(token: JobToken) -> Self {
        ServerConfig {
            token,
            limits: Limits::default(),
            exit_when_done: true,
            checkpoint: None,
            worker_timeout: None,
            worker_lease: None,
            follow: None,
            security: None,
            compression: None,
        }
    }

    /// Secures connections with `security` instead of what the environment says.
    pub fn with_security(mut self, security: tandem_tls::Security) -> Self {
        self.security = Some(security);
        self
    }
}

/// A server ready to serve: its checkpoint (if any) is loaded, and [`Server::service`] gives a
/// handle for monitoring before it runs.
pub struct Server {
    /// What the server serves.
    service: Service,
    /// How it was configured.
    config: ServerConfig,
    /// Notified when every worker said done.
    all_done: Arc<Notify>,
    /// The standby's listener and address, when this server follows a primary.
    standby: Option<(TcpListener, std::net::SocketAddr)>,
}

impl Server {
    /// Prepares a server, restoring from its checkpoint when the directory holds one.
    pub async fn new(config: ServerConfig) -> Result<Server> {
        let all_done = Arc::new(Notify::new());
        let compression = crate::wire::check_setting(match config.compression {
            Some(c) => c,
            None => tandem_core::compression::Compression::from_env()?,
        })?;
        let service = Service::new(
            config.limits.clone(),
            all_done.clone(),
            config.checkpoint.clone(),
            compression,
        );
        if let Some(policy) = &config.checkpoint {
            let (dir, index) = (policy.dir.clone(), policy.index);
            let snap = tokio::task::spawn_blocking(move || checkpoint::read(&dir, index))
                .await
                .map_err(|e| Error::transport("reading the checkpoint", e.to_string()))??;
            if let Some(snap) = snap {
                service.restore(Model::from_snapshot(snap))?;
            }
        }
        let standby = match &config.follow {
            Some(f) => Some(standby::Standby::bind(f).await?),
            None => None,
        };
        Ok(Server {
            service,
            config,
            all_done,
            standby,
        })
    }

    /// Where this process serves its standby of another server, if it does.
    pub fn standby_address(&self) -> Option<std::net::SocketAddr> {
        self.standby.as_ref().map(|(_, a)| *a)
    }

    /// A handle on the service (its model and counters), for monitoring.
    pub fn service(&self) -> Service {
        self.service.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, (with `exit_when_done`) every worker is
    /// done, or (with `worker_timeout`) every remaining worker has been silent that long, which is
    /// an error naming them. Stopping lets open calls finish for at most [`DRAIN`], then closes
    /// their connections, so a server cut off from its workers still stops promptly.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the server address", e))?;
        let security = match self.config.security.clone() {
            Some(s) => s,
            None => tandem_tls::Security::from_env()?,
        };
        security.check_peers("the parameter server", &[local.to_string()])?;
        let service = self.service.clone();
        let standby = match (self.config.follow.clone(), self.standby) {
            (Some(follow), Some((listener, addr))) => Some(Arc::new(standby::Standby::start(
                follow,
                listener,
                addr,
                self.config.token.clone(),
                self.config.limits.clone(),
                security.clone(),
                service.compression,
            ))),
            _ => None,
        };
        let svc = ParameterServerServer::new(self.service)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let svc = InterceptedService::new(svc, CheckToken(self.config.token));
        let incoming =
            tandem_tls::grpc::incoming(listener, security.clone(), "parameter server", |r| {
                !matches!(r, tandem_tls::identity::Role::Rendezvous)
            });
        let (exit_when_done, all_done) = (self.config.exit_when_done, self.all_done);
        let worker_timeout = self.config.worker_timeout;
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        // Why it stopped, kept where the end of the run reads it: the serving can end in the same
        // poll as the stop (no connection open), before the drain below would have passed it on.
        let reason = std::sync::Arc::new(std::sync::Mutex::new(None::<Stop>));
        let reason_set = reason.clone();
        let watched = service.clone();
        let lease = self.config.worker_lease;
        let leases = lease.map(|lease| {
            let service = service.clone();
            tokio::spawn(async move { service.enforce_leases(lease).await })
        });
        let (ka_interval, ka_timeout) = keepalive(lease);
        let (standby_done, replication) = (standby.clone(), service.replication.clone());
        let stop = async move {
            let why = tokio::select! {
                _ = shutdown => Stop::Asked,
                by = replication.replaced() => Stop::Replaced(by),
                _ = async {
                    if !exit_when_done {
                        return std::future::pending().await;
                    }
                    all_done.notified().await;
                    // A promoted standby serves its workers to the end too.
                    if let Some(s) = standby_done.as_ref().filter(|s| s.is_promoted()) {
                        s.done().await;
                    }
                } => {
                    // Let the last responses leave before closing.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Stop::Done
                }
                silent = watch_silence(&watched, worker_timeout) => Stop::Silent(silent),
            };
            *reason_set.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            let _ = stopped_tx.send(());
        };
        tracing::info!(%local, tls = security.is_tls(), "parameter server serving");
        let serve = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(Some(MAX_STREAMS))
            .max_frame_size(16_777_215u32)
            .http2_keepalive_interval(Some(ka_interval))
            .http2_keepalive_timeout(Some(ka_timeout))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop);
        let drained = async move {
            // Once stopping, open calls get DRAIN to finish; then the server stops anyway.
            let _ = stopped_rx.await;
            tokio::time::sleep(DRAIN).await;
        };
        let served = tokio::select! {
            r = serve => r.map_err(|e| Error::transport(format!("serving parameters on {local}"), e.to_string())),
            _ = drained => {
                tracing::warn!("connections still open {DRAIN:?} after stopping (workers cut off?); closing them");
                Ok(())
            }
        };
        if let Some(task) = leases {
            task.abort();
        }
        if let Some(s) = &standby {
            s.stop();
        }
        let why = reason.lock().unwrap_or_else(|p| p.into_inner()).take();
        stopped(why, served, &service, local, worker_timeout).await
    }
}

/// HTTP/2 keepalive (interval, timeout): a worker cut off mid-call (no RST) keeps its lease until
/// keepalive drops its connection, so with a lease it probes a few times per lease.
fn keepalive(lease: Option<Duration>) -> (Duration, Duration) {
    match lease {
        Some(l) => (
            (l / 3).clamp(Duration::from_millis(500), Duration::from_secs(30)),
            (l / 3).clamp(Duration::from_millis(500), Duration::from_secs(10)),
        ),
        None => (Duration::from_secs(30), Duration::from_secs(10)),
    }
}

/// What a server's run returns once it stopped for `why` (the serving itself ended with
/// `served`): replaced by its standby and silent workers are errors (the latter after a final
/// checkpoint).
async fn stopped(
    why: Option<Stop>,
    served: Result<()>,
    service: &Service,
    local: std::net::SocketAddr,
    worker_timeout: Option<Duration>,
) -> Result<()> {
    match why {
        Some(Stop::Replaced(by)) => Err(Error::Precondition {
            context: format!("serving parameters on {local}"),
            problem: format!(
                "this server was replaced by its standby at {by} (a worker could not reach it); it stopped so the two never serve the same partitions"
            ),
        }),
        Some(Stop::Silent(silent)) => {
            if let Some(path) = service.final_checkpoint().await? {
                tracing::info!(path = %path.display(), "final checkpoint written");
            }
            Err(Error::timeout(
                format!("any word from {silent}; the parameter server stops"),
                worker_timeout.unwrap_or_default(),
            ))
        }
        _ => served,
    }
}

/// Why a server stopped.
enum Stop {
    /// The caller's shutdown signal.
    Asked,
    /// Every worker said done (and the server exits when they do).
    Done,
    /// Every remaining worker was silent past the timeout: who, and for how long.
    Silent(String),
    /// A standby was promoted in this server's place (its address).
    Replaced(String),
}

/// Resolves when every worker that has not said done has been silent for `timeout` (never without
/// a timeout): checked a few times per timeout, at most every second.
async fn watch_silence(service: &Service, timeout: Option<Duration>) -> String {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let every = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        if let Some(silent) = service.silent_workers(timeout) {
            tracing::error!("{silent}: stopping");
            return silent;
        }
    }
}

/// Serves on `listener` until `shutdown` resolves or (with `exit_when_done`) every worker is done.
/// The caller binds the listener: the library never opens a port by itself.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    Server::new(config).await?.run(listener, shutdown).await
}
