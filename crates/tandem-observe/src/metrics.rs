//! This process's metrics, in the Prometheus text format: served at `TANDEM_METRICS_ADDR`
//! (see [`crate::serve_from_env`]), returned by [`render`] and, parsed, by [`samples`].
//!
//! Every series carries the labels `job`, `rank` and `role` of the process's [`Identity`].
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `tandem_op_seconds` (histogram) | `op`, `size` | collective and message latency by size class |
//! | `tandem_op_bytes_total` | `op`, `size` | payload bytes of those operations |
//! | `tandem_op_errors_total` | `op`, `error` | failed operations (`timeout`, `peer_lost`, `mismatch`, `other`) |
//! | `tandem_peer_late_total` | `peer` | operations a peer started 2 ms or more after this rank |
//! | `tandem_peer_straggler_total` | `peer` | windows of 64 operations in which the peer was late in most |
//! | `tandem_peer_sent_bytes_total`, `tandem_peer_received_bytes_total` | `peer` | bytes on the wire to and from each peer (the kernel's count) |
//! | `tandem_peer_retransmits_total` | `peer` | TCP segments retransmitted to each peer |
//! | `tandem_rendezvous_seconds` (histogram) | `call` | rendezvous round trips |
//! | `tandem_ps_call_seconds` (histogram) | `call` | parameter-server calls of a worker (`push`, `pull`) |
//! | `tandem_ps_*` | | a parameter server's counters (its own [`add_source`]) |
//!
//! ```
//! tandem_observe::identify(tandem_observe::Identity::new("rank", 0, 1));
//! tandem_observe::metrics::op("allreduce", 4096, 0.00002);
//! assert!(tandem_observe::metrics::render().contains("tandem_op_seconds_count"));
//! ```

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Identity;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    server: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: Cow<'static, str>,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 10 µs to ~2.8 min by factors of 4.
    Histogram::new(exponential_buckets(1e-5, 4.0, 13))
}

struct Metrics {
    registry: Registry,
    errors: Family<ErrorLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    late: Family<PeerLabels, Counter>,
    stragglers: Family<PeerLabels, Counter>,
    rendezvous: Histograms<CallLabels>,
    ps_calls: Histograms<CallLabels>,
    /// `job="..",rank="..",role=".."`, for the series written by hand.
    labels: String,
}

type Source = Box<dyn Fn(&mut String, &str) + Send + Sync>;

static METRICS: OnceLock<Metrics> = OnceLock::new();
static SOURCES: Mutex<Vec<Source>> = Mutex::new(Vec::new());

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

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) fn init(id: &Identity) {
    METRICS.get_or_init(|| {
        let labels = [
            ("job", id.job.clone()),
            ("rank", id.index.to_string()),
            ("role", id.role.clone()),
        ];
        let text = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        let mut registry = Registry::with_labels(
            labels
                .into_iter()
                .map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v))),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let late = Family::<PeerLabels, Counter>::default();
        let stragglers = Family::<PeerLabels, Counter>::default();
        let rendezvous: Histograms<CallLabels> = Family::new_with_constructor(latency);
        let ps_calls: Histograms<CallLabels> = Family::new_with_constructor(latency);
        registry.register(
            "tandem_op_errors",
            "Failed operations, by operation and error",
            errors.clone(),
        );
        registry.register(
            "tandem_connections_refused",
            "Connections a server of this process did not admit, by server and reason",
            refused.clone(),
        );
        registry.register(
            "tandem_peer_late",
            "Operations a peer started 2 ms or more after this rank",
            late.clone(),
        );
        registry.register(
            "tandem_peer_straggler",
            "Windows of 64 operations in which the peer started late in most",
            stragglers.clone(),
        );
        registry.register(
            "tandem_rendezvous_seconds",
            "Round trips to the rendezvous",
            rendezvous.clone(),
        );
        registry.register(
            "tandem_ps_call_seconds",
            "Parameter-server calls of this worker",
            ps_calls.clone(),
        );
        Metrics {
            registry,
            errors,
            refused,
            late,
            stragglers,
            rendezvous,
            ps_calls,
            labels: text,
        }
    });
}

fn get() -> Option<&'static Metrics> {
    if crate::active() { METRICS.get() } else { None }
}

