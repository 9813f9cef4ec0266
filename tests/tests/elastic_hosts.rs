//! Elastic training across simulated hosts (network namespaces, `tandem-testbed`): a member whose
//! host is cut off from the others is left behind; healed, it is fenced from the epoch it was in
//! (its operations in that epoch's group fail, naming what went wrong) and comes back only as a
//! newcomer of a newer epoch, at a commit, with the others' state. Every step is applied once, by
//! one membership, and every member ends with the parameters of a control computed from the
//! memberships the job went through. `TANDEM_TESTBED=off` skips it, loudly.

use std::process::{Child, Stdio};
use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem_testbed::Testbed;
use tandem_tests::elastic::{applied, control, result_weights};
use tandem_tests::{rank_env, stdout_lines, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(180);
const STEPS: u64 = 80;

fn spawn_on(bed: &Testbed, host: usize, args: &[&str], env: &[(String, String)]) -> Child {
    let mut cmd = bed.command(host, NODE, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {args:?} on host {host}: {e}"),
    }
}

fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    stdout_lines(child)
}

/// Waits for a line starting with `prefix`, keeping every line read in `kept`.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str, kept: &mut Vec<String>) {
    loop {
        match rx.recv_timeout(LIMIT) {
            Ok(l) => {
                let hit = l.starts_with(prefix);
                kept.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!(
                "no line starting with {prefix:?}; read:\n{}",
                kept.join("\n")
            ),
        }
    }
}

#[test]
fn a_partitioned_member_that_heals_is_fenced_and_rejoins_as_a_newcomer() {
    if let Some(why) = tandem_testbed::skip_reason() {
        eprintln!("\n*** {why} ***\n");
        return;
    }
    let bed = match Testbed::new(3, None) {
        Ok(b) => b,
        Err(e) => panic!("simulated hosts cannot be made here: {e}"),
    };
    let token = JobToken::generate();
    // The rendezvous outlives the members (as `tandem launch` or a Kubernetes service would host
    // it): on host 0, which stays connected.
    let mut base = tandem_tests::ps_env(token.as_str(), "tcp");
    base.extend(tandem_tests::transport_env());
    let mut rdv = spawn_on(
        &bed,
        0,
        &["rendezvous", "--bind", &format!("{}:29410", bed.addr(0))],
        &base,
    );
    let rdv_lines = lines_of(&mut rdv);
    let addr = rdv_lines
        .recv_timeout(LIMIT)
        .ok()
        .and_then(|l| l.strip_prefix("ADDR ").map(str::to_string))
        .expect("the rendezvous printed no address");
    let steps = STEPS.to_string();
    let mut members: Vec<Child> = (0..3)
        .map(|id| {
            let mut env = rank_env(id, 3, &addr, token.as_str());
            for (k, v) in [
                ("TANDEM_RENDEZVOUS_EXTERNAL", "1"),
                ("TANDEM_ELASTIC", "2:3"),
                ("TANDEM_ELASTIC_SETTLE", "1"),
                ("TANDEM_ELASTIC_ID", &id.to_string()),
                ("TANDEM_TIMEOUT", "4"),
                ("TANDEM_CONNECT_TIMEOUT", "20"),
                ("TANDEM_LOCAL_RANK", "0"),
                ("TANDEM_LOCAL_WORLD_SIZE", "1"),
            ] {
                env.retain(|(key, _)| key != k);
                env.push((k.into(), v.to_string()));
            }
            spawn_on(
                &bed,
                id,
                &[
                    "elastic",
                    "--steps",
                    &steps,
                    "--len",
                    "100",
                    "--pause-ms",
                    "60",
                ],
                &env,
            )
        })
        .collect();
    let watched = lines_of(&mut members[2]);
    let survivor = lines_of(&mut members[0]);
    let (mut seen2, mut seen0) = (Vec::new(), Vec::new());
    wait_line(&watched, "APPLIED 10 ", &mut seen2);
    bed.cut(2).expect("cut");
    // The others go on without it...
    wait_line(&survivor, "EPOCH 2 ", &mut seen0);
    wait_line(&survivor, "APPLIED ", &mut seen0);
    // ...and it comes back.
    bed.heal(2).expect("heal");
    let outs = wait_all(members, LIMIT);
    let _ = rdv.kill();
    let _ = rdv.wait();
    let mut texts: Vec<String> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    texts[0] = format!(
        "{}\n{}",
        seen0.join("\n"),
        survivor.iter().collect::<Vec<_>>().join("\n")
    );
    texts[2] = format!(
        "{}\n{}",
        seen2.join("\n"),
        watched.iter().collect::<Vec<_>>().join("\n")
    );
    for (i, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "member {i} failed: {}\n{}",
            texts[i],
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Every step once, by one membership.
    let applied = applied(&texts);
    assert_eq!(
        applied.keys().copied().collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>(),
        "every step applied once"
    );
    assert!(
        applied.values().any(|m| !m.contains(&2)),
        "the others never went on without the cut-off member: {applied:?}\n{}",
        texts[0]
    );
    assert!(
        applied.iter().any(|(s, m)| *s > 11 && m.contains(&2)),
        "the healed member never came back"
    );
    let want = control(&applied, 100);
    for (i, t) in texts.iter().enumerate() {
        let w = result_weights(t, &format!("member {i}"));
        assert_eq!(w, want, "member {i}'s parameters differ from the control");
    }
    // The healed member's step in the old epoch failed (fenced), and it rejoined a newer one.
    let err2 = String::from_utf8_lossy(&outs[2].stderr);
    assert!(
        err2.contains("the group changed; restoring the last commit and re-forming"),
        "{err2}"
    );
    let epochs: Vec<u64> = texts[2]
        .lines()
        .filter_map(|l| l.strip_prefix("EPOCH ")?.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        epochs.first() == Some(&1) && epochs.last().is_some_and(|e| *e >= 3),
        "member 2 must rejoin in an epoch after the one formed without it: {epochs:?}"
    );
}
