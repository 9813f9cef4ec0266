//! The parameter server across separate OS processes: 2 servers and 4 workers on 127.0.0.1.

use std::process::{Child, Output};
use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem_tests::{linreg, result_json, spawn, stdout_lines, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);

struct Job {
    token: JobToken,
    servers: Vec<Child>,
    addrs: Vec<String>,
    /// `TANDEM_SAME_HOST` for every process: `auto` (tensors move by address between processes on
    /// this machine when it allows) or `tcp` (every byte through the gRPC streams).
    same_host: &'static str,
}

/// Checks a worker's report of the data plane it used.
fn check_plane(v: &serde_json::Value, same_host: &str) {
    let want = same_host == "auto" && tandem::collective::transport::peer_memory::available();
    assert_eq!(
        v["same_host"], want,
        "data plane with TANDEM_SAME_HOST={same_host}: {v}"
    );
}

fn env_of(token: &JobToken, same_host: &str) -> Vec<(String, String)> {
    tandem_tests::ps_env(token.as_str(), same_host)
}

fn start_server(token: &JobToken, args: &[&str], same_host: &str) -> (Child, String) {
    tandem_tests::start_ps_server(NODE, token.as_str(), args, same_host)
}

impl Job {
    fn start(servers: usize) -> Job {
        Self::start_with(servers, |_| vec![])
    }

    fn start_plane(servers: usize, same_host: &'static str) -> Job {
        Self::start_full(servers, |_| vec![], same_host)
    }

    fn start_with(servers: usize, args: impl Fn(usize) -> Vec<String>) -> Job {
        Self::start_full(servers, args, "auto")
    }

    fn start_full(
        servers: usize,
        args: impl Fn(usize) -> Vec<String>,
        same_host: &'static str,
    ) -> Job {
        let token = JobToken::generate();
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..servers {
            let a = args(i);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let (c, addr) = start_server(&token, &a, same_host);
            addrs.push(addr);
            children.push(c);
        }
        Job {
            token,
            servers: children,
            addrs,
            same_host,
        }
    }

