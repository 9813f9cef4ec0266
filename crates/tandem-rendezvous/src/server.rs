//! Serving the rendezvous: [`run`] on a listener the caller bound, or [`Host::bind`] for the common case.
//!
//! Why a rendezvous at all: the processes of a job start in any order on machines that do not know
//! each other's ports; each needs a place, known from its environment alone, where it can publish
//! what the others need (its ring address, a same-host advert, NCCL's unique id) and wait for
//! theirs. Rank 0 (or the launcher) hosts it; every request carries the job token, refused before
//! the store is touched, and every wait ends at its deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_core::{Error, Result};
use tandem_tls::Security;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::auth::{CheckToken, JobToken};
use crate::pb::rendezvous_server::RendezvousServer;
use crate::service::Service;
use crate::store::{Limits, Store};

/// Most HTTP/2 streams (calls) one connection may have open at once: a process waits on a few
/// keys at a time, so a member cannot tie the server up with thousands (more wait their turn on
/// the client's side).
pub const MAX_STREAMS: u32 = 128;

/// How a rendezvous server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The job token every request must carry (inside TLS when the connection has it).
    pub token: JobToken,
    /// Store limits.
    pub limits: Limits,
    /// How connections are secured; `None`: from the process's environment
    /// ([`Security::from_env`]).
    pub security: Option<Security>,
}

impl ServerConfig {
    /// A configuration with default limits, secured as the environment says.
    pub fn new(token: JobToken) -> Self {
        ServerConfig {
            token,
            limits: Limits::default(),
            security: None,
        }
    }

    /// Secures connections with `security` instead of what the environment says.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = Some(security);
        self
    }
}

/// Serves the rendezvous on `listener` until `shutdown` resolves. The caller binds the listener, so
/// the library never opens a port it was not told to. Connections are mutual TLS when the
/// configuration's [`Security`] has certificates; plaintext is refused on a listener outside
/// loopback unless the user asked for it (`TANDEM_INSECURE=1`).
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading the rendezvous address", e))?;
    let security = match config.security.clone() {
        Some(s) => s,
        None => Security::from_env()?,
    };
    security.check_peers("the rendezvous server", &[local.to_string()])?;
    let store = Arc::new(Store::new(config.limits.clone()));
    let decode_limit = config.limits.max_value_len + config.limits.max_key_len + 4096;
    let svc = RendezvousServer::new(Service::new(store))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(usize::MAX);
    let svc = InterceptedService::new(svc, CheckToken(config.token));
    let incoming = tandem_tls::grpc::incoming(listener, security.clone(), "rendezvous", |_| true);
    tracing::info!(%local, tls = security.is_tls(), "rendezvous serving");
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::transport(format!("serving the rendezvous on {local}"), e.to_string()))
}

/// A rendezvous server running in this process's tokio runtime; stops when dropped or [`Host::stop`]ped.
#[derive(Debug)]
pub struct Host {
    /// Where it serves.
    addr: SocketAddr,
    /// Stops serving.
    stop: Option<oneshot::Sender<()>>,
    /// The serving task.
    task: Option<JoinHandle<Result<()>>>,
}

impl Host {
    /// Binds `addr` (use port 0 for an ephemeral port) and serves there.
    pub async fn bind(addr: &str, config: ServerConfig) -> Result<Host> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding the rendezvous to {addr}"), e))?;
        Self::serve(listener, config)
    }

    /// Serves on an already bound listener.
    pub fn serve(listener: TcpListener, config: ServerConfig) -> Result<Host> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the rendezvous address", e))?;
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(run(listener, config, async {
            let _ = rx.await;
        }));
        Ok(Host {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| Error::transport("stopping the rendezvous", e.to_string()))?,
            None => Ok(()),
        }
    }

    /// Serves until the process is interrupted (Ctrl-C or SIGTERM).
    pub async fn serve_until_signal(mut self) -> Result<()> {
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        let stop = self.stop.take();
        tokio::select! {
            r = task => r.map_err(|e| Error::transport("serving the rendezvous", e.to_string()))?,
            _ = shutdown_signal() => {
                if let Some(tx) = stop { let _ = tx.send(()); }
                Ok(())
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM (what Kubernetes sends).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
