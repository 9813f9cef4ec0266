//! `tandem ps` across simulated hosts (see `tandem-testbed`), in the states only a network can
//! produce: its workers cut off (no RST, no FIN), so their connections never close. It must still
//! stop on SIGTERM (Kubernetes and Slurm stop jobs that way), and with `--worker-timeout` stop by
//! itself naming the silent workers. `TANDEM_TESTBED=off` skips these, loudly.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tandem_testbed::Testbed;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const TOKEN: &str = "hosts-test-token-0123456789";

fn testbed(hosts: usize) -> Option<Testbed> {
    if let Some(why) = tandem_testbed::skip_reason() {
        eprintln!("\n*** {why} ***\n");
        return None;
    }
    match Testbed::new(hosts, None) {
        Ok(bed) => Some(bed),
        Err(e) => panic!("simulated hosts cannot be made here: {e}"),
    }
}

/// The job's certificates, made by `tandem certs init` as a user would (every connection between
/// hosts is mutual TLS); the folder to give as `TANDEM_TLS_DIR`.
fn certs(bed: &Testbed) -> std::path::PathBuf {
    static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hosts-tls-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(TANDEM)
        .args(["certs", "init"])
        .arg(&dir)
        .args(["--name", &bed.addr(0).to_string()])
        .output()
        .expect("tandem certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The certificate's folder, apart from the CA's key.
    dir.join("process")
}

/// `tandem ps` on host 0 with `extra` flags, and two workers training on hosts 1 and 2 for far
/// longer than the test; returns the server once both workers are past their first steps.
fn job(bed: &Testbed, extra: &[&str]) -> (Child, Vec<Child>) {
    let bind = format!("{}:29600", bed.addr(0));
    let mut args = vec!["ps", "--bind", &bind, "--index", "0", "--log-every", "1"];
    args.extend_from_slice(extra);
    let tls = certs(bed);
    let mut server = bed.command(0, TANDEM, &args);
    server
        .env("TANDEM_JOB_TOKEN", TOKEN)
        .env("TANDEM_TLS_DIR", &tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut server = server.spawn().expect("tandem ps");
    let workers = (0..2)
        .map(|w| {
            let mut c = bed.command(
                w + 1,
                TANDEM,
                &[
                    "bench-ps-worker",
                    &format!("--servers={bind}"),
                    &format!("--worker={w}"),
                    "--workers=2",
                    "--params=1000",
                    "--steps=100000000",
                    "--sync",
                ],
            );
            c.env("TANDEM_JOB_TOKEN", TOKEN)
                .env("TANDEM_TLS_DIR", &tls)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c.spawn().expect("worker")
        })
        .collect();
    // The server logs its version every second: wait until steps are being applied.
    let out = server.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("the server never reported applied steps");
        if line.contains("version ") && !line.contains("version 0,") {
            break;
        }
    }
    std::thread::spawn(move || for _ in rx {});
    (server, workers)
}

/// Waits for `child` at most `limit`; its exit status and stderr, or `None` if it was still
/// running (then it is killed).
fn exit_within(mut child: Child, limit: Duration) -> Option<(std::process::ExitStatus, String)> {
    let err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = err {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some((status, reader.join().unwrap_or_default()));
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(children: Vec<Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn sigterm_stops_a_server_whose_workers_are_cut_off() {
    let Some(bed) = testbed(3) else {
        return;
    };
    let (server, workers) = job(&bed, &[]);
    bed.cut(1).expect("cut");
    bed.cut(2).expect("cut");
    let pid = Testbed::pid_of(&server).expect("the server's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    // Within its drain deadline (2 s) and slack for a loaded machine; before the fix it waited
    // for connections that can never close (HTTP/2 keepalive notices a dead peer after 40 s).
    let exited = exit_within(server, Duration::from_secs(15));
    stop(workers);
    let (status, stderr) = exited.expect("tandem ps did not stop on SIGTERM");
    assert!(
        status.success(),
        "a stop asked for is not a failure: {status} {stderr}"
    );
}

#[test]
fn a_server_whose_workers_all_go_silent_stops_naming_them() {
    let Some(bed) = testbed(3) else {
        return;
    };
    let (server, workers) = job(&bed, &["--worker-timeout", "3"]);
    bed.cut(1).expect("cut");
    bed.cut(2).expect("cut");
    let exited = exit_within(server, Duration::from_secs(40));
    stop(workers);
    let (status, stderr) = exited.expect("tandem ps kept waiting for silent workers");
    assert!(!status.success(), "silent workers are a failure: {stderr}");
    assert!(
        stderr.contains("worker 0") && stderr.contains("worker 1") && stderr.contains("silent"),
        "the error names the silent workers: {stderr}"
    );
}
