//! Compressed parameter-server traffic across separate OS processes on 127.0.0.1, every byte
//! through the gRPC streams (`TANDEM_SAME_HOST=tcp`): bf16 pushes and pulls against f32 master
//! weights, top-k pushes with the error kept in the workers, each checked against a reference
//! computed here; a worker and servers that disagree on the setting; `auto` on one machine.

use std::process::{Child, Output};
use std::time::Duration;

use half::bf16;
use tandem::rendezvous::JobToken;
use tandem_tests::{linreg, ps_env, result_json, spawn, start_ps_server_env, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);

/// Servers and workers of one job, every process with `TANDEM_COMPRESSION` of its own.
struct Job {
    token: JobToken,
    servers: Vec<Child>,
    addrs: Vec<String>,
}

/// The environment of a process of the job: streams only, and `compression` when given.
fn env(token: &JobToken, compression: Option<&str>) -> Vec<(String, String)> {
    let mut e = ps_env(token.as_str(), "tcp");
    if let Some(c) = compression {
        e.push(("TANDEM_COMPRESSION".into(), c.into()));
    }
    e
}

impl Job {
    /// `servers` servers started with `compression`; each tensor whole on one server.
    fn start(servers: usize, compression: Option<&str>) -> Job {
        let token = JobToken::generate();
        let (mut children, mut addrs) = (Vec::new(), Vec::new());
        for _ in 0..servers {
            let (c, addr) = start_ps_server_env(NODE, &[], &env(&token, compression));
            children.push(c);
            addrs.push(addr);
        }
        Job {
            token,
            servers: children,
            addrs,
        }
    }

    /// `n` sync workers of `steps` steps, each with `compression`.
    fn workers(&self, n: usize, steps: usize, compression: Option<&str>) -> Vec<Output> {
        self.workers_with(n, steps, compression, &[])
    }

    /// As [`Job::workers`], each worker given `extra` arguments too.
    fn workers_with(
        &self,
        n: usize,
        steps: usize,
        compression: Option<&str>,
        extra: &[&str],
    ) -> Vec<Output> {
        let servers = self.addrs.join(",");
        let children: Vec<Child> = (0..n)
            .map(|w| {
                let args = [
                    "ps-worker",
                    "--servers",
                    &servers,
                    "--worker",
                    &w.to_string(),
                    "--workers",
                    &n.to_string(),
                    "--mode",
                    "sync",
                    "--steps",
                    &steps.to_string(),
                    "--lr",
                    "0.05",
                    // Each tensor one partition: top-k then selects over the whole tensor.
                    "--min-part",
                    "1048576",
                ]
                .map(str::to_string);
                let args: Vec<String> = args
                    .into_iter()
                    .chain(extra.iter().map(|a| a.to_string()))
                    .collect();
                spawn(NODE, &args, &env(&self.token, compression))
            })
            .collect();
        wait_all(children, LIMIT)
    }

