//! Entry points for the fuzz targets of `fuzz/` (feature `fuzzing`; not part of the API): the
//! record layer fed records a peer could seal, and the handshake drivers fed what a peer could
//! send before any key exists. Each runs one real connection over loopback and must end, with
//! data or an error, never a panic or a hang.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::stream::{Stream, WriteHalf, accept, connect};
use crate::{Authority, Security, TlsContext};

/// How long one fuzz input may take.
const LIMIT: Duration = Duration::from_secs(5);

/// A job's worth of TLS for the fuzz targets: a runtime, a server's and a client's security.
struct Job {
    /// The runtime connections run on.
    rt: tokio::runtime::Runtime,
    /// A server's TLS.
    server: Security,
    /// A client's TLS.
    client: Security,
}

/// The fuzz job, made once per process.
fn job() -> &'static Job {
    /// Made once.
    static JOB: OnceLock<Job> = OnceLock::new();
    JOB.get_or_init(|| {
        let ca = Authority::generate("fuzz", 1).expect("a CA");
        let member = |name: &str| {
            let cert = ca
                .issue(name, &["127.0.0.1".into()], 1)
                .expect("a certificate");
            Security::tls(
                TlsContext::from_pem(
                    ca.cert_pem.as_bytes(),
                    cert.cert_pem.as_bytes(),
                    cert.key_pem.as_bytes(),
                    ["ca".into(), "cert".into(), "key".into()],
                )
                .expect("a context"),
            )
        };
        Job {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            server: member("rank-0"),
            client: member("rank-1"),
        }
    })
}

/// A connected pair of TLS streams over loopback.
async fn pair(j: &Job) -> Option<(Stream, Stream)> {
    let l = TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = l.local_addr().ok()?;
    let srv = async {
        let (tcp, _) = l.accept().await.ok()?;
        accept(&j.server, tcp, LIMIT).await.ok()
    };
    let cli = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        connect(&j.client, tcp, &addr.to_string(), LIMIT).await.ok()
    };
    let (s, c) = tokio::join!(srv, cli);
    Some((s?, c?))
}

/// `data` as records the client seals and sends to the server (`[type][len u16][content]`
/// each; a leading byte with its low bit set sends them to the client instead), then the server
/// (or client) reads until the data ends or fails. Whatever arrives must be the application
/// data sent, in order.
pub fn record_layer(data: &[u8]) {
    let j = job();
    j.rt.block_on(async {
        let Some((s, c)) = pair(j).await else {
            return;
        };
        let ((sr, sw), (cr, cw)) = (s.into_split(), c.into_split());
        let to_client = data.first().is_some_and(|b| b & 1 == 1);
        let (mut r, mut w, _keep) = if to_client {
            (cr, sw, (sr, cw))
        } else {
            (sr, cw, (cr, sw))
        };
        let WriteHalf::Tls { inner, .. } = &mut w else {
            return;
        };
        let mut sent = Vec::new();
        let mut at = 1;
        while let Some(&[typ, hi, lo]) = data.get(at..at + 3) {
            let n = usize::from(u16::from_be_bytes([hi, lo])) % (1 << 15);
            let content = data
                .get(at + 3..(at + 3 + n).min(data.len()))
                .unwrap_or(&[]);
            if inner.queue_record(typ, content).is_err() {
                break;
            }
            // What the reader will take it for: the last non-zero byte of content + type.
            let mut inner = content.to_vec();
            inner.push(typ);
            if let Some(last) = inner.iter().rposition(|b| *b != 0)
                && inner[last] == 23
            {
                sent.extend_from_slice(&inner[..last]);
            }
            at += 3 + content.len();
        }
        let _ = tokio::time::timeout(LIMIT, async {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        })
        .await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(LIMIT, r.read_to_end(&mut got)).await;
        // Application data arrives as sent (content types are taken from the record's end, so
        // trailing zeros of a content are padding, and a record may end the stream early).
        assert!(
            sent.starts_with(&got) || got.is_empty(),
            "the reader returned data that was not sent"
        );
    });
}

/// `data` sent raw to a server's handshake (as a client's first flight), or, with its first
/// byte odd, to a client's (as a server's answer); the handshake must end within its deadline.
pub fn handshake(data: &[u8]) {
    let j = job();
    let to_client = data.first().is_some_and(|b| b & 1 == 1);
    let bytes = data.get(1..).unwrap_or(&[]).to_vec();
    j.rt.block_on(async {
        let Ok(l) = TcpListener::bind("127.0.0.1:0").await else {
            return;
        };
        let Ok(addr) = l.local_addr() else {
            return;
        };
        let peer = async {
            if to_client {
                let (mut tcp, _) = l.accept().await.ok()?;
                let mut first = [0u8; 512];
                let _ = tokio::time::timeout(LIMIT, tcp.read(&mut first)).await;
                let _ = tcp.write_all(&bytes).await;
                let _ = tcp.shutdown().await;
                Some(tcp)
            } else {
                let mut tcp = TcpStream::connect(addr).await.ok()?;
                let _ = tcp.write_all(&bytes).await;
                let _ = tcp.shutdown().await;
                Some(tcp)
            }
        };
        let me = async {
            if to_client {
                let tcp = TcpStream::connect(addr).await.ok()?;
                connect(&j.client, tcp, &addr.to_string(), LIMIT).await.ok()
            } else {
                let (tcp, _) = l.accept().await.ok()?;
                accept(&j.server, tcp, LIMIT).await.ok()
            }
        };
        let (_peer, admitted) = tokio::join!(peer, me);
        assert!(
            admitted.is_none(),
            "a handshake completed with a peer that holds no key"
        );
    });
}
