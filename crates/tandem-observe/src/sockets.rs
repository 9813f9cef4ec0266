//! Bytes on the wire to and from each peer, as the kernel counts them (`TCP_INFO`), read when the
//! metrics are scraped: nothing is counted on the data path of a TCP connection. A local socket
//! (Unix domain, see `tandem_tls::local`) has no such counters: its halves count what passes
//! through them ([`watch_counted`]).

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// A connection counted: its peer and where its counts are read.
struct Watched {
    id: u64,
    peer: u32,
    source: Source,
}

/// Where a watched connection's counts come from.
enum Source {
    /// The kernel's TCP counters of this socket.
    Tcp(RawFd),
    /// Counters kept by the connection itself: (sent, received).
    Counted(Arc<AtomicU64>, Arc<AtomicU64>),
}

impl Source {
    /// (sent, received, retransmitted) so far.
    fn counts(&self) -> Option<(u64, u64, u64)> {
        match self {
            Source::Tcp(fd) => tcp_counts(*fd),
            Source::Counted(s, r) => {
                Some((s.load(Ordering::Relaxed), r.load(Ordering::Relaxed), 0))
            }
        }
    }
}

/// The connections counted now, and the totals of those closed.
#[derive(Default)]
struct Table {
    next: u64,
    live: Vec<Watched>,
    /// Totals of closed sockets, per peer: (sent, received, retransmits).
    closed: BTreeMap<u32, (u64, u64, u64)>,
}

/// The process's table, made at the first connection watched.
static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// Counts one connection to a peer until dropped; drop it before the socket is closed.
#[derive(Debug)]
pub struct SocketWatch {
    id: Option<u64>,
}

/// Counts the bytes of the TCP socket `fd`, connected to `peer`, in the metrics from now until the
/// returned guard is dropped (which must happen before `fd` is closed).
pub fn watch_socket(peer: usize, fd: RawFd) -> SocketWatch {
    watch(peer, Source::Tcp(fd))
}

/// Counts a connection to `peer` that keeps its own byte counters (`sent`, `received`), until
/// the returned guard is dropped.
pub fn watch_counted(peer: usize, sent: Arc<AtomicU64>, received: Arc<AtomicU64>) -> SocketWatch {
    watch(peer, Source::Counted(sent, received))
}

/// Starts counting a connection to `peer`; nothing while observation is off.
fn watch(peer: usize, source: Source) -> SocketWatch {
    if !crate::active() {
        return SocketWatch { id: None };
    }
    let Ok(mut t) = TABLE.lock() else {
        return SocketWatch { id: None };
    };
    let t = t.get_or_insert_with(Table::default);
    let id = t.next;
    t.next += 1;
    t.live.push(Watched {
        id,
        peer: peer as u32,
        source,
    });
    SocketWatch { id: Some(id) }
}

impl Drop for SocketWatch {
    fn drop(&mut self) {
        let Some(id) = self.id else {
            return;
        };
        let Ok(mut t) = TABLE.lock() else {
            return;
        };
        let Some(t) = t.as_mut() else {
            return;
        };
        if let Some(i) = t.live.iter().position(|w| w.id == id) {
            let w = t.live.swap_remove(i);
            if let Some((s, r, x)) = w.source.counts() {
                let c = t.closed.entry(w.peer).or_default();
                c.0 += s;
                c.1 += r;
                c.2 += x;
            }
        }
    }
}

/// The bytes a TCP socket has carried, as the kernel counts them: (sent and acknowledged by the
/// peer, received). `None` when `fd` is not an open TCP socket.
///
/// ```
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
/// use std::os::fd::AsRawFd;
/// assert!(tandem_observe::tcp_bytes(listener.as_raw_fd()).is_some());
/// assert_eq!(tandem_observe::tcp_bytes(-1), None);
/// ```
pub fn tcp_bytes(fd: RawFd) -> Option<(u64, u64)> {
    tcp_counts(fd).map(|(sent, received, _)| (sent, received))
}

