//! Looking inside from Python: metrics, flight-recorder dumps and timeline spans.
//!
//! Why from Python: a user debugging a slow or stuck job works in Python; the metrics, a dump on
//! demand and spans of their own code on the same timeline as Tandem's operations are what they
//! need, without a second tool.
//!
//! `metrics_text` is the same text the metrics endpoint serves (`tandem.metrics()` parses it with
//! `prometheus_client`); `timeline_span` writes a span the Python side timed itself, on the calling
//! thread's track.

use pyo3::prelude::*;

/// This process's metrics in the Prometheus text format.
#[pyfunction]
pub fn metrics_text() -> String {
    tandem::observe::metrics::render()
}

/// Writes the flight recorder now; returns the file, or `None` when nothing is recorded (no group
/// or client yet, or `TANDEM_OBSERVE=off`).
#[pyfunction]
#[pyo3(signature = (reason="requested from Python"))]
pub fn dump_flight_recorder(reason: &str) -> Option<String> {
    tandem::observe::dump::write(reason).map(|p| p.display().to_string())
}

/// Writes a span of user code to the timeline: `name` from `start_us` for `dur_us` (µs since the
/// Unix epoch), on the calling thread's track.
#[pyfunction]
pub fn timeline_span(name: &str, start_us: u64, dur_us: u64) {
    tandem::observe::timeline::user_span(name, start_us, dur_us);
}

/// Writes what the timeline has buffered.
#[pyfunction]
pub fn timeline_flush() {
    tandem::observe::timeline::flush();
}
