//! A connection as Tandem's protocols use it: a TCP stream, encrypted with mutual TLS or (where
//! the [`Security`] allows) plaintext, and the two ends of opening one: [`accept`] and [`connect`].
//!
//! Both ends tell a mismatch apart from noise: a TLS endpoint that receives plaintext answers
//! with a TLS alert (which a plaintext peer of the ring reads as [`TLS_ALERT`]) and logs who spoke
//! plaintext; a plaintext endpoint that receives a TLS hello logs that the peer wants TLS and
//! closes, and the TLS side reports that the peer closed during the handshake.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UnixStream, unix};

use crate::context::describe;
use crate::policy::{INSECURE_VAR, Security};
use crate::record::{RecordReader, RecordWriter};

/// The first byte of a TLS handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The first byte of a TLS alert record: what a plaintext client of a TLS endpoint reads first.
pub const TLS_ALERT: u8 = 0x15;

/// What a TLS endpoint sends a plaintext client before closing: a fatal `access_denied` alert.
const PLAINTEXT_REFUSAL: [u8; 7] = [TLS_ALERT, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// A connection after its TLS 1.3 handshake: records protected by Tandem's record layer with the
/// keys rustls negotiated (each received record decrypted in place and copied once into the
/// caller's buffer; key updates, alerts and `close_notify` handled as RFC 8446 says).
pub struct TlsConnection {
    /// Reads and decrypts.
    reader: RecordReader,
    /// Seals and writes.
    writer: RecordWriter,
    /// The peer's certificate.
    peer: Option<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("peer", &self.reader.tcp().peer_addr().ok())
            .finish_non_exhaustive()
    }
}

/// A connection, encrypted or not.
#[derive(Debug)]
pub enum Stream {
    /// Plaintext TCP.
    Plain(TcpStream),
    /// Mutual TLS over TCP.
    Tls(Box<TlsConnection>),
    /// A Unix domain socket to a process of this user on this machine (see [`crate::local`]).
    Local(UnixStream),
}

impl From<crate::handshake::Secured> for Stream {
    fn from(s: crate::handshake::Secured) -> Self {
        Stream::Tls(Box::new(TlsConnection {
            reader: s.reader,
            writer: s.writer,
            peer: s.peer,
        }))
    }
}

impl Stream {
    /// The TCP connection underneath (`None` for a local socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.reader.tcp().as_ref()),
            Stream::Local(_) => None,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Whether the connection is a local socket, its peer vouched for by the kernel.
    pub fn is_local(&self) -> bool {
        matches!(self, Stream::Local(_))
    }

    /// The certificate the peer presented (TLS only).
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match self {
            Stream::Plain(_) | Stream::Local(_) => None,
            Stream::Tls(s) => s.peer.clone(),
        }
    }

    /// Splits into halves that can be used by different tasks.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Local(s) => {
                let (r, w) = s.into_split();
                (
                    ReadHalf::Local(Counted::new(r)),
                    WriteHalf::Local(Counted::new(w)),
                )
            }
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let fd = s.reader.tcp().as_ref().as_raw_fd();
                let TlsConnection { reader, writer, .. } = *s;
                (
                    ReadHalf::Tls {
                        inner: Box::new(reader),
                        fd,
                    },
                    WriteHalf::Tls {
                        inner: Box::new(writer),
                        fd,
                    },
                )
            }
        }
    }
}

/// `$e` on the plaintext socket or on the TLS connection's reading or writing half.
macro_rules! delegate {
    ($self:ident, $half:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls(t) => {
                let $s = Pin::new(&mut t.$half);
                $e
            }
            Stream::Local($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, reader, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, writer, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, writer, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, writer, s => s.poll_shutdown(cx))
    }
}

/// The reading half of a split [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    /// Plaintext: the socket itself (callers may read it with non-blocking calls).
    Plain(OwnedReadHalf),
    /// TLS.
    Tls {
        /// The decrypting half.
        inner: Box<RecordReader>,
        /// The socket's descriptor (for statistics).
        fd: RawFd,
    },
    /// A local socket: the socket itself, counting what is read.
    Local(Counted<unix::OwnedReadHalf>),
}

/// A half of a local socket and the bytes that passed through it (a Unix socket has no kernel
/// counters to read, as TCP's `TCP_INFO`).
#[derive(Debug)]
pub struct Counted<H> {
    /// The half.
    half: H,
    /// Bytes through it so far.
    bytes: Arc<AtomicU64>,
}

