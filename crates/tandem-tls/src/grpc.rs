//! Secure connections under tonic: [`incoming`] admits a server's connections (TLS handshakes in
//! their own tasks, bounded in number per source and in total by an [`Admission`], each within a
//! deadline, refusals counted and logged at a bounded rate) and
//! [`Connector`] opens a client's (TCP, then TLS when the process has certificates).
//!
//! The gRPC layer above sees a byte stream either way and speaks HTTP/2 over it, so one server or
//! client serves both modes; the job token still travels in every request, inside TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::admission::Admission;
use crate::identity::Role;
use crate::policy::Security;
use crate::stream::{Stream, accept, connect, tls_failure};

/// Admitted connections waiting for the server to take them.
const QUEUED: usize = 64;

/// How long an accepted connection may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Connected for Stream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let tcp = self.tcp();
        TcpConnectInfo {
            local_addr: tcp.and_then(|t| t.local_addr().ok()),
            remote_addr: tcp.and_then(|t| t.peer_addr().ok()),
        }
    }
}

/// The admitted connections of `listener`, for `tonic`'s `serve_with_incoming*`: accepts until the
/// returned stream is dropped (the server stopped). `what` names the server in logs and metrics
/// (`rendezvous`, `ps`). The accept loop never waits for a handshake: each runs in its own task
/// under `admission`'s bounds, and a connection over them is closed at once.
///
/// `clients` says which roles may connect, once this process's certificate names its identity
/// (any of its job's processes otherwise passes; see [`crate::identity`]).
pub fn incoming(
    listener: TcpListener,
    security: Security,
    what: &'static str,
    clients: fn(&Role) -> bool,
) -> ReceiverStream<io::Result<Stream>> {
    let (tx, rx) = mpsc::channel(QUEUED);
    let admission = Admission::new(what);
    if let Some(local) = listener
        .local_addr()
        .ok()
        .and_then(|a| crate::local::listen(&a))
    {
        tokio::spawn(accept_local(local, tx.clone(), what, admission.clone()));
    }
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, from) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait a little, then go on.
                    tracing::warn!(server = what, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = admission.slot(from.ip()) else {
                admission.refused(from, "busy", &"too many handshakes in progress", true);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, security, admission) = (tx.clone(), security.clone(), admission.clone());
            tokio::spawn(async move {
                match accept(&security, tcp, HANDSHAKE_TIMEOUT).await {
                    Ok(s) if let Err(why) = security.check_peer(&s, what, &clients) => {
                        drop(slot);
                        admission.refused(from, "role", &why, true);
                    }
                    Ok(s) => {
                        drop(slot);
                        if let Some(cert) = s.peer_certificate() {
                            tracing::debug!(server = what, %from, peer = ?crate::common_name(&cert), "admitted");
                        }
                        let _ = tx.send(Ok(s)).await;
                    }
                    Err(r) => admission.refused(from, r.kind, &r, r.notable),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Hands the server the connections of its local socket whose process runs as this user (see
/// [`crate::local`]); others are refused like any stranger. Ends when the server stops.
async fn accept_local(
    listener: tokio::net::UnixListener,
    tx: mpsc::Sender<io::Result<Stream>>,
    what: &'static str,
    admission: Admission,
) {
    let from = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => break,
            a = crate::local::accept(&listener) => a,
        };
        match accepted {
            Ok(Ok(s)) => {
                if tx.send(Ok(Stream::Local(s))).await.is_err() {
                    break;
                }
            }
            Ok(Err(why)) => admission.refused(from, "user", &why, true),
            Err(e) => {
                tracing::warn!(server = what, error = %e, "accepting a local connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A failed connection attempt of a [`Connector`].
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// Where it tried.
    pub addr: String,
    /// Why, in words.
    pub reason: String,
    /// The TLS handshake refused a certificate (retrying will not help).
    pub refused: bool,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connecting to {}: {}", self.addr, self.reason)
    }
}

impl std::error::Error for ConnectError {}

/// Why a gRPC call or connection failed on TLS grounds (a certificate refused by either side),
/// found anywhere in the error's chain; `None` for every other failure.
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return c.refused.then(|| c.reason.clone());
        }
        cur = err.source();
    }
    tls_failure(e)
}

/// What to add to a failed gRPC call's message when this process runs without TLS and the
/// connection broke under HTTP/2 (what a TLS server's alert, or its closing on plaintext, looks
/// like to a plaintext client); empty otherwise.
pub fn plaintext_hint(status: &tonic::Status) -> &'static str {
    let plain = Security::from_env().is_ok_and(|s| !s.is_tls());
    // What a plaintext client sees of a TLS server varies with timing (an HTTP/2 protocol error,
    // a broken transport, a cancelled call): every failure of the connection itself counts.
    let broken = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    );
    if plain && broken {
        " (this process has no TLS certificates: if the server requires TLS, give this process \
         the job's with TANDEM_TLS_DIR)"
    } else {
        ""
    }
}

/// Opens a gRPC client's connections: to a server of this machine its local socket (see
/// [`crate::local`]), else TCP (no delay) to the URI's host and port, then TLS when the
/// process has certificates. Use with `Endpoint::connect_with_connector` and an `http://` URI (the
/// TLS is underneath, not tonic's).
#[derive(Clone)]
pub struct Connector {
    /// How connections are secured.
    security: Security,
    /// Try the local socket of a server on this machine first (see [`crate::local`]).
    local: bool,
    /// What the servers are for (in refusals) and which roles may serve it.
    expect: Option<(&'static str, Expected)>,
}

/// Which roles may be at the other end of a connection.
pub type Expected = Arc<dyn Fn(&Role) -> bool + Send + Sync>;

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("security", &self.security)
            .field("expect", &self.expect.as_ref().map(|e| e.0))
            .finish()
    }
}

