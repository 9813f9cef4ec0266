//! The Rust examples, run at small scale the way users run them: through the launcher, each
//! process a separate OS process on 127.0.0.1.

#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_launch::{JobSpec, Layout, LineSink, Planned};

/// `target/<profile>/examples/<name>`, next to this test's own binary in `deps/`.
fn example(name: &str) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let dir: PathBuf = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples");
    dir.join(name).to_string_lossy().into_owned()
}

/// Runs the job and returns (exit code, every stdout line as "role index: line").
fn run(layout: Layout, command: Vec<String>) -> (i32, Vec<String>) {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut spec = JobSpec::new(layout, command);
    let sink = lines.clone();
    spec.sink = Some(LineSink(Arc::new(
        move |p: &Planned, line: &str, stderr: bool| {
            let tag = if stderr { "stderr " } else { "" };
            sink.lock()
                .unwrap()
                .push(format!("{tag}{}: {line}", p.name()));
        },
    )));
    let outcome = tandem_launch::run(&spec, Some(Duration::from_secs(240)), &|| false).unwrap();
    let lines = lines.lock().unwrap().clone();
    (outcome.code, lines)
}

fn accuracy(lines: &[String], marker: &str) -> f64 {
    let line = lines
        .iter()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} line in {lines:#?}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("accuracy")
}

#[test]
fn sync_ps_trains_with_the_same_binary_on_servers_and_workers() {
    let ps = Layout::Ps {
        ps: 2,
        workers: 3,
        chief: false,
    };
    let (code, lines) = run(ps, vec![example("sync_ps"), "--steps".into(), "300".into()]);
    assert_eq!(code, 0, "{lines:#?}");
    assert!(accuracy(&lines, "sync PS:") >= 0.9, "{lines:#?}");
}

#[test]
fn async_ps_trains_with_a_staleness_bound() {
    let ps = Layout::Ps {
        ps: 2,
        workers: 3,
        chief: true,
    };
    let cmd = vec![
        example("async_ps"),
        "--steps".into(),
        "300".into(),
        "--staleness".into(),
        "1".into(),
    ];
    let (code, lines) = run(ps, cmd);
    assert_eq!(code, 0, "{lines:#?}");
    assert!(accuracy(&lines, "async PS") >= 0.9, "{lines:#?}");
}

#[test]
fn allreduce_data_parallel_trains() {
    let (code, lines) = run(
        Layout::Allreduce { nproc: 3 },
        vec![example("allreduce_data_parallel")],
    );
    assert_eq!(code, 0, "{lines:#?}");
    assert!(accuracy(&lines, "test accuracy:") >= 0.9, "{lines:#?}");
}

#[test]
fn elastic_data_parallel_trains_under_launch_elastic() {
    let mut spec = JobSpec::new(
        Layout::Allreduce { nproc: 3 },
        vec![
            example("elastic_data_parallel"),
            "--steps".into(),
            "600".into(),
        ],
    );
    spec.elastic = Some((2, 3));
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    spec.sink = Some(LineSink(Arc::new(move |p: &Planned, line: &str, _| {
        sink.lock().unwrap().push(format!("{}: {line}", p.name()));
    })));
    let outcome = tandem_launch::run(&spec, Some(Duration::from_secs(240)), &|| false).unwrap();
    let lines = lines.lock().unwrap().clone();
    assert_eq!(outcome.code, 0, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("epoch 1: 3 processes")),
        "{lines:#?}"
    );
    assert!(accuracy(&lines, "test accuracy:") >= 0.9, "{lines:#?}");
}

#[test]
fn pipeline_parallel_matches_the_single_process_run_bit_for_bit() {
    let cmd = vec![example("pipeline_parallel"), "--steps".into(), "300".into()];
    let (code, two) = run(Layout::Allreduce { nproc: 2 }, cmd.clone());
    assert_eq!(code, 0, "{two:#?}");
    let (code, one) = run(Layout::Allreduce { nproc: 1 }, cmd);
    assert_eq!(code, 0, "{one:#?}");
    // Strip the process names: the same numbers must come out of both runs.
    let text = |v: &[String]| {
        let mut t: Vec<String> = v
            .iter()
            .map(|l| l.split_once(": ").map(|x| x.1).unwrap_or(l).to_string())
            .map(|l| {
                l.replace("over 2 process(es)", "over N")
                    .replace("over 1 process(es)", "over N")
            })
            .map(|l| {
                l.replace("stage 1: layer 2", "stage L: layer 2")
                    .replace("stage 0: layer 2", "stage L: layer 2")
            })
            .collect();
        t.sort();
        t
    };
    assert_eq!(text(&two), text(&one));
    assert!(accuracy(&one, "test accuracy") >= 0.9, "{one:#?}");
}

