//! What the collectives tell [`tandem_observe`]: every operation goes to the flight recorder and
//! the metrics (always), and to the timeline when one is written, with its phases: waiting for the
//! peers' headers, moving the bytes, and the reductions done while they move. A failed operation
//! dumps the flight recorder.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_core::Error;
use tandem_observe::recorder::{self, Entry, Token};
use tandem_observe::{metrics, timeline};

use crate::algorithm::ring::{left, right};
use crate::backend::ops::Waiting;
use crate::stats::LATE_THRESHOLD;
use crate::transport::frame::{OpHeader, OpKind};

/// Reductions closer than this are one span on the timeline.
const REDUCE_GAP_US: u64 = 50;
/// At most this many reduce spans per operation (later ones extend the last).
const REDUCE_SPANS: usize = 64;

thread_local! {
    static REDUCES: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Times one reduction for the timeline, until dropped (nothing without a timeline).
pub(crate) struct ReduceTimer(Option<u64>);

impl ReduceTimer {
    /// Starts timing.
    #[inline]
    pub(crate) fn start() -> ReduceTimer {
        ReduceTimer(timeline::enabled().then(tandem_observe::now_us))
    }
}

impl Drop for ReduceTimer {
    fn drop(&mut self) {
        let Some(start) = self.0 else {
            return;
        };
        let end = tandem_observe::now_us();
        REDUCES.with(|r| {
            let mut r = r.borrow_mut();
            let full = r.len() >= REDUCE_SPANS;
            match r.last_mut() {
                Some(last) if start <= last.1 + REDUCE_GAP_US || full => last.1 = end,
                _ => r.push((start, end)),
            }
        });
    }
}

/// "rank 2's header" / "data from or to rank 2", and the peer.
pub(crate) fn describe(w: Waiting) -> Option<(u32, String)> {
    match w {
        Waiting::Header(p) => Some((p as u32, format!("rank {p}'s header (it has not started)"))),
        Waiting::Data(p) => Some((p as u32, format!("data from or to rank {p}"))),
        Waiting::Nothing => None,
    }
}

/// One operation being recorded.
pub(crate) struct Recording {
    token: Token,
    kind: &'static str,
    bytes: u64,
    started: Instant,
    started_us: u64,
}

/// Records the start of `header`'s operation on `rank` of `world`.
pub(crate) fn begin(header: &OpHeader, rank: usize, world: usize) -> Recording {
    let kind = match header.kind {
        OpKind::Send if header.root as usize == rank => "recv",
        k => k.name(),
    };
    let bytes = header.count * header.dtype.size() as u64;
    let mut e = Entry::new(header.seq, kind, header.dtype.name(), header.count);
    e.bytes = bytes;
    e.op = header.op.map(|o| o.name().into());
    if matches!(header.kind, OpKind::Broadcast | OpKind::Reduce) {
        e.root = Some(header.root);
    }
    e.peers = match header.kind {
        // A message's header names its destination.
        OpKind::Send if kind == "send" => vec![header.root],
        OpKind::Send => Vec::new(),
        _ => vec![left(rank, world) as u32, right(rank, world) as u32],
    };
    if timeline::enabled() {
        REDUCES.with(|r| r.borrow_mut().clear());
    }
    Recording {
        token: recorder::begin(e),
        kind,
        bytes,
        started_us: tandem_observe::now_us(),
        started: Instant::now(),
    }
}

/// Records how `rec`'s operation ended: `lateness` is the last header's arrival, `waiting` what it
/// waited for at the end; an error dumps the flight recorder.
pub(crate) fn end(
    rec: Recording,
    lateness: Option<(usize, Duration)>,
    waiting: Waiting,
    error: Option<&Error>,
) {
    if !tandem_observe::active() && !timeline::enabled() {
        return;
    }
    let took = rec.started.elapsed();
    let late = lateness.map(|(p, d)| (p as u32, d.as_micros() as u64));
    let stuck = error.and_then(|_| describe(waiting));
    recorder::end(
        rec.token,
        |e| {
            if let Some((p, us)) = late {
                e.late_peer = Some(p);
                e.late_us = Some(us);
            }
            if let Some((p, w)) = &stuck {
                e.waiting_on = Some(*p);
                e.waiting = Some(w.clone());
            }
        },
        error.map(ToString::to_string),
    );
    match error {
        None => metrics::op(rec.kind, rec.bytes, took.as_secs_f64()),
        Some(e) => metrics::error(rec.kind, e.kind()),
    }
    if let Some((p, d)) = lateness
        && d >= LATE_THRESHOLD
    {
        metrics::late(p);
    }
    if timeline::enabled() {
        write_timeline(&rec, took, late, error);
    }
    if let Some(e) = error {
        tandem_observe::dump::write(&format!("{}: {e}", e.kind()));
        timeline::flush();
    }
}

fn write_timeline(
    rec: &Recording,
    took: Duration,
    late: Option<(u32, u64)>,
    error: Option<&Error>,
) {
    let tid = timeline::TID_COLLECTIVE;
    let start = rec.started_us;
    let dur = took.as_micros() as u64;
    let entry = recorder::snapshot_of(rec.token);
    timeline::complete(
        rec.kind,
        "collective",
        tid,
        start,
        dur,
        json!({"op": entry, "error": error.map(ToString::to_string)}),
    );
    let wait = late.map_or(0, |(_, us)| us.min(dur));
    if wait > 0 {
        timeline::complete(
            "wait for peers",
            "phase",
            tid,
            start,
            wait,
            json!({"last_peer": late.map(|(p, _)| p)}),
        );
    }
    timeline::complete(
        "transfer",
        "phase",
        tid,
        start + wait,
        dur - wait,
        json!({"bytes": rec.bytes}),
    );
    let reduces = REDUCES.with(|r| std::mem::take(&mut *r.borrow_mut()));
    for (a, b) in reduces {
        let a = a.max(start + wait);
        if b > a {
            timeline::complete("reduce", "phase", tid, a, b - a, json!({}));
        }
    }
}
