//! This process's metrics, in the Prometheus text format: served at `TANDEM_METRICS_ADDR`
//! (see [`crate::serve_from_env`]) and returned by [`render`].
//!
//! One path: every series is encoded by prometheus-client from one [`Registry`] that carries the
//! labels `job`, `rank` and `role` of the process's [`Identity`]. Counters and histograms that
//! Tandem updates off the hot path are prometheus-client's own; the operation histograms
//! (`ops.rs`) and the per-peer socket counters (`sockets.rs`) keep their values elsewhere
//! (lock-free atomics; the kernel) and join the registry as [`Collector`]s read at scrape time,
//! as a parameter server's counters do ([`register`]).
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
//! | `tandem_ps_*` | | a parameter server's counters (a collector it [`register`]s) |
//! | `tandem_compression_auto` (gauge, 1) | `chosen` | what `auto` compression chose for the group formed last |
//! | `tandem_compression_probe_seconds` (gauge) | `compression` | the probe allreduce's time `auto` chose by (`none`, `bf16`) |
//!
//! ```
//! tandem_observe::identify(tandem_observe::Identity::new("rank", 0, 1));
//! tandem_observe::metrics::op("allreduce", 4096, 0.00002);
//! assert!(tandem_observe::metrics::render().contains("tandem_op_seconds_count"));
//! ```

use std::borrow::Cow;
use std::sync::{Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Identity;

mod ops;

pub use ops::{COLLECTIVE_KINDS, op, op_at, size_class};

/// Labels of a refused connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    server: &'static str,
    reason: &'static str,
}

/// Labels of a failed operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: Cow<'static, str>,
    error: &'static str,
}

/// Labels of a per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: u32,
}

/// Labels of a call's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
}

/// Labels of `auto` compression's choice.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChosenLabels {
    chosen: &'static str,
}

/// Labels of a probe's time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    compression: &'static str,
}

/// A gauge of seconds.
type Seconds = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A family of latency histograms.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A latency histogram: 10 µs to ~2.8 min by factors of 4.
fn latency() -> Histogram {
    // 10 µs to ~2.8 min by factors of 4.
    Histogram::new(exponential_buckets(1e-5, 4.0, 13))
}

/// The process's registry and the handles of its families.
struct Metrics {
    /// Every series of the process, with its identity's labels; locked only to register a
    /// collector and to encode a scrape.
    registry: Mutex<Registry>,
    errors: Family<ErrorLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    late: Family<PeerLabels, Counter>,
    stragglers: Family<PeerLabels, Counter>,
    rendezvous: Histograms<CallLabels>,
    ps_calls: Histograms<CallLabels>,
    auto_chosen: Family<ChosenLabels, Gauge>,
    probe_seconds: Family<ProbeLabels, Seconds>,
}

/// Made when the process gets its identity.
static METRICS: OnceLock<Metrics> = OnceLock::new();
/// Collectors registered before the process had an identity, waiting for its registry.
static PENDING: Mutex<Vec<Box<dyn Collector>>> = Mutex::new(Vec::new());

/// Makes the registry with `id`'s labels (once per process).
pub(crate) fn init(id: &Identity) {
    METRICS.get_or_init(|| {
        let labels = [
            ("job", id.job.clone()),
            ("rank", id.index.to_string()),
            ("role", id.role.clone()),
        ];
        let mut registry = Registry::with_labels(
            labels
                .into_iter()
                .map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v))),
        );
        let m = Metrics::register(&mut registry);
        if let Ok(mut pending) = PENDING.lock() {
            for c in pending.drain(..) {
                registry.register_collector(c);
            }
        }
        Metrics {
            registry: Mutex::new(registry),
            ..m
        }
    });
}

impl Metrics {
    /// Makes the families and registers them, with the operation and socket collectors.
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            errors: Family::default(),
            refused: Family::default(),
            late: Family::default(),
            stragglers: Family::default(),
            rendezvous: Family::new_with_constructor(latency),
            ps_calls: Family::new_with_constructor(latency),
            auto_chosen: Family::default(),
            probe_seconds: Family::default(),
        };
        registry.register_collector(Box::new(ops::Ops));
        let help = [
            "Failed operations, by operation and error",
            "Connections a server of this process did not admit, by server and reason",
            "Operations a peer started 2 ms or more after this rank",
            "Windows of 64 operations in which the peer started late in most",
            "Round trips to the rendezvous",
            "Parameter-server calls of this worker",
            "What auto compression chose for the group formed last (1 on the chosen setting)",
            "The probe allreduce's time auto compression chose by, by setting",
        ];
        registry.register("tandem_op_errors", help[0], m.errors.clone());
        registry.register("tandem_connections_refused", help[1], m.refused.clone());
        registry.register("tandem_peer_late", help[2], m.late.clone());
        registry.register("tandem_peer_straggler", help[3], m.stragglers.clone());
        registry.register("tandem_rendezvous_seconds", help[4], m.rendezvous.clone());
        registry.register("tandem_ps_call_seconds", help[5], m.ps_calls.clone());
        registry.register("tandem_compression_auto", help[6], m.auto_chosen.clone());
        let probe = m.probe_seconds.clone();
        registry.register("tandem_compression_probe_seconds", help[7], probe);
        registry.register_collector(Box::new(crate::sockets::PeerBytes));
        m
    }
}

/// The metrics, while anything is recorded.
fn get() -> Option<&'static Metrics> {
    if crate::active() { METRICS.get() } else { None }
}

/// Whether metrics are being recorded (an identity is set and observation is on).
#[inline]
fn recording() -> bool {
    get().is_some()
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

/// Records what `auto` compression chose (`chosen`: `none`, `bf16`) and the probe times it
/// chose by (none where nothing was measured): the choice of the group formed last replaces any
/// earlier one.
pub fn compression_auto(chosen: &'static str, none_secs: Option<f64>, bf16_secs: Option<f64>) {
    if let Some(m) = get() {
        m.auto_chosen.clear();
        m.auto_chosen.get_or_create(&ChosenLabels { chosen }).set(1);
        m.probe_seconds.clear();
        for (compression, secs) in [("none", none_secs), ("bf16", bf16_secs)] {
            if let Some(secs) = secs {
                m.probe_seconds
                    .get_or_create(&ProbeLabels { compression })
                    .set(secs);
            }
        }
    }
}

/// Adds series that live elsewhere (a parameter server's counters) to this process's registry:
/// `collector` is asked for them at every scrape, and they carry the process's labels like every
/// other series. Registered before the process has an identity, it joins the registry then.
pub fn register(collector: impl Collector) {
    // The pending list's lock is held across the check, so a registry made meanwhile (which
    // drains the list under the same lock) cannot miss this collector.
    let Ok(mut pending) = PENDING.lock() else {
        return;
    };
    match METRICS.get() {
        Some(m) => {
            if let Ok(mut r) = m.registry.lock() {
                r.register_collector(Box::new(collector));
            }
        }
        None => pending.push(Box::new(collector)),
    }
}

/// This process's metrics in the Prometheus text format (version 0.0.4); empty before it has an
/// identity or with `TANDEM_OBSERVE=off`.
pub fn render() -> String {
    let Some(m) = get() else {
        return String::new();
    };
    let mut out = String::new();
    let encoded = match m.registry.lock() {
        Ok(r) => prometheus_client::encoding::prometheus_text::encode(&mut out, &r),
        Err(_) => Err(std::fmt::Error),
    };
    if encoded.is_err() {
        tracing::warn!("metrics not encoded");
    }
    out
}

#[cfg(test)]
mod tests;
