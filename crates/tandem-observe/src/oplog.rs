//! The flight recorder of one stream of operations that one thread at a time writes (a process
//! group's collectives, which its ring runs one after another): a ring of fixed-size slots of
//! atomics, written without a lock, each guarded by a sequence word so that a dump taken from
//! another thread (`SIGUSR1`, a metrics scrape) reads whole slots only.
//!
//! Recording an operation costs a few relaxed stores at its start and at its end; names (kind,
//! element type, reduce operation) are stored as indices into tables the owner gives once.
//!
//! ```
//! use tandem_observe::oplog::{Names, OpLog, OpStart};
//! static NAMES: Names = Names { kinds: &["allreduce"], dtypes: &["f32"], ops: &["sum"] };
//! let log = OpLog::new(&NAMES, 16);
//! let n = log.begin(&OpStart { seq: 7, kind: 0, dtype: 0, op: Some(0), count: 4, ..Default::default() });
//! log.end(n, 12, None, None, None);
//! let e = &log.entries()[0];
//! assert_eq!((e.seq, e.call()), (7, "allreduce(f32 x 4, sum)".to_string()));
//! ```

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, Weak};

use crate::recorder::{Entry, Outcome, Wait};

/// The names the codes of a log stand for.
#[derive(Debug)]
pub struct Names {
    /// Operation kinds (`allreduce`, ...).
    pub kinds: &'static [&'static str],
    /// Element types.
    pub dtypes: &'static [&'static str],
    /// Reduce operations.
    pub ops: &'static [&'static str],
}

/// An operation as it starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStart {
    /// Sequence number.
    pub seq: u64,
    /// Index into [`Names::kinds`].
    pub kind: u8,
    /// Index into [`Names::dtypes`].
    pub dtype: u8,
    /// Index into [`Names::ops`].
    pub op: Option<u8>,
    /// Root rank (or a message's destination).
    pub root: Option<u32>,
    /// Up to two peers (left and right on the ring; the other side of a message).
    pub peers: [Option<u32>; 2],
    /// Elements.
    pub count: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// When it was asked for (µs since the Unix epoch; an async operation waits in a queue; 0:
    /// when it started).
    pub enqueued_us: u64,
    /// When it started (µs since the Unix epoch).
    pub started_us: u64,
}

/// A 32-bit field's value for "none".
const NONE32: u64 = u32::MAX as u64;

/// One operation, as plain atomics: written by the log's one writer, read by a dump at any time
/// (a reader retries while `version` is odd or changes under it).
#[derive(Default)]
struct Slot {
    /// Odd while the slot is written.
    version: AtomicU64,
    seq: AtomicU64,
    count: AtomicU64,
    bytes: AtomicU64,
    enqueued_us: AtomicU64,
    started_us: AtomicU64,
    /// 0 while running.
    ended_us: AtomicU64,
    /// kind | dtype << 8 | (op + 1) << 16 | state << 24 | wait kind << 32.
    meta: AtomicU64,
    /// peer a | peer b << 32 (`u32::MAX`: none).
    peers: AtomicU64,
    /// root | waiting-on peer << 32 (`u32::MAX`: none).
    root_wait: AtomicU64,
    /// late peer | (late µs, capped) << 32.
    late: AtomicU64,
}

/// State of a slot's operation: still running.
const RUNNING: u64 = 0;
/// State of a slot's operation: completed.
const OK: u64 = 1;
/// State of a slot's operation: failed (its error kept apart).
const FAILED: u64 = 2;

/// One stream's log; see the module documentation.
pub struct OpLog {
    names: &'static Names,
    slots: Box<[Slot]>,
    /// Operations begun.
    head: AtomicU64,
    errors: Mutex<VecDeque<(u64, String)>>,
}

impl std::fmt::Debug for OpLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpLog")
            .field("capacity", &self.slots.len())
            .field("head", &self.head.load(Ordering::Relaxed))
            .finish()
    }
}

/// Every live log of the process, for dumps (a log dropped with its group leaves a dead entry).
static LOGS: Mutex<Vec<Weak<OpLog>>> = Mutex::new(Vec::new());

/// Failures whose text is kept (they are rare).
const ERRORS_KEPT: usize = 32;

impl OpLog {
    /// A log of the last `capacity` operations (at least 1), read by every dump of this process
    /// while it lives.
    pub fn new(names: &'static Names, capacity: usize) -> Arc<OpLog> {
        let log = Arc::new(OpLog {
            names,
            slots: (0..capacity.max(1)).map(|_| Slot::default()).collect(),
            head: AtomicU64::new(0),
            errors: Mutex::new(VecDeque::new()),
        });
        if let Ok(mut logs) = LOGS.lock() {
            logs.retain(|l| l.strong_count() > 0);
            logs.push(Arc::downgrade(&log));
        }
        log
    }

