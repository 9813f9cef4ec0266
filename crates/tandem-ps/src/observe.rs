//! What parameter-server calls tell [`tandem_observe`]: a worker's pushes and pulls, and a server's
//! applied updates, go to the flight recorder (always) and the timeline (when one is written); a
//! worker's calls also to the metrics, and a failed call dumps the flight recorder.

use std::future::Future;
use std::time::Instant;

use serde_json::json;
use tandem_core::Result;
use tandem_observe::recorder::{self, Ending, Peers, Record};
use tandem_observe::{metrics, timeline};

/// What is recorded: a worker's calls and a server's applied update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// A worker's push of gradients.
    Push,
    /// A worker's pull of parameters.
    Pull,
    /// A server applying an update.
    Apply,
}

impl Call {
    /// The name in metrics (`call` label).
    fn name(self) -> &'static str {
        match self {
            Call::Push => "push",
            Call::Pull => "pull",
            Call::Apply => "apply",
        }
    }

    /// The operation's name in the flight recorder, the timeline and error metrics.
    fn op(self) -> &'static str {
        match self {
            Call::Push => "ps.push",
            Call::Pull => "ps.pull",
            Call::Apply => "ps.apply",
        }
    }

    /// A worker's call (timed in the worker's call metrics).
    fn is_worker_call(self) -> bool {
        self != Call::Apply
    }
}

/// Runs one call of `count` f32 elements, for step or version `seq`, exchanged with `peers`, and
/// records it.
pub(crate) async fn traced<T>(
    kind: Call,
    seq: u64,
    count: u64,
    peers: usize,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    let rec = start(kind, seq, count, peers);
    let out = call.await;
    finish(rec, out.as_ref().err());
    out
}

/// Records an operation that is not a future (a server applying a step).
pub(crate) fn traced_sync<T>(kind: Call, seq: u64, count: u64, f: impl FnOnce() -> T) -> T {
    let rec = start(kind, seq, count, 0);
    let out = f();
    finish(rec, None);
    out
}

/// A call being recorded: what the flight recorder, the metrics and the timeline get at its end.
pub(crate) struct Recording {
    /// The call.
    kind: Call,
    /// Its entry in the flight recorder.
    token: recorder::Token,
    /// When it started (for its latency).
    started: Instant,
    /// When it started, µs since the Unix epoch (for the timeline).
    started_us: u64,
    /// Elements it moves.
    count: u64,
}

/// Starts recording a call of `kind` moving `count` elements to `peers` servers.
fn start(kind: Call, seq: u64, count: u64, peers: usize) -> Recording {
    let name = kind.op();
    let token = if tandem_observe::active() {
        let mut r = Record::new(seq, name, "f32", count, tandem_observe::now_us());
        r.bytes = count * 4;
        r.peers = Peers::Servers(peers as u32);
        recorder::begin(r)
    } else {
        recorder::Token::none()
    };
    Recording {
        kind,
        token,
        started: Instant::now(),
        started_us: tandem_observe::now_us(),
        count,
    }
}

/// Ends a recording: the outcome to the flight recorder, the latency to the metrics, the span to
/// the timeline.
fn finish(rec: Recording, error: Option<&tandem_core::Error>) {
    if !tandem_observe::active() && !timeline::enabled() {
        return;
    }
    let took = rec.started.elapsed();
    recorder::end(
        rec.token,
        Ending {
            error: error.map(ToString::to_string),
            ..Ending::default()
        },
    );
    if rec.kind.is_worker_call() {
        metrics::ps_call(rec.kind.name(), took.as_secs_f64());
    }
    if let Some(e) = error {
        metrics::error(rec.kind.op(), e.kind());
    }
    if timeline::enabled() {
        let entry = recorder::snapshot_of(rec.token);
        timeline::complete(
            rec.kind.op(),
            "ps",
            timeline::TID_PS,
            rec.started_us,
            took.as_micros() as u64,
            json!({"op": entry, "elements": rec.count, "error": error.map(ToString::to_string)}),
        );
    }
    if let Some(e) = error {
        tandem_observe::dump::write(&format!("{} {}: {e}", rec.kind.op(), e.kind()));
        timeline::flush();
    }
}
