//! `tandem launch` as users run it: real child processes, their environment, failures and Ctrl-C.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn launch(args: &[&str]) -> std::process::Output {
    Command::new(TANDEM)
        .arg("launch")
        .args(args)
        .env_remove("TF_CONFIG")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .expect("run tandem launch")
}

/// Lines of the form `[role index] {json}` collected per process, as `tandem info --json` prints.
fn specs_by_process(stdout: &[u8]) -> BTreeMap<String, serde_json::Value> {
    let mut text: BTreeMap<String, String> = BTreeMap::new();
    for line in String::from_utf8_lossy(stdout).lines() {
        let (tag, rest) = line
            .strip_prefix('[')
            .and_then(|l| l.split_once("] "))
            .expect("prefixed line");
        // `ps 0 (rank 3)`: keep the name; the rank is checked against what the process resolved.
        let tag = tag.trim();
        let (name, rank) = match tag.split_once(" (rank ") {
            Some((n, r)) => (n.to_string(), r.trim_end_matches(')').to_string()),
            None => (
                tag.to_string(),
                tag.rsplit(' ').next().unwrap_or_default().to_string(),
            ),
        };
        let entry = text.entry(name).or_default();
        if entry.is_empty() {
            entry.push_str(&format!("{{\"tag_rank\": {rank}, \"spec\": "));
        }
        entry.push_str(rest);
    }
    text.into_iter()
        .map(|(k, v)| {
            let v: serde_json::Value = serde_json::from_str(&format!("{v}}}")).expect("json");
            assert_eq!(
                v["tag_rank"], v["spec"]["rank"],
                "{k}: the prefix names the rank"
            );
            (k, v["spec"].clone())
        })
        .collect()
}

