//! The full mesh of authenticated connections between the ranks of a group.
//!
//! Rank `i` connects to every rank `j > i` and accepts from every rank `j < i`, concurrently. Each
//! connection is mutual TLS when the process has the job's certificates (plaintext only where
//! [`Security`] allows it), then opens with a handshake (magic, protocol version, rank, group id,
//! job token, all inside TLS); the accepting side answers one byte. A certificate that names a rank
//! (`rank-<n>`) must match the rank its holder claims. Strangers, refused certificates, wrong tokens
//! and unexpected ranks are refused, counted and logged (at a bounded rate), never admitted, and the
//! accept loop goes on until the expected peers have arrived or the deadline passes: no number of
//! refused connections ends a forming group.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tandem_core::{Error, Result};
use tandem_rendezvous::JobToken;
use tandem_tls::Security;
use tandem_tls::admission::Admission;
use tandem_tls::identity::Role;
use tandem_tls::local::NotThisUser;
use tandem_tls::stream::{ReadHalf, Stream, TLS_ALERT, WriteHalf};

use super::congestion::CongestionChoice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::time::Instant;

use super::frame::{
    HELLO_BAD_PEER, HELLO_BAD_TOKEN, HELLO_FIXED, HELLO_OK, decode_hello, encode_hello,
};

/// How long an accepted connection may take to send its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a rank accepts its peers: its TCP listener (the address it publishes) and, beside it, the
/// local socket that stands for that address on this machine (see [`tandem_tls::local`]).
#[derive(Debug)]
pub struct Listener {
    /// The TCP listener.
    pub tcp: TcpListener,
    /// Its local socket, when local sockets are on and the name was free.
    pub local: Option<UnixListener>,
}

impl Listener {
    /// Binds `addr` (`host:port`) and its local socket. Call inside the runtime that will drive
    /// the connections.
    pub async fn bind(addr: &str) -> std::io::Result<Listener> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tandem_tls::local::listen(&tcp.local_addr()?);
        Ok(Listener { tcp, local })
    }
}

/// One read half and one write half per peer (`None` at this rank's own index).
#[derive(Debug, Default)]
pub struct Mesh {
    /// Where to read what peer `i` sends.
    pub readers: Vec<Option<ReadHalf>>,
    /// Where to write what peer `i` should read.
    pub writers: Vec<Option<WriteHalf>>,
}

/// How a rank's connections to its peers are carried, counted by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Links {
    /// Local sockets to processes of this user on this machine (see [`tandem_tls::local`]).
    pub local: usize,
    /// Mutual TLS over TCP.
    pub tls: usize,
    /// Plaintext TCP.
    pub plain: usize,
}

impl std::fmt::Display for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} over local sockets, {} over TLS, {} in plaintext",
            self.local, self.tls, self.plain
        )
    }
}

impl Mesh {
    /// How this rank's connections are carried.
    pub fn links(&self) -> Links {
        let mut links = Links::default();
        for r in self.readers.iter().flatten() {
            match r {
                ReadHalf::Local(_) => links.local += 1,
                ReadHalf::Tls { .. } => links.tls += 1,
                ReadHalf::Plain(_) => links.plain += 1,
            }
        }
        links
    }
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
    /// How the connections are secured.
    pub security: &'a Security,
    /// The TCP congestion control set on every connection.
    pub congestion: &'a CongestionChoice,
    /// The group's ranks are the job's (its default group): a certificate naming `rank-<n>` is
    /// only accepted from rank `n`. In other groups (subgroups, elastic epochs, whose ranks are
    /// numbered anew) any rank of the job is.
    pub job_ranks: bool,
}

impl MeshSpec<'_> {
    /// Whether the peer of `s`, claiming group rank `rank`, may be that rank of this ring: its
    /// certificate, when it names a rank, must be that rank's in the job's own group; when this
    /// process's certificate names its identity, the peer's must be a rank of the same job.
    fn check_rank(&self, s: &Stream, rank: usize) -> Option<String> {
        if self.job_ranks
            && let Some(why) = wrong_rank(s, rank)
        {
            return Some(why);
        }
        let exact = self.job_ranks;
        let ring = |r: &Role| matches!(r, Role::Rank(n) if !exact || *n == rank);
        self.security
            .check_peer(s, "the ring", &ring)
            .err()
            .map(|e| e.to_string())
    }
}