    fn spawn_workers(&self, n: usize, extra: &[&str]) -> Vec<Child> {
        let env = env_of(&self.token, self.same_host);
        let servers = self.addrs.join(",");
        (0..n)
            .map(|w| {
                let mut args: Vec<String> = vec![
                    "ps-worker".into(),
                    "--servers".into(),
                    servers.clone(),
                    "--worker".into(),
                    w.to_string(),
                    "--workers".into(),
                    n.to_string(),
                ];
                args.extend(extra.iter().map(|s| s.to_string()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn(NODE, &args, &env)
            })
            .collect()
    }

    fn workers(
        &self,
        n: usize,
        extra: &[&str],
        per_worker: impl Fn(usize) -> Vec<String>,
    ) -> Vec<Output> {
        let env = env_of(&self.token, self.same_host);
        let servers = self.addrs.join(",");
        let children: Vec<_> = (0..n)
            .map(|w| {
                let mut args: Vec<String> = vec![
                    "ps-worker".into(),
                    "--servers".into(),
                    servers.clone(),
                    "--worker".into(),
                    w.to_string(),
                    "--workers".into(),
                    n.to_string(),
                ];
                args.extend(extra.iter().map(|s| s.to_string()));
                args.extend(per_worker(w));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                spawn(NODE, &args, &env)
            })
            .collect();
        wait_all(children, LIMIT)
    }

    /// The servers exit by themselves once every worker is done.
    fn finish(self) {
        for out in wait_all(self.servers, LIMIT) {
            assert!(
                out.status.success(),
                "server failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "worker failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    result_json(out)
}

fn params(v: &serde_json::Value) -> (Vec<f32>, f32) {
    let w = v["w"]
        .as_array()
        .expect("w")
        .iter()
        .map(|x| x.as_f64().expect("f") as f32)
        .collect();
    (w, v["b"].as_f64().expect("b") as f32)
}

fn distance_to_truth(w: &[f32], b: f32) -> f32 {
    let (wt, bt) = linreg::truth();
    w.iter()
        .zip(&wt)
        .map(|(a, b)| (a - b).abs())
        .fold((b - bt).abs(), f32::max)
}

#[test]
/// On one machine the servers sum each step's gradients in worker order, piece by piece, out of the
/// workers' memory; over the streams they add them into a running sum as they arrive. Either way
/// results match the reference up to float rounding of the order, and every worker sees exactly the
/// same parameters.
fn sync_sgd_matches_the_single_process_reference() {
    sync_reference("auto");
}

/// The same with every byte through the gRPC streams.
#[test]
fn sync_sgd_over_the_streams_matches_the_single_process_reference() {
    sync_reference("tcp");
}

/// A worker 1.5 s late to every step: the others' gradients wait in their memory for 1 s, then are
/// copied into the step's sum so those workers go on; the step still averages all four.
#[test]
fn sync_sgd_with_a_late_worker_matches_the_single_process_reference() {
    sync_reference_with("auto", 4, |w| {
        if w == 3 {
            vec!["--slow".into(), "1500".into()]
        } else {
            vec![]
        }
    });
}

/// Each push also pulls the next step at once (`push_pull_into`), the weights cut into four
/// partitions per server so a server streams each one as soon as the step applied it, before the
/// step is published: the same parameters as pushing then pulling, on every worker.
#[test]
fn sync_sgd_with_pulls_overlapping_pushes_matches_the_single_process_reference() {
    sync_reference_with("tcp", 150, |_| {
        ["--overlap", "--max-part", "16"].map(String::from).to_vec()
    });
}

/// Async mode: `push_pull_into` pushes, then pulls, so each gradient is computed on parameters that
/// include the worker's previous one: a single worker trains exactly like one-worker SGD.
#[test]
fn async_push_pull_includes_the_workers_own_gradient() {
    let job = Job::start_plane(2, "tcp");
    let lr = 0.05;
    let steps = 40;
    let outs = job.workers(
        1,
        &[
            "--mode",
            "async",
            "--steps",
            &steps.to_string(),
            "--lr",
            "0.05",
            "--overlap",
            "--max-part",
            "16",
        ],
        |_| vec![],
    );
    let (want_w, want_b) = linreg::reference_sync(1, steps, lr);
    let (w, b) = params(&ok(&outs[0]));
    for (got, want) in w.iter().zip(&want_w).chain([(&b, &want_b)]) {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{got} vs one-worker SGD {want}"
        );
    }
    job.finish();
}

/// A model too small to share: its two tensors whole on two of three servers, the third holding
/// none (it gets no pushes, so its version stays 0): pulls must not wait for it.
#[test]
fn a_server_holding_no_partition_does_not_stall_the_job() {
    for same_host in ["auto", "tcp"] {
        sync_reference_on(3, same_host, 30, |_| {
            vec!["--min-part".to_string(), (1 << 20).to_string()]
        });
    }
}

fn sync_reference(same_host: &'static str) {
    sync_reference_with(same_host, 150, |_| vec![]);
}

fn sync_reference_with(
    same_host: &'static str,
    steps: usize,
    per_worker: impl Fn(usize) -> Vec<String>,
) {
    sync_reference_on(2, same_host, steps, per_worker);
}

fn sync_reference_on(
    servers: usize,
    same_host: &'static str,
    steps: usize,
    per_worker: impl Fn(usize) -> Vec<String>,
) {
    let job = Job::start_plane(servers, same_host);
    let lr = 0.05;
    let steps_arg = steps.to_string();
    let outs = job.workers(
        4,
        &["--mode", "sync", "--steps", &steps_arg, "--lr", "0.05"],
        per_worker,
    );
    let (want_w, want_b) = linreg::reference_sync(4, steps, lr);
    let first = params(&ok(&outs[0]));
    for out in &outs {
        check_plane(&ok(out), same_host);
        let (w, b) = params(&ok(out));
        assert_eq!((w.clone(), b), first, "workers see different parameters");
        for (got, want) in w.iter().zip(&want_w).chain([(&b, &want_b)]) {
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{got} vs reference {want}"
            );
        }
    }
    let (w, b) = params(&ok(&outs[0]));
    assert!(
        steps < 100 || distance_to_truth(&w, b) < 0.05,
        "sync SGD did not reach the known solution: {w:?} {b}"
    );
    job.finish();
}

#[test]
fn async_sgd_converges() {
    let job = Job::start(2);
    let outs = job.workers(
        4,
        &["--mode", "async", "--steps", "150", "--lr", "0.03"],
        |_| vec![],
    );
    for out in &outs {
        let (w, b) = params(&ok(out));
        assert!(
            distance_to_truth(&w, b) < 0.1,
            "async SGD did not converge: {w:?} {b}"
        );
    }
    job.finish();
}

#[test]
fn backup_workers_keep_the_job_moving_past_a_stalled_worker() {
    let job = Job::start(2);
    // K = 3 of 4: worker 3 sleeps 100 ms per step; the others must not wait for it.
    let outs = job.workers(
        4,
        &[
            "--mode", "sync", "--k", "3", "--steps", "150", "--lr", "0.05",
        ],
        |w| {
            if w == 3 {
                vec!["--slow".into(), "100".into()]
            } else {
                vec![]
            }
        },
    );
    let fast = ok(&outs[0]);
    assert!(
        fast["version"].as_u64().expect("version") >= 150,
        "the job stalled: {fast}"
    );
    let slow = ok(&outs[3]);
    assert!(
        slow["dropped"].as_u64().expect("dropped") > 0,
        "the stalled worker's late gradients must be dropped: {slow}"
    );
    let (w, b) = params(&fast);
    assert!(distance_to_truth(&w, b) < 0.05, "{w:?} {b}");
    job.finish();
}

#[test]
fn the_staleness_bound_holds_under_a_slow_worker() {
    let job = Job::start(2);
    let outs = job.workers(
        3,
        &[
            "--mode",
            "async",
            "--staleness",
            "2",
            "--steps",
            "20",
            "--lr",
            "0.02",
        ],
        |w| {
            if w == 2 {
                vec!["--slow".into(), "30".into()]
            } else {
                vec![]
            }
        },
    );
    for out in &outs {
        let v = ok(out);
        // A push waits while its worker is more than 2 steps ahead; after it, at most 3.
        assert!(
            v["max_spread"].as_u64().expect("spread") <= 3,
            "bound violated: {v}"
        );
    }
    job.finish();
}

#[test]
fn adam_on_the_servers_converges() {
    let job = Job::start(2);
    let outs = job.workers(
        2,
        &[
            "--mode", "sync", "--steps", "300", "--lr", "0.05", "--opt", "adam",
        ],
        |_| vec![],
    );
    for out in &outs {
        let (w, b) = params(&ok(out));
        assert!(distance_to_truth(&w, b) < 0.05, "{w:?} {b}");
    }
    job.finish();
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut cases = vec![
        ("nan", "NaN", "auto"),
        ("nan", "NaN", "tcp"),
        ("shape", "shape mismatch", "auto"),
        ("name", "unknown parameter", "auto"),
        ("truncated", "truncated", "tcp"),
        ("oversized", "does not follow", "tcp"),
        ("listed-truncated", "ended early", "tcp"),
        ("listed-oversized", "sent 8 bytes", "tcp"),
        ("listed-twice", "out of ascending order or twice", "tcp"),
        ("listed-nan", "NaN", "tcp"),
        ("shared-stranger", "not attached", "auto"),
    ];
    if tandem::collective::transport::peer_memory::available() {
        cases.push(("shared-len", "2 bytes offered", "auto"));
        cases.push(("shared-left", "left the push", "auto"));
    }
    for (bad, needle, same_host) in cases {
        let job = Job::start_plane(2, same_host);
        let outs = job.workers(1, &["--mode", "sync", "--bad", bad], |_| vec![]);
        let text = String::from_utf8_lossy(&outs[0].stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.starts_with("BAD "))
            .unwrap_or_else(|| panic!("{bad}: no BAD line: {text}"));
        assert!(
            line.contains(needle) && line.ends_with("unchanged true"),
            "{bad}: {line}"
        );
        job.finish();
    }
}

/// An async push applied as read, sent again with the same id (a worker whose connection broke
/// after the server took it): applied once, and the second attempt gets the first one's answer.
/// Without the id the same bytes would be applied twice (the control in the test's second half).
#[test]
fn an_async_push_sent_twice_with_one_id_is_applied_once() {
    let job = Job::start_plane(1, "tcp");
    let outs = job.workers(
        1,
        &["--mode", "async", "--bad", "listed-again", "--lr", "0.5"],
        |_| vec![],
    );
    let text = String::from_utf8_lossy(&outs[0].stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("AGAIN "))
        .unwrap_or_else(|| panic!("no AGAIN line: {text}"));
    assert!(line.ends_with("once true"), "{line}");
    job.finish();
}

#[test]
fn a_wrong_token_is_refused() {
    let job = Job::start(1);
    let env = vec![(
        "TANDEM_JOB_TOKEN".to_string(),
        "not-the-job-token".to_string(),
    )];
    let out = tandem_tests::wait_output(
        spawn(
            NODE,
            &[
                "ps-worker",
                "--servers",
                &job.addrs[0],
                "--worker",
                "0",
                "--workers",
                "1",
            ],
            &env,
        ),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ERROR authentication"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The server still serves the real job.
    let outs = job.workers(1, &["--mode", "sync", "--steps", "5"], |_| vec![]);
    ok(&outs[0]);
    job.finish();
}

#[test]
fn a_server_killed_and_restarted_from_its_checkpoint_lets_training_finish() {
    let dir = std::env::temp_dir().join(format!("tandem-ps-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = dir.to_string_lossy().to_string();
    let mut job = Job::start_with(2, |i| {
        vec![
            "--index".into(),
            i.to_string(),
            "--ckpt".into(),
            ckpt.clone(),
            "--every".into(),
            "10".into(),
        ]
    });
    let mut workers = job.spawn_workers(4, &["--mode", "sync", "--steps", "200", "--lr", "0.05"]);
    let progress = stdout_lines(&mut workers[0]);
    loop {
        let line = progress
            .recv_timeout(LIMIT)
            .expect("worker 0 made no progress");
        if line == "STEP 60" {
            break;
        }
    }
    // Kill server 1 mid-training and start it again on the same address from its checkpoint.
    let mut victim = job.servers.remove(1);
    victim.kill().expect("kill");
    let _ = victim.wait();
    assert!(
        dir.join("ps-1.ckpt").exists(),
        "server 1 wrote no checkpoint before it was killed"
    );
    let addr = job.addrs[1].clone();
    let (restarted, _) = start_server(
        &job.token,
        &[
            "--bind", &addr, "--index", "1", "--ckpt", &ckpt, "--every", "10",
        ],
        job.same_host,
    );
    job.servers.push(restarted);
    let drain = std::thread::spawn(move || {
        progress
            .iter()
            .find_map(|l| l.strip_prefix("RESULT ").map(str::to_string))
    });
    let outs = wait_all(workers, LIMIT);
    for (w, out) in outs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(4).collect();
        eprintln!("worker {w}: {} | {}", out.status, tail.join(" | "));
    }
    for out in &outs[1..] {
        let (w, b) = params(&ok(out));
        assert!(
            distance_to_truth(&w, b) < 0.05,
            "training did not finish well after the restart: {w:?} {b}"
        );
    }
    assert!(
        outs[0].status.success(),
        "worker 0 failed: {}",
        String::from_utf8_lossy(&outs[0].stderr)
    );
    let r0: serde_json::Value =
        serde_json::from_str(&drain.join().expect("drain").expect("worker 0 result"))
            .expect("json");
    assert!(r0["version"].as_u64().expect("version") >= 200, "{r0}");
    job.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_on_demand_restores_exactly() {
    let dir = std::env::temp_dir().join(format!("tandem-ps-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = dir.to_string_lossy().to_string();
    let server_args = |_| {
        vec![
            "--index".to_string(),
            "0".into(),
            "--ckpt".into(),
            ckpt.clone(),
        ]
    };
    let job = Job::start_with(1, server_args);
    let first = job.workers(
        1,
        &[
            "--mode",
            "sync",
            "--steps",
            "20",
            "--lr",
            "0.05",
            "--opt",
            "adam",
            "--checkpoint",
        ],
        |_| vec![],
    );
    let trained = ok(&first[0]);
    job.finish();
    // A new server from the same directory serves exactly those parameters at the same version.
    let job = Job::start_with(1, server_args);
    let again = job.workers(
        1,
        &[
            "--mode", "sync", "--steps", "0", "--opt", "adam", "--lr", "0.05",
        ],
        |_| vec![],
    );
    let restored = ok(&again[0]);
    assert_eq!(params(&restored), params(&trained));
    assert_eq!(restored["version"], trained["version"]);
    job.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rows of `ids` as the initializer makes them (the initializer is the specification).
fn initial_rows(ids: &[u64]) -> Vec<f32> {
    let init = tandem::ps::init::Init::Uniform {
        low: -1.0,
        high: 1.0,
        seed: 5,
    };
    ids.iter()
        .flat_map(|id| (0..8).map(move |k| init.value(id * 8 + k)))
        .collect()
}

#[test]
fn sparse_rows_update_only_those_rows_and_match_a_reference() {
    for opt in ["sgd", "adagrad"] {
        let job = Job::start(2);
        let env = vec![(
            "TANDEM_JOB_TOKEN".to_string(),
            job.token.as_str().to_string(),
        )];
        let servers = job.addrs.join(",");
        let out = tandem_tests::wait_output(
            spawn(
                NODE,
                &["ps-sparse", "--servers", &servers, "--opt", opt],
                &env,
            ),
            LIMIT,
        );
        let v = ok(&out);
        let floats = |k: &str| -> Vec<f32> {
            v[k].as_array()
                .expect(k)
                .iter()
                .map(|x| x.as_f64().expect("f") as f32)
                .collect()
        };
        let (before, after) = (floats("before"), floats("after"));
        assert_eq!(
            before,
            initial_rows(&[3, 999, 500, 4]),
            "{opt}: rows are not the initializer's"
        );
        // Reference: row 3 gets g1[0..8] + g1[16..24] then g2[8..16]; 500 gets g1[8..16]; 999 g2[0..8].
        let g1: Vec<f32> = (0..24).map(|i| (i as f32 - 12.0) / 8.0).collect();
        let g2: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let row = |r: usize| before[r * 8..(r + 1) * 8].to_vec();
        let (mut r3, mut r999, mut r500) = (row(0), row(1), row(2));
        let mut acc3 = vec![0.0f32; 8];
        let step = |p: &mut Vec<f32>, acc: &mut Vec<f32>, g: Vec<f32>| {
            for k in 0..8 {
                if opt == "sgd" {
                    p[k] -= 0.5 * g[k];
                } else {
                    acc[k] += g[k] * g[k];
                    p[k] -= 0.5 * g[k] / (acc[k].sqrt() + 1e-10);
                }
            }
        };
        let first3: Vec<f32> = (0..8).map(|k| g1[k] + g1[16 + k]).collect();
        step(&mut r3, &mut acc3, first3);
        step(&mut r500, &mut vec![0.0; 8], g1[8..16].to_vec());
        step(&mut r999, &mut vec![0.0; 8], g2[0..8].to_vec());
        step(&mut r3, &mut acc3, g2[8..16].to_vec());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        assert!(
            close(&after[0..8], &r3),
            "{opt} row 3: {:?} vs {r3:?}",
            &after[0..8]
        );
        assert!(close(&after[8..16], &r999), "{opt} row 999");
        assert!(close(&after[16..24], &r500), "{opt} row 500");
        assert_eq!(
            &after[24..32],
            &before[24..32],
            "{opt}: an untouched row changed"
        );
        assert!(v["bad"].as_str().expect("bad").contains("row 1000"), "{v}");
        job.finish();
    }
}

#[test]
fn a_256_mib_tensor_streams_through_push_and_pull() {
    big_tensor("tcp");
}

/// The same tensor between processes on this machine, moved by address when the machine allows.
#[test]
fn a_256_mib_tensor_moves_by_address_between_processes_on_one_machine() {
    big_tensor("auto");
}

/// Async mode applies a gradient read by address piece by piece, straight into the parameters.
#[test]
fn a_256_mib_tensor_applied_on_arrival_in_async_mode() {
    big_tensor_in("auto", "async");
}

fn big_tensor(same_host: &'static str) {
    big_tensor_in(same_host, "sync");
}

fn big_tensor_in(same_host: &'static str, mode: &str) {
    let job = Job::start_plane(2, same_host);
    let env = env_of(&job.token, same_host);
    let servers = job.addrs.join(",");
    let elems = (64usize << 20).to_string(); // 64 Mi f32 = 256 MiB
    let out = tandem_tests::wait_output(
        spawn(
            NODE,
            &[
                "ps-big",
                "--servers",
                &servers,
                "--elems",
                &elems,
                "--mode",
                mode,
            ],
            &env,
        ),
        LIMIT,
    );
    let v = ok(&out);
    check_plane(&v, same_host);
    assert_eq!(v["mismatches"], 0, "{v}");
    assert_eq!(v["version"], 1, "{v}");
    job.finish();
}