/// Runs `tandem launch ARGS -- tandem info --json` and returns what each process resolved.
fn resolved(args: &[&str]) -> BTreeMap<String, serde_json::Value> {
    let mut all = args.to_vec();
    all.extend(["--", TANDEM, "info", "--json"]);
    let out = launch(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    specs_by_process(&out.stdout)
}

#[test]
fn a_ps_job_gives_every_process_its_tfjob_role() {
    let specs = resolved(&["--ps", "2", "--workers", "3", "--chief", "--no-log-files"]);
    let names: Vec<&str> = specs.keys().map(String::as_str).collect();
    assert_eq!(names, ["chief 0", "ps 0", "ps 1", "worker 0", "worker 1"]);
    let mut ranks: Vec<u64> = specs
        .values()
        .map(|v| v["rank"].as_u64().unwrap())
        .collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2, 3, 4]);
    for (name, v) in &specs {
        assert_eq!(v["source"], "tf_config", "{name}");
        assert_eq!(v["world_size"], 5);
        let (role, index) = name.split_once(' ').unwrap();
        assert_eq!(v["role"], role);
        assert_eq!(v["index"].to_string(), index);
    }
    // Every process sees the same servers.
    let ps: Vec<&serde_json::Value> = specs.values().map(|v| &v["peers"]["ps"]).collect();
    assert!(ps.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn an_allreduce_job_gets_torchrun_variables_and_log_files() {
    let dir = std::env::temp_dir().join(format!("tandem-launch-logs-{}", std::process::id()));
    let specs = resolved(&["--nproc", "3", "--log-dir", dir.to_str().unwrap()]);
    for r in 0..3 {
        let v = &specs[&format!("worker {r}")];
        assert_eq!(v["source"], "torchrun");
        assert_eq!(v["rank"], r);
        assert_eq!(v["local_rank"], r);
    }
    let job = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for r in 0..3 {
        let log = std::fs::read_to_string(job.join(format!("worker-{r}.log"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&log).unwrap();
        assert_eq!(v["rank"], r, "the log file holds that rank's own output");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_worker_stops_the_job_with_its_exit_code() {
    let out = launch(&[
        "--nproc",
        "3",
        "--no-log-files",
        "--",
        "sh",
        "-c",
        "[ $RANK = 2 ] && exit 7; sleep 60",
    ]);
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("worker 2 (rank 2) exited with code 7; stopped 2 other processes"),
        "{err}"
    );
}

#[test]
fn on_failure_restarts_up_to_the_limit() {
    // Each start appends a line; worker 1 always fails, so it runs 1 + 2 times.
    let dir = std::env::temp_dir().join(format!("tandem-launch-restarts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "echo start >> {}/starts-$RANK; [ $RANK = 1 ] && exit 5; exit 0",
        dir.display()
    );
    let out = launch(&[
        "--nproc",
        "2",
        "--no-log-files",
        "--restart",
        "on-failure",
        "--max-restarts",
        "2",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(out.status.code(), Some(5));
    let starts = |r: usize| {
        std::fs::read_to_string(dir.join(format!("starts-{r}")))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!((starts(0), starts(1)), (1, 3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("after 2 restarts"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn alive(pid: i32) -> bool {
    // A zombie would still have a /proc entry; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false)
}

#[test]
fn ctrl_c_stops_every_child_and_grandchild() {
    let dir = std::env::temp_dir().join(format!("tandem-launch-int-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Each rank starts a grandchild in the background and records both pids.
    let script = format!(
        "sleep 300 & echo $$ $! > {}/pids-$RANK.tmp && mv {0}/pids-$RANK.tmp {0}/pids-$RANK; wait",
        dir.display()
    );
    let child = Command::new(TANDEM)
        .args([
            "launch",
            "--nproc",
            "2",
            "--no-log-files",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while (0..2).any(|r| !dir.join(format!("pids-{r}")).exists()) {
        assert!(Instant::now() < end, "the ranks never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids: Vec<i32> = (0..2)
        .flat_map(|r| {
            std::fs::read_to_string(dir.join(format!("pids-{r}")))
                .unwrap()
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect::<Vec<i32>>()
        })
        .collect();
    assert!(pids.iter().all(|&p| alive(p)));
    let launcher = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(launcher, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    for p in pids {
        assert!(!alive(p), "process {p} outlived the launcher");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_job_past_its_deadline_is_stopped() {
    let out = launch(&[
        "--nproc",
        "2",
        "--no-log-files",
        "--timeout",
        "1",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(out.status.code(), Some(124));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("deadline"), "{err}");
}

#[test]
fn gpus_auto_gives_each_rank_its_gpu_from_the_topology() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tandem-topology/fixtures/pairs4.txt"
    );
    let out = Command::new(TANDEM)
        .args([
            "launch",
            "--nproc",
            "2",
            "--no-log-files",
            "--",
            "sh",
            "-c",
            "echo gpu=$CUDA_VISIBLE_DEVICES",
        ])
        .env("TANDEM_TOPOLOGY_FILE", fixture)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut gpus: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once("gpu=").map(|x| x.1.to_string()))
        .collect();
    gpus.sort();
    // GPUs 0 and 2 (or 1 and 3) are the NVLink pairs of that machine.
    assert!(gpus == ["0", "2"] || gpus == ["1", "3"], "{gpus:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("over NV4"));
    let out = Command::new(TANDEM)
        .args([
            "launch",
            "--nproc",
            "2",
            "--gpus",
            "none",
            "--no-log-files",
            "--",
            "sh",
            "-c",
            "echo gpu=${CUDA_VISIBLE_DEVICES:-unset}",
        ])
        .env("TANDEM_TOPOLOGY_FILE", fixture)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("gpu=unset")
            .count(),
        2
    );
}

/// Every job gets a CA of its own and a certificate per process naming its identity (`rank-N`),
/// in `tls/` of its log folder (or a temporary folder removed when the job ends), with the CA's
/// key deleted once they are issued, unless the user's environment already names TLS files.
#[test]
fn every_launched_job_gets_its_own_certificates() {
    let show = r#"echo "TLS $TANDEM_TLS_DIR $(ls "$TANDEM_TLS_DIR" | tr '\n' ' ')""#;
    let dirs = |out: &std::process::Output| -> Vec<String> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once("TLS ").map(|(_, r)| r.to_string()))
            .collect()
    };
    let logs = std::env::temp_dir().join(format!("tandem-launch-tls-{}", std::process::id()));
    let out = launch(&[
        "--nproc",
        "2",
        "--log-dir",
        logs.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        show,
    ]);
    let mut seen = dirs(&out);
    seen.sort();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (rank, s) in seen.iter().enumerate() {
        assert!(
            s.contains(&format!("/tls/rank-{rank} ca.pem cert.pem key.pem")),
            "{seen:?}"
        );
    }
    let folder = |s: &str| std::path::PathBuf::from(s.split(' ').next().expect("dir"));
    let (a, b) = (folder(&seen[0]), folder(&seen[1]));
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("read");
    assert_eq!(
        read(a.join("ca.pem")),
        read(b.join("ca.pem")),
        "one CA per job"
    );
    assert_ne!(
        read(a.join("cert.pem")),
        read(b.join("cert.pem")),
        "a certificate each"
    );
    let root = a.parent().expect("tls/");
    assert!(
        !root.join("ca-key.pem").exists() && !seen[0].contains("ca-key"),
        "the CA's key is deleted once the certificates are issued"
    );
    let out = launch(&["--nproc", "1", "--no-log-files", "--", "sh", "-c", show]);
    let seen = dirs(&out);
    let temp = std::path::Path::new(seen[0].split(' ').next().expect("dir"));
    assert!(seen[0].contains("ca.pem cert.pem key.pem"), "{seen:?}");
    let root = temp.parent().expect("root");
    assert!(!root.exists(), "{} is removed with the job", root.display());
    // The user's own certificates are used as they are, by the processes and the launcher's
    // rendezvous alike; a folder that does not hold them stops the launch, naming the file.
    let mine = logs.join("mine");
    let made = Command::new(TANDEM)
        .args(["certs", "init", mine.to_str().expect("utf8")])
        .output()
        .expect("certs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let with_dir = |dir: &str| {
        Command::new(TANDEM)
            .args([
                "launch",
                "--nproc",
                "2",
                "--no-log-files",
                "--",
                "sh",
                "-c",
                "echo \"TLS $TANDEM_TLS_DIR\"",
            ])
            .env("TANDEM_TLS_DIR", dir)
            .output()
            .expect("run")
    };
    // The certificate's own folder (`tandem certs init` keeps the CA's key apart).
    let mine = mine.join("process").to_str().expect("utf8").to_string();
    assert_eq!(
        dirs(&with_dir(&mine)),
        vec![mine.clone(), mine.clone()],
        "the user's files are used"
    );
    let out = with_dir("/nonexistent-tls");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent-tls/ca.pem does not exist"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&logs);
}
