//! What the parameter server's client and server share, below both: the limits of a message
//! and of the HTTP/2 windows, the key of a partition, and the one way to open a gRPC connection
//! to a server (a worker's, and a standby's to its primary). Neither side imports the other.
//!
//! Why a layer of its own: the client and the server used to import each other's constants and
//! helpers, so neither could be read or changed alone. Everything both sides must agree on lives
//! here and nowhere else.

use std::time::Duration;

use tandem_core::{Error, Result};
use tandem_rendezvous::{AttachToken, JobToken};
use tokio::time::Instant;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::pb::parameter_server_client::ParameterServerClient;

/// Largest message a server accepts: one chunk plus framing.
pub const MAX_MESSAGE: usize = 4 << 20;

/// HTTP/2 receive window per stream: what one waiting push may have in flight before its sender
/// stops. Large enough for 1 MiB chunks to stream without stalls on one host.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 receive window per connection (one per worker).
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// Most HTTP/2 streams (calls) one connection may have open at once; a worker uses a few, so a
/// member cannot tie the server up with thousands (more wait their turn on the client's side).
pub const MAX_STREAMS: u32 = 128;

/// Key of a partition: parameter name and partition index.
pub type Key = (String, u32);

/// A gRPC client of one parameter server, sending the job token on every call.
pub(crate) type Grpc = ParameterServerClient<InterceptedService<Channel, AttachToken>>;

/// A gRPC client of the parameter server at `addr`: server `index` of the job's list (its
/// certificate must then be `ps-<index>`'s, once this process has an identity), or, with `None`,
/// any parameter server of the job (a standby after failover, a primary its standby follows).
pub(crate) async fn connect_one(
    addr: &str,
    token: &JobToken,
    security: &tandem_tls::Security,
    deadline: Instant,
    index: Option<usize>,
) -> Result<Grpc> {
    use tandem_tls::identity::Role;
    tandem_core::cluster::check_address("parameter server address", addr)?;
    let connector = tandem_tls::grpc::Connector::new(security.clone()).expecting(
        "the parameter server",
        move |r| match (r, index) {
            (Role::Ps(n), Some(i)) => *n == i,
            (Role::Ps(_), None) => true,
            _ => false,
        },
    );
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
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let mut backoff = tandem_core::Backoff::new(
        Duration::from_millis(20),
        Duration::from_secs(1),
        deadline.into_std(),
    );
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = endpoint
            .clone()
            .connect_timeout(left.clamp(Duration::from_millis(10), Duration::from_secs(3)));
        let err =
            match tokio::time::timeout(left, attempt.connect_with_connector(connector.clone()))
                .await
            {
                Ok(Ok(ch)) => {
                    return Ok(ParameterServerClient::with_interceptor(
                        ch,
                        AttachToken::from_token(header.clone()),
                    )
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE));
                }
                Ok(Err(e)) => {
                    if let Some(why) = tandem_tls::grpc::refusal(&e) {
                        return Err(Error::Authentication {
                            peer: format!("parameter server {addr}"),
                            reason: why,
                        });
                    }
                    tandem_core::error::source_chain(&e)
                }
                Err(_) => "connect timed out".to_string(),
            };
        let Some(delay) = backoff.next_delay() else {
            return Err(Error::timeout(
                format!("the parameter server at {addr} (last error: {err})"),
                left,
            ));
        };
        tokio::time::sleep(delay).await;
    }
}

/// This process's index among those on its host, as its environment says (0 when it does not):
/// offsets its metrics port.
pub(crate) fn local_rank() -> usize {
    tandem_core::ClusterSpec::from_env().map_or(0, |s| s.local_rank())
}
