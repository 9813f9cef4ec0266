//! The full mesh of authenticated TCP connections between the ranks of a group.
//!
//! Rank `i` connects to every rank `j > i` and accepts from every rank `j < i`, concurrently. Each
//! connection opens with a handshake (magic, protocol version, rank, group id, job token); the accepting
//! side answers one byte. Strangers, wrong tokens and unexpected ranks are refused and logged, never
//! admitted, and the accept loop goes on until the expected peers have arrived or the deadline passes.

use std::time::Duration;

use tandem_core::{Error, Result};
use tandem_rendezvous::JobToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::frame::{
    HELLO_BAD_PEER, HELLO_BAD_TOKEN, HELLO_FIXED, HELLO_OK, decode_hello, encode_hello,
};

/// Most refused connections tolerated while waiting for the real peers.
pub const MAX_STRANGERS: usize = 256;

/// How long an accepted connection may take to send its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// One read half and one write half per peer (`None` at this rank's own index).
#[derive(Debug, Default)]
pub struct Mesh {
    /// Where to read what peer `i` sends.
    pub readers: Vec<Option<OwnedReadHalf>>,
    /// Where to write what peer `i` should read.
    pub writers: Vec<Option<OwnedWriteHalf>>,
}

/// What this rank needs to build its part of the mesh.
#[derive(Debug, Clone)]
pub struct MeshSpec<'a> {
    /// This rank.
    pub rank: usize,
    /// Every rank's listening address, by rank.
    pub addrs: &'a [String],
    /// The job token.
    pub token: &'a JobToken,
    /// The group id (see [`super::frame::group_id`]).
    pub group: u64,
}

fn setup(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

async fn connect_one(spec: &MeshSpec<'_>, peer: usize, deadline: Instant) -> Result<TcpStream> {
    let addr = &spec.addrs[peer];
    let mut backoff = tandem_core::Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(500),
        deadline.into_std(),
    );
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(left, TcpStream::connect(addr.as_str())).await;
        let err = match attempt {
            Ok(Ok(mut s)) => {
                setup(&s);
                let hello = encode_hello(spec.rank as u32, spec.group, spec.token.as_str());
                let exchange = async {
                    s.write_all(&hello).await?;
                    let mut reply = [0u8; 1];
                    s.read_exact(&mut reply).await?;
                    Ok::<u8, std::io::Error>(reply[0])
                };
                match tokio::time::timeout(left.min(HELLO_TIMEOUT), exchange).await {
                    Ok(Ok(HELLO_OK)) => return Ok(s),
                    Ok(Ok(HELLO_BAD_TOKEN)) => {
                        return Err(Error::Authentication {
                            peer: format!("rank {peer} at {addr}"),
                            reason: "it refused our job token".into(),
                        });
                    }
                    Ok(Ok(code)) => format!("refused with code {code}"),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "handshake timed out".into(),
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".into(),
        };
        let Some(delay) = backoff.next_delay() else {
            return Err(Error::timeout(
                format!("a connection to rank {peer} at {addr} (last error: {err})"),
                left,
            ));
        };
        tokio::time::sleep(delay).await;
    }
}

async fn read_hello(
    s: &mut TcpStream,
    spec: &MeshSpec<'_>,
    world: usize,
) -> std::result::Result<usize, (u8, String)> {
    let mut fixed = [0u8; HELLO_FIXED];
    let read = async {
        s.read_exact(&mut fixed).await?;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(HELLO_TIMEOUT, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((HELLO_BAD_PEER, format!("handshake unreadable: {e}"))),
        Err(_) => return Err((HELLO_BAD_PEER, "no handshake within 5 s".into())),
    }
    let hello = decode_hello(&fixed).map_err(|m| (HELLO_BAD_PEER, m))?;
    let mut token = vec![0u8; hello.token_len];
    match tokio::time::timeout(HELLO_TIMEOUT, s.read_exact(&mut token)).await {
        Ok(Ok(_)) => {}
        _ => return Err((HELLO_BAD_PEER, "token unreadable".into())),
    }
    if !spec.token.matches(&token) {
        return Err((
            HELLO_BAD_TOKEN,
            format!("wrong job token (claimed rank {})", hello.rank),
        ));
    }
    if hello.group != spec.group {
        return Err((
            HELLO_BAD_PEER,
            format!("rank {} belongs to another group", hello.rank),
        ));
    }
    let rank = hello.rank as usize;
    if rank >= spec.rank || rank >= world {
        return Err((
            HELLO_BAD_PEER,
            format!("rank {rank} should not connect to rank {}", spec.rank),
        ));
    }
    Ok(rank)
}

async fn accept_all(
    listener: &TcpListener,
    spec: &MeshSpec<'_>,
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>> {
    let world = spec.addrs.len();
    let mut got: Vec<Option<TcpStream>> = (0..spec.rank).map(|_| None).collect();
    let mut strangers = 0;
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (mut s, from) = match tokio::time::timeout(left, listener.accept()).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(Error::io("accepting a peer connection", e)),
            Err(_) => {
                let missing: Vec<String> = (0..spec.rank)
                    .filter(|r| got[*r].is_none())
                    .map(|r| r.to_string())
                    .collect();
                return Err(Error::timeout(
                    format!("connections from ranks [{}]", missing.join(", ")),
                    left,
                ));
            }
        };
        setup(&s);
        match read_hello(&mut s, spec, world).await {
            Ok(rank) if got[rank].is_none() => {
                if s.write_all(&[HELLO_OK]).await.is_ok() {
                    got[rank] = Some(s);
                }
            }
            Ok(rank) => {
                tracing::warn!(%from, rank, "refused a second connection claiming the same rank");
                let _ = s.write_all(&[HELLO_BAD_PEER]).await;
                strangers += 1;
            }
            Err((code, why)) => {
                tracing::warn!(%from, reason = %why, "refused a connection");
                let _ = s.write_all(&[code]).await;
                strangers += 1;
            }
        }
        if strangers > MAX_STRANGERS {
            return Err(Error::Authentication {
                peer: "peer connections".into(),
                reason: format!(
                    "refused {strangers} connections while waiting for the group's ranks"
                ),
            });
        }
    }
    Ok(got)
}

/// Builds this rank's part of the mesh: connects up, accepts down, all before `deadline`.
pub async fn establish(
    listener: &TcpListener,
    spec: &MeshSpec<'_>,
    deadline: Instant,
) -> Result<Mesh> {
    let world = spec.addrs.len();
    let connect = async {
        let mut out = Vec::new();
        for peer in spec.rank + 1..world {
            out.push(connect_one(spec, peer, deadline).await?);
        }
        Ok::<_, Error>(out)
    };
    let (up, down) = tokio::join!(connect, accept_all(listener, spec, deadline));
    let (up, down) = (up?, down?);
    let mut mesh = Mesh {
        readers: (0..world).map(|_| None).collect(),
        writers: (0..world).map(|_| None).collect(),
    };
    let streams = down.into_iter().enumerate().chain(
        up.into_iter()
            .enumerate()
            .map(|(i, s)| (spec.rank + 1 + i, Some(s))),
    );
    for (peer, s) in streams {
        if let Some(s) = s {
            let (r, w) = s.into_split();
            mesh.readers[peer] = Some(r);
            mesh.writers[peer] = Some(w);
        }
    }
    Ok(mesh)
}
