//! A parameter-server job that loses a worker keeps training (issue: elastic PS), with separate
//! processes: in sync mode a worker silent past its lease is gone and the steps need the live
//! workers only; a worker that comes back has its late gradient refused with a reason naming the
//! lease, then rejoins at the server's step. Every step is applied exactly once: the gradients
//! depend on the step only (`linreg::const_grad`), so the final parameters are known whoever took
//! part in each step, and a lost, repeated or misplaced step changes them.

use std::process::Child;
use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem_tests::linreg;
use tandem_tests::{spawn, start_ps_server, stdout_lines, wait_all, wait_output};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);
const LEASE: &str = "1.5";
const STEPS: u64 = 40;
const LR: f32 = 0.5;

struct Job {
    token: JobToken,
    servers: Vec<Child>,
    addrs: Vec<String>,
}

impl Job {
    fn start(servers: usize, lease: Option<&str>) -> Job {
        let token = JobToken::generate();
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        let args: Vec<&str> = lease.map_or(vec![], |l| vec!["--lease", l]);
        for _ in 0..servers {
            let (c, addr) = start_ps_server(NODE, token.as_str(), &args, "tcp");
            children.push(c);
            addrs.push(addr);
        }
        Job {
            token,
            servers: children,
            addrs,
        }
    }

    fn worker(&self, w: usize, n: usize, extra: &[&str]) -> Child {
        let env = tandem_tests::ps_env(self.token.as_str(), "tcp");
        let (w, n, servers) = (w.to_string(), n.to_string(), self.addrs.join(","));
        let mut args = vec![
            "ps-worker",
            "--servers",
            &servers,
            "--worker",
            &w,
            "--workers",
            &n,
            "--const-grad",
            "--lr",
            "0.5",
            "--timeout",
            "20",
        ];
        args.extend_from_slice(extra);
        spawn(NODE, &args, &env)
    }

    fn stop(self) {
        for mut s in self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// The worker's `RESULT` line, parsed.
fn result(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT in:\n{text}"));
    serde_json::from_str(line).expect("result json")
}

/// The result is exactly `steps` steps of the known gradients, each applied once.
fn check_exact(r: &serde_json::Value, steps: u64) {
    let (want_w, want_b) = linreg::const_grad_result(steps, LR);
    let w: Vec<f32> = r["w"]
        .as_array()
        .expect("w")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect();
    let b = r["b"].as_f64().expect("b") as f32;
    assert_eq!(r["version"].as_u64(), Some(steps), "{r}");
    assert_eq!(
        w, want_w,
        "weights differ from {steps} steps applied once each"
    );
    assert_eq!(
        b, want_b,
        "bias differs from {steps} steps applied once each"
    );
}

/// Waits until `child` prints `line`; returns the rest of its output as it comes.
fn wait_for_line(child: &mut Child, line: &str) -> std::sync::mpsc::Receiver<String> {
    let lines = stdout_lines(child);
    loop {
        match lines.recv_timeout(LIMIT) {
            Ok(l) if l == line => return lines,
            Ok(_) => {}
            Err(_) => panic!("the worker never printed {line:?}"),
        }
    }
}

/// SIGKILL one of three sync workers (all three aggregated per step) at step 10: once its lease
/// expires the two others finish every step, each applied once, on both servers.
#[test]
fn a_worker_killed_in_sync_mode_leaves_the_others_training() {
    let job = Job::start(2, Some(LEASE));
    let steps = STEPS.to_string();
    let mut victim = job.worker(2, 3, &["--steps", &steps]);
    let others: Vec<Child> = (0..2)
        .map(|w| job.worker(w, 3, &["--steps", &steps]))
        .collect();
    let _rest = wait_for_line(&mut victim, "STEP 10");
    victim.kill().expect("kill");
    let _ = victim.wait();
    for (w, out) in wait_all(others, LIMIT).iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "worker {w} failed after worker 2 was killed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Waiting in a pull for the step keeps a live worker's lease.
        assert!(
            !text.contains("REFUSED"),
            "a live worker lost its lease:\n{text}"
        );
        check_exact(&result(&text), STEPS);
    }
    job.stop();
}

/// Without a lease the same kill stalls the job: the others fail at their deadline naming the
/// version that never came (the control for the test above).
#[test]
fn without_a_lease_a_killed_worker_stalls_sync_training_until_the_deadline() {
    let job = Job::start(1, None);
    let mut victim = job.worker(1, 2, &["--steps", "40"]);
    let other = job.worker(0, 2, &["--steps", "40", "--timeout", "3"]);
    let _rest = wait_for_line(&mut victim, "STEP 10");
    victim.kill().expect("kill");
    let _ = victim.wait();
    let out = wait_output(other, LIMIT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the worker finished without its peer"
    );
    assert!(err.contains("a worker may be missing"), "{err}");
    job.stop();
}

/// A worker silent between its pull and its push for longer than its lease: the two others go on
/// without it; its late push is refused naming the lease (nothing applied), and it rejoins at the
/// server's step. All three end with every step applied once.
#[test]
fn a_worker_back_after_its_lease_is_refused_once_then_rejoins() {
    let job = Job::start(2, Some(LEASE));
    // Slow enough steps that the others are still training when it comes back.
    let steps = 80;
    let steps_arg = steps.to_string();
    let children: Vec<Child> = (0..3)
        .map(|w| {
            let stall: &[&str] = if w == 2 {
                &["--stall-at", "10", "--stall-ms", "2500"]
            } else {
                &[]
            };
            let mut args = vec!["--steps", steps_arg.as_str(), "--slow", "30"];
            args.extend_from_slice(stall);
            job.worker(w, 3, &args)
        })
        .collect();
    let outs = wait_all(children, LIMIT);
    for (w, out) in outs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "worker {w} failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        check_exact(&result(&text), steps);
    }
    let late = String::from_utf8_lossy(&outs[2].stdout);
    let refused = late
        .lines()
        .find(|l| l.starts_with("REFUSED "))
        .unwrap_or_else(|| panic!("the late push was not refused:\n{late}"));
    assert!(
        refused.contains("gradient for step 10 refused")
            && refused.contains("lease")
            && refused.contains("to rejoin"),
        "{refused}"
    );
    // It pushed again after the refusal: steps after 10 carry its gradient.
    let after: Vec<u64> = late
        .lines()
        .skip_while(|l| !l.starts_with("REFUSED "))
        .filter_map(|l| l.strip_prefix("STEP ")?.parse().ok())
        .collect();
    assert!(
        after.iter().any(|s| *s > 10),
        "worker 2 never pushed again after the refusal:\n{late}"
    );
    for out in &outs[..2] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("REFUSED"), "{text}");
    }
    job.stop();
}