/// The congestion control a TCP socket uses (`TCP_CONGESTION`: `cubic`, `bbr`, ...). `None` when
/// `fd` is not an open TCP socket.
///
/// ```
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// use std::os::fd::AsRawFd;
/// assert!(tandem_observe::tcp_congestion(listener.as_raw_fd()).is_some());
/// assert_eq!(tandem_observe::tcp_congestion(-1), None);
/// ```
#[allow(unsafe_code)]
pub fn tcp_congestion(fd: RawFd) -> Option<String> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `name` is a writable buffer of `len` bytes, passed with its length by pointer as
    // getsockopt requires; the kernel writes at most `len` bytes. A closed or foreign `fd` only
    // makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let name = &name[..(len as usize).min(name.len())];
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(name).into_owned()).filter(|s| !s.is_empty())
}

/// (bytes acknowledged by the peer, bytes received from it, segments retransmitted).
#[allow(unsafe_code)]
fn tcp_counts(fd: RawFd) -> Option<(u64, u64, u64)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes and `len` is passed by pointer as
    // getsockopt requires; the kernel writes at most `len` bytes and updates `len`. `fd` is a
    // socket kept open by the caller (watched sockets are removed before they close, under the
    // same lock as this read).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised, then (partly) filled by the kernel; every field is a plain integer.
    let info = unsafe { info.assume_init() };
    // The kernel's count includes the SYN (and a FIN once acknowledged): one byte each.
    Some((
        info.tcpi_bytes_acked.saturating_sub(1),
        info.tcpi_bytes_received,
        u64::from(info.tcpi_total_retrans),
    ))
}

/// Bytes to and from each peer, read from the sockets' counts at scrape time.
fn per_peer() -> BTreeMap<u32, (u64, u64, u64)> {
    let Ok(t) = TABLE.lock() else {
        return BTreeMap::new();
    };
    let Some(t) = t.as_ref() else {
        return BTreeMap::new();
    };
    let mut per_peer = t.closed.clone();
    for w in &t.live {
        if let Some((s, r, x)) = w.source.counts() {
            let c = per_peer.entry(w.peer).or_default();
            c.0 += s;
            c.1 += r;
            c.2 += x;
        }
    }
    per_peer
}

/// The label of per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: u32,
}

/// Which of a peer's (sent, received, retransmitted) counts a family shows.
type Pick = fn(&(u64, u64, u64)) -> u64;

/// `tandem_peer_sent_bytes_total`, `tandem_peer_received_bytes_total` and
/// `tandem_peer_retransmits_total`, as the kernel counts them when the registry is scraped.
#[derive(Debug)]
pub(crate) struct PeerBytes;

impl Collector for PeerBytes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let per_peer = per_peer();
        if per_peer.is_empty() {
            return Ok(());
        }
        let families: [(&str, &str, Pick); 3] = [
            (
                "tandem_peer_sent_bytes",
                "Bytes sent to each peer and acknowledged (kernel TCP count; local sockets: bytes written)",
                |c| c.0,
            ),
            (
                "tandem_peer_received_bytes",
                "Bytes received from each peer (kernel TCP count; local sockets: bytes read)",
                |c| c.1,
            ),
            (
                "tandem_peer_retransmits",
                "TCP segments retransmitted to each peer",
                |c| c.2,
            ),
        ];
        for (name, help, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (peer, counts) in &per_peer {
                let labels = PeerLabel { peer: *peer };
                ConstCounter::new(pick(counts)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn the_kernel_counts_the_bytes_of_a_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(&[7u8; 5000]).unwrap();
        let mut got = vec![0u8; 5000];
        b.read_exact(&mut got).unwrap();
        b.write_all(&[1u8; 300]).unwrap();
        let mut back = [0u8; 300];
        a.read_exact(&mut back).unwrap();
        let (sent, received, _) = tcp_counts(a.as_raw_fd()).unwrap();
        assert_eq!(received, 300);
        assert_eq!(sent, 5000);
        assert!(tcp_counts(-1).is_none());
    }
}
