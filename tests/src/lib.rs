//! Helpers shared by Tandem's multi-process integration tests: spawning the helper binary per rank
//! with a job's environment, and collecting what each rank reports, always under a deadline.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The environment of one rank of a local job (Tandem's own variables, so no other launcher interferes).
pub fn rank_env(rank: usize, world: usize, rendezvous: &str, token: &str) -> Vec<(String, String)> {
    vec![
        ("TANDEM_LAUNCHER".into(), "tandem".into()),
        ("TANDEM_RANK".into(), rank.to_string()),
        ("TANDEM_WORLD_SIZE".into(), world.to_string()),
        ("TANDEM_LOCAL_RANK".into(), rank.to_string()),
        ("TANDEM_LOCAL_WORLD_SIZE".into(), world.to_string()),
        ("TANDEM_RENDEZVOUS_ADDR".into(), rendezvous.into()),
        ("TANDEM_JOB_TOKEN".into(), token.into()),
    ]
}

/// Starts `exe args` with `env` added, stdout and stderr captured.
pub fn spawn(exe: &str, args: &[&str], env: &[(String, String)]) -> Child {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {exe}: {e}"),
    }
}

/// Waits for a child at most `timeout`, killing it after that; returns its output either way.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for a child failed: {e}"),
        }
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => panic!("waiting for a child failed: {e}"),
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// The JSON after `RESULT ` on a child's stdout.
pub fn result_json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT "));
    match line.map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => panic!(
            "no RESULT line (status {}):\nstdout:\n{text}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Takes a child's stdout and forwards its lines through a channel, so a test can wait for one line
/// with a deadline.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}
