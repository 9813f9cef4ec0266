//! The TLS handshake of a ring connection, driven through rustls's unbuffered API, and the hand-over
//! of its keys to [`crate::record`] once both sides have finished (the client's certificate
//! checked by the server, the server's by the client).

use std::io;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::record::{Keys, Protection, RecordReader, RecordWriter, Shared, tls_error};

/// Most handshake bytes buffered from the peer (its certificate chain and finished message).
const MAX_HANDSHAKE: usize = 1 << 17;

/// A connection whose handshake is done: its two halves and the peer's certificate.
pub(crate) struct Secured {
    /// Reads and decrypts the peer's records.
    pub reader: RecordReader,
    /// Seals and writes this side's records.
    pub writer: RecordWriter,
    /// The peer's certificate.
    pub peer: Option<CertificateDer<'static>>,
}

/// One step of a handshake, for either side.
trait Side {
    /// What the connection holds after the handshake.
    type Data;
    /// Feeds `incoming` bytes to the connection and says what it needs next.
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// What a step asks of the socket.
enum Next {
    /// The handshake failed.
    Fail(rustls::Error),
    /// More bytes from the peer are needed.
    Read,
    /// Bytes are waiting to be written.
    Write,
    /// The handshake is complete.
    Done,
    /// Step again.
    Continue,
}

/// What arrived from the peer beyond its handshake: application data rustls already decrypted
/// (the peer may send it with its last handshake message), then records not yet looked at.
pub(crate) struct Early {
    /// Application data already decrypted.
    pub plain: Vec<u8>,
    /// Records that arrived after the handshake's last one.
    pub records: Vec<u8>,
}

/// Runs the handshake on `tcp` to its end; returns what the peer sent beyond it. A refusal by
/// either side is a rustls error inside the I/O error; the alert that says why is sent to the
/// peer first.
async fn drive<S: Side>(conn: &mut S, tcp: &mut TcpStream) -> io::Result<Early> {
    let mut incoming = vec![0u8; 16 << 10];
    let mut used = 0;
    let mut outgoing: Vec<u8> = Vec::with_capacity(4096);
    let mut plain = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..used]);
        let next = match state {
            Err(e) => Next::Fail(e),
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                let at = outgoing.len();
                match data.encode(&mut []) {
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        outgoing.resize(at + required_size, 0);
                        let n = data.encode(&mut outgoing[at..]).map_err(|e| {
                            io::Error::other(format!("encoding a handshake message: {e}"))
                        })?;
                        outgoing.truncate(at + n);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(io::Error::other(format!(
                            "encoding a handshake message: {e}"
                        )));
                    }
                }
                Next::Continue
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Next::Write
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            // The peer finished and sent data at once: take it, it comes first.
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                while let Some(record) = data.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
                Next::Continue
            }
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            Ok(_) => {
                return Err(tls_error(rustls::Error::General(
                    "data arrived before the TLS handshake was done".into(),
                )));
            }
        };
        incoming.copy_within(discard..used, 0);
        used -= discard;
        match next {
            Next::Fail(e) => {
                let _ = send_alert(conn, tcp, &mut incoming[..used]).await;
                return Err(tls_error(e));
            }
            Next::Continue => {}
            Next::Write => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
            }
            // Application data may flow: the handshake is over for this side (rustls checks it
            // again when it hands the keys over). A client is done once its finished message is
            // out; a server that refuses its certificate then answers with an alert, which the
            // record layer reports.
            Next::Done => {
                incoming.truncate(used);
                return Ok(Early {
                    plain,
                    records: incoming,
                });
            }
            Next::Read => {
                if used == incoming.len() {
                    if incoming.len() >= MAX_HANDSHAKE {
                        return Err(tls_error(rustls::Error::General(
                            "a handshake larger than 128 KiB".into(),
                        )));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = tcp.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
                used += n;
            }
        }
    }
}

/// After a failed step: sends the alert rustls queued, if any (best effort, a few steps).
async fn send_alert<S: Side>(
    conn: &mut S,
    tcp: &mut TcpStream,
    incoming: &mut [u8],
) -> io::Result<()> {
    let mut outgoing = vec![0u8; 1024];
    let mut len = 0;
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = conn.process(incoming);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                if let Ok(n) = data.encode(&mut outgoing[len..]) {
                    len += n;
                }
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                break;
            }
            _ => break,
        }
    }
    if len > 0 {
        tcp.write_all(&outgoing[..len]).await?;
        tcp.flush().await?;
    }
    Ok(())
}

/// The stream of a finished handshake: its keys handed to the record layer, bytes that arrived
/// early replayed first, and the peer's certificate kept.
fn secured(
    tcp: TcpStream,
    early: &Early,
    secrets: rustls::ExtractedSecrets,
    keys: Keys,
    peer: Option<CertificateDer<'static>>,
) -> io::Result<Secured> {
    let shared = Shared::new(keys);
    let (r, w) = tcp.into_split();
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    Ok(Secured {
        reader: RecordReader::new(r, Protection::new(rx, rx_seq)?, shared.clone(), early)?,
        writer: RecordWriter::new(w, Protection::new(tx, tx_seq)?, shared),
        peer,
    })
}

/// The client's handshake with `config` on `tcp`.
pub(crate) async fn client(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
) -> io::Result<Secured> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let early = drive(&mut conn, &mut tcp).await?;
    let peer = first_certificate(conn.peer_certificates());
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    secured(tcp, &early, secrets, Keys::Client(kernel), peer)
}

/// The server's handshake with `config` on `tcp`.
pub(crate) async fn server(
    config: Arc<rustls::ServerConfig>,
    mut tcp: TcpStream,
) -> io::Result<Secured> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let early = drive(&mut conn, &mut tcp).await?;
    let peer = first_certificate(conn.peer_certificates());
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    secured(tcp, &early, secrets, Keys::Server(kernel), peer)
}

/// The peer's leaf certificate, if it sent one.
fn first_certificate(chain: Option<&[CertificateDer<'static>]>) -> Option<CertificateDer<'static>> {
    chain
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
}