    /// The servers exit by themselves once every worker is done; or are stopped.
    fn finish(self, stop: bool) {
        for mut c in self.servers {
            if stop {
                let _ = c.kill();
            }
            let _ = c.wait();
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

fn params(v: &serde_json::Value) -> Vec<f32> {
    let mut w: Vec<f32> = v["w"]
        .as_array()
        .expect("w")
        .iter()
        .map(|x| x.as_f64().expect("f") as f32)
        .collect();
    w.push(v["b"].as_f64().expect("b") as f32);
    w
}

/// Rounded to bf16 and back.
fn round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// bf16 pushes and pulls: every worker sees the same bf16 values, those of a reference in which
/// each gradient is computed on the rounded weights and rounded once before the servers average
/// it into f32 masters; the servers received two bytes per gradient element.
#[test]
fn bf16_pushes_and_pulls_train_like_a_reference_that_rounds_the_same() {
    let (workers, steps) = (4, 60);
    let job = Job::start(2, Some("bf16"));
    let outs = job.workers(workers, steps, Some("bf16"));
    let (want_w, want_b) = linreg::reference_sync_by(workers, steps, 0.05, round, |_, gw, gb| {
        gw.iter_mut().for_each(|g| *g = round(*g));
        *gb = round(*gb);
    });
    let want: Vec<f32> = want_w.into_iter().chain([want_b]).collect();
    let first = params(&ok(&outs[0]));
    for out in &outs {
        let v = ok(out);
        assert_eq!(v["compression"], "bf16", "{v}");
        let got = params(&v);
        assert_eq!(got, first, "workers see different parameters");
        for (g, w) in got.iter().zip(&want) {
            // Pulled through bf16: the value is one; the masters' sums may differ from the
            // reference's in order, which can move the last bf16 digit.
            assert_eq!(*g, round(*g), "{g} is not a bf16 value");
            assert!(
                (g - w).abs() <= w.abs() / 64.0 + 1e-3,
                "{g} vs the rounding reference {w}"
            );
        }
        let bytes_in = v["bytes_in"].as_u64().expect("bytes_in");
        let elements = (workers * steps * (linreg::DIM + 1)) as u64;
        assert_eq!(bytes_in, 2 * elements, "bytes received by the servers");
    }
    job.finish(false);
}

/// Top-k pushes (a quarter of the weights per push), the rest kept in each worker and added to
/// its next gradient: the same parameters as a reference that does the same per worker; the
/// single-element bias goes dense (its pair would be larger).
#[test]
fn top_k_pushes_keep_their_error_in_the_worker_and_match_the_reference() {
    let (workers, steps) = (3, 40);
    let job = Job::start(2, Some("topk:0.25"));
    let outs = job.workers(workers, steps, Some("topk:0.25"));
    let want = top_k_reference(workers, steps);
    for out in &outs {
        let v = ok(out);
        assert_eq!(v["compression"], "topk:0.25", "{v}");
        assert!(
            off_by(&params(&v), &want) <= 1e-5,
            "{v} vs the top-k reference {want:?}"
        );
        // 4 of 16 weights as 8-byte pairs, the bias as 4 bytes, per push.
        let bytes_in = v["bytes_in"].as_u64().expect("bytes_in");
        assert_eq!(bytes_in, (workers * steps * (4 * 8 + 4)) as u64);
    }
    job.finish(false);
}

/// The parameters of `workers` sync workers after `steps` top-k pushes (a quarter of each
/// tensor, the rest fed back), computed here.
fn top_k_reference(workers: usize, steps: usize) -> Vec<f32> {
    let mut residual_w = vec![Vec::new(); workers];
    let mut residual_b = vec![Vec::new(); workers];
    let (want_w, want_b) = linreg::reference_sync_by(
        workers,
        steps,
        0.05,
        |x| x,
        |i, gw, gb| {
            linreg::top_k_with_feedback(gw, &mut residual_w[i], 0.25);
            let mut b = [*gb];
            linreg::top_k_with_feedback(&mut b, &mut residual_b[i], 0.25);
            *gb = b[0];
        },
    );
    want_w.into_iter().chain([want_b]).collect()
}

/// The largest difference, relative to the reference's magnitude (at least 1).
fn off_by(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// A worker restarted mid-training (a new client) that restores its saved compression state
/// trains exactly as if it had not restarted; one that does not loses the residual and ends
/// elsewhere (so the state is what carries it).
#[test]
fn a_restarted_top_k_worker_keeps_its_residual_through_its_saved_state() {
    let (workers, steps) = (3, 40);
    let want = top_k_reference(workers, steps);
    for (restore, close) in [(true, true), (false, false)] {
        let job = Job::start(2, Some("topk:0.25"));
        let extra: &[&str] = if restore {
            &["--restart-at", "17"]
        } else {
            &["--restart-at", "17", "--no-restore"]
        };
        let outs = job.workers_with(workers, steps, Some("topk:0.25"), extra);
        for out in &outs {
            let v = ok(out);
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains("RESTARTED 17"), "{said}");
            let off = off_by(&params(&v), &want);
            assert_eq!(off <= 1e-5, close, "restore {restore}: off by {off}: {v}");
        }
        job.finish(false);
    }
}

/// A worker asking for another compression than the servers were started with fails at
/// connect, naming both; `auto` adopts the servers' setting.
#[test]
fn a_worker_and_servers_that_disagree_on_compression_fail_naming_both() {
    let job = Job::start(1, Some("bf16"));
    let outs = job.workers(1, 1, Some("none"));
    let text = String::from_utf8_lossy(&outs[0].stdout).into_owned()
        + &String::from_utf8_lossy(&outs[0].stderr);
    assert!(!outs[0].status.success(), "{text}");
    assert!(
        text.contains("declares compression none") && text.contains("started with bf16"),
        "{text}"
    );
    let outs = job.workers(1, 2, Some("auto"));
    assert_eq!(ok(&outs[0])["compression"], "bf16");
    job.finish(true);
}

/// `auto` everywhere on one machine: nothing to save on loopback, so full precision, and the
/// result is the uncompressed reference's.
#[test]
fn auto_on_one_machine_keeps_full_precision() {
    let (workers, steps) = (2, 20);
    let job = Job::start(1, Some("auto"));
    let outs = job.workers(workers, steps, Some("auto"));
    let (want_w, want_b) = linreg::reference_sync(workers, steps, 0.05);
    let want: Vec<f32> = want_w.into_iter().chain([want_b]).collect();
    for out in &outs {
        let v = ok(out);
        assert_eq!(v["compression"], "none", "{v}");
        for (g, w) in params(&v).iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
    job.finish(false);
}
