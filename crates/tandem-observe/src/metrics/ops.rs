//! Latency and bytes of every collective and message, by kind and size class: the one hot path of
//! the metrics. An operation updates plain atomics in a static table (no lock, no label hashing,
//! no allocation) instead of prometheus-client families, whose `get_or_create` locks and hashes
//! the labels on every record. Measured (BENCHMARKS.md, "Stall diagnosis: what the always-on
//! progress record costs"): the first version, recording through families (with an allocation and
//! two clock reads more), cost 2-3% of a 4 KiB allreduce on 2 ranks; this table with the shared
//! clock reads keeps it within 1%. The table joins the registry as a [`Collector`], so its text is
//! written by prometheus-client like every other series.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// The kinds of collective operation, in the order of their metric slots (and of the names
/// collectives give their [`crate::oplog::OpLog`]).
pub const COLLECTIVE_KINDS: [&str; 8] = [
    "allreduce",
    "broadcast",
    "allgather",
    "reduce_scatter",
    "reduce",
    "barrier",
    "send",
    "recv",
];

/// Upper bounds of the size classes, and their label values.
const SIZES: [(u64, &str); 6] = [
    (4 << 10, "<=4KiB"),
    (64 << 10, "<=64KiB"),
    (1 << 20, "<=1MiB"),
    (16 << 20, "<=16MiB"),
    (256 << 20, "<=256MiB"),
    (u64::MAX, ">256MiB"),
];

/// The size class of an operation of `bytes` (its `size` label).
pub fn size_class(bytes: u64) -> usize {
    SIZES
        .iter()
        .position(|(b, _)| bytes <= *b)
        .unwrap_or(SIZES.len() - 1)
}

/// Upper bounds of the latency buckets in nanoseconds: 10 µs to ~168 s by factors of 4.
pub(crate) const BOUNDS_NS: [u64; 13] = {
    let mut b = [0u64; 13];
    let mut i = 0;
    let mut v = 10_000u64;
    while i < 13 {
        b[i] = v;
        v *= 4;
        i += 1;
    }
    b
};

/// Latency and bytes of one kind of operation in one size class.
struct OpHist {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
    bytes: AtomicU64,
}

impl OpHist {
    /// A slot with nothing recorded.
    const fn new() -> OpHist {
        OpHist {
            buckets: [const { AtomicU64::new(0) }; BOUNDS_NS.len() + 1],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

/// Every kind's slots, one per size class.
static OPS: [[OpHist; SIZES.len()]; COLLECTIVE_KINDS.len()] =
    [const { [const { OpHist::new() }; SIZES.len()] }; COLLECTIVE_KINDS.len()];

/// Records one operation of kind `kind` (an index into [`COLLECTIVE_KINDS`]) moving `bytes` of
/// payload in `nanos`.
#[inline]
pub fn op_at(kind: usize, bytes: u64, nanos: u64) {
    if !super::recording() {
        return;
    }
    let Some(row) = OPS.get(kind) else {
        return;
    };
    let h = &row[size_class(bytes)];
    let b = BOUNDS_NS
        .iter()
        .position(|b| nanos <= *b)
        .unwrap_or(BOUNDS_NS.len());
    // Plain loads and stores, not read-modify-writes (each of which is a full barrier): a group's
    // operations run one at a time, so each slot has one writer; two groups of one process running
    // the same kind and size at the same instant may lose one count, never corrupt one.
    let add = |a: &AtomicU64, v: u64| {
        a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed)
    };
    add(&h.buckets[b], 1);
    add(&h.sum_ns, nanos);
    add(&h.bytes, bytes);
    add(&h.count, 1);
}

/// Records one operation of `kind` (`allreduce`, ..., `send`, `recv`: one of
/// [`COLLECTIVE_KINDS`]; others are ignored) moving `bytes` of payload in `secs`.
pub fn op(kind: &str, bytes: u64, secs: f64) {
    if let Some(k) = COLLECTIVE_KINDS.iter().position(|c| *c == kind) {
        op_at(k, bytes, (secs * 1e9) as u64);
    }
}

/// The labels of an operation's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    size: &'static str,
}

/// One recorded slot, read at scrape time.
struct Snapshot {
    labels: OpLabels,
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
    bytes: u64,
}

/// The slots that recorded anything, read now.
fn snapshot() -> Vec<Snapshot> {
    let mut out = Vec::new();
    for (k, row) in OPS.iter().enumerate() {
        for (z, h) in row.iter().enumerate() {
            if h.count.load(Ordering::Acquire) == 0 {
                continue;
            }
            let buckets: Vec<(f64, u64)> = h
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let le = BOUNDS_NS
                        .get(i)
                        .map_or(f64::INFINITY, |ns| *ns as f64 / 1e9);
                    (le, b.load(Ordering::Relaxed))
                })
                .collect();
            out.push(Snapshot {
                labels: OpLabels {
                    op: COLLECTIVE_KINDS[k],
                    size: SIZES[z].1,
                },
                // The count is the buckets' total, so a scrape between two updates stays whole.
                count: buckets.iter().map(|(_, n)| n).sum(),
                buckets,
                sum: h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
                bytes: h.bytes.load(Ordering::Relaxed),
            });
        }
    }
    out
}

/// `tandem_op_seconds` and `tandem_op_bytes_total` from the table.
#[derive(Debug)]
pub(crate) struct Ops;

impl Collector for Ops {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let slots = snapshot();
        if slots.is_empty() {
            return Ok(());
        }
        let mut seconds = encoder.encode_descriptor(
            "tandem_op_seconds",
            "Latency of collectives and messages, by operation and size class",
            None,
            MetricType::Histogram,
        )?;
        for s in &slots {
            seconds
                .encode_family(&s.labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    s.sum, s.count, &s.buckets, None,
                )?;
        }
        let mut bytes = encoder.encode_descriptor(
            "tandem_op_bytes",
            "Payload bytes of collectives and messages",
            None,
            MetricType::Counter,
        )?;
        for s in &slots {
            ConstCounter::new(s.bytes).encode(bytes.encode_family(&s.labels)?)?;
        }
        Ok(())
    }
}
