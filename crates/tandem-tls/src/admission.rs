//! Who gets a handshake slot: the accept loops of the ring, the rendezvous and the parameter
//! servers admit connections through an [`Admission`], so that outsiders can neither starve the
//! members nor end a forming group.
//!
//! - Every accepted connection's handshake runs in its own task; the accept loop never waits for
//!   one, so a connection that stalls only holds its own slot.
//! - Unauthenticated handshakes are bounded in total and per source address (a connection over a
//!   bound is closed at once); a slot is given back when the handshake ends, either way.
//! - A connection must send its first byte within [`FIRST_BYTE_TIMEOUT`] (members send theirs at
//!   once), so idle sockets are dropped quickly.
//! - Refused connections are counted (`tandem_connections_refused_total{server, reason}`) and
//!   logged at most once a second per server and reason, with the number left unsaid since; they
//!   never end anything.
//!
//! ```
//! use std::net::{IpAddr, Ipv4Addr};
//! use tandem_tls::admission::{Admission, Limits};
//! let a = Admission::with_limits("example", Limits { total: 3, per_source: 2 });
//! let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
//! let (s1, s2) = (a.slot(ip), a.slot(ip));
//! assert!(s1.is_some() && s2.is_some());
//! assert!(a.slot(ip).is_none(), "a source holds at most 2 slots");
//! assert!(a.slot(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))).is_some());
//! drop(s1);
//! assert!(a.slot(ip).is_some(), "a slot is given back when its handshake ends");
//! ```

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an accepted connection may stay silent before its first byte.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds on the handshakes an [`Admission`] runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in progress, from every source together.
    pub total: usize,
    /// Handshakes in progress from one source address.
    pub per_source: usize,
}

impl Default for Limits {
    /// 1024 in total, 256 per source address: far above what members need (a group's ranks
    /// connect once each), and a few KiB each.
    fn default() -> Self {
        Limits {
            total: 1024,
            per_source: 256,
        }
    }
}

/// The admission of one server's connections (cheap to clone: clones share their counts).
#[derive(Debug, Clone)]
pub struct Admission {
    /// What the admission shares with its slots.
    inner: Arc<Inner>,
}

/// What the admission of one server shares between its slots.
#[derive(Debug)]
struct Inner {
    /// The server's name in logs and metrics.
    server: &'static str,
    /// The bounds.
    limits: Limits,
    /// Handshakes in progress.
    pending: Mutex<Pending>,
    /// Connections refused so far.
    refused: AtomicU64,
    /// When each kind of refusal was last logged.
    log: Mutex<HashMap<&'static str, LogWindow>>,
}

/// Handshakes in progress: all of them, and per source address.
#[derive(Debug, Default)]
struct Pending {
    /// All of them.
    total: usize,
    /// Per source address.
    by_source: HashMap<IpAddr, usize>,
}

/// When a refusal of one kind was last logged, and how many were not since (logs stay bounded).
#[derive(Debug, Default)]
struct LogWindow {
    /// When it was last logged.
    last: Option<Instant>,
    /// Refusals since, not logged.
    unsaid: u64,
}

/// A handshake slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    /// The admission it came from.
    inner: Arc<Inner>,
    /// The connection's source address.
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.total = p.total.saturating_sub(1);
            if let Some(n) = p.by_source.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    p.by_source.remove(&self.source);
                }
            }
        }
    }
}

impl Admission {
    /// The admission of the server named `server` (in logs and the metric), default limits.
    pub fn new(server: &'static str) -> Admission {
        Admission::with_limits(server, Limits::default())
    }

