//! Seeing inside a job, across separate OS processes on 127.0.0.1: flight-recorder dumps (on a
//! timeout and on SIGUSR1), the timeline, the metrics endpoint, and `tandem trace`'s analysis of
//! what they hold.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use tandem::observe::analyze;
use tandem::observe::dump;
use tandem::observe::recorder::Outcome;
use tandem::rendezvous::{Host, JobToken, ServerConfig};
use tandem_tests::{check, rank_env, spawn, stdout_lines, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);

struct Job {
    _rt: tokio::runtime::Runtime,
    host: Host,
    token: JobToken,
    dir: PathBuf,
}

impl Job {
    fn new(name: &str) -> Job {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let token = JobToken::generate();
        let host = rt
            .block_on(Host::bind(
                "127.0.0.1:0",
                ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
            ))
            .expect("bind");
        let dir =
            std::env::temp_dir().join(format!("tandem-observe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Job {
            _rt: rt,
            host,
            token,
            dir,
        }
    }

    fn env(&self, rank: usize, world: usize, timeout_s: u64) -> Vec<(String, String)> {
        let mut env = rank_env(
            rank,
            world,
            &self.host.addr().to_string(),
            self.token.as_str(),
        );
        env.push(("TANDEM_RENDEZVOUS_EXTERNAL".into(), "1".into()));
        env.push(("TANDEM_TIMEOUT".into(), timeout_s.to_string()));
        env.push(("TANDEM_CONNECT_TIMEOUT".into(), "60".into()));
        env.push(("TANDEM_TRACE_DIR".into(), self.dir.display().to_string()));
        env
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits (bounded) until `path` exists and parses as a dump.
fn wait_for_dump(path: &Path) -> dump::Dump {
    let end = Instant::now() + LIMIT;
    loop {
        if let Ok(d) = dump::read(path) {
            return d;
        }
        assert!(Instant::now() < end, "no dump at {}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stopped rank: every survivor's timeout writes its dump; each parses, holds the allreduces the
/// rank ran (each the call the test made) and ends with the failed one; `tandem trace`'s analysis
/// of the folder names the stopped rank.
#[test]
fn survivors_of_a_stall_dump_their_recorders_and_the_analysis_names_the_stopped_rank() {
    let world = 4;
    let victim = 2;
    let job = Job::new("stall");
    let mut children: Vec<_> = (0..world)
        .map(|r| spawn(NODE, &["loop", "65536"], &job.env(r, world, 4)))
        .collect();
    let lines = stdout_lines(&mut children[victim]);
    while lines
        .recv_timeout(LIMIT)
        .expect("the victim made no progress")
        != "ITER 3"
    {}
    let pid = children[victim].id();
    assert!(signal(pid, "-STOP"));
    let mut stopped = children.remove(victim);
    let outs = wait_all(children, LIMIT);
    let _ = stopped.kill();
    let _ = signal(pid, "-CONT");
    let _ = stopped.wait();
    drop(lines);
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(3), "survivor {i} should fail");
    }
    for r in [0, 1, 3] {
        let d = dump::read(&job.dir.join(format!("rank-{r}.dump.json"))).expect("a dump");
        assert_eq!((d.identity.role.as_str(), d.identity.index), ("rank", r));
        assert!(d.reason.starts_with("timeout:"), "rank {r}: {}", d.reason);
        assert!(d.reason.contains("rank 2"), "rank {r}: {}", d.reason);
        let allreduces: Vec<_> = d.ops.iter().filter(|e| e.kind == "allreduce").collect();
        assert!(
            allreduces.len() >= 4,
            "rank {r} recorded {}",
            allreduces.len()
        );
        for e in &allreduces {
            assert_eq!((e.dtype.as_ref(), e.count, e.bytes), ("f32", 65536, 262144));
            assert_eq!(e.op.as_deref(), Some("max"));
        }
        let seqs: Vec<u64> = allreduces.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let last = allreduces.last().expect("ops");
        assert!(matches!(last.outcome, Outcome::Error(_)), "{last:?}");
        assert!(last.waiting_on.is_some(), "{last:?}");
        assert!(
            allreduces[..allreduces.len() - 1]
                .iter()
                .all(|e| e.outcome == Outcome::Ok && e.ended_us.is_some())
        );
    }
    let tracks = analyze::load(&job.dir).expect("load");
    let report = analyze::diagnose(&tracks);
    assert!(
        report.contains("rank(s) 2 left no records"),
        "the analysis must name rank 2: {report}"
    );
    assert!(report.contains("stopped answering"), "{report}");
    let merged = analyze::merge(&tracks);
    let names = merged["traceEvents"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["name"] == "process_name")
        .count();
    assert_eq!(names, 3, "one track per rank that left records");
}

/// SIGUSR1 dumps a running rank's recorder without disturbing it, and dumps the current
/// operation as running when it is stuck in one.
#[test]
fn sigusr1_dumps_a_running_rank() {
    let world = 2;
    let job = Job::new("usr1");
    let mut children: Vec<_> = (0..world)
        .map(|r| spawn(NODE, &["loop"], &job.env(r, world, 60)))
        .collect();
    let lines = stdout_lines(&mut children[1]);
    while lines.recv_timeout(LIMIT).expect("no progress") != "ITER 3" {}
    assert!(signal(children[1].id(), "-USR1"));
    let d = wait_for_dump(&job.dir.join("rank-1.dump.json"));
    assert_eq!(d.reason, "SIGUSR1");
    assert_eq!(d.pid, children[1].id());
    let done = d
        .ops
        .iter()
        .filter(|e| e.kind == "allreduce" && e.outcome == Outcome::Ok)
        .count();
    assert!(done >= 4, "{done} allreduces done");
    // It keeps going after the dump.
    let before = lines.recv_timeout(LIMIT).expect("alive");
    let after = lines.recv_timeout(LIMIT).expect("alive");
    assert_ne!(before, after);
    // Rank 0, stopped in the middle of the loop, leaves rank 1 inside an allreduce.
    assert!(signal(children[0].id(), "-STOP"));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(job.dir.join("rank-1.dump.json")).expect("rm");
    assert!(signal(children[1].id(), "-USR1"));
    let d = wait_for_dump(&job.dir.join("rank-1.dump.json"));
    let last = d.ops.last().expect("ops");
    assert_eq!(last.outcome, Outcome::Running, "{last:?}");
    assert_eq!(last.waiting_on, Some(0), "{last:?}");
    for c in &mut children {
        let _ = c.kill();
    }
    let _ = signal(children[0].id(), "-CONT");
    for c in &mut children {
        let _ = c.wait();
    }
}

/// The timeline of a run where rank 1 starts each of 130 allreduces 10 ms late: every rank's file
/// is complete JSON with one event per allreduce (their sequence numbers 0..130), the phases, and
/// rank 1's own spans; the analysis of the timelines tables rank 1 as the late one.
#[test]
fn the_timeline_has_every_op_and_the_analysis_finds_the_straggler() {
    let world = 3;
    let job = Job::new("timeline");
    let tl = job.dir.join("timeline");
    let children: Vec<_> = (0..world)
        .map(|r| {
            let mut env = job.env(r, world, 60);
            env.push(("TANDEM_TIMELINE".into(), tl.display().to_string()));
            spawn(NODE, &["straggle", "--slow", "1"], &env)
        })
        .collect();
    let outs = wait_all(children, LIMIT);
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", stderr(o));
    }
    for r in 0..world {
        let text = std::fs::read_to_string(tl.join(format!("rank-{r}.json"))).expect("timeline");
        let v: serde_json::Value = serde_json::from_str(&text).expect("complete JSON");
        let events = v["traceEvents"].as_array().expect("traceEvents");
        let mut seqs: Vec<u64> = events
            .iter()
            .filter(|e| e["cat"] == "collective" && e["name"] == "allreduce")
            .map(|e| e["args"]["op"]["seq"].as_u64().expect("seq"))
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..130).collect::<Vec<u64>>(), "rank {r}");
        for e in events.iter().filter(|e| e["ph"] == "X") {
            assert!(
                e["ts"].as_u64().is_some() && e["dur"].as_u64().is_some(),
                "{e}"
            );
            assert_eq!(e["pid"], r, "{e}");
        }
        let phases = |name: &str| events.iter().filter(|e| e["name"] == name).count();
        assert_eq!(phases("transfer"), 130, "rank {r}");
        let spans = phases("late on purpose");
        assert_eq!(spans, if r == 1 { 130 } else { 0 }, "rank {r}");
    }
    let tracks = analyze::load(&tl).expect("load");
    assert_eq!(tracks.len(), 3);
    let report = analyze::diagnose(&tracks);
    let table: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.contains("rank   late/seen"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert!(
        table
            .first()
            .is_some_and(|l| l.trim_start().starts_with("1 ")),
        "rank 1 must top the late arrivals: {report}"
    );
    assert!(
        report.contains("every recorded collective completed"),
        "{report}"
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A port `p` such that `p` and `p + 1` are both free now (each rank serves at base + local rank;
/// a free base alone left rank 1's port to chance).
fn free_port() -> u16 {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let p = first.local_addr().expect("addr").port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports in 100 tries")
}

fn scrape(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Every rank serves its metrics at the base port plus its local rank; a scrape parses, carries the
/// rank's labels, counts the allreduces it printed (at least), the rendezvous round trips, and the
/// bytes exchanged with its peer as the kernel counted them.
#[test]
fn every_rank_serves_metrics_that_parse() {
    let world = 2;
    let job = Job::new("metrics");
    let base = free_port();
    let mut children: Vec<_> = (0..world)
        .map(|r| {
            let mut env = job.env(r, world, 60);
            env.push(("TANDEM_METRICS_ADDR".into(), format!("127.0.0.1:{base}")));
            env.push(("TANDEM_JOB_NAME".into(), "metrics-test".into()));
            spawn(NODE, &["loop"], &env)
        })
        .collect();
    let lines: Vec<_> = children.iter_mut().map(stdout_lines).collect();
    for l in &lines {
        while l.recv_timeout(LIMIT).expect("no progress") != "ITER 5" {}
    }
    for r in 0..world {
        let addr = format!("127.0.0.1:{}", base + r as u16);
        let body = scrape(&addr).expect("a scrape");
        let rank = r.to_string();
        let me = [
            ("job", "metrics-test"),
            ("rank", rank.as_str()),
            ("role", "rank"),
        ];
        let with = |extra: &[(&'static str, &str)]| -> Vec<(&str, String)> {
            me.iter()
                .chain(extra)
                .map(|(k, v)| (*k, v.to_string()))
                .collect()
        };
        let value = |name: &str, labels: &[(&str, String)]| {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            check::sample(&body, name, &labels)
        };
        let want = with(&[("op", "allreduce"), ("size", "<=4KiB")]);
        let count = value("tandem_op_seconds_count", &want).expect("allreduce count");
        assert!(count >= 6.0, "rank {r}: {count} allreduces");
        // The histogram and the byte counter are two updates: a scrape may fall between them.
        let bytes = value("tandem_op_bytes_total", &want).expect("allreduce bytes");
        assert!(
            (bytes - count * 4000.0).abs() <= 4000.0,
            "rank {r}: {bytes} bytes for {count} allreduces of 1000 f32"
        );
        let peer = (1 - r).to_string();
        let to_peer = with(&[("peer", peer.as_str())]);
        let sent = value("tandem_peer_sent_bytes_total", &to_peer).expect("sent");
        let received = value("tandem_peer_received_bytes_total", &to_peer).expect("received");
        // Each allreduce sends the peer 4000 bytes and a header; the last may not be acknowledged.
        let floor = (count - 1.0) * 4000.0;
        assert!(
            sent >= floor && received >= floor,
            "{sent} {received} for {count}"
        );
        let rdv: f64 = check::samples_of(&body, "tandem_rendezvous_seconds_count")
            .iter()
            .sum();
        assert!(rdv >= 1.0, "rank {r}: rendezvous round trips {rdv}");
        let ours = format!("{{job=\"metrics-test\",rank=\"{r}\",role=\"rank\"");
        assert!(
            body.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .all(|l| l.contains(&ours)),
            "every series carries the rank's labels:\n{body}"
        );
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
}
