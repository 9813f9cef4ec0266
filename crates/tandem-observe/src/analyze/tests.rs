use super::diagnose::outcome;
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
    assert!(
        d.contains(
            "op #2: rank(s) 0 called allreduce(f32 x 16, sum); rank(s) 1 called broadcast(f32 x 16)"
        ),
        "{d}"
    );
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
    assert!(
        load(&dir)
            .unwrap_err()
            .to_string()
            .contains("no flight-recorder dump")
    );
    assert!(matches!(
        load(&dir.join("nope")).unwrap_err(),
        crate::ReadError::Io { .. }
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
