//! The flight recorder: the last operations of this process, always on, in a bounded ring.
//!
//! An operation is recorded when it starts ([`begin`], a [`Record`]) and completed when it ends
//! ([`end_at`]), so a dump taken while it hangs shows it running, with what it waits for
//! ([`set_live`]). The ring holds [`ENTRIES_VAR`](crate::ENTRIES_VAR) operations (default
//! [`DEFAULT_ENTRIES`]) in small fixed-size slots (no allocation per operation; error texts are
//! kept apart); older ones are dropped. Dumps read them as [`Entry`]s. Recording costs two
//! uncontended locks and a few stores per operation (`cargo bench -p tandem-observe`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// Entries kept by default.
pub const DEFAULT_ENTRIES: usize = 2048;

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It has not ended.
    Running,
    /// It completed.
    Ok,
    /// It failed, with the error.
    Error(String),
}

/// One operation: a collective, a point-to-point message, or a parameter-server call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Sequence number: the collective's (the same on every rank), the message's between a pair
    /// of ranks, or the client's call number.
    pub seq: u64,
    /// `allreduce`, `broadcast`, ..., `send`, `recv`, `ps.push`, `ps.pull`, `ps.apply`.
    pub kind: Cow<'static, str>,
    /// Element type (`f32`, ...).
    pub dtype: Cow<'static, str>,
    /// Elements.
    pub count: u64,
    /// Reduce operation, for reductions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Cow<'static, str>>,
    /// Root rank, for rooted collectives (and the destination of a send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<u32>,
    /// The peers this operation exchanges bytes with first: left and right neighbour on the ring,
    /// the other side of a message, or the servers of a parameter-server call.
    #[serde(default)]
    pub peers: Vec<u32>,
    /// Payload bytes.
    pub bytes: u64,
    /// When the caller asked for it (µs since the Unix epoch; later than `started_us` never).
    pub enqueued_us: u64,
    /// When it started.
    pub started_us: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_us: Option<u64>,
    /// The peer whose header arrived last, and how long after this rank started (µs): who this
    /// rank waited for to begin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_peer: Option<u32>,
    /// See `late_peer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_us: Option<u64>,
    /// What it was waiting for when it failed, or when the dump was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The peer it was waiting on then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on: Option<u32>,
    /// How it ended.
    pub outcome: Outcome,
}

impl Entry {
    /// An operation starting now.
    pub fn new(
        seq: u64,
        kind: impl Into<Cow<'static, str>>,
        dtype: impl Into<Cow<'static, str>>,
        count: u64,
    ) -> Entry {
        Self::starting_at(seq, kind, dtype, count, crate::now_us())
    }

    /// An operation that started at `now` (µs since the Unix epoch).
    pub fn starting_at(
        seq: u64,
        kind: impl Into<Cow<'static, str>>,
        dtype: impl Into<Cow<'static, str>>,
        count: u64,
        now: u64,
    ) -> Entry {
        Entry {
            seq,
            kind: kind.into(),
            dtype: dtype.into(),
            count,
            op: None,
            root: None,
            peers: Vec::new(),
            bytes: 0,
            enqueued_us: now,
            started_us: now,
            ended_us: None,
            late_peer: None,
            late_us: None,
            waiting: None,
            waiting_on: None,
            outcome: Outcome::Running,
        }
    }

    /// Whether it is a collective (the kinds every rank calls in the same order).
    pub fn is_collective(&self) -> bool {
        matches!(
            &*self.kind,
            "allreduce" | "broadcast" | "allgather" | "reduce_scatter" | "reduce" | "barrier"
        )
    }

    /// "allreduce(f32 x 1024, sum)": the call, as errors name it.
    pub fn call(&self) -> String {
        let mut s = format!("{}({} x {}", self.kind, self.dtype, self.count);
        if let Some(op) = &self.op {
            s.push_str(&format!(", {op}"));
        }
        if let Some(root) = self.root {
            s.push_str(&format!(", root {root}"));
        }
        s.push(')');
        s
    }
}

/// The peers of a recorded operation, kept without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Peers {
    /// None named.
    #[default]
    None,
    /// One peer (the other side of a message).
    One(u32),
    /// Two peers (left and right neighbour on the ring).
    Two(u32, u32),
    /// Servers `0..n` of a parameter-server call.
    Servers(u32),
}

