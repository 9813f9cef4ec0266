//! The flight recorder: the last operations of this process, always on, in a bounded ring.
//!
//! An operation is recorded when it starts ([`begin`]) and completed when it ends ([`end`]), so a
//! dump taken while it hangs shows it running, with what it waits for ([`set_live`]). The ring
//! holds [`ENTRIES_VAR`](crate::ENTRIES_VAR) entries (default [`DEFAULT_ENTRIES`]); older ones
//! are dropped. Recording costs one uncontended lock and two clock reads per operation.

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
        let now = crate::now_us();
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

/// Names one recorded operation, to complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(Option<u64>);

impl Token {
    /// A token that names nothing (completing it does nothing).
    pub fn none() -> Token {
        Token(None)
    }
}

struct Ring {
    entries: VecDeque<Entry>,
    capacity: usize,
    /// Entries ever pushed.
    pushed: u64,
}

type Live = Box<dyn Fn() -> Option<(u32, String)> + Send + Sync>;

static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
static LIVE: Mutex<Option<Live>> = Mutex::new(None);

/// Makes the ring (its capacity from the environment).
pub(crate) fn init() {
    RING.get_or_init(|| {
        let capacity = std::env::var(crate::ENTRIES_VAR)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_ENTRIES)
            .min(1 << 20);
        Mutex::new(Ring {
            entries: VecDeque::with_capacity(capacity),
            capacity,
            pushed: 0,
        })
    });
}

/// Records an operation that starts; returns the token that completes it. Does nothing (and
/// returns an empty token) while recording is off.
pub fn begin(entry: Entry) -> Token {
    if !crate::active() {
        return Token(None);
    }
    let Some(Ok(mut ring)) = RING.get().map(Mutex::lock) else {
        return Token(None);
    };
    if ring.entries.len() == ring.capacity {
        ring.entries.pop_front();
    }
    ring.entries.push_back(entry);
    ring.pushed += 1;
    Token(Some(ring.pushed - 1))
}

/// Completes the operation `token` names: `update` fills in what it learnt, `error` is its failure
/// (`None`: it succeeded). An entry the ring has already dropped is left alone.
pub fn end(token: Token, update: impl FnOnce(&mut Entry), error: Option<String>) {
    let Token(Some(n)) = token else {
        return;
    };
    let Some(Ok(mut ring)) = RING.get().map(Mutex::lock) else {
        return;
    };
    let first = ring.pushed - ring.entries.len() as u64;
    let Some(i) = n.checked_sub(first) else {
        return;
    };
    if let Some(e) = ring.entries.get_mut(i as usize) {
        update(e);
        e.ended_us = Some(crate::now_us());
        e.outcome = match error {
            None => Outcome::Ok,
            Some(m) => Outcome::Error(m),
        };
    }
}

/// The entry `token` names, if the ring still holds it.
pub fn snapshot_of(token: Token) -> Option<Entry> {
    let Token(Some(n)) = token else {
        return None;
    };
    let ring = RING.get()?.lock().ok()?;
    let first = ring.pushed - ring.entries.len() as u64;
    ring.entries.get(n.checked_sub(first)? as usize).cloned()
}

/// Sets what answers "which peer is the running operation waiting on, for what" at dump time.
pub fn set_live(live: impl Fn() -> Option<(u32, String)> + Send + Sync + 'static) {
    if let Ok(mut l) = LIVE.lock() {
        *l = Some(Box::new(live));
    }
}

/// The entries kept, oldest first; running ones say what they wait for.
pub fn snapshot() -> Vec<Entry> {
    let mut out: Vec<Entry> = match RING.get().map(Mutex::lock) {
        Some(Ok(ring)) => ring.entries.iter().cloned().collect(),
        _ => Vec::new(),
    };
    let waiting = LIVE.lock().ok().and_then(|l| l.as_ref().and_then(|f| f()));
    if let Some((peer, what)) = waiting
        && let Some(e) = out
            .iter_mut()
            .rev()
            .find(|e| e.outcome == Outcome::Running && e.is_collective_or_message())
        && e.waiting.is_none()
    {
        e.waiting = Some(what);
        e.waiting_on = Some(peer);
    }
    out
}

impl Entry {
    fn is_collective_or_message(&self) -> bool {
        self.is_collective() || matches!(&*self.kind, "send" | "recv")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(capacity: usize) -> Mutex<Ring> {
        Mutex::new(Ring {
            entries: VecDeque::new(),
            capacity,
            pushed: 0,
        })
    }

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

    #[test]
    fn the_ring_keeps_the_newest_and_completes_by_token() {
        let r = ring(2);
        let push = |seq| {
            let mut g = r.lock().unwrap();
            if g.entries.len() == g.capacity {
                g.entries.pop_front();
            }
            g.entries.push_back(Entry::new(seq, "barrier", "u8", 1));
            g.pushed += 1;
            g.pushed - 1
        };
        for s in 0..3 {
            push(s);
        }
        let g = r.lock().unwrap();
        let seqs: Vec<u64> = g.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(g.pushed, 3);
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
