//! What parameter-server calls tell [`tandem_observe`]: a worker's pushes and pulls, and a server's
//! applied updates, go to the flight recorder (always) and the timeline (when one is written); a
//! worker's calls also to the metrics, and a failed call dumps the flight recorder.

use std::future::Future;
use std::time::Instant;

use serde_json::json;
use tandem_core::Result;
use tandem_observe::recorder::{self, Ending, Peers, Record};
use tandem_observe::{metrics, timeline};

/// Runs one call (`kind`: `push`, `pull`, `apply`) of `count` f32 elements, for step or version
/// `seq`, exchanged with `peers`, and records it.
pub(crate) async fn traced<T>(
    kind: &'static str,
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
pub(crate) fn traced_sync<T>(kind: &'static str, seq: u64, count: u64, f: impl FnOnce() -> T) -> T {
    let rec = start(kind, seq, count, 0);
    let out = f();
    finish(rec, None);
    out
}

pub(crate) struct Recording {
    kind: &'static str,
    token: recorder::Token,
    started: Instant,
    started_us: u64,
    count: u64,
}

fn start(kind: &'static str, seq: u64, count: u64, peers: usize) -> Recording {
    let name = match kind {
        "push" => "ps.push",
        "pull" => "ps.pull",
        "apply" => "ps.apply",
        "push_rows" => "ps.push_rows",
        "pull_rows" => "ps.pull_rows",
        other => other,
    };
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
    if rec.kind != "apply" {
        metrics::ps_call(rec.kind, took.as_secs_f64());
    }
    if let Some(e) = error {
        metrics::error(format!("ps.{}", rec.kind), e.kind());
    }
    if timeline::enabled() {
        let entry = recorder::snapshot_of(rec.token);
        timeline::complete(
            &format!("ps.{}", rec.kind),
            "ps",
            timeline::TID_PS,
            rec.started_us,
            took.as_micros() as u64,
            json!({"op": entry, "elements": rec.count, "error": error.map(ToString::to_string)}),
        );
    }
    if let Some(e) = error {
        tandem_observe::dump::write(&format!("ps.{} {}: {e}", rec.kind, e.kind()));
        timeline::flush();
    }
}