impl Peers {
    /// The peers as a list of ranks.
    fn list(self) -> Vec<u32> {
        match self {
            Peers::None => Vec::new(),
            Peers::One(a) => vec![a],
            Peers::Two(a, b) => vec![a, b],
            Peers::Servers(n) => (0..n).collect(),
        }
    }
}

/// What an operation waited for when it failed, or when a dump was taken while it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The header of this peer: it had not started the operation.
    Header(u32),
    /// Bytes from or to this peer.
    Data(u32),
}

impl Wait {
    /// The peer waited on.
    pub fn peer(self) -> u32 {
        match self {
            Wait::Header(p) | Wait::Data(p) => p,
        }
    }

    /// "rank 2's header (it has not started)", "data from or to rank 2".
    pub fn describe(self) -> String {
        match self {
            Wait::Header(p) => format!("rank {p}'s header (it has not started)"),
            Wait::Data(p) => format!("data from or to rank {p}"),
        }
    }
}

/// An operation as it starts: what [`begin`] records. `Copy` and free of allocations, so that
/// recording costs a few stores (the ring keeps these, not [`Entry`]s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// See [`Entry::seq`].
    pub seq: u64,
    /// See [`Entry::kind`].
    pub kind: &'static str,
    /// See [`Entry::dtype`].
    pub dtype: &'static str,
    /// Elements.
    pub count: u64,
    /// Reduce operation.
    pub op: Option<&'static str>,
    /// Root rank, or a message's destination.
    pub root: Option<u32>,
    /// The peers it exchanges bytes with first.
    pub peers: Peers,
    /// Payload bytes.
    pub bytes: u64,
    /// When it was asked for (µs since the Unix epoch).
    pub enqueued_us: u64,
    /// When it started.
    pub started_us: u64,
}

impl Record {
    /// An operation starting at `now` (µs since the Unix epoch).
    pub fn new(seq: u64, kind: &'static str, dtype: &'static str, count: u64, now: u64) -> Record {
        Record {
            seq,
            kind,
            dtype,
            count,
            op: None,
            root: None,
            peers: Peers::None,
            bytes: 0,
            enqueued_us: now,
            started_us: now,
        }
    }
}

/// How an operation ended: what [`end_at`] records.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    /// The peer whose header arrived last, and how long after this rank started (µs).
    pub late: Option<(u32, u64)>,
    /// What it waited for when it failed.
    pub waiting: Option<Wait>,
    /// Its error, if it failed.
    pub error: Option<String>,
}

/// One operation in the ring: its record and how it ended.
#[derive(Clone, Copy)]
struct Slot {
    rec: Record,
    /// 0 while running.
    ended_us: u64,
    late: Option<(u32, u64)>,
    waiting: Option<Wait>,
    failed: bool,
}

/// Names one recorded operation, to complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(Option<u64>);

impl Token {
    /// A token that names nothing (completing it does nothing).
    pub fn none() -> Token {
        Token(None)
    }
}

/// Errors are kept apart from the slots (they are rare, and slots stay small and `Copy`).
const ERRORS_KEPT: usize = 32;

/// The process's last operations, oldest first, and its latest failures.
struct Ring {
    slots: VecDeque<Slot>,
    capacity: usize,
    /// Slots ever pushed.
    pushed: u64,
    /// (slot number, error) of the latest failures.
    errors: VecDeque<(u64, String)>,
}

impl Ring {
    /// Where slot `n` stands in the ring, if it is still there.
    fn index(&self, n: u64) -> Option<usize> {
        let first = self.pushed - self.slots.len() as u64;
        n.checked_sub(first).map(|i| i as usize)
    }

