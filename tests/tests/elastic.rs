//! Elastic training (tandem-elastic) with separate processes and a rendezvous that outlives them
//! (hosted here, as `tandem launch` would): a member killed with SIGKILL mid-training, the
//! survivors re-form and finish, every step applied exactly once, the final parameters equal to a
//! control computed from the memberships the job went through; a newcomer let in at a commit gets
//! the same state; fewer than MIN left is a clear error, not a hang.

use std::process::{Child, Output};
use std::time::Duration;

use tandem::rendezvous::{Host, JobToken, ServerConfig};
use tandem_tests::elastic::{applied, control, weights};
use tandem_tests::{rank_env, result_json, spawn, stdout_lines, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(180);

struct Job {
    rt: tokio::runtime::Runtime,
    host: Host,
    token: JobToken,
}

impl Job {
    fn new() -> Job {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let token = JobToken::generate();
        let host = rt
            .block_on(Host::bind(
                "127.0.0.1:0",
                ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
            ))
            .expect("rendezvous");
        Job { rt, host, token }
    }

    fn start(&self, id: usize, world: usize, bounds: &str, extra: &[(&str, &str)]) -> Child {
        self.start_with(id, world, bounds, extra, &[])
    }

    fn start_with(
        &self,
        id: usize,
        world: usize,
        bounds: &str,
        extra: &[(&str, &str)],
        args: &[&str],
    ) -> Child {
        let mut env = rank_env(
            id.min(world - 1),
            world,
            &self.host.addr().to_string(),
            self.token.as_str(),
        );
        for (k, v) in [
            ("TANDEM_RENDEZVOUS_EXTERNAL", "1"),
            ("TANDEM_ELASTIC", bounds),
            ("TANDEM_ELASTIC_SETTLE", "1"),
            ("TANDEM_TIMEOUT", "20"),
            ("TANDEM_CONNECT_TIMEOUT", "10"),
        ] {
            env.push((k.into(), v.into()));
        }
        env.push(("TANDEM_ELASTIC_ID".into(), id.to_string()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut all = vec!["elastic", "--steps", "40"];
        all.extend_from_slice(args);
        spawn(NODE, &all, &env)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = &self.rt;
    }
}

/// Reads `child`'s stdout in a thread: signals `ready` when a line starts with `prefix`, and
/// returns everything it read once the child closes it.
fn watch(
    child: &mut Child,
    prefix: &'static str,
) -> (
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<String>,
) {
    let lines = stdout_lines(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut all = String::new();
        for l in lines {
            if l.starts_with(prefix) {
                let _ = tx.send(());
            }
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    (rx, h)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn check_finished(outs: &[Output], who: &[usize]) {
    let texts: Vec<String> = outs.iter().map(text).collect();
    let steps = applied(&texts);
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "every step applied once"
    );
    let want = control(&steps, 1000);
    for &i in who {
        assert!(outs[i].status.success(), "process {i}: {}", texts[i]);
        let w = weights(&result_json(&outs[i]));
        assert_eq!(w, want, "process {i}'s parameters differ from the control");
    }
}

#[test]
fn a_killed_member_is_left_behind_and_training_finishes() {
    let job = Job::new();
    let mut procs: Vec<Child> = (0..4).map(|id| job.start(id, 4, "2:4", &[])).collect();
    // Kill process 2 once it has applied step 10.
    let (step10, seen) = watch(&mut procs[2], "APPLIED 10 ");
    step10
        .recv_timeout(LIMIT)
        .expect("process 2 never reached step 10");
    let _ = procs[2].kill();
    let mut outs = wait_all(procs, LIMIT);
    // The victim's steps count too (the survivors may have adopted its last one).
    outs[2].stdout = seen.join().expect("reader").into_bytes();
    check_finished(&outs, &[0, 1, 3]);
    // The survivors went on as three.
    for i in [0, 1, 3] {
        assert!(text(&outs[i]).contains("WORLD 3"), "{}", text(&outs[i]));
    }
}

#[test]
fn a_newcomer_joins_at_a_commit_with_the_same_state() {
    let job = Job::new();
    let mut procs: Vec<Child> = (0..3).map(|id| job.start(id, 3, "2:4", &[])).collect();
    let (step5, seen) = watch(&mut procs[0], "APPLIED 5 ");
    step5
        .recv_timeout(LIMIT)
        .expect("process 0 never reached step 5");
    procs.push(job.start(3, 4, "2:4", &[]));
    let mut outs = wait_all(procs, LIMIT);
    outs[0].stdout = seen.join().expect("reader").into_bytes();
    check_finished(&outs, &[0, 1, 2, 3]);
    assert!(text(&outs[3]).contains("WORLD 4"), "{}", text(&outs[3]));
}

/// A newcomer admitted to the group dies before its first step (in its reset, after the state
/// was broadcast to it): the others re-form without it and finish, every step applied once.
#[test]
fn a_joiner_killed_during_its_join_leaves_the_others_training() {
    let job = Job::new();
    let mut procs: Vec<Child> = (0..3).map(|id| job.start(id, 3, "2:4", &[])).collect();
    let (step5, seen) = watch(&mut procs[0], "APPLIED 5 ");
    step5
        .recv_timeout(LIMIT)
        .expect("process 0 never reached step 5");
    procs.push(job.start_with(3, 4, "2:4", &[], &["--die-in-reset", "3"]));
    let mut outs = wait_all(procs, LIMIT);
    outs[0].stdout = seen.join().expect("reader").into_bytes();
    let joiner = text(&outs[3]);
    assert_eq!(outs[3].status.code(), Some(87), "{joiner}");
    assert!(
        joiner.contains("WORLD 4"),
        "the joiner was never admitted: {joiner}"
    );
    assert!(!joiner.contains("APPLIED"), "{joiner}");
    check_finished(&outs[..3], &[0, 1, 2]);
    // The others were in the four-member epoch, then went on as three.
    for o in &outs[..3] {
        let t = text(o);
        let four = t.find("WORLD 4").unwrap_or_else(|| panic!("{t}"));
        assert!(t[four..].contains("WORLD 3"), "{t}");
    }
}

#[test]
fn fewer_than_min_members_is_a_clear_error() {
    let job = Job::new();
    let mut procs: Vec<Child> = (0..3)
        .map(|id| job.start(id, 3, "3:3", &[("TANDEM_ELASTIC_WAIT", "3")]))
        .collect();
    let (step3, _seen) = watch(&mut procs[1], "APPLIED 3 ");
    step3
        .recv_timeout(LIMIT)
        .expect("process 1 never reached step 3");
    let _ = procs[1].kill();
    let outs = wait_all(procs, LIMIT);
    for i in [0, 2] {
        let t = text(&outs[i]);
        assert!(!outs[i].status.success(), "{t}");
        assert!(
            t.contains("ERROR timeout") && t.contains("at least 3 needed"),
            "{t}"
        );
    }
}

/// `tandem launch --nproc 3 --elastic 2:3` (through the launcher's library): rank 1 crashes right
/// after applying step 8. Without restarts the job finishes with the two others and exits 0; with
/// `--restart on-failure` a replacement starts, joins at a commit, and all three end equal. Either
/// way every step is applied once and the parameters equal the control.
#[test]
fn the_launcher_keeps_an_elastic_job_going() {
    use std::sync::{Arc, Mutex};
    use tandem_launch::{JobSpec, Layout, LineSink, Restart};
    for restart in [Restart::Never, Restart::OnFailure { max: 1 }] {
        let lines: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let sink = lines.clone();
        let mut spec = JobSpec::new(
            Layout::Allreduce { nproc: 3 },
            [
                NODE, "elastic", "--steps", "40", "--die-at", "8", "--die-id", "1",
            ]
            .map(String::from)
            .to_vec(),
        );
        spec.elastic = Some((2, 3));
        spec.restart = restart;
        spec.env = vec![
            ("TANDEM_ELASTIC_SETTLE".into(), "1".into()),
            ("TANDEM_TIMEOUT".into(), "20".into()),
            ("TANDEM_CONNECT_TIMEOUT".into(), "10".into()),
        ];
        spec.env.extend(tandem_tests::transport_env());
        spec.sink = Some(LineSink(Arc::new(move |p, line, _| {
            if let Ok(mut l) = sink.lock() {
                l.push((p.rank, line.to_string()));
            }
        })));
        let out = tandem_launch::run(&spec, Some(LIMIT), &|| false).expect("launch");
        let lines = lines.lock().expect("lines").clone();
        let all: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        assert_eq!(out.code, 0, "{restart:?}: {}\n{all}", out.summary);
        let steps = applied(std::slice::from_ref(&all));
        assert_eq!(
            steps.keys().copied().collect::<Vec<_>>(),
            (1..=40).collect::<Vec<_>>(),
            "{restart:?}: every step applied once"
        );
        let want = control(&steps, 1000);
        let results: Vec<(usize, serde_json::Value)> = lines
            .iter()
            .filter_map(|(r, l)| {
                l.strip_prefix("RESULT ")
                    .map(|j| (*r, serde_json::from_str(j).expect("json")))
            })
            .collect();
        let finishers: Vec<usize> = results.iter().map(|(r, _)| *r).collect();
        match restart {
            Restart::Never => assert_eq!(finishers.len(), 2, "{all}"),
            Restart::OnFailure { .. } => {
                assert_eq!(finishers.len(), 3, "{all}");
                assert!(
                    out.summary.contains("all 3 processes succeeded"),
                    "{}",
                    out.summary
                );
            }
        }
        for (r, v) in results {
            let w = weights(&v);
            assert_eq!(
                w, want,
                "{restart:?}: rank {r}'s parameters differ from the control"
            );
        }
    }
}

/// SIGKILL one of four processes at a pseudo-random step, run after run (20 here;
/// `scripts/elastic-soak` runs 100 with `TANDEM_ELASTIC_RUNS`): every run finishes with the three
/// others, every step applied once, the parameters equal to the control. The seed of each run is
/// printed, so a failure can be replayed.
#[test]
fn random_kills_never_lose_or_repeat_a_step() {
    let runs: u64 = std::env::var("TANDEM_ELASTIC_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    for run in 0..runs {
        let seed = base
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(run);
        let victim = (seed % 4) as usize;
        let step = 2 + (seed / 4) % 30;
        eprintln!("run {run}: seed {seed}: killing process {victim} after step {step}");
        let job = Job::new();
        let mut procs: Vec<Child> = (0..4).map(|id| job.start(id, 4, "2:4", &[])).collect();
        let prefix: &'static str = Box::leak(format!("APPLIED {step} ").into_boxed_str());
        let (reached, seen) = watch(&mut procs[victim], prefix);
        if reached.recv_timeout(LIMIT).is_err() {
            for p in &mut procs {
                let _ = p.kill();
            }
            let outs = wait_all(procs, LIMIT);
            let report: Vec<String> = outs
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let err = String::from_utf8_lossy(&o.stderr);
                    let tail: Vec<&str> = err.lines().rev().take(30).collect();
                    format!("process {i}: {}\n{}", o.status, tail.join("\n"))
                })
                .collect();
            panic!(
                "run {run}: process {victim} never reached step {step}:\n{}",
                report.join("\n")
            );
        }
        let _ = procs[victim].kill();
        let mut outs = wait_all(procs, LIMIT);
        outs[victim].stdout = seen.join().expect("reader").into_bytes();
        let survivors: Vec<usize> = (0..4).filter(|i| *i != victim).collect();
        check_finished(&outs, &survivors);
    }
}
