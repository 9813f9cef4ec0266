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
fn demo_trains_to_a_stated_accuracy_with_identical_replicas() {
    let out = tandem(
        &["demo", "--nproc", "3", "--steps", "600", "--timeout", "120"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("replicas identical: yes"), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("] allreduce"))
        .expect("result row");
    let acc: f64 = row
        .split_whitespace()
        .nth(5)
        .and_then(|v| v.parse().ok())
        .expect("accuracy column");
    assert!(acc >= 0.9, "test accuracy {acc} below 0.9:\n{text}");
}

#[test]
fn demo_rejects_bad_sizes() {
    let out = tandem(&["demo", "--nproc", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nproc"));
}