    /// Slot `n` as a dump's entry.
    fn entry(&self, n: u64, s: &Slot) -> Entry {
        let r = &s.rec;
        Entry {
            seq: r.seq,
            kind: Cow::Borrowed(r.kind),
            dtype: Cow::Borrowed(r.dtype),
            count: r.count,
            op: r.op.map(Cow::Borrowed),
            root: r.root,
            peers: r.peers.list(),
            bytes: r.bytes,
            enqueued_us: r.enqueued_us,
            started_us: r.started_us,
            ended_us: (s.ended_us != 0).then_some(s.ended_us),
            late_peer: s.late.map(|l| l.0),
            late_us: s.late.map(|l| l.1),
            waiting: s.waiting.map(Wait::describe),
            waiting_on: s.waiting.map(Wait::peer),
            outcome: if s.ended_us == 0 {
                Outcome::Running
            } else if s.failed {
                Outcome::Error(
                    self.errors
                        .iter()
                        .find(|(i, _)| *i == n)
                        .map_or_else(|| "failed".to_string(), |(_, m)| m.clone()),
                )
            } else {
                Outcome::Ok
            },
        }
    }
}

/// Asks the running operation what it waits for (set by the collectives).
type Live = Box<dyn Fn() -> Option<Wait> + Send + Sync>;

/// The process's ring, made at its first operation.
static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
/// What a dump asks about the running operation.
static LIVE: Mutex<Option<Live>> = Mutex::new(None);

/// How many operations a recorder keeps: [`crate::ENTRIES_VAR`], else [`DEFAULT_ENTRIES`].
pub(crate) fn capacity_from_env() -> usize {
    capacity(std::env::var(crate::ENTRIES_VAR).ok().as_deref())
}

/// Most operations a recorder keeps, whatever the environment asks.
pub const MAX_ENTRIES: usize = 1 << 20;
/// The table of settings declares the same maximum.
const _: () = assert!(matches!(
    tandem_core::settings::TRACE_ENTRIES.kind,
    tandem_core::settings::Kind::Integer { max, .. } if max == MAX_ENTRIES as u64
));

/// The capacity `value` asks for: a positive count, at most [`MAX_ENTRIES`], as
/// [`tandem_core::settings::TRACE_ENTRIES`] declares it; anything else is [`DEFAULT_ENTRIES`]
/// (the start has refused it already).
fn capacity(value: Option<&str>) -> usize {
    match value.map(|v| tandem_core::settings::TRACE_ENTRIES.parse(v)) {
        Some(Ok(tandem_core::settings::Value::Integer(n))) => usize::try_from(n)
            .unwrap_or(DEFAULT_ENTRIES)
            .min(MAX_ENTRIES),
        _ => DEFAULT_ENTRIES,
    }
}

/// Makes the ring (its capacity from the environment).
pub(crate) fn init() {
    RING.get_or_init(|| {
        let capacity = capacity_from_env();
        Mutex::new(Ring {
            slots: VecDeque::with_capacity(capacity),
            capacity,
            pushed: 0,
            errors: VecDeque::with_capacity(ERRORS_KEPT),
        })
    });
}

/// Records an operation that starts; returns the token that completes it. Does nothing (and
/// returns an empty token) while recording is off.
pub fn begin(rec: Record) -> Token {
    if !crate::active() {
        return Token(None);
    }
    let Some(Ok(mut ring)) = RING.get().map(Mutex::lock) else {
        return Token(None);
    };
    if ring.slots.len() == ring.capacity {
        ring.slots.pop_front();
    }
    ring.slots.push_back(Slot {
        rec,
        ended_us: 0,
        late: None,
        waiting: None,
        failed: false,
    });
    ring.pushed += 1;
    Token(Some(ring.pushed - 1))
}

/// Completes the operation `token` names, now.
pub fn end(token: Token, ending: Ending) {
    end_at(token, crate::now_us(), ending);
}

/// Completes the operation `token` names, which ended at `ended_us` (µs since the Unix epoch). An
/// operation the ring has already dropped is left alone.
pub fn end_at(token: Token, ended_us: u64, ending: Ending) {
    let Token(Some(n)) = token else {
        return;
    };
    let Some(Ok(mut ring)) = RING.get().map(Mutex::lock) else {
        return;
    };
    let Some(i) = ring.index(n) else {
        return;
    };
    let failed = ending.error.is_some();
    if let Some(s) = ring.slots.get_mut(i) {
        s.ended_us = ended_us.max(1);
        s.late = ending.late;
        s.waiting = ending.waiting;
        s.failed = failed;
    }
    if let Some(m) = ending.error {
        if ring.errors.len() == ERRORS_KEPT {
            ring.errors.pop_front();
        }
        ring.errors.push_back((n, m));
    }
}