/// Async with a staleness bound: a killed worker would hold the others back forever (they may not
/// run more than the bound ahead of the slowest); once its lease expires they finish.
#[test]
fn a_worker_killed_under_a_staleness_bound_is_not_waited_for() {
    let job = Job::start(1, Some(LEASE));
    let async_args = ["--mode", "async", "--staleness", "1", "--steps", "40"];
    let mut victim = job.worker(1, 2, &async_args);
    let other = job.worker(0, 2, &async_args);
    let _rest = wait_for_line(&mut victim, "STEP 10");
    victim.kill().expect("kill");
    let _ = victim.wait();
    let out = wait_output(other, LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "worker 0 did not finish after worker 1 was killed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = result(&text);
    assert!(r["version"].as_u64().expect("version") >= 40, "{r}");
    job.stop();
}

/// Server 1 also serves a standby of server 0. SIGKILL server 0 mid-training: the workers fail
/// over to the standby within their deadline and finish; every step is applied exactly once on
/// both shards (the standby held every step server 0 published). Server 1 then exits by itself:
/// its own workers and the promoted standby's are done.
#[test]
fn a_server_killed_with_a_standby_loses_no_applied_step() {
    let token = JobToken::generate();
    let (mut primary, a0) = start_ps_server(NODE, token.as_str(), &[], "tcp");
    let (backup, a1) = start_ps_server(NODE, token.as_str(), &["--follow", &a0], "tcp");
    let job = Job {
        token,
        servers: vec![],
        addrs: vec![a0, a1],
    };
    let steps = 60;
    let steps_arg = steps.to_string();
    let args = ["--steps", steps_arg.as_str(), "--slow", "20"];
    let mut first = job.worker(0, 2, &args);
    let second = job.worker(1, 2, &args);
    let rest = wait_for_line(&mut first, "STEP 20");
    primary.kill().expect("kill");
    let _ = primary.wait();
    let out = wait_output(second, LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "worker 1 did not finish after server 0 was killed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_exact(&result(&text), steps);
    let first_text = rest.iter().collect::<Vec<String>>().join("\n");
    check_exact(&result(&first_text), steps);
    // No version a worker saw was lost: the standby held every published step.
    for t in [&text.to_string(), &first_text] {
        assert!(!t.contains("REWOUND"), "a published step was lost:\n{t}");
    }
    let out = wait_output(backup, LIMIT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "server 1 failed: {err}");
    assert!(
        err.contains("promoted"),
        "the standby was never promoted:\n{err}"
    );
    job.stop();
}

/// A standby reached by a worker while its primary is alive (the worker could not reach the
/// primary, say) is promoted, and the primary stops with an error naming it: two servers never
/// serve the same partitions.
#[test]
fn a_primary_stops_once_its_standby_is_promoted() {
    use tandem_ps::pb;
    let token = JobToken::generate();
    let (primary, a0) = start_ps_server(NODE, token.as_str(), &[], "tcp");
    let (mut backup, _a1) = start_ps_server(NODE, token.as_str(), &["--follow", &a0], "tcp");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = |addr: String| {
        let token = token.clone();
        async move { tandem_tests::ps_client(&addr, token.as_str()).await }
    };
    let standby = rt.block_on(async {
        let mut c = client(a0.clone()).await;
        let declare = pb::DeclareRequest {
            partitions: vec![pb::Partition {
                param: "w".into(),
                part: 0,
                shape: vec![4],
                row_start: 0,
                rows: 4,
                dtype: "f32".into(),
                init: None,
            }],
            optimizer: Some(pb::Optimizer {
                kind: "sgd".into(),
                lr: 0.1,
                ..Default::default()
            }),
            mode: Some(pb::Mode {
                sync: true,
                workers: 1,
                replicas_to_aggregate: 1,
                ..Default::default()
            }),
            map_hash: 7,
            compression: String::new(),
        };
        c.declare(declare).await.expect("declare");
        for _ in 0..200 {
            let s = c
                .stats(pb::StatsRequest {})
                .await
                .expect("stats")
                .into_inner();
            if !s.standby.is_empty() {
                return s.standby;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no standby followed the primary within 10 s");
    });
    // Reach the standby as a worker would: any call promotes it.
    rt.block_on(async {
        let mut c = client(standby.clone()).await;
        let _ = c.stats(pb::StatsRequest {}).await;
    });
    let out = wait_output(primary, LIMIT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the replaced primary exited 0");
    assert!(
        err.contains(&format!("replaced by its standby at {standby}")),
        "{err}"
    );
    let _ = backup.kill();
    let _ = backup.wait();
}
