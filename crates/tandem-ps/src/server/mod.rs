//! Serving parameters: [`run`] on a listener the caller bound, until shutdown or until every worker
//! is done.

pub mod checkpoint;
mod model;
mod service;

pub use model::{Counters, Mode, Model};
pub use service::{CheckpointPolicy, Limits, Service};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tandem_core::{Error, Result};
use tandem_rendezvous::{CheckToken, JobToken};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::pb::parameter_server_server::ParameterServerServer;

/// Largest message a server accepts: one chunk plus framing.
pub const MAX_MESSAGE: usize = 4 << 20;

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
}

impl ServerConfig {
    /// Defaults: 1 MiB chunks, stop when the workers are done.
    pub fn new(token: JobToken) -> Self {
        ServerConfig {
            token,
            limits: Limits::default(),
            exit_when_done: true,
            checkpoint: None,
        }
    }
}

/// Serves on `listener` until `shutdown` resolves or (with `exit_when_done`) every worker is done.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading the server address", e))?;
    let all_done = Arc::new(Notify::new());
    let service = Service::new(
        config.limits.clone(),
        all_done.clone(),
        config.checkpoint.clone(),
    );
    if let Some(policy) = &config.checkpoint {
        let (dir, index) = (policy.dir.clone(), policy.index);
        let snap = tokio::task::spawn_blocking(move || checkpoint::read(&dir, index))
            .await
            .map_err(|e| Error::transport("reading the checkpoint", e.to_string()))??;
        if let Some(snap) = snap {
            service.restore(Model::from_snapshot(snap));
        }
    }
    let svc = ParameterServerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let svc = InterceptedService::new(svc, CheckToken(config.token));
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let exit_when_done = config.exit_when_done;
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = async { if exit_when_done { all_done.notified().await } else { std::future::pending().await } } => {
                // Let the last responses leave before closing.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tracing::info!(%local, "parameter server serving");
    tonic::transport::Server::builder()
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .max_frame_size(16_777_215u32)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop)
        .await
        .map_err(|e| Error::transport(format!("serving parameters on {local}"), e.to_string()))
}
