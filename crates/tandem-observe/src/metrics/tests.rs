use super::ops::BOUNDS_NS;
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
fn latency_buckets_grow_by_four_from_ten_microseconds() {
    assert_eq!(BOUNDS_NS[0], 10_000);
    assert_eq!(BOUNDS_NS[1], 40_000);
    assert_eq!(BOUNDS_NS[12], 10_000 * 4u64.pow(12));
}

#[derive(Debug)]
struct Seven(&'static str);

impl Collector for Seven {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let family = encoder.encode_descriptor(
            self.0,
            "t",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        prometheus_client::metrics::gauge::ConstGauge::new(7i64).encode(family)
    }
}

#[test]
fn recorded_operations_render_as_parsable_series_with_the_process_labels() {
    // Registered before the process has an identity: it joins the registry when it is made.
    register(Seven("tandem_test_source"));
    let mut id = Identity::new("rank", 5, 8);
    // (Escaped label values are read back by the Python suite, whose parser unescapes them.)
    id.job = "metrics-unit".into();
    crate::identify(id);
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
    let text = render();
    // The lines the registry must have written, each with the process's labels first.
    let me = "job=\"metrics-unit\",rank=\"5\",role=\"rank\"";
    let small = format!("{me},op=\"allreduce\",size=\"<=4KiB\"");
    let slow = format!("{me},op=\"recv\",size=\"<=4KiB\"");
    for line in [
        format!("tandem_op_seconds_bucket{{{small},le=\"1e-05\"}} 1"),
        format!("tandem_op_seconds_bucket{{{small},le=\"4e-05\"}} 2"),
        format!("tandem_op_seconds_bucket{{{small},le=\"+Inf\"}} 2"),
        format!("tandem_op_seconds_count{{{small}}} 2"),
        format!("tandem_op_seconds_sum{{{small}}} 0.000035"),
        format!("tandem_op_bytes_total{{{small}}} 8192"),
        format!("tandem_op_bytes_total{{{me},op=\"allreduce\",size=\"<=64KiB\"}} 4097"),
        format!("tandem_op_seconds_bucket{{{slow},le=\"167.77216\"}} 0"),
        format!("tandem_op_seconds_bucket{{{slow},le=\"+Inf\"}} 1"),
        format!("tandem_op_errors_total{{{me},op=\"allreduce\",error=\"timeout\"}} 1"),
        format!("tandem_peer_late_total{{{me},peer=\"3\"}} 1"),
        format!("tandem_peer_straggler_total{{{me},peer=\"3\"}} 1"),
        format!("tandem_ps_call_seconds_count{{{me},call=\"push\"}} 1"),
        format!("tandem_rendezvous_seconds_count{{{me},call=\"get\"}} 1"),
        format!("tandem_test_source{{{me}}} 7"),
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(samples.len() > 30, "{text}");
    assert!(
        samples.iter().all(|l| l.contains(&format!("{{{me}"))),
        "{text}"
    );
    // A collector registered after the registry was made joins it too.
    register(Seven("tandem_test_later"));
    let later = format!("tandem_test_later{{{me}}} 7");
    assert!(render().lines().any(|l| l == later));
}
