//! The `tandem` binary as users run it.

use std::process::Command;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn tandem(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(TANDEM);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tandem")
}

#[test]
fn info_reads_tf_config() {
    let tf = r#"{"cluster":{"chief":["j-chief-0.ns.svc:2222"],"ps":["j-ps-0.ns.svc:2222"],"worker":["j-worker-0.ns.svc:2222"]},"task":{"type":"ps","index":0}}"#;
    let out = tandem(&["info", "--json"], &[("TF_CONFIG", tf)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["source"], "tf_config");
    assert_eq!(v["role"], "ps");
    assert_eq!(v["rank"], 2);
    assert_eq!(v["rendezvous"], "j-chief-0.ns.svc:2222");
}

#[test]
fn info_reports_configuration_errors() {
    let out = tandem(
        &["info"],
        &[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "n[1-"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLURM_JOB_NODELIST") && err.contains("unclosed"),
        "{err}"
    );
    let out = tandem(&["info", "--json"], &[("RANK", "abc"), ("WORLD_SIZE", "2")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["error"]["kind"], "config");
}

#[test]
fn rendezvous_refuses_to_run_without_a_token() {
    let out = tandem(&["rendezvous", "--bind", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TANDEM_JOB_TOKEN"));
}

#[test]
fn demo_trains_with_every_mode_to_a_stated_accuracy() {
    let out = tandem(
        &[
            "demo",
            "--workers",
            "3",
            "--servers",
            "2",
            "--steps",
            "400",
            "--timeout",
            "120",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["sync PS", "async PS", "allreduce"] {
        let acc = demo_accuracy(&text, mode);
        assert!(acc >= 0.9, "{mode}: test accuracy {acc} below 0.9:\n{text}");
    }
}

/// The test accuracy in the demo's last row for `mode` (columns: mode ... steps/s samples/s
/// loss accuracy wall MB).
fn demo_accuracy(text: &str, mode: &str) -> f64 {
    let row = text
        .lines()
        .rev()
        .find(|l| l.starts_with(mode))
        .unwrap_or_else(|| panic!("no {mode} row in\n{text}"));
    row.split_whitespace()
        .nth_back(2)
        .and_then(|v| v.parse().ok())
        .expect("accuracy column")
}

/// The allreduce demo compresses its gradients as `TANDEM_COMPRESSION` says and still trains;
/// a setting that is not one fails the job, naming the variable.
#[test]
fn demo_allreduce_trains_with_compressed_gradients_and_refuses_a_bad_setting() {
    let args = [
        "demo",
        "--mode",
        "allreduce",
        "--workers",
        "2",
        "--steps",
        "400",
        "--timeout",
        "120",
    ];
    let out = tandem(&args, &[("TANDEM_COMPRESSION", "topk:0.5")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acc = demo_accuracy(&text, "allreduce");
    assert!(acc >= 0.9, "test accuracy {acc} below 0.9:\n{text}");
    let bad = tandem(&args, &[("TANDEM_COMPRESSION", "zip")]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(!bad.status.success(), "{all}");
    assert!(all.contains("TANDEM_COMPRESSION"), "{all}");
}

/// `tandem bench allreduce --elastic-cost` forms an elastic group through the launcher and prints,
/// per size, the time with and without a commit after every allreduce and their ratio; it is
/// refused on other collectives and with simulated hosts, naming the flag.
#[test]
fn bench_elastic_cost_measures_commits_and_refuses_other_setups() {
    let out = tandem(
        &[
            "bench",
            "allreduce",
            "--np",
            "2",
            "--min",
            "4K",
            "--max",
            "8K",
            "--iters",
            "40",
            "--warmup",
            "2",
            "--elastic-cost",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<f64>> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .filter(|r: &Vec<f64>| r.len() == 5)
        .collect();
    assert_eq!(
        rows.iter().map(|r| r[0]).collect::<Vec<_>>(),
        [4096.0, 8192.0],
        "{text}"
    );
    for r in &rows {
        assert!(
            r[2] > 0.0 && r[3] > 0.0 && (r[4] - r[2] / r[3]).abs() < 1e-2,
            "{text}"
        );
    }
    for bad in [
        vec!["bench", "broadcast", "--elastic-cost"],
        vec!["bench", "allreduce", "--elastic-cost", "--hosts", "2"],
    ] {
        let out = tandem(&bad, &[]);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--elastic-cost"),
            "{bad:?}"
        );
    }
}

/// `tandem bench allreduce --streams-per-peer N` runs its ranks with N connections per pair (every
/// result checked by the bench: the `#wrong` column) and refuses a count outside 1 to 8, naming the
/// flag.
#[test]
fn bench_streams_per_peer_runs_at_the_bounds_and_refuses_beyond() {
    let args = |n: &'static str| {
        vec![
            "bench",
            "allreduce",
            "--np",
            "2",
            "--min",
            "4M",
            "--max",
            "4M",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--streams-per-peer",
            n,
        ]
    };
    for n in ["1", "8"] {
        let out = tandem(&args(n), &[("TANDEM_SAME_HOST", "tcp")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("# streams per peer: {n}")), "{text}");
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.trim_start().starts_with("4194304"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        assert_eq!(row.get(7), Some(&"0"), "no wrong elements: {text}");
    }
    for n in ["0", "9"] {
        let out = tandem(&args(n), &[]);
        assert_eq!(out.status.code(), Some(1), "{n}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--streams-per-peer"),
            "{n}"
        );
    }
}

/// `tandem bench allreduce --compression NAME` runs every compression with the table's check (the
/// half types exact on small integers, the others finite), says which it used, and refuses a
/// bad name, another collective, or another dtype before any rank starts.
#[test]
fn bench_compression_runs_each_kind_and_refuses_what_it_cannot_compress() {
    for name in ["fp16", "bf16", "topk:0.01", "powersgd:2"] {
        let out = tandem(
            &[
                "bench",
                "allreduce",
                "--np",
                "2",
                "--min",
                "64K",
                "--max",
                "64K",
                "--iters",
                "2",
                "--warmup",
                "1",
                "--compression",
                name,
            ],
            &[],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("# compression: {name}")), "{text}");
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.trim_start().starts_with("65536"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        assert_eq!(row.get(7), Some(&"0"), "{name}: no wrong elements: {text}");
    }
    for (args, says) in [
        (
            vec!["bench", "allreduce", "--compression", "topk:3"],
            "at most 1",
        ),
        (
            vec!["bench", "allreduce", "--compression", "zip"],
            "is not one of",
        ),
        (
            vec!["bench", "broadcast", "--compression", "bf16"],
            "compresses allreduces",
        ),
        (
            vec![
                "bench",
                "allreduce",
                "--compression",
                "bf16",
                "--dtype",
                "f64",
            ],
            "--dtype f32",
        ),
    ] {
        let out = tandem(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `tandem bench --tcp-congestion NAME` says which congestion control the ranks use and runs them
/// with it; the variable works the same; a name the kernel lacks, or one that cannot be a name,
/// stops the bench naming the flag or the variable before any rank starts.
#[test]
fn bench_tcp_congestion_is_said_and_refused_names_are_named() {
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "bench",
            "allreduce",
            "--np",
            "2",
            "--min",
            "1M",
            "--max",
            "1M",
            "--iters",
            "2",
            "--warmup",
            "1",
        ];
        a.extend_from_slice(extra);
        a
    };
    let ok = |a: &[&str], env: &[(&str, &str)]| {
        let out = tandem(a, env);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = ok(
        &args(&["--tcp-congestion", "reno"]),
        &[("TANDEM_SAME_HOST", "tcp")],
    );
    assert!(text.contains("# TCP congestion control: reno ("), "{text}");
    let text = ok(
        &args(&[]),
        &[
            ("TANDEM_SAME_HOST", "tcp"),
            ("TANDEM_TCP_CONGESTION", "reno"),
        ],
    );
    assert!(text.contains("# TCP congestion control: reno ("), "{text}");
    for (a, env, named) in [
        (args(&["--tcp-congestion", "nosuchcc"]), vec![], "nosuchcc"),
        (
            args(&["--tcp-congestion", "no such"]),
            vec![],
            "--tcp-congestion",
        ),
        (
            args(&[]),
            vec![("TANDEM_TCP_CONGESTION", "nosuchcc")],
            "TANDEM_TCP_CONGESTION",
        ),
    ] {
        let out = tandem(&a, &env);
        assert_eq!(out.status.code(), Some(1), "{a:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(named) && !String::from_utf8_lossy(&out.stdout).contains("size(B)"),
            "{err}"
        );
    }
}

#[test]
fn demo_rejects_bad_sizes() {
    let out = tandem(&["demo", "--workers", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
    let out = tandem(&["demo", "--mode", "sync", "--servers", "0"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--servers"));
}

#[test]
fn ps_refuses_a_worker_role_and_a_missing_token() {
    let tf = r#"{"cluster":{"ps":["127.0.0.1:1"],"worker":["127.0.0.1:2"]},"task":{"type":"worker","index":0}}"#;
    let out = tandem(
        &["ps"],
        &[("TF_CONFIG", tf), ("TANDEM_JOB_TOKEN", "job-secret-123")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a parameter server"));
    let out = tandem(&["ps", "--bind", "127.0.0.1:0"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("TANDEM_JOB_TOKEN"));
}

#[test]
fn ps_replicate_follows_the_previous_server_and_needs_two() {
    use std::io::BufRead;
    let one = r#"{"cluster":{"ps":["127.0.0.1:1"],"worker":["127.0.0.1:2"]},"task":{"type":"ps","index":0}}"#;
    let out = tandem(
        &["ps", "--replicate"],
        &[("TF_CONFIG", one), ("TANDEM_JOB_TOKEN", "job-secret-123")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--replicate") && err.contains("at least 2"),
        "{err}"
    );
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
    };
    let (ps0, ps1) = (free(), free());
    // Server 0's standby follows the last server (the list wraps around).
    let tf = format!(
        r#"{{"cluster":{{"ps":["{ps0}","{ps1}"],"worker":["127.0.0.1:2"]}},"task":{{"type":"ps","index":0}}}}"#
    );
    let mut child = Command::new(TANDEM)
        .args(["ps", "--replicate"])
        .env_clear()
        .env("TF_CONFIG", &tf)
        .env("TANDEM_JOB_TOKEN", "job-secret-123")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tandem ps");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    let second = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains(&format!("serving on {ps0}")), "{first}");
    assert!(
        second.contains(&format!("standby of {ps1} on 127.0.0.1:")),
        "{second}"
    );
}

#[test]
fn ps_serves_its_tf_config_address_and_metrics() {
    use std::io::{BufRead, Read, Write};
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
    };
    let (addr, metrics) = (free(), free());
    let tf = format!(
        r#"{{"cluster":{{"ps":["{addr}"],"worker":["127.0.0.1:2"]}},"task":{{"type":"ps","index":0}}}}"#
    );
    let mut child = Command::new(TANDEM)
        .args(["ps", "--metrics-addr", &metrics.to_string()])
        .env_clear()
        .env("TF_CONFIG", &tf)
        .env("TANDEM_JOB_TOKEN", "job-secret-123")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tandem ps");
    // Stop the server however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let _guard = Kill(child);
    let first = lines.next().expect("a line").expect("utf8");
    assert!(first.contains(&format!("serving on {addr}")), "{first}");
    let mut s = (0..100)
        .find_map(|_| {
            std::net::TcpStream::connect(metrics).ok().or_else(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                None
            })
        })
        .expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut resp = String::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
}

#[test]
fn topo_reads_a_recorded_matrix_and_names_the_bottleneck() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tandem-topology/fixtures/pairs4.txt"
    );
    let out = tandem(&["topo", "--from-file", fixture, "--gpus", "2"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("bottleneck: GPU0 -> GPU2 over NV4")
            || text.contains("bottleneck: GPU1 -> GPU3 over NV4"),
        "{text}"
    );
    let bad = std::env::temp_dir().join(format!("tandem-bad-topo-{}", std::process::id()));
    std::fs::write(&bad, "\tGPU0\tGPU1\nGPU0\t X \tWARP\nGPU1\tNV1\t X \n").unwrap();
    let out = tandem(&["topo", "--from-file", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown link \"WARP\""));
    std::fs::remove_file(bad).unwrap();
}

/// A dump as a rank writes it (the format `tandem trace` reads), built by hand.
fn dump_json(rank: usize, world: usize, ops: &[(u64, &str, &str)], reason: &str) -> String {
    let ops: Vec<serde_json::Value> = ops
        .iter()
        .map(|(seq, kind, state)| {
            let outcome = match *state {
                "ok" => serde_json::json!("ok"),
                "running" => serde_json::json!("running"),
                e => serde_json::json!({ "error": e }),
            };
            serde_json::json!({
                "seq": seq, "kind": kind, "dtype": "f32", "count": 16, "op": "sum",
                "peers": [(rank + world - 1) % world, (rank + 1) % world], "bytes": 64,
                "enqueued_us": 1_000 + seq * 10, "started_us": 1_000 + seq * 10,
                "ended_us": if *state == "running" { serde_json::Value::Null } else { serde_json::json!(1_005 + seq * 10) },
                "waiting": if *state == "ok" { serde_json::Value::Null } else { serde_json::json!("rank 2's header (it has not started)") },
                "waiting_on": if *state == "ok" { serde_json::Value::Null } else { serde_json::json!(2) },
                "outcome": outcome,
            })
        })
        .collect();
    serde_json::json!({
        "format": "tandem-flight-recorder/1",
        "identity": {"role": "rank", "index": rank, "world": world, "job": "t", "local": rank, "addr": ""},
        "pid": 100 + rank, "reason": reason, "written_us": 2_000, "ops": ops,
    })
    .to_string()
}

#[test]
fn trace_merges_dumps_and_names_the_rank_the_others_waited_for() {
    let dir = std::env::temp_dir().join(format!("tandem-cli-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let why = "timeout: timed out after 4s waiting for rank 2, which has not started it";
    for r in [0, 1, 3] {
        let text = dump_json(
            r,
            4,
            &[(0, "allreduce", "ok"), (1, "allreduce", "timed out")],
            why,
        );
        std::fs::write(dir.join(format!("rank-{r}.dump.json")), text).expect("write");
    }
    std::fs::write(
        dir.join("rank-2.dump.json"),
        dump_json(2, 4, &[(0, "allreduce", "ok")], "SIGUSR1"),
    )
    .expect("write");
    let out = tandem(&["trace", dir.to_str().expect("utf8")], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("4 process(es)"), "{text}");
    assert!(
        text.contains("Verdict from the records: rank 2 (last: op #0 allreduce(f32 x 16, sum), done) never started op #1"),
        "{text}"
    );
    assert!(text.contains("rank 0 -> rank 2"), "{text}");
    assert!(
        text.contains(&format!("What rank 0 concluded when it timed out: {why}")),
        "{text}"
    );
    let merged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("merged-trace.json")).expect("merged"))
            .expect("json");
    let events = merged["traceEvents"].as_array().expect("events");
    let tracks = events
        .iter()
        .filter(|e| e["name"] == "process_name")
        .count();
    assert_eq!(tracks, 4);
    // 3 ranks x 2 ops + rank 2's one.
    assert_eq!(events.iter().filter(|e| e["ph"] == "X").count(), 7);
    // A folder without records, and one that does not exist, are errors that say so.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let out = tandem(&["trace", empty.to_str().expect("utf8")], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no flight-recorder dump"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("rank-9.dump.json"), "{not json").expect("write");
    let out = tandem(&["trace", dir.to_str().expect("utf8")], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("rank-9.dump.json is not a flight-recorder dump"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn certs_init_makes_a_job_ca_reuses_it_and_never_overwrites() {
    let dir = std::env::temp_dir().join(format!("tandem-cli-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let job = dir.join("job");
    let s = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    let out = tandem(&["certs", "init", &s(&job), "--job", "j1"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("new CA for job j1") && text.contains("localhost, 127.0.0.1"),
        "{text}"
    );
    let ca = std::fs::read_to_string(job.join("ca.pem")).expect("ca");
    // A second process's certificate from the same CA, in its own folder.
    let host = dir.join("host-2");
    let out = tandem(
        &[
            "certs",
            "init",
            &s(&job),
            "--out",
            &s(&host),
            "--name",
            "host-2.example",
            "--name",
            "10.77.0.3",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reusing the CA already in"));
    // A certificate bound to a rank, checked as a process would load it.
    let r3 = dir.join("rank-3");
    let out = tandem(
        &[
            "certs",
            "init",
            &s(&job),
            "--out",
            &s(&r3),
            "--identity",
            "rank-3",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tandem(&["certs", "check", &s(&r3)], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TLS ok") && text.contains("\"rank-3\""),
        "{text}"
    );
    assert!(text.contains("identity: rank-3 of job j1"), "{text}");
    // A worker's certificate loads (it is for client use only) and belongs to the CA's job
    // whatever --job says; the job's own certificate names no role.
    let w1 = dir.join("worker-1");
    let out = tandem(
        &[
            "certs",
            "init",
            &s(&job),
            "--out",
            &s(&w1),
            "--identity",
            "worker-1",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tandem(&["certs", "check", &s(&w1)], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("identity: worker-1 of job j1"), "{text}");
    let out = tandem(&["certs", "check", &s(&job.join("process"))], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no identity"));
    // The CA's folder holds no process's key, and may not be given as one.
    assert!(!job.join("key.pem").exists() && job.join("process/key.pem").exists());
    let out = tandem(&["certs", "init", &s(&job), "--out", &s(&job)], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the CA's folder"));
    let out = tandem(&["certs", "check", &s(&dir.join("nothing-here"))], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing-here"));
    assert_eq!(
        std::fs::read_to_string(host.join("ca.pem")).expect("copy"),
        ca
    );
    assert_eq!(std::fs::read_to_string(job.join("ca.pem")).expect("ca"), ca);
    // Nothing stored is replaced.
    let key = std::fs::read_to_string(job.join("process/key.pem")).expect("key");
    let out = tandem(&["certs", "init", &s(&job)], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists; nothing was changed"));
    assert_eq!(
        std::fs::read_to_string(job.join("process/key.pem")).expect("key"),
        key
    );
    let out = tandem(
        &["certs", "init", &s(&dir.join("x")), "--name", "no spaces"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a host name"));
    let out = tandem(&["certs", "init", &s(&dir.join("y")), "--days", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give 1 to 3650"));
    // The Secret carries the process's three files, not the CA's key.
    let out = tandem(
        &["certs", "kubernetes", &s(&host), "--name", "job-tls"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let y = String::from_utf8_lossy(&out.stdout);
    assert!(
        y.contains("kind: Secret") && y.contains("name: job-tls"),
        "{y}"
    );
    for f in ["ca.pem:", "cert.pem:", "key.pem:"] {
        assert!(y.contains(f), "{y}");
    }
    assert!(!y.contains("ca-key"));
    // Without --name the Secret is named after the job: jobs of a namespace share none.
    let out = tandem(&["certs", "kubernetes", &s(&host), "--job", "train-7"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("name: train-7-tls"));
    // A certificate per replica needs the CA's key: a process's folder has none.
    let out = tandem(
        &["certs", "kubernetes", &s(&host), "--replicas", "worker=2"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no CA key"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Slurm scripts' certificates (deploy/slurm/job-tls.sh): made for the job in the submit
/// folder, one per task naming its identity (rank-N; ps-N and worker-N with PS_COUNT), each task
/// pointed at its own by task-tls.sh, usable by a process (the tandem binary loads them), the
/// CA's key gone at once, the folder removed when the job script ends; a user's own
/// TANDEM_TLS_DIR is left alone.
#[test]
fn slurm_jobs_make_their_certificates_and_remove_them() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let submit = std::env::temp_dir().join(format!("tandem-cli-slurm-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&submit);
    std::fs::create_dir_all(submit.join("deploy/slurm")).expect("mkdir");
    for f in ["job-tls.sh", "task-tls.sh"] {
        std::fs::copy(
            root.join("deploy/slurm").join(f),
            submit.join("deploy/slurm").join(f),
        )
        .expect("copy");
    }
    // Task 1 of the job, as srun starts it through task-tls.sh.
    let script = "source deploy/slurm/job-tls.sh\n\
                  SLURM_PROCID=1 deploy/slurm/task-tls.sh bash -c '\
                    echo \"DIR $TANDEM_TLS_DIR\"; \
                    ls \"$TANDEM_TLS_DIR\" \"$(dirname \"$TANDEM_TLS_DIR\")/ca\"; \
                    \"$TANDEM_CLI\" certs check'\n\
                  ls \"$TANDEM_TLS_ROOT\" | tr '\\n' ' '; echo";
    let run = |extra: &[(&str, &str)]| {
        let mut c = std::process::Command::new("bash");
        c.args(["-c", script])
            .current_dir(&submit)
            .env("SLURM_SUBMIT_DIR", &submit)
            .env("SLURM_JOB_ID", "77")
            .env("SLURM_NTASKS", "3")
            .env("TANDEM_CLI", TANDEM)
            .env_remove("TANDEM_TLS_DIR")
            .env_remove("TANDEM_INSECURE");
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().expect("bash")
    };
    let out = run(&[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{text}\n{err}");
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("DIR "))
        .expect("DIR line");
    assert!(dir.ends_with(".tandem-tls-77/rank-1"), "{dir}");
    assert!(
        text.contains("ca rank-0 rank-1 rank-2 "),
        "a folder per task: {text}"
    );
    assert!(text.contains("identity: rank-1 of job"), "{text}");
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(text.lines().any(|l| l == f), "{f} missing: {text}");
    }
    assert!(
        !text.contains("ca-key.pem"),
        "the CA's key must be gone: {text}"
    );
    assert!(text.contains("TLS ok"), "{text}\n{err}");
    assert!(
        !submit.join(".tandem-tls-77").exists(),
        "the job's certificates outlived it"
    );
    // With parameter servers: ps-N for the first PS_COUNT tasks, worker-N after them.
    let out = run(&[("PS_COUNT", "1")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("ca ps-0 worker-0 worker-1 "), "{text}");
    // Certificates of the user's own are used as they are.
    let out = run(&[("TANDEM_TLS_DIR", "/nonexistent/own")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("DIR /nonexistent/own"), "{text}");
    let _ = std::fs::remove_dir_all(&submit);
}
