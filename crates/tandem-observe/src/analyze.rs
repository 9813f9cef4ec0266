//! Reading the dumps and timelines of every process of a job together (`tandem trace DIR`): one
//! merged trace (a track per process) and a diagnosis: the last operation each rank reached, who
//! waited for whom, which rank the stall comes down to, late arrivals per rank (stragglers), and
//! mismatched calls.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
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
pub fn load(dir: &Path) -> Result<Vec<Track>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
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
        return Err(format!(
            "{} holds no flight-recorder dump (*.dump.json) and no Tandem timeline",
            dir.display()
        ));
    }
    Ok(tracks.into_values().collect())
}

impl Track {
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

/// The diagnosis `tandem trace` prints.
pub fn diagnose(tracks: &[Track]) -> String {
    let mut s = String::new();
    let ranks: Vec<&Track> = tracks
        .iter()
        .filter(|t| t.identity.role == "rank")
        .collect();
    let others: Vec<&Track> = tracks
        .iter()
        .filter(|t| t.identity.role != "rank")
        .collect();
    let _ = writeln!(
        s,
        "{} process(es): {}",
        tracks.len(),
        tracks
            .iter()
            .map(Track::name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !ranks.is_empty() {
        collectives(&mut s, &ranks);
    }
    for t in others {
        let _ = writeln!(s, "\n{}:", t.name());
        match t.ops.last() {
            Some(e) => {
                let _ = writeln!(s, "  last: #{} {} {}", e.seq, e.call(), outcome(e));
            }
            None => {
                let _ = writeln!(s, "  no operations recorded");
            }
        }
        if let Some(r) = &t.reason {
            let _ = writeln!(s, "  dumped because: {r}");
        }
    }
    s
}

fn outcome(e: &Entry) -> String {
    match &e.outcome {
        Outcome::Ok => "done".into(),
        Outcome::Running => match &e.waiting {
            Some(w) => format!("running, waiting for {w}"),
            None => "running".into(),
        },
        Outcome::Error(m) => match &e.waiting {
            Some(w) => format!("failed while waiting for {w}: {m}"),
            None => format!("failed: {m}"),
        },
    }
}

fn collectives(s: &mut String, ranks: &[&Track]) {
    let world = ranks.iter().map(|t| t.identity.world).max().unwrap_or(0);
    let present: BTreeSet<usize> = ranks.iter().map(|t| t.identity.index).collect();
    let missing: Vec<usize> = (0..world).filter(|r| !present.contains(r)).collect();
    let _ = writeln!(s, "\nLast collective each rank reached:");
    for t in ranks {
        match t.last_collective() {
            Some(e) => {
                let _ = writeln!(
                    s,
                    "  rank {:<3} op #{} {}: {}",
                    t.identity.index,
                    e.seq,
                    e.call(),
                    outcome(e)
                );
            }
            None => {
                let _ = writeln!(s, "  rank {:<3} no collective recorded", t.identity.index);
            }
        }
    }
    for r in &missing {
        let _ = writeln!(s, "  rank {r:<3} left no dump and no timeline");
    }

    let _ = writeln!(s, "\nWho waited for whom:");
    let mut waits: BTreeMap<usize, usize> = BTreeMap::new();
    for t in ranks {
        if let Some(e) = t.last_collective()
            && e.outcome != Outcome::Ok
            && let Some(p) = e.waiting_on
        {
            waits.insert(t.identity.index, p as usize);
            let _ = writeln!(
                s,
                "  rank {} -> rank {} ({})",
                t.identity.index,
                p,
                e.waiting.as_deref().unwrap_or("")
            );
        }
    }
    if waits.is_empty() {
        let _ = writeln!(s, "  nobody was waiting at the end of the records");
    }

    let _ = writeln!(
        s,
        "\nVerdict from the records: {}",
        verdict(ranks, &missing, &waits)
    );
    // The diagnosis a rank made when its operation timed out had every live rank's answer: the
    // best word there is when there is one.
    if let Some((r, why)) = ranks
        .iter()
        .filter_map(|t| t.reason.as_deref().map(|w| (t.identity.index, w)))
        .find(|(_, w)| w.starts_with("timeout:"))
    {
        let _ = writeln!(s, "What rank {r} concluded when it timed out: {why}");
    }

    stragglers(s, ranks);
    mismatches(s, ranks);

    let reasons: Vec<(usize, &str)> = ranks
        .iter()
        .filter_map(|t| t.reason.as_deref().map(|r| (t.identity.index, r)))
        .collect();
    if !reasons.is_empty() {
        let _ = writeln!(s, "\nWhy each dump was written:");
        for (r, why) in reasons {
            let _ = writeln!(s, "  rank {r}: {why}");
        }
    }
}

/// The rank the stall comes down to, from the records alone.
fn verdict(ranks: &[&Track], missing: &[usize], waits: &BTreeMap<usize, usize>) -> String {
    let lasts: Vec<(usize, Option<&Entry>)> = ranks
        .iter()
        .map(|t| (t.identity.index, t.last_collective()))
        .collect();
    let top = lasts.iter().filter_map(|(_, e)| e.map(|e| e.seq)).max();
    let stuck = lasts
        .iter()
        .any(|(_, e)| e.is_some_and(|e| e.outcome != Outcome::Ok));
    if let Some(top) = top {
        let behind: Vec<String> = lasts
            .iter()
            .filter(|(_, e)| e.is_none_or(|e| e.seq < top))
            .map(|(r, e)| match e {
                Some(e) => format!(
                    "rank {r} (last: op #{} {}, {})",
                    e.seq,
                    e.call(),
                    outcome(e)
                ),
                None => format!("rank {r} (no collective)"),
            })
            .collect();
        if !behind.is_empty() && stuck {
            return format!(
                "{} never started op #{top}, which the other ranks were in",
                behind.join(", ")
            );
        }
    }
    if !missing.is_empty() && stuck {
        return format!(
            "rank(s) {} left no records (killed, or their host cut off?) while the others were stuck",
            join(missing)
        );
    }
    // Follow the wait chains from any rank.
    if let Some(&start) = waits.keys().next() {
        let mut seen = vec![start];
        let mut at = start;
        while let Some(&next) = waits.get(&at) {
            if let Some(i) = seen.iter().position(|r| *r == next) {
                let cycle = &seen[i..];
                return format!(
                    "ranks {} wait on each other in a cycle (each blocked on the next)",
                    join(cycle)
                );
            }
            seen.push(next);
            at = next;
        }
        return format!(
            "rank {at}: the chain of waits ends there ({})",
            seen.iter()
                .map(|r| format!("rank {r}"))
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
    if stuck {
        "the ranks failed without a wait to follow; see why each dump was written".into()
    } else {
        "every recorded collective completed".into()
    }
}

fn join(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn stragglers(s: &mut String, ranks: &[&Track]) {
    // peer -> (observed, late lateness list)
    let mut per: BTreeMap<u32, (usize, Vec<u64>)> = BTreeMap::new();
    for t in ranks {
        for e in t.ops.iter().filter(|e| e.is_collective()) {
            if let (Some(p), Some(us)) = (e.late_peer, e.late_us) {
                let c = per.entry(p).or_default();
                c.0 += 1;
                if us >= LATE_US {
                    c.1.push(us);
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "\nLate arrivals (a rank starting a collective {} ms or more after the neighbour waiting on it):",
        LATE_US / 1000
    );
    if per.values().all(|(_, l)| l.is_empty()) {
        let _ = writeln!(s, "  none");
        return;
    }
    let _ = writeln!(s, "  rank   late/seen   median     max");
    let mut rows: Vec<(u32, usize, Vec<u64>)> =
        per.into_iter().map(|(p, (n, l))| (p, n, l)).collect();
    rows.sort_by_key(|(p, _, l)| (std::cmp::Reverse(l.len()), *p));
    for (p, n, mut l) in rows {
        if l.is_empty() {
            continue;
        }
        l.sort_unstable();
        let _ = writeln!(
            s,
            "  {:<6} {:>4}/{:<6} {:>7.1} ms {:>7.1} ms",
            p,
            l.len(),
            n,
            l[l.len() / 2] as f64 / 1000.0,
            l[l.len() - 1] as f64 / 1000.0
        );
    }
}

fn mismatches(s: &mut String, ranks: &[&Track]) {
    // seq -> rank -> call
    let mut calls: BTreeMap<u64, BTreeMap<usize, String>> = BTreeMap::new();
    for t in ranks {
        for e in t.ops.iter().filter(|e| e.is_collective()) {
            calls
                .entry(e.seq)
                .or_default()
                .insert(t.identity.index, e.call());
        }
    }
    let bad: Vec<(u64, BTreeMap<usize, String>)> = calls
        .into_iter()
        .filter(|(_, by)| by.values().collect::<BTreeSet<_>>().len() > 1)
        .collect();
    if bad.is_empty() {
        return;
    }
    let _ = writeln!(s, "\nMismatched calls:");
    for (seq, by) in bad.iter().take(10) {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (r, c) in by {
            groups.entry(c.as_str()).or_default().push(*r);
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|(c, rs)| format!("rank(s) {} called {c}", join(rs)))
            .collect();
        let _ = writeln!(s, "  op #{seq}: {}", parts.join("; "));
    }
    if bad.len() > 10 {
        let _ = writeln!(s, "  ... and {} more", bad.len() - 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(seq: u64, kind: &'static str, outcome: Outcome) -> Entry {
        let mut e = Entry::new(seq, kind, "f32", 16);
        e.op = Some("sum".into());
        e.outcome = outcome;
        e
    }

    fn track(rank: usize, world: usize, ops: Vec<Entry>) -> Track {
        let mut t = Track::new(Identity::new("rank", rank, world));
        t.ops = ops;
        t
    }

    #[test]
    fn a_rank_that_never_started_the_op_is_named() {
        let mut stuck = op(5, "allreduce", Outcome::Error("timed out".into()));
        stuck.waiting = Some("rank 2's header".into());
        stuck.waiting_on = Some(2);
        let t = vec![
            track(0, 3, vec![op(4, "allreduce", Outcome::Ok), stuck.clone()]),
            track(1, 3, vec![op(4, "allreduce", Outcome::Ok), stuck]),
            track(2, 3, vec![op(4, "allreduce", Outcome::Ok)]),
        ];
        let d = diagnose(&t);
        assert!(
            d.contains("Verdict from the records: rank 2 (last: op #4"),
            "{d}"
        );
        assert!(d.contains("never started op #5"), "{d}");
        assert!(d.contains("rank 0 -> rank 2"), "{d}");
    }

    #[test]
    fn a_cycle_and_a_chain_end_are_found() {
        let waiting = |seq, on: u32| {
            let mut e = op(seq, "allreduce", Outcome::Running);
            e.waiting_on = Some(on);
            e.waiting = Some(format!("data from rank {on}"));
            e
        };
        let t = vec![
            track(0, 2, vec![waiting(3, 1)]),
            track(1, 2, vec![waiting(3, 0)]),
        ];
        assert!(diagnose(&t).contains("ranks 0, 1 wait on each other in a cycle"));
        let t = vec![
            track(0, 3, vec![waiting(3, 1)]),
            track(1, 3, vec![waiting(3, 2)]),
            track(2, 3, vec![op(3, "allreduce", Outcome::Running)]),
        ];
        let d = diagnose(&t);
        assert!(
            d.contains("rank 2: the chain of waits ends there (rank 0 -> rank 1 -> rank 2)"),
            "{d}"
        );
        let t = vec![
            track(0, 3, vec![waiting(3, 1)]),
            track(1, 3, vec![waiting(3, 0)]),
        ];
        assert!(diagnose(&t).contains("rank(s) 2 left no records"));
    }

    #[test]
    fn stragglers_and_mismatches_are_tabled() {
        let late = |seq, peer: u32, us| {
            let mut e = op(seq, "allreduce", Outcome::Ok);
            e.late_peer = Some(peer);
            e.late_us = Some(us);
            e
        };
        let mut other = op(2, "broadcast", Outcome::Ok);
        other.op = None;
        let t = vec![
            track(
                0,
                2,
                vec![late(0, 1, 5_000), late(1, 1, 9_000), late(2, 1, 100)],
            ),
            track(1, 2, vec![late(0, 0, 10), late(1, 0, LATE_US - 1), other]),
        ];
        let d = diagnose(&t);
        assert!(
            d.contains("  1         2/3          9.0 ms     9.0 ms"),
            "{d}"
        );
        assert!(!d.contains("\n  0 "), "rank 0 was never late: {d}");
        assert!(d.contains("op #2: rank(s) 0 called allreduce(f32 x 16, sum); rank(s) 1 called broadcast(f32 x 16)"), "{d}");
        assert!(d.contains("every recorded collective completed"));
        let quiet = vec![track(0, 1, vec![late(0, 0, LATE_US - 1)])];
        assert!(diagnose(&quiet).contains("Late arrivals") && diagnose(&quiet).contains("  none"));
    }

    #[test]
    fn merging_gives_each_track_a_process_and_keeps_running_ops_of_dumps() {
        let mut a = track(
            0,
            2,
            vec![
                op(0, "allreduce", Outcome::Ok),
                op(1, "allreduce", Outcome::Running),
            ],
        );
        a.dumped_us = Some(a.ops[1].started_us + 10);
        let mut b = track(1, 2, vec![op(0, "allreduce", Outcome::Ok)]);
        b.events = vec![
            json!({"name":"allreduce","ph":"X","pid":1,"tid":1,"ts":5,"dur":1}),
            json!({"name":"process_name","ph":"M","pid":1,"args":{"name":"x"}}),
        ];
        let m = merge(&[a, b]);
        let evs = m["traceEvents"].as_array().unwrap();
        let pid1: Vec<&Value> = evs
            .iter()
            .filter(|e| e["pid"] == 1 && e["ph"] == "X")
            .collect();
        assert_eq!(
            pid1.len(),
            1,
            "b's own events only (its recorded ops are in them)"
        );
        let pid0 = evs
            .iter()
            .filter(|e| e["pid"] == 0 && e["ph"] == "X")
            .count();
        assert_eq!(
            pid0, 2,
            "a's completed and running ops (it has no timeline)"
        );
        let running: Vec<&Value> = evs
            .iter()
            .filter(|e| e["name"] == "allreduce (running)")
            .collect();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0]["dur"], 10);
        assert_eq!(
            evs.iter().filter(|e| e["name"] == "process_name").count(),
            2
        );
    }

    #[test]
    fn a_folder_is_read_as_one_track_per_process_from_dumps_and_timelines() {
        let dir = std::env::temp_dir().join(format!("tandem-analyze-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let id = |r| Identity::new("rank", r, 3);
        // rank 0: a dump and a timeline; rank 1: a timeline only; rank 2: a dump only.
        let mut op0 = op(7, "allreduce", Outcome::Running);
        op0.waiting_on = Some(1);
        let dump = |r, ops: Vec<Entry>| crate::dump::Dump {
            format: crate::dump::FORMAT.into(),
            identity: id(r),
            pid: 1,
            reason: "SIGUSR1".into(),
            written_us: 99,
            ops,
        };
        crate::dump::write_to(&dir, &dump(0, vec![op0])).unwrap();
        crate::dump::write_to(&dir, &dump(2, vec![op(6, "allreduce", Outcome::Ok)])).unwrap();
        let timeline = |r: usize, seq: u64| {
            let e = op(seq, "allreduce", Outcome::Ok);
            json!({"traceEvents": [
                {"name": "tandem_identity", "ph": "M", "pid": r, "tid": 0, "args": id(r)},
                {"name": "allreduce", "cat": "collective", "ph": "X", "pid": r, "tid": 1, "ts": 1, "dur": 2, "args": {"op": e}},
                {"name": "transfer", "cat": "phase", "ph": "X", "pid": r, "tid": 1, "ts": 1, "dur": 2, "args": {}},
                {"name": "allreduce", "cat": "collective", "ph": "B", "pid": r, "tid": 1, "ts": 1, "args": {"op": e}},
            ]})
            .to_string()
        };
        std::fs::write(dir.join("rank-0.json"), timeline(0, 5)).unwrap();
        std::fs::write(dir.join("rank-1.json"), timeline(1, 6)).unwrap();
        // Not Tandem's, hidden, or not JSON: skipped.
        std::fs::write(dir.join("other.json"), "{\"traceEvents\": []}").unwrap();
        std::fs::write(dir.join(".rank-1.dump.json.7"), "half").unwrap();
        std::fs::write(dir.join(".hidden.json"), timeline(2, 9)).unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let tracks = load(&dir).unwrap();
        let names: Vec<String> = tracks.iter().map(Track::name).collect();
        assert_eq!(names, vec!["rank 0", "rank 1", "rank 2"]);
        // The dump's operations win over the timeline's (they include the running one).
        assert_eq!(
            tracks[0].ops.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![7]
        );
        assert_eq!(tracks[0].files.len(), 2);
        assert_eq!(tracks[0].events.len(), 4);
        // A timeline alone gives its completed collectives, not its phases or other events.
        assert_eq!(
            tracks[1].ops.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![6]
        );
        assert!(tracks[1].reason.is_none());
        assert_eq!(tracks[2].reason.as_deref(), Some("SIGUSR1"));
        let report = diagnose(&tracks);
        assert!(
            report.contains("rank 0   op #7 allreduce(f32 x 16, sum): running"),
            "{report}"
        );
        assert!(report.contains("rank 0 -> rank 1"), "{report}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parameter_server_tracks_are_reported_apart_and_outcomes_read_plainly() {
        let mut ps = Track::new(Identity::new("ps", 0, 1));
        ps.ops = vec![op(3, "ps.apply", Outcome::Ok)];
        ps.reason = Some("ps.push timeout: late".into());
        let worker = Track::new(Identity::new("worker", 1, 2));
        let d = diagnose(&[ps, worker]);
        assert!(d.contains("2 process(es): ps 0, worker 1"), "{d}");
        assert!(d.contains("ps 0:\n  last: #3 ps.apply(f32 x 16, sum) done\n  dumped because: ps.push timeout: late"), "{d}");
        assert!(d.contains("worker 1:\n  no operations recorded"), "{d}");
        assert!(!d.contains("Last collective"), "no collective ranks: {d}");
        let mut e = op(1, "allreduce", Outcome::Error("boom".into()));
        assert_eq!(outcome(&e), "failed: boom");
        e.waiting = Some("rank 2's header".into());
        assert_eq!(
            outcome(&e),
            "failed while waiting for rank 2's header: boom"
        );
        e.outcome = Outcome::Running;
        assert_eq!(outcome(&e), "running, waiting for rank 2's header");
        e.waiting = None;
        assert_eq!(outcome(&e), "running");
    }

    #[test]
    fn many_mismatches_are_cut_short_and_agreeing_calls_are_not_listed() {
        let calls = |kind: &'static str| {
            (0..12)
                .map(|s| op(s, kind, Outcome::Ok))
                .collect::<Vec<_>>()
        };
        let t = vec![
            track(0, 2, calls("allreduce")),
            track(1, 2, calls("broadcast")),
        ];
        let d = diagnose(&t);
        assert_eq!(
            d.lines().filter(|l| l.starts_with("  op #")).count(),
            10,
            "{d}"
        );
        assert!(d.contains("... and 2 more"), "{d}");
        let ten = |kind: &'static str| {
            (0..10)
                .map(|s| op(s, kind, Outcome::Ok))
                .collect::<Vec<_>>()
        };
        let d = diagnose(&[track(0, 2, ten("allreduce")), track(1, 2, ten("broadcast"))]);
        assert_eq!(d.lines().filter(|l| l.starts_with("  op #")).count(), 10);
        assert!(!d.contains("... and"), "{d}");
        let same = vec![
            track(0, 2, calls("allreduce")),
            track(1, 2, calls("allreduce")),
        ];
        assert!(!diagnose(&same).contains("Mismatched"));
        let alone = vec![track(0, 3, calls("allreduce"))];
        let d = diagnose(&alone);
        assert!(d.contains("rank 1   left no dump and no timeline"), "{d}");
        assert!(d.contains("rank 2   left no dump and no timeline"), "{d}");
    }

    #[test]
    fn a_folder_without_records_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tandem-analyze-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("other.json"), "{}").unwrap();
        assert!(load(&dir).unwrap_err().contains("no flight-recorder dump"));
        assert!(load(&dir.join("nope")).unwrap_err().contains("reading"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