    /// The log sized as the environment says ([`crate::ENTRIES_VAR`]).
    pub fn from_env(names: &'static Names) -> Arc<OpLog> {
        OpLog::new(names, crate::recorder::capacity_from_env())
    }

    /// The slot of operation `n` (the ring wraps).
    fn slot(&self, n: u64) -> &Slot {
        &self.slots[(n % self.slots.len() as u64) as usize]
    }

    /// Records an operation that starts; returns its number. Calls to `begin` and `end` must come
    /// from one thread at a time.
    pub fn begin(&self, op: &OpStart) -> u64 {
        let n = self.head.load(Ordering::Relaxed);
        let s = self.slot(n);
        let v = s.version.load(Ordering::Relaxed);
        s.version.store(v + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        s.seq.store(op.seq, Ordering::Relaxed);
        s.count.store(op.count, Ordering::Relaxed);
        s.bytes.store(op.bytes, Ordering::Relaxed);
        s.started_us.store(op.started_us, Ordering::Relaxed);
        let enqueued = if op.enqueued_us == 0 {
            op.started_us
        } else {
            op.enqueued_us
        };
        s.enqueued_us.store(enqueued, Ordering::Relaxed);
        s.ended_us.store(0, Ordering::Relaxed);
        let opc = op.op.map_or(0, |o| u64::from(o) + 1);
        s.meta.store(
            u64::from(op.kind) | u64::from(op.dtype) << 8 | opc << 16 | RUNNING << 24,
            Ordering::Relaxed,
        );
        let p = |x: Option<u32>| x.map_or(NONE32, u64::from);
        s.peers
            .store(p(op.peers[0]) | p(op.peers[1]) << 32, Ordering::Relaxed);
        s.root_wait
            .store(p(op.root) | NONE32 << 32, Ordering::Relaxed);
        s.late.store(NONE32, Ordering::Relaxed);
        s.version.store(v + 2, Ordering::Release);
        self.head.store(n + 1, Ordering::Release);
        n
    }

    /// Completes operation `n` (from [`OpLog::begin`]) at `ended_us`: `late` is the peer whose
    /// header came last and how late (µs), `waiting` what it waited for when it failed, `error`
    /// its failure. An operation already overwritten is left alone.
    pub fn end(
        &self,
        n: u64,
        ended_us: u64,
        late: Option<(u32, u64)>,
        waiting: Option<Wait>,
        error: Option<String>,
    ) {
        if n + (self.slots.len() as u64) < self.head.load(Ordering::Relaxed) {
            return;
        }
        let s = self.slot(n);
        let v = s.version.load(Ordering::Relaxed);
        s.version.store(v + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        s.ended_us.store(ended_us.max(1), Ordering::Relaxed);
        let state = if error.is_some() { FAILED } else { OK };
        let (wait_kind, wait_peer) = match waiting {
            None => (0u64, NONE32),
            Some(Wait::Header(p)) => (1, u64::from(p)),
            Some(Wait::Data(p)) => (2, u64::from(p)),
        };
        let meta = s.meta.load(Ordering::Relaxed) & 0xff_ffff;
        s.meta
            .store(meta | state << 24 | wait_kind << 32, Ordering::Relaxed);
        let root = s.root_wait.load(Ordering::Relaxed) & NONE32;
        s.root_wait.store(root | wait_peer << 32, Ordering::Relaxed);
        if let Some((p, us)) = late {
            s.late
                .store(u64::from(p) | us.min(NONE32 - 1) << 32, Ordering::Relaxed);
        }
        s.version.store(v + 2, Ordering::Release);
        if let Some(m) = error
            && let Ok(mut errors) = self.errors.lock()
        {
            if errors.len() == ERRORS_KEPT {
                errors.pop_front();
            }
            errors.push_back((n, m));
        }
    }

    /// The operations kept, oldest first (a slot being written during the read is skipped).
    pub fn entries(&self) -> Vec<Entry> {
        let head = self.head.load(Ordering::Acquire);
        let first = head.saturating_sub(self.slots.len() as u64);
        (first..head).filter_map(|n| self.read(n)).collect()
    }

    /// Operation `n` (from [`OpLog::begin`]), if the log still holds it.
    pub fn entry(&self, n: u64) -> Option<Entry> {
        let head = self.head.load(Ordering::Acquire);
        if n >= head || n + (self.slots.len() as u64) < head {
            return None;
        }
        self.read(n)
    }

    /// Operation `n` read consistently (a few tries while it is being written); `None` when
    /// overwritten or never whole.
    fn read(&self, n: u64) -> Option<Entry> {
        let s = self.slot(n);
        for _ in 0..8 {
            let v1 = s.version.load(Ordering::Acquire);
            if v1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let seq = s.seq.load(Ordering::Relaxed);
            let count = s.count.load(Ordering::Relaxed);
            let bytes = s.bytes.load(Ordering::Relaxed);
            let enqueued_us = s.enqueued_us.load(Ordering::Relaxed);
            let started_us = s.started_us.load(Ordering::Relaxed);
            let ended_us = s.ended_us.load(Ordering::Relaxed);
            let meta = s.meta.load(Ordering::Relaxed);
            let peers = s.peers.load(Ordering::Relaxed);
            let root_wait = s.root_wait.load(Ordering::Relaxed);
            let late = s.late.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if s.version.load(Ordering::Relaxed) != v1 {
                continue;
            }
            let mut e = self.decode(
                n, seq, count, bytes, started_us, ended_us, meta, peers, root_wait, late,
            );
            e.enqueued_us = enqueued_us;
            return Some(e);
        }
        None
    }

    /// An entry from a slot's raw fields.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        n: u64,
        seq: u64,
        count: u64,
        bytes: u64,
        started_us: u64,
        ended_us: u64,
        meta: u64,
        peers: u64,
        root_wait: u64,
        late: u64,
    ) -> Entry {
        let name = |table: &'static [&'static str], i: u64| -> Cow<'static, str> {
            Cow::Borrowed(table.get(i as usize).copied().unwrap_or("?"))
        };
        let opt = |x: u64| (x != NONE32).then_some(x as u32);
        let opc = (meta >> 16) & 0xff;
        let waiting_on = opt(root_wait >> 32);
        let waiting = match ((meta >> 32) & 0xff, waiting_on) {
            (1, Some(p)) => Some(Wait::Header(p)),
            (2, Some(p)) => Some(Wait::Data(p)),
            _ => None,
        };
        let late_peer = opt(late & NONE32);
        let outcome = match (meta >> 24) & 0xff {
            OK => Outcome::Ok,
            FAILED => Outcome::Error(
                self.errors
                    .lock()
                    .ok()
                    .and_then(|e| e.iter().find(|(i, _)| *i == n).map(|(_, m)| m.clone()))
                    .unwrap_or_else(|| "failed".into()),
            ),
            _ => Outcome::Running,
        };
        Entry {
            seq,
            kind: name(self.names.kinds, meta & 0xff),
            dtype: name(self.names.dtypes, (meta >> 8) & 0xff),
            count,
            op: (opc > 0).then(|| name(self.names.ops, opc - 1)),
            root: opt(root_wait & NONE32),
            peers: [peers & NONE32, peers >> 32]
                .into_iter()
                .filter_map(opt)
                .collect(),
            bytes,
            enqueued_us: started_us,
            started_us,
            ended_us: (ended_us != 0).then_some(ended_us),
            late_peer,
            late_us: late_peer.map(|_| late >> 32),
            waiting: waiting.map(Wait::describe),
            waiting_on: waiting.map(Wait::peer),
            outcome,
        }
    }
}

