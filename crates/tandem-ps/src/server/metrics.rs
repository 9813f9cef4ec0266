//! A parameter server in the process's metrics: its counters join the registry of
//! [`tandem_observe::metrics`] as a [`Collector`] read at scrape time (so they carry the process's
//! `job`, `rank` and `role` labels and are written by prometheus-client like every other series),
//! and [`summary`] is the one log line of its state.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::model::Model;
use super::service::Service;

/// The server's counters as metrics: `tandem_ps_version`, `tandem_ps_gradients_applied_total`,
/// `..._dropped_total`, `..._rejected_total`, `tandem_ps_bytes_in_total`, `..._out_total`, the
/// `tandem_ps_staleness` histogram and `tandem_ps_worker_step` by worker.
#[derive(Clone)]
pub struct ServerMetrics(Service);

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerMetrics")
    }
}

impl ServerMetrics {
    /// The metrics of `service`'s model (none until it has one).
    pub fn new(service: &Service) -> Self {
        ServerMetrics(service.clone())
    }
}

impl Collector for ServerMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.0.model() {
            Some(m) => encode(&m, encoder),
            None => Ok(()),
        }
    }
}

/// The label of a per-worker series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    /// The worker's index.
    worker: usize,
}

/// Writes `model`'s counters.
fn encode(model: &Model, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let c = &model.counters;
    let version = *model.version.borrow();
    let gauge = encoder.encode_descriptor(
        "tandem_ps_version",
        "Sync steps or async updates applied",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(version as i64).encode(gauge)?;
    let counters = [
        (
            "tandem_ps_gradients_applied",
            "Gradients applied",
            &c.applied,
        ),
        (
            "tandem_ps_gradients_dropped",
            "Late or duplicate gradients dropped",
            &c.dropped,
        ),
        (
            "tandem_ps_gradients_rejected",
            "Gradients refused (NaN/Inf, bad shapes)",
            &c.rejected,
        ),
        ("tandem_ps_bytes_in", "Gradient bytes received", &c.bytes_in),
        ("tandem_ps_bytes_out", "Parameter bytes sent", &c.bytes_out),
    ];
    for (name, help, value) in counters {
        let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value.load(Relaxed)).encode(family)?;
    }
    let mut staleness = encoder.encode_descriptor(
        "tandem_ps_staleness",
        "Staleness of applied async gradients",
        None,
        MetricType::Histogram,
    )?;
    let buckets = staleness_buckets(c);
    let count = buckets.iter().map(|(_, n)| n).sum();
    let sum = c.staleness_sum.load(Relaxed) as f64;
    staleness.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    let steps = model.worker_steps.borrow().clone();
    let mut per_worker = encoder.encode_descriptor(
        "tandem_ps_worker_step",
        "Steps pushed by each worker",
        None,
        MetricType::Gauge,
    )?;
    for (worker, s) in steps.iter().enumerate() {
        let labels = WorkerLabel { worker };
        ConstGauge::new(*s as i64).encode(per_worker.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The staleness counts with their upper bounds: 0, 1, 3, 7, ... (buckets 0, 1, 2-3, 4-7, ...),
/// the last unbounded.
fn staleness_buckets(c: &super::Counters) -> Vec<(f64, u64)> {
    let last = c.staleness.len() - 1;
    c.staleness
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let le = if i == last {
                f64::INFINITY
            } else {
                ((1u64 << i) - 1) as f64
            };
            (le, b.load(Relaxed))
        })
        .collect()
}

/// Makes this process parameter server `index` of `servers` in the flight recorder, the timeline
/// and the metrics (its counters join the metrics endpoint, `TANDEM_METRICS_ADDR`, and
/// [`tandem_observe::metrics::render`]). Call once, when it starts serving.
pub fn observe(index: usize, servers: usize, service: &Service) {
    tandem_observe::identify(
        tandem_observe::Identity::new("ps", index, servers).local(crate::protocol::local_rank()),
    );
    tandem_observe::metrics::register(ServerMetrics::new(service));
}

/// One log line of the server's state, naming the slowest worker and its lag.
pub fn summary(model: &Model) -> String {
    let c = &model.counters;
    let steps = model.worker_steps.borrow().clone();
    let lag = match (
        steps.iter().enumerate().min_by_key(|(_, s)| **s),
        steps.iter().max(),
    ) {
        (Some((w, slow)), Some(fast)) => {
            format!("slowest worker {w} ({} steps behind)", fast - slow)
        }
        _ => "no workers".into(),
    };
    format!(
        "version {}, gradients applied {} dropped {} rejected {}, {} MB in, {} MB out, {lag}",
        *model.version.borrow(),
        c.applied.load(Relaxed),
        c.dropped.load(Relaxed),
        c.rejected.load(Relaxed),
        c.bytes_in.load(Relaxed) / 1_000_000,
        c.bytes_out.load(Relaxed) / 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::super::Mode;
    use super::*;
    use crate::optimizer::Optimizer;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Of(std::sync::Arc<Model>);

    impl Collector for Of {
        fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode(&self.0, encoder)
        }
    }

    #[test]
    fn counters_render_through_the_registry_with_its_labels_and_a_summary_names_the_laggard() {
        let mode = Mode {
            sync: false,
            workers: 3,
            replicas_to_aggregate: 3,
            staleness: None,
            reject_non_finite: true,
        };
        let m = std::sync::Arc::new(Model::new(1, Optimizer::sgd(0.1), mode, vec![]));
        m.counters.applied.fetch_add(5, Relaxed);
        m.counters.record_staleness(0);
        m.counters.record_staleness(3);
        m.worker_steps.send_replace(vec![7, 2, 9]);
        let mut registry = Registry::with_labels(
            [("job".into(), "j".into()), ("role".into(), "ps".into())].into_iter(),
        );
        registry.register_collector(Box::new(Of(m.clone())));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("text");
        for line in [
            "tandem_ps_gradients_applied_total{job=\"j\",role=\"ps\"} 5",
            "tandem_ps_staleness_bucket{job=\"j\",role=\"ps\",le=\"0\"} 1",
            "tandem_ps_staleness_bucket{job=\"j\",role=\"ps\",le=\"1\"} 1",
            "tandem_ps_staleness_bucket{job=\"j\",role=\"ps\",le=\"3\"} 2",
            "tandem_ps_staleness_bucket{job=\"j\",role=\"ps\",le=\"+Inf\"} 2",
            "tandem_ps_staleness_sum{job=\"j\",role=\"ps\"} 3.0",
            "tandem_ps_staleness_count{job=\"j\",role=\"ps\"} 2",
            "tandem_ps_worker_step{job=\"j\",role=\"ps\",worker=\"1\"} 2",
            "tandem_ps_version{job=\"j\",role=\"ps\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(
            summary(&m).contains("slowest worker 1 (7 steps behind)"),
            "{}",
            summary(&m)
        );
    }
}