/// Run outside any job (no token, no launcher), each example says what is wrong as a message on
/// stderr and exits 1, never with a debug dump of the error.
#[test]
fn examples_outside_a_job_print_the_error_message_and_exit_1() {
    for name in [
        "allreduce_data_parallel",
        "sync_ps",
        "async_ps",
        "pipeline_parallel",
        "elastic_data_parallel",
    ] {
        let out = std::process::Command::new(example(name))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TANDEM_WORLD_SIZE", "2")
            .env("TANDEM_RANK", "1")
            .env("TANDEM_RENDEZVOUS_ADDR", "127.0.0.1:9")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{name}: {stderr}");
        assert!(
            !stderr.contains(" {"),
            "{name} printed a debug form: {stderr}"
        );
    }
}

/// `mpirun -np 3` (Open MPI, one node) with nothing but the job token exported: rank 0 publishes
/// the rendezvous address in a file named after the MPI job id in the working directory, the
/// others read it there, the example trains, and the file is gone afterwards. `TANDEM_MPI=off`
/// skips it, loudly.
#[test]
fn mpirun_with_only_the_job_token_trains() {
    if std::env::var("TANDEM_MPI").as_deref() == Ok("off") {
        eprintln!("\n*** TANDEM_MPI=off: the mpirun test was SKIPPED ***\n");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tandem-mpirun-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = std::process::Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "3"])
        .args([
            "--mca",
            "btl",
            "self,tcp",
            "-x",
            "TANDEM_JOB_TOKEN",
            "-x",
            "PATH",
        ])
        .arg(example("allreduce_data_parallel"))
        .args(["--steps", "400"])
        .current_dir(&dir)
        .env("TANDEM_JOB_TOKEN", "mpirun-token-0123456789abcdef");
    mpirun_trains(cmd, &["TANDEM_JOB_TOKEN"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the `mpirun` command `cmd` with no variable of Tandem's but `keep` (the test's own
/// environment must not name a rendezvous) and checks that the job trained and that rank 0 left
/// nothing in the working directory `work`.
fn mpirun_trains(mut cmd: std::process::Command, keep: &[&str], work: &std::path::Path) {
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") && !keep.contains(&k.as_str()) || k.starts_with("MASTER_") {
            cmd.env_remove(k);
        }
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run mpirun ({e}): install Open MPI (Debian's openmpi-bin; scripts/test does) or set TANDEM_MPI=off"
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert!(accuracy(&lines, "test accuracy:") >= 0.9, "{stdout}");
    let left: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "rank 0 left {left:?} behind");
}

/// `mpirun` across two simulated hosts (network namespaces, `tandem-testbed`; mpirun in host 0's,
/// its daemons started on each host through the testbed's remote-shell script, one slot per host,
/// no oversubscription) with only the job token and the job's certificates exported: rank 0
/// binds the interface towards mpirun's host and publishes the rendezvous in the shared working
/// directory, rank 1 on the other host finds it there, both train over TLS, and the file is gone
/// afterwards. `TANDEM_MPI=off` or `TANDEM_TESTBED=off` skips it, loudly.
#[test]
fn mpirun_across_two_hosts_with_only_the_token_and_certificates_trains() {
    for var in ["TANDEM_MPI", "TANDEM_TESTBED"] {
        if std::env::var(var).as_deref() == Ok("off") {
            eprintln!("\n*** {var}=off: the mpirun test across hosts was SKIPPED ***\n");
            return;
        }
    }
    let bed = match tandem_testbed::Testbed::new(2, None) {
        Ok(b) => b,
        Err(e) => panic!(
            "cannot make simulated hosts: {e} (needs root and network namespaces; TANDEM_TESTBED=off skips)"
        ),
    };
    let dir = std::env::temp_dir().join(format!("tandem-mpirun-hosts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tls = dir.join("tls");
    let names = [bed.addr(0), bed.addr(1)];
    tandem_tls::init(&tls, None, "tandem-mpirun-hosts", &names, 1).unwrap();
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let agent = dir.join("agent");
    bed.write_rsh_agent(&agent).unwrap();
    let hosts = format!("{}:1,{}:1", bed.addr(0), bed.addr(1));
    let agent_path = agent.to_string_lossy().into_owned();
    let exe = example("allreduce_data_parallel");
    let mut cmd = bed.net_command(
        0,
        "mpirun",
        &[
            "--allow-run-as-root",
            "--mca",
            "plm_rsh_agent",
            &agent_path,
            "--host",
            &hosts,
            "-np",
            "2",
            "--mca",
            "btl",
            "self,tcp",
            "--mca",
            "btl_tcp_if_include",
            "10.77.0.0/24",
            "--mca",
            "oob_tcp_if_include",
            "10.77.0.0/24",
            "-x",
            "TANDEM_JOB_TOKEN",
            "-x",
            "TANDEM_TLS_DIR",
            "-x",
            "PATH",
            &exe,
            "--steps",
            "400",
        ],
    );
    cmd.current_dir(&work)
        .env("TANDEM_JOB_TOKEN", "mpirun-hosts-token-0123456789abcdef")
        .env("TANDEM_TLS_DIR", &tls);
    mpirun_trains(cmd, &["TANDEM_JOB_TOKEN", "TANDEM_TLS_DIR"], &work);
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
}