impl<H> Counted<H> {
    /// `half`, counting from zero.
    fn new(half: H) -> Self {
        Counted {
            half,
            bytes: Arc::default(),
        }
    }

    /// The bytes that passed through this half so far (for metrics).
    pub fn bytes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes)
    }

    /// Counts `n` more bytes.
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl ReadHalf {
    /// The unencrypted socket (plaintext TCP or local), for non-blocking reads; `None` under TLS.
    pub fn socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            ReadHalf::Plain(s) => Some(s.as_ref().as_fd()),
            ReadHalf::Local(s) => Some(s.half.as_ref().as_fd()),
            ReadHalf::Tls { .. } => None,
        }
    }

    /// The TCP socket's descriptor (for TCP statistics only); `None` for a local socket.
    pub fn raw_fd(&self) -> Option<RawFd> {
        match self {
            ReadHalf::Plain(s) => Some(s.as_ref().as_raw_fd()),
            ReadHalf::Tls { fd, .. } => Some(*fd),
            ReadHalf::Local(_) => None,
        }
    }

    /// Counts `n` bytes read straight from [`ReadHalf::socket`] (local sockets count their
    /// bytes; TCP's the kernel counts).
    pub fn note(&self, n: usize) {
        if let ReadHalf::Local(c) = self {
            c.add(n);
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls { inner, .. } => Pin::new(&mut **inner).poll_read(cx, buf),
            ReadHalf::Local(c) => {
                let before = buf.filled().len();
                let polled = Pin::new(&mut c.half).poll_read(cx, buf);
                c.add(buf.filled().len() - before);
                polled
            }
        }
    }
}

/// The writing half of a split [`Stream`]. Under TLS a write completes only once its bytes are
/// on the socket (encrypted), so a sender that never flushes cannot leave its last bytes in the
/// TLS buffer while the peer waits for them.
#[derive(Debug)]
pub enum WriteHalf {
    /// Plaintext: the socket itself (callers may write it with non-blocking calls).
    Plain(OwnedWriteHalf),
    /// TLS.
    Tls {
        /// The encrypting half.
        inner: Box<RecordWriter>,
        /// The socket's descriptor (for statistics).
        fd: RawFd,
    },
    /// A local socket: the socket itself, counting what is written.
    Local(Counted<unix::OwnedWriteHalf>),
}

impl WriteHalf {
    /// The unencrypted socket (plaintext TCP or local), for non-blocking writes; `None` under
    /// TLS.
    pub fn socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            WriteHalf::Plain(s) => Some(s.as_ref().as_fd()),
            WriteHalf::Local(s) => Some(s.half.as_ref().as_fd()),
            WriteHalf::Tls { .. } => None,
        }
    }

    /// The TCP socket's descriptor (for TCP statistics only); `None` for a local socket.
    pub fn raw_fd(&self) -> Option<RawFd> {
        match self {
            WriteHalf::Plain(s) => Some(s.as_ref().as_raw_fd()),
            WriteHalf::Tls { fd, .. } => Some(*fd),
            WriteHalf::Local(_) => None,
        }
    }

    /// Counts `n` bytes written straight to [`WriteHalf::socket`] (see [`ReadHalf::note`]).
    pub fn note(&self, n: usize) {
        if let WriteHalf::Local(c) = self {
            c.add(n);
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls { inner, .. } => Pin::new(&mut **inner).poll_write(cx, buf),
            WriteHalf::Local(c) => {
                let polled = Pin::new(&mut c.half).poll_write(cx, buf);
                if let Poll::Ready(Ok(n)) = polled {
                    c.add(n);
                }
                polled
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls { inner, .. } => Pin::new(&mut **inner).poll_flush(cx),
            WriteHalf::Local(c) => Pin::new(&mut c.half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls { inner, .. } => Pin::new(&mut **inner).poll_shutdown(cx),
            WriteHalf::Local(c) => Pin::new(&mut c.half).poll_shutdown(cx),
        }
    }
}

/// Why an incoming connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What went wrong, in words.
    pub reason: String,
    /// Whether it is worth a warning (a peer that connects and closes at once is only noise).
    pub notable: bool,
    /// What kind of refusal, for the metric: `closed`, `silent`, `protocol` (plaintext against
    /// TLS or the reverse) or `tls` (the handshake failed or took too long).
    pub kind: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A refusal of `kind` (the metrics' reason) saying why.
fn refused(kind: &'static str, reason: impl Into<String>) -> Refused {
    Refused {
        reason: reason.into(),
        notable: true,
        kind,
    }
}

/// A TLS failure inside an I/O error, in words (or the I/O error itself).
pub fn explain_io(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => describe(r),
        None => e.to_string(),
    }
}

/// Whether an I/O error is a TLS failure (an alert from the peer, a certificate refused).
pub fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
}