    /// The same with explicit limits (each at least 1).
    pub fn with_limits(server: &'static str, limits: Limits) -> Admission {
        Admission {
            inner: Arc::new(Inner {
                server,
                limits: Limits {
                    total: limits.total.max(1),
                    per_source: limits.per_source.max(1),
                },
                pending: Mutex::new(Pending::default()),
                refused: AtomicU64::new(0),
                log: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A slot for a handshake from `source`, or `None` when the bounds are reached (close the
    /// connection then, and call [`Admission::refused`] with reason `busy`).
    pub fn slot(&self, source: IpAddr) -> Option<Slot> {
        let mut p = self.inner.pending.lock().ok()?;
        let from_source = p.by_source.get(&source).copied().unwrap_or(0);
        if p.total >= self.inner.limits.total || from_source >= self.inner.limits.per_source {
            return None;
        }
        p.total += 1;
        *p.by_source.entry(source).or_insert(0) += 1;
        Some(Slot {
            inner: self.inner.clone(),
            source,
        })
    }

    /// Records a connection that was not admitted: counted in the metric under `kind` (`busy`,
    /// `closed`, `silent`, `protocol`, `tls`, `token`, `peer`) and logged with why, at most once a
    /// second for each `kind`.
    /// `notable` false (a connection that closed before sending anything) is counted, not logged.
    pub fn refused(&self, from: SocketAddr, kind: &'static str, why: &dyn Display, notable: bool) {
        self.inner.refused.fetch_add(1, Ordering::Relaxed);
        tandem_observe::metrics::refused(self.inner.server, kind);
        let Some(unsaid) = self.report(kind, notable, Instant::now()) else {
            return;
        };
        // `unsaid`: refusals of this kind counted, not logged, since its last line.
        tracing::warn!(server = self.inner.server, %from, reason = %why, unsaid, "refused a connection");
    }

    /// Whether a refusal of `kind` at `now` is logged: `Some(refusals left unsaid since the last
    /// line of this kind)` when it is (a notable one, a second or more after the last line of its
    /// kind), `None` when it is only counted.
    fn report(&self, kind: &'static str, notable: bool, now: Instant) -> Option<u64> {
        let mut windows = self.inner.log.lock().ok()?;
        let log = windows.entry(kind).or_default();
        let due = log
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if !notable || !due {
            log.unsaid += 1;
            return None;
        }
        log.last = Some(now);
        Some(std::mem::take(&mut log.unsaid))
    }

    /// Source addresses with handshakes in progress (tests: none are kept once they end).
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.inner
            .pending
            .lock()
            .map(|p| p.by_source.len())
            .unwrap_or(0)
    }

    /// How many connections were refused so far.
    pub fn refused_count(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Handshakes in progress now (every source).
    pub fn pending(&self) -> usize {
        self.inner.pending.lock().map(|p| p.total).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn bounds_hold_in_total_and_per_source_and_slots_come_back() {
        let a = Admission::with_limits(
            "t",
            Limits {
                total: 4,
                per_source: 2,
            },
        );
        let s: Vec<_> = [1, 1, 2, 2].iter().map(|i| a.slot(ip(*i))).collect();
        assert!(s.iter().all(Option::is_some));
        assert_eq!(a.pending(), 4);
        assert!(a.slot(ip(3)).is_none(), "the total is reached");
        drop(s);
        assert_eq!(a.pending(), 0);
        assert_eq!(a.sources(), 0, "a source without handshakes is forgotten");
        let keep = (a.slot(ip(1)), a.slot(ip(1)));
        assert!(keep.0.is_some() && keep.1.is_some());
        assert!(a.slot(ip(1)).is_none(), "per source");
        assert!(a.slot(ip(2)).is_some(), "another source is not held back");
        // One of the source's two ends: it still holds the other.
        drop(keep.0);
        assert_eq!(a.sources(), 1);
        let again = a.slot(ip(1));
        assert!(again.is_some(), "its freed slot is available again");
        assert!(a.slot(ip(1)).is_none(), "and the bound holds again");
    }

    #[test]
    fn zero_limits_still_admit_one() {
        let a = Admission::with_limits(
            "t",
            Limits {
                total: 0,
                per_source: 0,
            },
        );
        let first = a.slot(ip(1));
        assert!(first.is_some());
        assert!(a.slot(ip(1)).is_none());
    }

    #[test]
    fn at_most_one_line_a_second_per_reason_says_how_many_went_unsaid() {
        let a = Admission::new("t");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(a.report("tls", true, at(0)), Some(0), "the first is logged");
        assert_eq!(a.report("tls", true, at(10)), None, "within the second");
        assert_eq!(
            a.report("tls", false, at(20)),
            None,
            "closed-at-once: counted only"
        );
        assert_eq!(
            a.report("token", true, at(30)),
            Some(0),
            "another reason has its own second"
        );
        assert_eq!(a.report("tls", true, at(999)), None, "just under a second");
        assert_eq!(
            a.report("tls", true, at(1000)),
            Some(3),
            "a second later, with the unsaid"
        );
        assert_eq!(
            a.report("tls", false, at(5000)),
            None,
            "not notable: never a line"
        );
        assert_eq!(a.report("tls", true, at(5001)), Some(1));
    }

    #[test]
    fn refusals_are_counted_whether_logged_or_not() {
        let a = Admission::new("t");
        let from: SocketAddr = "10.0.0.1:5".parse().expect("addr");
        for _ in 0..5 {
            a.refused(from, "closed", &"closed before sending anything", false);
        }
        a.refused(from, "tls", &"bad certificate", true);
        a.refused(from, "tls", &"bad certificate", true);
        assert_eq!(a.refused_count(), 7);
    }
}