impl Connector {
    /// A connector securing its connections as `security` says.
    pub fn new(security: Security) -> Connector {
        Connector {
            security,
            local: crate::local::enabled(),
            expect: None,
        }
    }

    /// The same, always over TCP (and TLS where `security` says), even to a server of this
    /// machine: for tests of TLS itself.
    pub fn over_tcp(mut self) -> Connector {
        self.local = false;
        self
    }

    /// The same, refusing a server whose certificate names a role `expected` refuses (or
    /// another job), once this process's own certificate names its identity. `what` names the
    /// server in refusals.
    pub fn expecting(
        mut self,
        what: &'static str,
        expected: impl Fn(&Role) -> bool + Send + Sync + 'static,
    ) -> Connector {
        self.expect = Some((what, Arc::new(expected)));
        self
    }
}

/// A connection being made for tonic.
type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, ConnectError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let security = self.security.clone();
        let expect = self.expect.clone();
        let local = self.local;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            let addr = format!("{host}:{port}");
            let fail = |reason: String, refused: bool| ConnectError {
                addr: addr.clone(),
                reason,
                refused,
            };
            // Resolved once; without certificates only loopback addresses may be dialled, and
            // the address checked is the one used (standbys, failover: every connection).
            let targets = security
                .resolve("this gRPC client", &addr)
                .await
                .map_err(|e| {
                    let refused = matches!(e, tandem_core::Error::Config { .. });
                    fail(e.to_string(), refused)
                })?;
            if local {
                for t in &targets {
                    if let Some(s) = crate::local::connect(t).await {
                        return Ok(TokioIo::new(Stream::Local(s)));
                    }
                }
            }
            let tcp = tokio::net::TcpStream::connect(&targets[..])
                .await
                .map_err(|e| fail(e.to_string(), false))?;
            let _ = tcp.set_nodelay(true);
            let s = connect(&security, tcp, &addr, HANDSHAKE_TIMEOUT)
                .await
                .map_err(|e| fail(e.reason, e.refused))?;
            if let Some((what, expected)) = &expect {
                security
                    .check_peer(&s, what, &**expected)
                    .map_err(|why| fail(why.to_string(), true))?;
            }
            Ok(TokioIo::new(s))
        })
    }
}