/// The entry `token` names, if the ring still holds it.
pub fn snapshot_of(token: Token) -> Option<Entry> {
    let Token(Some(n)) = token else {
        return None;
    };
    let ring = RING.get()?.lock().ok()?;
    let i = ring.index(n)?;
    let s = ring.slots.get(i)?;
    Some(ring.entry(n, s))
}

/// Sets what answers "what is the running operation waiting for" at dump time.
pub fn set_live(live: impl Fn() -> Option<Wait> + Send + Sync + 'static) {
    if let Ok(mut l) = LIVE.lock() {
        *l = Some(Box::new(live));
    }
}

/// The entries kept (this ring's and every [`crate::oplog::OpLog`]'s), oldest first; a running
/// collective or message says what it waits for.
pub fn snapshot() -> Vec<Entry> {
    let mut out: Vec<Entry> = match RING.get().map(Mutex::lock) {
        Some(Ok(ring)) => {
            let first = ring.pushed - ring.slots.len() as u64;
            ring.slots
                .iter()
                .enumerate()
                .map(|(i, s)| ring.entry(first + i as u64, s))
                .collect()
        }
        _ => Vec::new(),
    };
    out.extend(crate::oplog::all_entries());
    out.sort_by_key(|e| e.started_us);
    let waiting = LIVE.lock().ok().and_then(|l| l.as_ref().and_then(|f| f()));
    if let Some(w) = waiting
        && let Some(e) = out
            .iter_mut()
            .rev()
            .find(|e| e.outcome == Outcome::Running && e.is_collective_or_message())
        && e.waiting.is_none()
    {
        e.waiting = Some(w.describe());
        e.waiting_on = Some(w.peer());
    }
    out
}

