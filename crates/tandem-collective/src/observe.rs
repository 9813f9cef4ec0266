//! What the collectives tell [`tandem_observe`]: every operation goes to the flight recorder and
//! the metrics (always), and to the timeline when one is written, with its phases: waiting for the
//! peers' headers, moving the bytes, and the reductions done while they move. A failed operation
//! dumps the flight recorder.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_core::Error;
use tandem_observe::oplog::{Names, OpLog, OpStart};
use tandem_observe::recorder::{self, Wait};
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
    /// The reduce spans of the operation this thread runs: (start µs, duration µs).
    static REDUCES: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
    /// When the async operation this thread runs next was asked for.
    static ENQUEUED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The next operation on this thread was asked for at `t` (an async operation, queued).
pub(crate) fn enqueued_at(t: Instant) {
    ENQUEUED.with(|e| e.set(Some(t)));
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

/// The recorder's form of what an operation waits for.
pub(crate) fn wait_of(w: Waiting) -> Option<Wait> {
    match w {
        Waiting::Header(p) => Some(Wait::Header(p as u32)),
        Waiting::Data(p) => Some(Wait::Data(p as u32)),
        Waiting::Nothing => None,
    }
}

/// What the codes of a group's [`OpLog`] stand for: kinds in the order of
/// [`metrics::COLLECTIVE_KINDS`], element types and reduce operations by their wire codes.
pub(crate) static NAMES: Names = Names {
    kinds: &metrics::COLLECTIVE_KINDS,
    dtypes: &["f32", "f64", "f16", "bf16", "i32", "i64", "u8"],
    ops: &["sum", "avg", "min", "max", "prod"],
};

/// The group's flight recorder.
pub(crate) fn log() -> std::sync::Arc<OpLog> {
    OpLog::from_env(&NAMES)
}

/// The index of an operation kind in [`metrics::COLLECTIVE_KINDS`] (a receive is a `Send` header
/// addressed to this rank).
fn kind_index(header: &OpHeader, rank: usize) -> usize {
    match header.kind {
        OpKind::Allreduce => 0,
        OpKind::Broadcast => 1,
        OpKind::Allgather => 2,
        OpKind::ReduceScatter => 3,
        OpKind::Reduce => 4,
        OpKind::Barrier => 5,
        OpKind::Send if header.root as usize == rank => 7,
        OpKind::Send => 6,
    }
}

/// One operation being recorded.
pub(crate) struct Recording {
    /// Its number in the log, when recorded.
    number: Option<u64>,
    /// The operation's kind (an index into the metrics' kinds).
    kind: usize,
    /// Payload bytes.
    bytes: u64,
    /// When it started (for its latency).
    started: Instant,
    /// When it started, µs since the Unix epoch (for the timeline).
    started_us: u64,
}

/// Records the start of `header`'s operation on `rank` of `world`, at `started`, in `log`.
pub(crate) fn begin(
    log: &OpLog,
    header: &OpHeader,
    rank: usize,
    world: usize,
    started: Instant,
) -> Recording {
    let kind = kind_index(header, rank);
    let bytes = header.count * header.dtype.size() as u64;
    let timeline = timeline::enabled();
    if !tandem_observe::active() && !timeline {
        return Recording {
            number: None,
            kind,
            bytes,
            started,
            started_us: 0,
        };
    }
    let started_us = tandem_observe::us_at(started);
    let enqueued_us = ENQUEUED
        .with(std::cell::Cell::take)
        .map_or(started_us, tandem_observe::us_at);
    let peers = match header.kind {
        // A message's header names its destination.
        OpKind::Send if kind == 6 => [Some(header.root), None],
        OpKind::Send => [None, None],
        _ => [
            Some(left(rank, world) as u32),
            Some(right(rank, world) as u32),
        ],
    };
    let number = tandem_observe::active().then(|| {
        log.begin(&OpStart {
            seq: header.seq,
            kind: kind as u8,
            dtype: header.dtype.code(),
            op: header.op.map(|o| o.code()),
            root: matches!(header.kind, OpKind::Broadcast | OpKind::Reduce).then_some(header.root),
            peers,
            count: header.count,
            bytes,
            enqueued_us,
            started_us,
        })
    });
    if timeline {
        REDUCES.with(|r| r.borrow_mut().clear());
    }
    Recording {
        number,
        kind,
        bytes,
        started,
        started_us,
    }
}

/// Records how `rec`'s operation ended at `ended`: `lateness` is the last header's arrival,
/// `waiting` what it waited for at the end; an error dumps the flight recorder.
pub(crate) fn end(
    log: &OpLog,
    rec: Recording,
    ended: Instant,
    lateness: Option<(usize, Duration)>,
    waiting: Waiting,
    error: Option<&Error>,
) {
    if rec.started_us == 0 {
        return;
    }
    let took = ended.saturating_duration_since(rec.started);
    let late = lateness.map(|(p, d)| {
        (
            p as u32,
            d.as_secs() * 1_000_000 + u64::from(d.subsec_micros()),
        )
    });
    if let Some(n) = rec.number {
        log.end(
            n,
            tandem_observe::us_at(ended),
            late,
            error.and_then(|_| wait_of(waiting)),
            error.map(ToString::to_string),
        );
    }
    match error {
        None => metrics::op_at(rec.kind, rec.bytes, took.as_nanos() as u64),
        Some(e) => metrics::error(metrics::COLLECTIVE_KINDS[rec.kind], e.kind()),
    }
    if let Some((p, d)) = lateness
        && d >= LATE_THRESHOLD
    {
        metrics::late(p);
    }
    if timeline::enabled() {
        let entry = rec.number.and_then(|n| log.entry(n));
        write_timeline(&rec, entry, took, late, error);
    }
    if let Some(e) = error {
        tandem_observe::dump::write(&format!("{}: {e}", e.kind()));
        timeline::flush();
    }
}

/// Writes an operation (and its reduce spans) to the timeline.
fn write_timeline(
    rec: &Recording,
    entry: Option<recorder::Entry>,
    took: Duration,
    late: Option<(u32, u64)>,
    error: Option<&Error>,
) {
    let tid = timeline::TID_COLLECTIVE;
    let start = rec.started_us;
    let dur = took.as_micros() as u64;
    timeline::complete(
        metrics::COLLECTIVE_KINDS[rec.kind],
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

/// What an NCCL call on device memory is, for the flight recorder and the metrics.
// Used by the nccl feature's device collectives (and the tests).
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceOp {
    /// Index into [`metrics::COLLECTIVE_KINDS`].
    pub(crate) kind: usize,
    /// Element type.
    pub(crate) dtype: tandem_core::DType,
    /// Reduce operator, for reductions.
    pub(crate) op: Option<tandem_core::ReduceOp>,
    /// The root of a rooted collective, or the other side of a message.
    pub(crate) root: Option<usize>,
    /// Elements.
    pub(crate) count: usize,
}

/// Records an NCCL operation on device memory, which does not pass the ring: an entry in the
/// device group's own flight recorder `log` (numbered `seq` there), the metrics as any operation
/// of its kind, a span on the timeline, and the recorder's dump when it failed.
// Used by the nccl feature's device collectives (and the tests).
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn device_op<T>(
    log: &OpLog,
    seq: u64,
    op: DeviceOp,
    run: impl FnOnce() -> tandem_core::Result<T>,
) -> tandem_core::Result<T> {
    record_device_op(log, seq, op, tandem_observe::active(), run)
}

/// [`device_op`], recording in `log` when `active`.
// Used by the nccl feature's device collectives (and the tests).
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
fn record_device_op<T>(
    log: &OpLog,
    seq: u64,
    op: DeviceOp,
    active: bool,
    run: impl FnOnce() -> tandem_core::Result<T>,
) -> tandem_core::Result<T> {
    let started = Instant::now();
    let started_us = tandem_observe::us_at(started);
    let bytes = (op.count * op.dtype.size()) as u64;
    let root = op.root.map(|r| r as u32);
    let message = op.kind >= 6; // send, recv: the root is the other side
    let number = active.then(|| {
        log.begin(&OpStart {
            seq,
            kind: op.kind as u8,
            dtype: op.dtype.code(),
            op: op.op.map(|o| o.code()),
            root,
            peers: [root.filter(|_| message), None],
            count: op.count as u64,
            bytes,
            enqueued_us: 0,
            started_us,
        })
    });
    let out = run();
    let ended = Instant::now();
    let took = ended.saturating_duration_since(started);
    let error = out.as_ref().err();
    if let Some(n) = number {
        log.end(
            n,
            tandem_observe::us_at(ended),
            None,
            None,
            error.map(ToString::to_string),
        );
    }
    let kind = metrics::COLLECTIVE_KINDS
        .get(op.kind)
        .copied()
        .unwrap_or("device");
    match error {
        None => metrics::op_at(op.kind, bytes, took.as_nanos() as u64),
        Some(e) => metrics::error(kind, e.kind()),
    }
    if timeline::enabled() {
        timeline::complete(
            kind,
            "collective",
            timeline::TID_COLLECTIVE,
            started_us,
            took.as_micros() as u64,
            json!({"backend": "nccl", "bytes": bytes, "error": error.map(ToString::to_string)}),
        );
    }
    if let Some(e) = error {
        tandem_observe::dump::write(&format!("{}: {e}", e.kind()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::{DType, ReduceOp};

    #[test]
    fn the_log_names_match_the_wire_codes() {
        for d in DType::ALL {
            assert_eq!(NAMES.dtypes[d.code() as usize], d.name());
        }
        for o in ReduceOp::ALL {
            assert_eq!(NAMES.ops[o.code() as usize], o.name());
        }
        let h = |kind, root| OpHeader {
            seq: 0,
            kind,
            dtype: DType::F32,
            op: None,
            root,
            count: 1,
        };
        for (kind, name) in [
            (OpKind::Allreduce, "allreduce"),
            (OpKind::Broadcast, "broadcast"),
            (OpKind::Allgather, "allgather"),
            (OpKind::ReduceScatter, "reduce_scatter"),
            (OpKind::Reduce, "reduce"),
            (OpKind::Barrier, "barrier"),
        ] {
            assert_eq!(NAMES.kinds[kind_index(&h(kind, 0), 0)], name);
        }
        assert_eq!(NAMES.kinds[kind_index(&h(OpKind::Send, 1), 0)], "send");
        assert_eq!(NAMES.kinds[kind_index(&h(OpKind::Send, 0), 0)], "recv");
    }

    #[test]
    fn a_device_operation_is_recorded_with_its_outcome() {
        let log = OpLog::new(&NAMES, 4);
        let op = DeviceOp {
            kind: 0,
            dtype: DType::BF16,
            op: Some(ReduceOp::Sum),
            root: None,
            count: 10,
        };
        assert_eq!(record_device_op(&log, 7, op, true, || Ok(3)).unwrap(), 3);
        let e = log.entry(0).expect("recorded");
        assert_eq!(
            (e.seq, &*e.kind, &*e.dtype, e.count, e.bytes),
            (7, "allreduce", "bf16", 10, 20)
        );
        assert_eq!(e.op.as_deref(), Some("sum"));
        assert!(e.ended_us.is_some());
        let recv = DeviceOp {
            kind: 7,
            dtype: DType::U8,
            op: None,
            root: Some(2),
            count: 5,
        };
        let failed: tandem_core::Result<()> = record_device_op(&log, 8, recv, true, || {
            Err(tandem_core::Error::transport("NCCL receive", "boom"))
        });
        assert!(failed.is_err());
        let e = log.entry(1).expect("recorded");
        assert_eq!(
            (&*e.kind, e.root, e.peers.clone()),
            ("recv", Some(2), vec![2])
        );
        assert!(
            format!("{:?}", e.outcome).contains("boom"),
            "{:?}",
            e.outcome
        );
        // Not active: nothing recorded, the result passed on.
        assert_eq!(record_device_op(&log, 9, op, false, || Ok(1)).unwrap(), 1);
        assert!(log.entry(2).is_none());
    }
}