/// Upper bounds of the latency buckets in nanoseconds: 10 µs to ~168 s by factors of 4.
const BOUNDS_NS: [u64; 13] = {
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

/// Latency and bytes of one kind of operation in one size class: plain atomics in a static
/// table, so recording an operation touches no lock and follows no pointer.
struct OpHist {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
    bytes: AtomicU64,
}

impl OpHist {
    const fn new() -> OpHist {
        OpHist {
            buckets: [const { AtomicU64::new(0) }; BOUNDS_NS.len() + 1],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

static OPS: [[OpHist; SIZES.len()]; COLLECTIVE_KINDS.len()] =
    [const { [const { OpHist::new() }; SIZES.len()] }; COLLECTIVE_KINDS.len()];

/// Records one operation of kind `kind` (an index into [`COLLECTIVE_KINDS`]) moving `bytes` of
/// payload in `nanos`.
#[inline]
pub fn op_at(kind: usize, bytes: u64, nanos: u64) {
    if get().is_none() {
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

/// Appends `tandem_op_seconds` and `tandem_op_bytes_total`.
fn render_ops(out: &mut String, labels: &str) {
    let sep = if labels.is_empty() { "" } else { "," };
    let _ = writeln!(
        out,
        "# HELP tandem_op_seconds Latency of collectives and messages, by operation and size class.\n# TYPE tandem_op_seconds histogram"
    );
    let mut bytes = Vec::new();
    for (k, row) in OPS.iter().enumerate() {
        for (z, h) in row.iter().enumerate() {
            let count = h.count.load(Ordering::Acquire);
            if count == 0 {
                continue;
            }
            let l = format!(
                "{labels}{sep}op=\"{}\",size=\"{}\"",
                COLLECTIVE_KINDS[k], SIZES[z].1
            );
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = match BOUNDS_NS.get(i) {
                    Some(ns) => format!("{}", *ns as f64 / 1e9),
                    None => "+Inf".into(),
                };
                let _ = writeln!(
                    out,
                    "tandem_op_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "tandem_op_seconds_sum{{{l}}} {}\ntandem_op_seconds_count{{{l}}} {cumulative}",
                h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            bytes.push((l, h.bytes.load(Ordering::Relaxed)));
        }
    }
    let _ = writeln!(
        out,
        "# HELP tandem_op_bytes_total Payload bytes of collectives and messages.\n# TYPE tandem_op_bytes_total counter"
    );
    for (l, b) in bytes {
        let _ = writeln!(out, "tandem_op_bytes_total{{{l}}} {b}");
    }
}

/// Counts a failed operation; `error` is `timeout`, `peer_lost`, `mismatch` or `other`.
pub fn error(kind: impl Into<Cow<'static, str>>, error: &'static str) {
    if let Some(m) = get() {
        m.errors
            .get_or_create(&ErrorLabels {
                op: kind.into(),
                error,
            })
            .inc();
    }
}

/// Counts a connection a server did not admit (`server`: `ring`, `rendezvous`, `ps`; `reason`:
/// `busy`, `closed`, `silent`, `protocol`, `tls`, `token`, `peer`): outsiders knocking, or
/// members misconfigured.
pub fn refused(server: &'static str, reason: &'static str) {
    if let Some(m) = get() {
        m.refused
            .get_or_create(&RefusedLabels { server, reason })
            .inc();
    }
}

/// Counts an operation `peer` started late (see [`crate::metrics`]).
pub fn late(peer: usize) {
    if let Some(m) = get() {
        m.late
            .get_or_create(&PeerLabels { peer: peer as u32 })
            .inc();
    }
}

/// Counts a window in which `peer` was a straggler.
pub fn straggler(peer: usize) {
    if let Some(m) = get() {
        m.stragglers
            .get_or_create(&PeerLabels { peer: peer as u32 })
            .inc();
    }
}

/// Records a rendezvous round trip (`call`: `get`, `set`, `wait`, ...).
pub fn rendezvous(call: &'static str, secs: f64) {
    if let Some(m) = get() {
        m.rendezvous
            .get_or_create(&CallLabels { call })
            .observe(secs);
    }
}

/// Records a parameter-server call of a worker (`call`: `push`, `pull`).
pub fn ps_call(call: &'static str, secs: f64) {
    if let Some(m) = get() {
        m.ps_calls.get_or_create(&CallLabels { call }).observe(secs);
    }
}

/// Adds series rendered by the caller (a parameter server's counters): `source(out, labels)`
/// appends text-format lines, putting `labels` (`job="..",rank="..",role=".."`) in each series.
pub fn add_source(source: impl Fn(&mut String, &str) + Send + Sync + 'static) {
    if let Ok(mut s) = SOURCES.lock() {
        s.push(Box::new(source));
    }
}

/// This process's metrics in the Prometheus text format (version 0.0.4); empty before it has an
/// identity or with `TANDEM_OBSERVE=off`.
pub fn render() -> String {
    let Some(m) = get() else {
        return String::new();
    };
    let mut out = String::new();
    render_ops(&mut out, &m.labels);
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry) {
        tracing::warn!("metrics not encoded: {e}");
    }
    crate::sockets::render(&mut out, &m.labels);
    if let Ok(sources) = SOURCES.lock() {
        for s in sources.iter() {
            s(&mut out, &m.labels);
        }
    }
    out
}

/// Writes one hand-rendered family: `# HELP`, `# TYPE` and its samples (`(extra labels, value)`).
pub fn write_family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    labels: &str,
    samples: &[(String, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (extra, v) in samples {
        let sep = if extra.is_empty() || labels.is_empty() {
            ""
        } else {
            ","
        };
        let _ = writeln!(out, "{name}{{{labels}{sep}{extra}}} {v}");
    }
}

/// One sample of [`render`]'s text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count`, `_total` as written).
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// Parses the text format (what [`render`] writes): its samples, or the first line that is not one.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: {line:?} is not a sample", n + 1);
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(bad()),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(bad());
        }
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(body) => parse_labels(body).ok_or_else(bad)?,
            None => (Vec::new(), rest),
        };
        let value = rest.split_whitespace().next().ok_or_else(bad)?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| bad())?,
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The labels after a `{`, and the text after their `}`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut labels = Vec::new();
    loop {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        if *b.get(i)? == b'}' {
            return Some((labels, &s[i + 1..]));
        }
        let eq = s[i..].find('=')? + i;
        let key = s[i..eq].trim();
        if key.is_empty() || key.contains(['"', '}', ',']) {
            return None;
        }
        i = eq + 1;
        if b.get(i) != Some(&b'"') {
            return None;
        }
        i += 1;
        let mut value = String::new();
        loop {
            let c = s[i..].chars().next()?;
            i += c.len_utf8();
            match c {
                '\\' => {
                    let d = s[i..].chars().next()?;
                    i += d.len_utf8();
                    value.push(if d == 'n' { '\n' } else { d });
                }
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.to_string(), value));
    }
}

/// This process's metrics, parsed: what `tandem.metrics()` returns in Python.
pub fn samples() -> Vec<Sample> {
    parse(&render()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn size_classes_have_inclusive_upper_bounds() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(4096), 0);
        assert_eq!(size_class(4097), 1);
        assert_eq!(size_class(1 << 20), 2);
        assert_eq!(size_class((1 << 20) + 1), 3);
        assert_eq!(size_class(256 << 20), 4);
        assert_eq!(size_class((256 << 20) + 1), 5);
        assert_eq!(size_class(u64::MAX), 5);
    }

    #[test]
    fn the_parser_reads_labels_escapes_and_infinities_and_names_a_bad_line() {
        let text = "# HELP x y\n# TYPE x counter\nx_total{job=\"a\\\"b\",le=\"+Inf\"} 3\nup 1\nh_bucket{le=\"+Inf\"} +Inf\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(
            s[0].labels,
            vec![
                ("job".to_string(), "a\"b".to_string()),
                ("le".to_string(), "+Inf".to_string())
            ]
        );
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("up", 1.0));
        assert!(s[2].value.is_infinite());
        assert!(parse("x{a=\"1\" 3\n").unwrap_err().contains("line 1"));
        assert!(parse("ok 1\nx y\n").unwrap_err().contains("line 2"));
        assert!(parse("{a=\"1\"} 3\n").is_err());
    }

    #[test]
    fn latency_buckets_grow_by_four_from_ten_microseconds() {
        assert_eq!(BOUNDS_NS[0], 10_000);
        assert_eq!(BOUNDS_NS[1], 40_000);
        assert_eq!(BOUNDS_NS[12], 10_000 * 4u64.pow(12));
    }

    fn value(s: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        s.iter()
            .find(|x| {
                x.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| x.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|x| x.value)
    }

    #[test]
    fn recorded_operations_render_as_parsable_series_with_the_process_labels() {
        let mut id = Identity::new("rank", 5, 8);
        id.job = "a \"quoted\" job\\".into();
        crate::identify(id);
        let id = crate::identity().unwrap();
        op("allreduce", 4096, 3e-5);
        op("allreduce", 4096, 5e-6);
        op("allreduce", 4097, 1e-5);
        op("nonsense", 1, 1.0);
        op_at(COLLECTIVE_KINDS.len(), 1, 1);
        op_at(7, 10, 200_000_000_000_000);
        error("allreduce", "timeout");
        late(3);
        straggler(3);
        ps_call("push", 0.5);
        rendezvous("get", 0.001);
        add_source(|out, labels| {
            write_family(
                out,
                "tandem_test_source",
                "gauge",
                "t",
                labels,
                &[(String::new(), 7.0)],
            )
        });
        let s = samples();
        assert!(!s.is_empty());
        let small = [("op", "allreduce"), ("size", "<=4KiB")];
        assert_eq!(value(&s, "tandem_op_seconds_count", &small), Some(2.0));
        let le = |b: &str| {
            let mut l = small.to_vec();
            l.push(("le", b));
            value(&s, "tandem_op_seconds_bucket", &l)
        };
        assert_eq!(le("0.00001"), Some(1.0));
        assert_eq!(le("0.00004"), Some(2.0));
        assert_eq!(le("+Inf"), Some(2.0));
        let sum = value(&s, "tandem_op_seconds_sum", &small).unwrap();
        assert!((sum - 3.5e-5).abs() < 1e-9, "{sum}");
        assert_eq!(value(&s, "tandem_op_bytes_total", &small), Some(8192.0));
        let next = [("op", "allreduce"), ("size", "<=64KiB")];
        assert_eq!(value(&s, "tandem_op_bytes_total", &next), Some(4097.0));
        let slow = [("op", "recv"), ("size", "<=4KiB"), ("le", "+Inf")];
        assert_eq!(value(&s, "tandem_op_seconds_bucket", &slow), Some(1.0));
        let slow_le = [("op", "recv"), ("size", "<=4KiB"), ("le", "167.77216")];
        assert_eq!(value(&s, "tandem_op_seconds_bucket", &slow_le), Some(0.0));
        assert_eq!(
            value(
                &s,
                "tandem_op_errors_total",
                &[("op", "allreduce"), ("error", "timeout")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "tandem_peer_late_total", &[("peer", "3")]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "tandem_peer_straggler_total", &[("peer", "3")]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "tandem_ps_call_seconds_count", &[("call", "push")]),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "tandem_rendezvous_seconds_count", &[("call", "get")]),
            Some(1.0)
        );
        assert_eq!(value(&s, "tandem_test_source", &[]), Some(7.0));
        let rank = id.index.to_string();
        for x in &s {
            let has = |k: &str, v: &str| x.labels.iter().any(|(a, b)| a == k && b == v);
            assert!(
                has("job", &id.job) && has("rank", &rank) && has("role", &id.role),
                "{x:?}"
            );
        }
    }

    #[test]
    fn hand_written_families_carry_the_process_labels() {
        let mut out = String::new();
        write_family(
            &mut out,
            "tandem_ps_version",
            "gauge",
            "v",
            "job=\"j\",rank=\"0\",role=\"ps\"",
            &[(String::new(), 4.0), ("le=\"1\"".into(), 2.0)],
        );
        let s = parse(&out).unwrap();
        assert_eq!(s[0].labels.len(), 3);
        assert_eq!(s[1].labels.len(), 4);
        assert_eq!(s[1].value, 2.0);
        let mut bare = String::new();
        write_family(
            &mut bare,
            "x",
            "gauge",
            "h",
            "",
            &[("a=\"1\"".into(), 1.0), (String::new(), 2.0)],
        );
        assert!(bare.contains("x{a=\"1\"} 1\nx{} 2\n"), "{bare}");
        let s = parse(&bare).unwrap();
        assert_eq!(s[0].labels, vec![("a".to_string(), "1".to_string())]);
        assert!(s[1].labels.is_empty());
    }

    #[test]
    fn label_values_are_escaped_and_read_back() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let line = format!("m{{k=\"{}\"}} 1", escape("a\"b\\c\nd"));
        assert_eq!(parse(&line).unwrap()[0].labels[0].1, "a\"b\\c\nd");
        // Keys must be names; a label list must close.
        assert!(parse("m{=\"1\"} 1").is_err());
        assert!(parse("m{k=1} 1").is_err());
        assert!(parse("m{k=\"1\"").is_err());
        assert!(parse("m{k=\"1} 1").is_err());
        assert_eq!(parse("m{k=\"1\",} 2").unwrap()[0].value, 2.0);
        assert_eq!(parse("m -Inf").unwrap()[0].value, f64::NEG_INFINITY);
        assert!(parse("m{} ").is_err(), "no value");
        assert_eq!(parse("job:rate_5m 1").unwrap()[0].name, "job:rate_5m");
        assert!(parse("a-b 1").is_err(), "not a metric name");
    }
}