impl Entry {
    /// Whether the entry is a collective or a point-to-point message (what the diagnosis compares).
    fn is_collective_or_message(&self) -> bool {
        self.is_collective() || matches!(&*self.kind, "send" | "recv")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_their_call() {
        let mut e = Entry::new(3, "allreduce", "f32", 8);
        e.op = Some("sum".into());
        assert_eq!(e.call(), "allreduce(f32 x 8, sum)");
        e.op = None;
        e.kind = "broadcast".into();
        e.root = Some(2);
        assert_eq!(e.call(), "broadcast(f32 x 8, root 2)");
        assert!(e.is_collective());
        e.kind = "send".into();
        assert!(!e.is_collective());
        assert!(e.is_collective_or_message());
    }

    fn ring(capacity: usize) -> Ring {
        Ring {
            slots: VecDeque::new(),
            capacity,
            pushed: 0,
            errors: VecDeque::new(),
        }
    }

    fn slot(seq: u64, ended_us: u64, failed: bool) -> Slot {
        let mut rec = Record::new(seq, "allreduce", "f32", 4, 10);
        rec.peers = Peers::Two(1, 3);
        Slot {
            rec,
            ended_us,
            late: Some((1, 7)),
            waiting: failed.then_some(Wait::Data(3)),
            failed,
        }
    }

    #[test]
    fn slots_become_entries_with_their_state() {
        let mut r = ring(4);
        r.slots.push_back(slot(0, 20, false));
        r.slots.push_back(slot(1, 0, false));
        r.slots.push_back(slot(2, 30, true));
        r.pushed = 3;
        r.errors.push_back((2, "boom".into()));
        let e: Vec<Entry> = (0..3).map(|i| r.entry(i, &r.slots[i as usize])).collect();
        assert_eq!(e[0].outcome, Outcome::Ok);
        assert_eq!(e[0].ended_us, Some(20));
        assert_eq!(e[0].peers, vec![1, 3]);
        assert_eq!((e[0].late_peer, e[0].late_us), (Some(1), Some(7)));
        assert_eq!(e[1].outcome, Outcome::Running);
        assert_eq!(e[1].ended_us, None);
        assert_eq!(e[2].outcome, Outcome::Error("boom".into()));
        assert_eq!(e[2].waiting_on, Some(3));
        assert_eq!(e[2].waiting.as_deref(), Some("data from or to rank 3"));
        // A failure whose text was pushed out of the error list still says it failed.
        r.errors.clear();
        assert_eq!(
            r.entry(2, &r.slots[2]).outcome,
            Outcome::Error("failed".into())
        );
        assert_eq!(r.index(0), Some(0));
        r.pushed = 10;
        assert_eq!(r.index(6), None, "dropped from the ring");
        assert_eq!(r.index(8), Some(1));
    }

    #[test]
    fn the_capacity_is_a_positive_count_up_to_the_maximum() {
        assert_eq!(capacity(None), DEFAULT_ENTRIES);
        assert_eq!(capacity(Some("0")), DEFAULT_ENTRIES);
        assert_eq!(capacity(Some("1")), 1);
        assert_eq!(capacity(Some(" 64 ")), 64);
        assert_eq!(capacity(Some("lots")), DEFAULT_ENTRIES);
        assert_eq!(capacity(Some(&MAX_ENTRIES.to_string())), MAX_ENTRIES);
        // Above the maximum the start refuses the variable; the recorder keeps its default.
        assert_eq!(
            capacity(Some(&(MAX_ENTRIES + 1).to_string())),
            DEFAULT_ENTRIES
        );
    }

    #[test]
    fn peers_and_waits_read_as_lists_and_sentences() {
        assert_eq!(Peers::Servers(3).list(), vec![0, 1, 2]);
        assert_eq!(Peers::One(4).list(), vec![4]);
        assert!(Peers::None.list().is_empty());
        assert_eq!(
            Wait::Header(2).describe(),
            "rank 2's header (it has not started)"
        );
        assert_eq!(Wait::Header(2).peer(), 2);
    }

    #[test]
    fn the_process_ring_records_completes_and_says_what_a_running_message_waits_for() {
        crate::identify(crate::Identity::new("rank", 0, 1));
        // Later than anything other tests of this process record (their op logs share the
        // snapshot), so this message is the latest running one whatever runs alongside.
        const T: u64 = 1 << 62;
        assert!(crate::active());
        let mut r = Record::new(555_002, "send", "f32", 3, T + 11);
        r.peers = Peers::One(4);
        let send = begin(r);
        // Started later than the message, but not one that waits on a peer.
        let push = begin(Record::new(555_001, "ps.push", "f32", 3, T + 12));
        set_live(|| Some(Wait::Data(4)));
        let snap = snapshot();
        let find = |seq| snap.iter().find(|e| e.seq == seq).cloned().unwrap();
        let (p, m) = (find(555_001), find(555_002));
        assert_eq!((p.outcome.clone(), p.waiting_on), (Outcome::Running, None));
        assert_eq!(
            m.waiting_on,
            Some(4),
            "the running message waits for rank 4"
        );
        assert_eq!(m.waiting.as_deref(), Some("data from or to rank 4"));
        assert!(snap.windows(2).all(|w| w[0].started_us <= w[1].started_us));
        end_at(
            push,
            T + 20,
            Ending {
                error: Some("refused".into()),
                ..Ending::default()
            },
        );
        end_at(
            send,
            T + 30,
            Ending {
                late: Some((4, 2)),
                ..Ending::default()
            },
        );
        let p = snapshot_of(push).unwrap();
        assert_eq!(
            (p.ended_us, p.outcome),
            (Some(T + 20), Outcome::Error("refused".into()))
        );
        let m = snapshot_of(send).unwrap();
        assert_eq!(
            (m.ended_us, m.outcome, m.late_us),
            (Some(T + 30), Outcome::Ok, Some(2))
        );
        assert_eq!(m.peers, vec![4]);
        assert!(snapshot_of(Token::none()).is_none());
        end(Token::none(), Ending::default());
        set_live(|| None);
    }

    #[test]
    fn outcomes_round_trip_through_json() {
        let mut e = Entry::new(1, "ps.push", "f32", 10);
        e.outcome = Outcome::Error("boom".into());
        e.peers = vec![0, 1];
        let s = serde_json::to_string(&e).unwrap();
        let back: Entry = serde_json::from_str(&s).unwrap();
        assert_eq!(back, e);
    }
}