/// The TLS failure somewhere in an error's chain of sources, in words: how a gRPC client finds
/// out that the connection's handshake or certificates were refused.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(describe(r));
        }
        cur = err.source();
    }
    None
}

/// Admits one incoming connection within `timeout`: the TLS handshake (client certificate
/// required) when `security` is TLS, else plaintext; a peer speaking the other one is refused.
/// The first byte must come within [`crate::admission::FIRST_BYTE_TIMEOUT`] (or `timeout`, if
/// shorter): members send theirs at once, idle sockets are dropped.
pub async fn accept(
    security: &Security,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Stream, Refused> {
    let mut first = [0u8; 1];
    let first_byte = timeout.min(crate::admission::FIRST_BYTE_TIMEOUT);
    let peeked = tokio::time::timeout(first_byte, tcp.peek(&mut first)).await;
    match peeked {
        Ok(Ok(1)) => {}
        Ok(Ok(_)) | Ok(Err(_)) => {
            return Err(Refused {
                reason: "closed before sending anything".into(),
                notable: false,
                kind: "closed",
            });
        }
        Err(_) => {
            return Err(refused(
                "silent",
                format!("sent nothing within {first_byte:?}"),
            ));
        }
    }
    match security {
        Security::Tls(ctx) => {
            if first[0] != HANDSHAKE_RECORD {
                let mut tcp = tcp;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::io::AsyncWriteExt::write_all(&mut tcp, &PLAINTEXT_REFUSAL),
                )
                .await;
                return Err(refused(
                    "protocol",
                    format!(
                        "it spoke plaintext to this TLS endpoint: it has no certificates (or runs \
                     with {INSECURE_VAR}=1) while this process has them"
                    ),
                ));
            }
            let handshake = crate::handshake::server(ctx.stream_server_config(), tcp);
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(s)) => Ok(s.into()),
                Ok(Err(e)) => Err(refused(
                    "tls",
                    format!("TLS handshake failed: {}", explain_io(&e)),
                )),
                Err(_) => Err(refused(
                    "tls",
                    format!("TLS handshake not finished within {timeout:?}"),
                )),
            }
        }
        Security::Plaintext { .. } => {
            if first[0] == HANDSHAKE_RECORD {
                return Err(refused(
                    "protocol",
                    "it speaks TLS but this process runs without certificates (give it the job's, \
                     TANDEM_TLS_DIR, or run every process without them)",
                ));
            }
            Ok(Stream::Plain(tcp))
        }
    }
}

/// Why [`connect`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    /// What went wrong, in words.
    pub reason: String,
    /// A certificate was refused by either side: trying again will not help.
    pub refused: bool,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Opens the TLS session (when `security` is TLS) on a connection made to `addr`, within
/// `timeout`. The error says why in words: the peer's certificate, this process's refused, or a
/// peer that runs without TLS.
pub async fn connect(
    security: &Security,
    tcp: TcpStream,
    addr: &str,
    timeout: Duration,
) -> Result<Stream, HandshakeError> {
    let Security::Tls(ctx) = security else {
        return Ok(Stream::Plain(tcp));
    };
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // Names are not checked (see the context's doc); this one only goes into the hello.
    let name = ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("tandem.invalid").expect("a valid DNS name"));
    let handshake = crate::handshake::client(ctx.stream_client_config(), name, tcp);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(s)) => Ok(s.into()),
        Ok(Err(e))
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            Err(HandshakeError {
                reason:
                    "it closed the connection during the TLS handshake: it probably runs without \
                     TLS (no certificates there) while this process has them"
                        .into(),
                refused: false,
            })
        }
        Ok(Err(e)) => Err(HandshakeError {
            reason: format!("TLS handshake failed: {}", explain_io(&e)),
            refused: true,
        }),
        Err(_) => Err(HandshakeError {
            reason: format!("TLS handshake not finished within {timeout:?}"),
            refused: false,
        }),
    }
}

/// The peer address of an accepted connection, for logs.
pub fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a: SocketAddr| a.to_string())
        .unwrap_or_else(|_| "an unknown address".into())
}