/// The entries of every live log of this process.
pub(crate) fn all_entries() -> Vec<Entry> {
    let logs: Vec<Arc<OpLog>> = match LOGS.lock() {
        Ok(l) => l.iter().filter_map(Weak::upgrade).collect(),
        Err(_) => Vec::new(),
    };
    logs.iter().flat_map(|l| l.entries()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    static NAMES: Names = Names {
        kinds: &["allreduce", "broadcast", "send"],
        dtypes: &["f32", "u8"],
        ops: &["sum", "max"],
    };

    fn start(seq: u64) -> OpStart {
        OpStart {
            seq,
            kind: 0,
            dtype: 0,
            op: Some(1),
            root: None,
            peers: [Some(1), Some(3)],
            count: 8,
            bytes: 32,
            enqueued_us: if seq == 1 { 90 } else { 0 },
            started_us: 100 + seq,
        }
    }

    #[test]
    fn operations_read_back_as_entries_with_their_state() {
        let log = OpLog::new(&NAMES, 4);
        let a = log.begin(&start(0));
        log.end(a, 150, Some((1, 7)), None, None);
        let b = log.begin(&OpStart {
            kind: 1,
            dtype: 1,
            op: None,
            root: Some(2),
            ..start(1)
        });
        log.end(
            b,
            160,
            None,
            Some(Wait::Header(2)),
            Some("timed out".into()),
        );
        log.begin(&start(2));
        let e = log.entries();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].call(), "allreduce(f32 x 8, max)");
        assert_eq!(
            (e[0].ended_us, e[0].outcome.clone()),
            (Some(150), Outcome::Ok)
        );
        assert_eq!((e[0].late_peer, e[0].late_us), (Some(1), Some(7)));
        assert_eq!(e[0].peers, vec![1, 3]);
        assert_eq!(
            (e[0].enqueued_us, e[0].started_us),
            (100, 100),
            "not queued"
        );
        assert_eq!(
            (e[1].enqueued_us, e[1].started_us),
            (90, 101),
            "queued 11 us"
        );
        assert_eq!(e[1].call(), "broadcast(u8 x 8, root 2)");
        assert_eq!(e[1].outcome, Outcome::Error("timed out".into()));
        assert_eq!(e[1].waiting_on, Some(2));
        assert_eq!(e[1].late_peer, None);
        assert_eq!(e[2].outcome, Outcome::Running);
        assert_eq!(e[2].ended_us, None);
    }

    #[test]
    fn the_ring_keeps_the_last_operations_and_ignores_overwritten_ones() {
        let log = OpLog::new(&NAMES, 2);
        let first = log.begin(&start(0));
        for s in 1..5 {
            let n = log.begin(&start(s));
            log.end(n, 200 + s, None, None, None);
        }
        log.end(first, 999, None, None, Some("late".into()));
        let e = log.entries();
        assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert!(e.iter().all(|e| e.outcome == Outcome::Ok));
        let empty = OpLog::new(&NAMES, 0);
        assert!(empty.entries().is_empty());
    }

    #[test]
    fn an_operation_is_overwritten_exactly_when_the_ring_comes_round() {
        let log = OpLog::new(&NAMES, 2);
        let a = log.begin(&start(0));
        log.begin(&start(1));
        // Two slots, two operations: the first is still held and can be completed.
        assert!(log.entry(a).is_some());
        log.end(a, 50, None, Some(Wait::Data(3)), Some("lost".into()));
        let e = log.entry(a).unwrap();
        assert_eq!(e.waiting.as_deref(), Some("data from or to rank 3"));
        assert_eq!(e.outcome, Outcome::Error("lost".into()));
        // A third operation takes its slot: completing the first again changes nothing.
        let c = log.begin(&start(2));
        assert!(log.entry(a).is_none());
        assert!(log.entry(c + 1).is_none(), "not begun yet");
        log.end(a, 60, None, None, None);
        assert_eq!(log.entry(c).unwrap().outcome, Outcome::Running);
        assert_eq!(log.entry(c).unwrap().seq, 2);
    }

    #[test]
    fn lateness_is_capped_and_the_latest_errors_are_kept() {
        let log = OpLog::new(&NAMES, 64);
        let n = log.begin(&start(0));
        log.end(n, 1, Some((2, u64::MAX)), None, None);
        assert_eq!(log.entry(n).unwrap().late_us, Some(NONE32 - 1));
        let first = log.begin(&start(1));
        log.end(first, 1, None, None, Some("error 0".into()));
        for i in 1..=ERRORS_KEPT {
            let m = log.begin(&start(1 + i as u64));
            log.end(m, 1, None, None, Some(format!("error {i}")));
        }
        assert_eq!(
            log.entry(first).unwrap().outcome,
            Outcome::Error("failed".into()),
            "the oldest error text was let go"
        );
        assert_eq!(
            log.entry(first + 1).unwrap().outcome,
            Outcome::Error("error 1".into())
        );
        assert!(format!("{log:?}").contains("capacity: 64"));
    }

    #[test]
    fn dumps_read_every_live_log() {
        let log = OpLog::new(&NAMES, 4);
        log.begin(&OpStart {
            seq: 4242,
            ..start(0)
        });
        assert!(all_entries().iter().any(|e| e.seq == 4242));
        drop(log);
        assert!(!all_entries().iter().any(|e| e.seq == 4242));
    }

    #[test]
    fn codes_beyond_the_tables_read_as_a_question_mark() {
        let log = OpLog::new(&NAMES, 2);
        log.begin(&OpStart {
            kind: 9,
            dtype: 9,
            op: Some(9),
            ..start(0)
        });
        assert_eq!(log.entries()[0].call(), "?(? x 8, ?)");
    }

    #[test]
    fn a_reader_on_another_thread_sees_only_whole_slots() {
        let log = OpLog::new(&NAMES, 8);
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                for s in 0..20_000u64 {
                    let n = log.begin(&OpStart {
                        count: s,
                        bytes: s * 4,
                        ..start(s)
                    });
                    log.end(n, 1_000 + s, Some((1, s)), None, None);
                }
            })
        };
        let check = |entries: Vec<Entry>| {
            for e in &entries {
                assert_eq!(e.count, e.seq);
                assert_eq!(e.bytes, e.seq * 4);
                if let Some(end) = e.ended_us {
                    assert_eq!(end, 1_000 + e.seq);
                    assert_eq!(e.late_us, Some(e.seq));
                }
            }
            entries.len()
        };
        loop {
            let done = writer.is_finished();
            check(log.entries());
            if done {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(check(log.entries()), 8, "the last 8, whole");
    }
}
