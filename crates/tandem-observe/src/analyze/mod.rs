//! Reading the dumps and timelines of every process of a job together (`tandem trace DIR`): one
//! merged trace (a track per process) and a diagnosis: the last operation each rank reached, who
//! waited for whom, which rank the stall comes down to, late arrivals per rank (stragglers), and
//! mismatched calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::Identity;
use crate::recorder::{Entry, Outcome};

/// Lateness that counts as a late arrival (as [`crate::metrics`] counts it), in µs.
pub const LATE_US: u64 = 2_000;

/// One process's records.
#[derive(Debug, Clone)]
pub struct Track {
    /// Whose.
    pub identity: Identity,
    /// The files read.
    pub files: Vec<PathBuf>,
    /// Why its dump was written, if one was.
    pub reason: Option<String>,
    /// When its dump was written (µs since the Unix epoch).
    pub dumped_us: Option<u64>,
    /// Its operations, oldest first (from the dump when there is one, else from the timeline).
    pub ops: Vec<Entry>,
    /// Its timeline events, if it wrote a timeline.
    pub events: Vec<Value>,
}

/// Reads every dump (`*.dump.json`) and timeline (`*.json` written by Tandem) in `dir`; files of
/// other kinds are skipped. A process with both has one track.
pub fn load(dir: &Path) -> Result<Vec<Track>, crate::ReadError> {
    let rd = std::fs::read_dir(dir).map_err(|source| crate::ReadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut tracks: BTreeMap<(String, usize), Track> = BTreeMap::new();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".dump.json") {
            let d = crate::dump::read(&p)?;
            let key = (d.identity.role.clone(), d.identity.index);
            let t = tracks
                .entry(key)
                .or_insert_with(|| Track::new(d.identity.clone()));
            t.files.push(p.clone());
            t.reason = Some(d.reason);
            t.dumped_us = Some(d.written_us);
            t.ops = d.ops;
        } else {
            let Ok(events) = crate::timeline::read(&p) else {
                continue;
            };
            let Some(identity) = events
                .iter()
                .rev()
                .find(|e| e["name"] == "tandem_identity")
                .and_then(|e| serde_json::from_value::<Identity>(e["args"].clone()).ok())
            else {
                continue;
            };
            let key = (identity.role.clone(), identity.index);
            let t = tracks.entry(key).or_insert_with(|| Track::new(identity));
            t.files.push(p.clone());
            if t.ops.is_empty() {
                t.ops = events.iter().filter_map(entry_of_event).collect();
            }
            t.events = events;
        }
    }
    if tracks.is_empty() {
        return Err(crate::ReadError::NotA {
            path: dir.to_path_buf(),
            what: "folder of observations",
            detail: "it holds no flight-recorder dump (*.dump.json) and no Tandem timeline".into(),
        });
    }
    Ok(tracks.into_values().collect())
}

impl Track {
    /// A process's track with nothing loaded yet.
    fn new(identity: Identity) -> Track {
        Track {
            identity,
            files: Vec::new(),
            reason: None,
            dumped_us: None,
            ops: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The track's name: role and index.
    fn name(&self) -> String {
        format!("{} {}", self.identity.role, self.identity.index)
    }

    /// The collective with the highest sequence number.
    fn last_collective(&self) -> Option<&Entry> {
        self.ops
            .iter()
            .filter(|e| e.is_collective())
            .max_by_key(|e| (e.seq, e.started_us))
    }
}

/// The operation a timeline event records (the events Tandem writes for its operations carry the
/// entry as their `args`).
fn entry_of_event(ev: &Value) -> Option<Entry> {
    if ev["ph"] != "X" || !matches!(ev["cat"].as_str(), Some("collective" | "ps")) {
        return None;
    }
    serde_json::from_value(ev["args"]["op"].clone()).ok()
}

/// The merged trace: every track's events (or, without a timeline, its recorded operations) as one
/// Chrome trace, a process per track.
pub fn merge(tracks: &[Track]) -> Value {
    let mut out = Vec::new();
    for (pid, t) in tracks.iter().enumerate() {
        let label = if t.identity.addr.is_empty() {
            t.name()
        } else {
            format!("{} ({})", t.name(), t.identity.addr)
        };
        out.push(json!({"name":"process_name","ph":"M","pid":pid,"tid":0,"args":{"name":label}}));
        out.push(
            json!({"name":"process_sort_index","ph":"M","pid":pid,"tid":0,"args":{"sort_index":pid}}),
        );
        for ev in &t.events {
            if ev["name"] == "process_name" || ev["name"] == "process_sort_index" {
                continue;
            }
            let mut ev = ev.clone();
            ev["pid"] = json!(pid);
            out.push(ev);
        }
        let end = t.dumped_us.unwrap_or_else(crate::now_us);
        for e in &t.ops {
            // With a timeline, only what it cannot hold: operations still running at the dump.
            if !t.events.is_empty() && e.outcome != Outcome::Running {
                continue;
            }
            let stop = e.ended_us.unwrap_or(end);
            let tid = if e.kind.starts_with("ps.") {
                crate::timeline::TID_PS
            } else {
                crate::timeline::TID_COLLECTIVE
            };
            let state = match &e.outcome {
                Outcome::Running => " (running)",
                Outcome::Error(_) => " (failed)",
                Outcome::Ok => "",
            };
            out.push(json!({
                "name": format!("{}{state}", e.kind), "cat": "recorded", "ph": "X",
                "pid": pid, "tid": tid, "ts": e.started_us,
                "dur": stop.saturating_sub(e.started_us), "args": {"op": e},
            }));
        }
    }
    json!({"displayTimeUnit": "ms", "traceEvents": out})
}

mod diagnose;

pub use diagnose::diagnose;

#[cfg(test)]
mod tests;