/// Socket options of every ring connection (no Nagle delay).
fn setup(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Why `stream`'s certificate does not allow its holder to be `rank`: it names another rank.
fn wrong_rank(stream: &Stream, rank: usize) -> Option<String> {
    let named = tandem_tls::peer_rank(&stream.peer_certificate()?)?;
    (named != rank).then(|| format!("its certificate is rank {named}'s, not rank {rank}'s"))
}

/// Dials `peer` until `deadline` (with backoff while it is not listening yet) and says hello.
async fn connect_one(spec: &MeshSpec<'_>, peer: usize, deadline: Instant) -> Result<Stream> {
    let addr = &spec.addrs[peer];
    let mut backoff = tandem_core::Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(500),
        deadline.into_std(),
    );
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Resolved once per attempt; without certificates only loopback addresses are dialled.
        let targets = match spec.security.resolve("the ring", addr).await {
            Ok(t) => t,
            Err(e @ Error::Config { .. }) => return Err(e),
            Err(_) => Vec::new(),
        };
        if let Some(s) = connect_local(&targets).await {
            match hello(spec, peer, Stream::Local(s), left.min(HELLO_TIMEOUT)).await? {
                Ok(s) => return Ok(s),
                Err(why) => tracing::debug!(peer, "the local socket failed ({why}); trying TCP"),
            }
        }
        let attempt = tokio::time::timeout(left, spec.congestion.connect_to(addr, &targets)).await;
        let err = match attempt {
            Ok(Ok(tcp)) => match open(spec, peer, tcp, left.min(HELLO_TIMEOUT)).await? {
                Ok(s) => return Ok(s),
                Err(why) => why.to_string(),
            },
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

/// Secures a connection made to `peer` and exchanges the handshake within `within`. The outer
/// error is final (a refused certificate or token); the inner one is worth another attempt.
async fn open(
    spec: &MeshSpec<'_>,
    peer: usize,
    tcp: TcpStream,
    within: Duration,
) -> Result<std::result::Result<Stream, Retry>> {
    let addr = &spec.addrs[peer];
    let refused = |reason: String| refusal(peer, addr, reason);
    setup(&tcp);
    let s = match tandem_tls::stream::connect(spec.security, tcp, addr, within).await {
        Ok(s) => s,
        Err(e) if e.refused => return Err(refused(e.reason)),
        Err(e) => return Ok(Err(Retry::Handshake(e.reason))),
    };
    if let Some(why) = spec.check_rank(&s, peer) {
        return Err(refused(why));
    }
    hello(spec, peer, s, within).await
}

/// The final error for `peer` at `addr` refusing this rank (or this rank it), with why.
fn refusal(peer: usize, addr: &str, reason: String) -> Error {
    Error::Authentication {
        peer: format!("rank {peer} at {addr}"),
        reason,
    }
}

/// The first of `targets` whose local socket a process of this user holds.
async fn connect_local(targets: &[std::net::SocketAddr]) -> Option<tokio::net::UnixStream> {
    for t in targets {
        if let Some(s) = tandem_tls::local::connect(t).await {
            return Some(s);
        }
    }
    None
}

/// Sends this rank's hello on a secured connection to `peer` and reads the answer, within
/// `within`; errors as for [`open`].
async fn hello(
    spec: &MeshSpec<'_>,
    peer: usize,
    mut s: Stream,
    within: Duration,
) -> Result<std::result::Result<Stream, Retry>> {
    let addr = &spec.addrs[peer];
    let refused = |reason: String| refusal(peer, addr, reason);
    let hello = encode_hello(spec.rank as u32, spec.group, spec.token.as_str());
    let exchange = async {
        s.write_all(&hello).await?;
        s.flush().await?;
        let mut reply = [0u8; 1];
        s.read_exact(&mut reply).await?;
        Ok::<u8, std::io::Error>(reply[0])
    };
    Ok(match tokio::time::timeout(within, exchange).await {
        Ok(Ok(HELLO_OK)) => Ok(s),
        Ok(Ok(HELLO_BAD_TOKEN)) => return Err(refused("it refused our job token".into())),
        Ok(Ok(TLS_ALERT)) => {
            return Err(refused(
                "it requires TLS and this process has no certificates (set TANDEM_TLS_DIR to \
                 the job's, as on the other ranks)"
                    .into(),
            ));
        }
        Ok(Ok(code)) => Err(Retry::Code(code)),
        Ok(Err(e)) if tandem_tls::stream::is_tls_error(&e) => {
            return Err(refused(tandem_tls::stream::explain_io(&e)));
        }
        Ok(Err(e)) => Err(Retry::Io(e)),
        Err(_) => Err(Retry::TimedOut),
    })
}

/// Why one attempt to open a connection to a peer failed, where another may succeed (the peer
/// not listening yet, restarting, or busy).
#[derive(Debug, thiserror::Error)]
enum Retry {
    /// The TLS handshake did not finish.
    #[error("{0}")]
    Handshake(String),
    /// The peer answered the hello with a code that is not a refusal.
    #[error("refused with code {0}")]
    Code(u8),
    /// The connection broke.
    #[error("{0}")]
    Io(std::io::Error),
    /// No answer in time.
    #[error("handshake timed out")]
    TimedOut,
}

/// Reads and checks a dialler's hello (job, group, rank, world); returns its rank, or the refusal
/// to send back and why.
async fn read_hello(
    s: &mut Stream,
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
    let hello = decode_hello(&fixed).map_err(|m| (HELLO_BAD_PEER, m.to_string()))?;
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

/// Admits one accepted connection: TLS (or plaintext), then the hello. On a refusal the peer is
/// told why (a reason code) and the metric's reason comes back with the words.
async fn admit(
    tcp: TcpStream,
    spec: &MeshSpec<'_>,
    world: usize,
) -> std::result::Result<(usize, Stream), Refusal> {
    setup(&tcp);
    let s = tandem_tls::stream::accept(spec.security, tcp, HELLO_TIMEOUT)
        .await
        .map_err(|r| Refusal {
            kind: r.kind,
            why: r.reason,
            notable: r.notable,
        })?;
    admit_hello(s, spec, world).await
}

/// Admits one connection of the local socket: its process runs as this user (the kernel says
/// so), then the hello as on TCP.
async fn admit_local(
    accepted: std::io::Result<std::result::Result<tokio::net::UnixStream, NotThisUser>>,
    spec: &MeshSpec<'_>,
    world: usize,
) -> std::result::Result<(usize, Stream), Refusal> {
    let refusal = |kind, why| Refusal {
        kind,
        why,
        notable: true,
    };
    match accepted {
        Ok(Ok(s)) => admit_hello(Stream::Local(s), spec, world).await,
        Ok(Err(why)) => Err(refusal("user", why.to_string())),
        Err(e) => Err(refusal(
            "closed",
            format!("accepting a local connection: {e}"),
        )),
    }
}

/// Reads and checks the hello of an accepted, secured connection.
async fn admit_hello(
    mut s: Stream,
    spec: &MeshSpec<'_>,
    world: usize,
) -> std::result::Result<(usize, Stream), Refusal> {
    let refuse = |code: u8, kind: &'static str, why: String| (code, kind, why);
    let verdict = match read_hello(&mut s, spec, world).await {
        Ok(rank) => match spec.check_rank(&s, rank) {
            Some(why) => Err(refuse(
                HELLO_BAD_PEER,
                "peer",
                format!("rank {rank}: {why}"),
            )),
            None => Ok(rank),
        },
        Err((code, why)) => Err(refuse(
            code,
            if code == HELLO_BAD_TOKEN {
                "token"
            } else {
                "peer"
            },
            why,
        )),
    };
    match verdict {
        Ok(rank) => Ok((rank, s)),
        Err((code, kind, why)) => {
            let _ = tokio::time::timeout(HELLO_TIMEOUT, async {
                let _ = s.write_all(&[code]).await;
                let _ = s.flush().await;
            })
            .await;
            Err(Refusal {
                kind,
                why,
                notable: true,
            })
        }
    }
}

/// Why a connection was not admitted to the mesh.
struct Refusal {
    /// The reason's name in the metrics.
    kind: &'static str,
    /// The words logged.
    why: String,
    /// Whether it is worth a warning (a stranger probing is not).
    notable: bool,
}

/// An accepted connection being admitted: where from, and the verdict.
type Admitting<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    std::net::SocketAddr,
                    std::result::Result<(usize, Stream), Refusal>,
                ),
            > + Send
            + 'a,
    >,
>;

/// The next connection of the local socket (its user checked), or never without one.
async fn local_accept(
    local: Option<&UnixListener>,
) -> std::io::Result<std::result::Result<tokio::net::UnixStream, NotThisUser>> {
    match local {
        Some(l) => tandem_tls::local::accept(l).await,
        None => std::future::pending().await,
    }
}

/// Accepts the connections of the ranks below this one. Each accepted connection is admitted
/// concurrently with the others and with the accept loop (bounded per source and in total, see
/// [`tandem_tls::admission`]), so connections that stall, close or speak garbage neither hold
/// the members back nor end the formation: only the deadline does.
async fn accept_all(
    listener: &Listener,
    spec: &MeshSpec<'_>,
    deadline: Instant,
) -> Result<Vec<Option<Stream>>> {
    let world = spec.addrs.len();
    let mut got: Vec<Option<Stream>> = (0..spec.rank).map(|_| None).collect();
    let admission = Admission::new("ring");
    let mut admitting: FuturesUnordered<Admitting<'_>> = FuturesUnordered::new();
    let started = Instant::now();
    let here = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    while got.iter().any(Option::is_none) {
        tokio::select! {
            accepted = local_accept(listener.local.as_ref()) => {
                // Same user (checked in admit_local): trusted with a slot of its own, still bounded.
                match admission.slot(here.ip()) {
                    Some(slot) => admitting.push(Box::pin(async move {
                        let verdict = admit_local(accepted, spec, world).await;
                        drop(slot);
                        (here, verdict)
                    }) as Admitting<'_>),
                    None => admission.refused(here, "busy", &"too many handshakes in progress", true),
                }
            }
            accepted = listener.tcp.accept() => {
                let (tcp, from) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: wait a little (the deadline still holds).
                        tracing::warn!(error = %e, "accepting a peer connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                match admission.slot(from.ip()) {
                    Some(slot) => admitting.push(Box::pin(async move {
                        let verdict = admit(tcp, spec, world).await;
                        drop(slot);
                        (from, verdict)
                    })),
                    None => admission.refused(from, "busy", &"too many handshakes in progress", true),
                }
            }
            Some((from, verdict)) = admitting.next(), if !admitting.is_empty() => match verdict {
                Ok((rank, mut s)) if got[rank].is_none() => {
                    if s.write_all(&[HELLO_OK]).await.is_ok() && s.flush().await.is_ok() {
                        got[rank] = Some(s);
                    }
                }
                Ok((rank, mut s)) => {
                    let _ = s.write_all(&[HELLO_BAD_PEER]).await;
                    admission.refused(from, "peer", &format!("a second connection claiming rank {rank}"), true);
                }
                Err(r) => admission.refused(from, r.kind, &r.why, r.notable),
            },
            _ = tokio::time::sleep_until(deadline) => {
                let missing: Vec<String> = (0..spec.rank)
                    .filter(|r| got[*r].is_none())
                    .map(|r| r.to_string())
                    .collect();
                let refused = admission.refused_count();
                return Err(Error::timeout(
                    format!(
                        "connections from ranks [{}]{}",
                        missing.join(", "),
                        if refused > 0 { format!(" ({refused} other connections refused meanwhile)") } else { String::new() }
                    ),
                    deadline.saturating_duration_since(started),
                ));
            }
        }
    }
    Ok(got)
}

/// Builds this rank's part of the mesh: connects up, accepts down, all before `deadline`.
pub async fn establish(
    listener: &Listener,
    spec: &MeshSpec<'_>,
    deadline: Instant,
) -> Result<Mesh> {
    let world = spec.addrs.len();
    // Accepted connections inherit the listener's congestion control (set on it when it was
    // bound, before any peer could know its address; again here for listeners made elsewhere).
    spec.congestion.apply(&listener.tcp);
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
    tracing::info!(
        rank = spec.rank,
        "connected to the other ranks: {}",
        mesh.links()
    );
    Ok(mesh)
}
