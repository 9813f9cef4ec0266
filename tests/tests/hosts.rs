//! What crosses machines, on simulated hosts (network namespaces on one machine, see
//! `tandem-testbed`): collectives across 2-4 hosts with 1 and 2 ranks per host checked against
//! references, the parameter server across hosts, a rank whose link is cut, and a server stopped
//! while its workers are cut off. `TANDEM_TESTBED=off` skips them, loudly.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tandem::rendezvous::JobToken;
use tandem::{DType, ReduceOp};
use tandem_testbed::Testbed;
use tandem_tests::check::{cases_of, check_case};
use tandem_tests::suite::cases;
use tandem_tests::{rank_env, stdout_lines, wait_all, wait_output};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);
const RENDEZVOUS_PORT: u16 = 29400;

/// The test bed, or `None` (after saying so loudly) with `TANDEM_TESTBED=off`.
fn testbed(hosts: usize, link: Option<&str>) -> Option<Testbed> {
    if let Some(why) = tandem_testbed::skip_reason() {
        eprintln!("\n*** {why} ***\n");
        return None;
    }
    match Testbed::new(hosts, link) {
        Ok(bed) => Some(bed),
        Err(e) => panic!("simulated hosts cannot be made here: {e}"),
    }
}

/// Starts `args` of the test node as rank `rank` of `world` on host `rank / per_host`, rank 0
/// hosting the rendezvous at its host's address.
fn spawn_rank(
    bed: &Testbed,
    token: &JobToken,
    rank: usize,
    world: usize,
    per_host: usize,
    args: &[&str],
    extra: &[(&str, &str)],
) -> Child {
    let rendezvous = format!("{}:{RENDEZVOUS_PORT}", bed.addr(0));
    let mut env = rank_env(rank, world, &rendezvous, token.as_str());
    env.retain(|(k, _)| !k.starts_with("TANDEM_LOCAL"));
    env.push(("TANDEM_LOCAL_RANK".into(), (rank % per_host).to_string()));
    env.push(("TANDEM_LOCAL_WORLD_SIZE".into(), per_host.to_string()));
    env.push(("TANDEM_CONNECT_TIMEOUT".into(), "60".into()));
    // A transport named in `extra` replaces this run's.
    if extra
        .iter()
        .any(|(k, _)| k.starts_with("TANDEM_TLS") || *k == "TANDEM_INSECURE")
    {
        env.retain(|(k, _)| !k.starts_with("TANDEM_TLS") && k != "TANDEM_INSECURE");
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut cmd = bed.command(rank / per_host, NODE, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start rank {rank}: {e}"),
    }
}

/// The whole collective suite on `hosts` hosts with `per_host` ranks each, every result checked
/// against the reference; ranks on different hosts cannot read each other's memory.
fn suite_across(hosts: usize, per_host: usize) {
    suite_across_with(hosts, per_host, &[]);
}

fn suite_across_with(hosts: usize, per_host: usize, extra: &[(&str, &str)]) {
    let Some(bed) = testbed(hosts, None) else {
        return;
    };
    let token = JobToken::generate();
    let world = hosts * per_host;
    let children: Vec<Child> = (0..world)
        .map(|r| {
            spawn_rank(
                &bed,
                &token,
                r,
                world,
                per_host,
                &["suite"],
                &[
                    &[("TANDEM_TIMEOUT", "60"), ("TANDEM_SEGMENT_BYTES", "4096")],
                    extra,
                ]
                .concat(),
            )
        })
        .collect();
    let outs = wait_all(children, LIMIT);
    let results: Vec<_> = outs.iter().map(cases_of).collect();
    for (r, o) in outs.iter().enumerate() {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.lines().any(|l| l == "SAMEHOST 0"),
            "rank {r}: ranks on different hosts must not copy by address: {text}"
        );
    }
    for case in cases(world) {
        check_case(&case, world, &results);
    }
}

#[test]
fn collectives_across_two_hosts() {
    suite_across(2, 1);
}

#[test]
fn collectives_across_four_hosts() {
    suite_across(4, 1);
}

/// Allreduces beyond one hop go hierarchical here (within hosts, across, within), the rest flat.
#[test]
fn collectives_across_two_hosts_with_two_ranks_each() {
    suite_across(2, 2);
}

/// The same layout with the flat ring only, and with every allreduce (however small) around a
/// ring, so both allreduce paths across hosts are checked at every size.
#[test]
fn collectives_across_two_hosts_with_two_ranks_each_flat_and_ring_only() {
    suite_across_with(2, 2, &[("TANDEM_HIERARCHICAL", "off")]);
    suite_across_with(2, 2, &[("TANDEM_DIRECT_BYTES", "0")]);
}

/// A buffer cut into several pieces of the hierarchical pipeline (uneven ones: the length is
/// prime), every element checked, hierarchical and flat, over one stream per peer and over
/// several (each part of the buffer around its own ring of connections).
#[test]
fn large_allreduces_across_two_hosts_of_two_ranks_are_exact() {
    for (mode, streams) in [("auto", "1"), ("off", "1"), ("auto", "3"), ("off", "2")] {
        big_across(2, 2, &[("TANDEM_HIERARCHICAL", mode), (STREAMS, streams)]);
    }
}

/// Four hosts of one rank, three streams per peer: large allreduces (f32 sum, f64 average) and a
/// broadcast, cut into three parts of uneven length, every element checked.
#[test]
fn large_collectives_across_four_hosts_over_several_streams_are_exact() {
    big_across(4, 1, &[(STREAMS, "3")]);
}

const STREAMS: &str = "TANDEM_STREAMS_PER_PEER";

/// `big 2500009` on `hosts` hosts of `per_host` ranks with `extra`: every rank must find every
/// element of its results right.
fn big_across(hosts: usize, per_host: usize, extra: &[(&str, &str)]) {
    let Some(bed) = testbed(hosts, None) else {
        return;
    };
    let token = JobToken::generate();
    let world = hosts * per_host;
    let env = [&[("TANDEM_TIMEOUT", "60")], extra].concat();
    let children: Vec<Child> = (0..world)
        .map(|r| spawn_rank(&bed, &token, r, world, per_host, &["big", "2500009"], &env))
        .collect();
    for (r, o) in wait_all(children, LIMIT).iter().enumerate() {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.lines().any(|l| l == "BIG 0 0 0"),
            "rank {r} ({extra:?}): {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Host 2's link is cut (no RST, no FIN) while 4 ranks allreduce in a loop: every survivor fails
/// within its deadline (plus the time to learn of the abort) instead of hanging.
#[test]
fn a_rank_whose_link_is_cut_makes_every_survivor_fail_within_its_deadline() {
    cut_rank(&["loop", "65536"], &[]);
}

/// The same with 1 MiB allreduces over two streams per peer, each half of the buffer on its own
/// connections and thread: the survivors still name the rank cut off, none hangs.
#[test]
fn a_rank_cut_off_during_allreduces_over_several_streams_is_named() {
    cut_rank(&["loop", "262144"], &[(STREAMS, "2")]);
}

fn cut_rank(args: &[&str], extra: &[(&str, &str)]) {
    let Some(bed) = testbed(4, None) else {
        return;
    };
    let token = JobToken::generate();
    let timeout_s = 5u64;
    let timeout = timeout_s.to_string();
    let env = [&[("TANDEM_TIMEOUT", timeout.as_str())], extra].concat();
    let mut children: Vec<Child> = (0..4)
        .map(|r| spawn_rank(&bed, &token, r, 4, 1, args, &env))
        .collect();
    // Wait until rank 0 is looping (the group formed), then cut host 2.
    let lines = stdout_lines(&mut children[0]);
    let deadline = Instant::now() + LIMIT;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("rank 0 never started its loop");
        if line.starts_with("ITER 5") {
            break;
        }
    }
    // The rest of rank 0's output, for the checks below.
    let rank0_rest = std::thread::spawn(move || lines.into_iter().collect::<Vec<String>>());
    let cut_at = Instant::now();
    bed.cut(2).expect("cut");
    let rank3 = children.pop().expect("rank 3");
    let rank2 = children.pop().expect("rank 2");
    children.push(rank3);
    let survivors: Vec<Child> = std::mem::replace(&mut children, vec![rank2]);
    let outs = wait_all(survivors, Duration::from_secs(timeout_s * 4 + 20));
    let waited = cut_at.elapsed();
    // A figure for BENCHMARKS.md (scripts/culprit-times measures the other cases), not a check.
    eprintln!("every survivor failed {waited:?} after the cut (TANDEM_TIMEOUT={timeout_s})");
    let rank0_text = rank0_rest.join().unwrap_or_default().join("\n");
    for (o, r) in outs.iter().zip([0usize, 1, 3]) {
        let text = if r == 0 {
            rank0_text.clone()
        } else {
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        assert_eq!(o.status.code(), Some(3), "rank {r} must fail: {text}");
        // Whoever timed out first, every survivor names the rank that was cut off, with its
        // address, not the neighbour it was waiting on.
        let err = text
            .lines()
            .find(|l| l.starts_with("ERROR "))
            .unwrap_or_else(|| panic!("rank {r}: {text}"));
        assert!(
            err.contains(&format!("rank 2 ({}:", bed.addr(2))) && err.contains("stopped answering"),
            "rank {r} must name rank 2: {err}"
        );
    }
    // A bound far above the deadline: what is checked is that nobody hangs.
    assert!(
        waited < Duration::from_secs(timeout_s * 4 + 20),
        "survivors took {waited:?}"
    );
    // Healed, the cut-off rank does not carry on as if nothing happened: it fails too (its
    // operation timed out, or it learns of the abort), and its group refuses further calls.
    bed.heal(2).expect("heal");
    let cut_off = children.pop().expect("rank 2");
    let out = wait_output(cut_off, Duration::from_secs(timeout_s * 4 + 20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "rank 2 must fail after the heal: {text}"
    );
    let after = text
        .lines()
        .find_map(|l| l.strip_prefix("AFTER "))
        .unwrap_or_default();
    assert!(
        after.contains("no longer usable"),
        "the group stays poisoned: {text}"
    );
}

/// `auto` compression across two hosts joined by a 100 Mbit/s link: the ranks measure the link
/// when the group forms, agree on the slowest rank's times and choose bf16 (its probe takes about
/// half as long there). A gradient at the latency path's limit (its bytes times `world − 1` equal
/// to `TANDEM_DIRECT_BYTES`, 64 KiB) is still sent whole (the exact sum of values bf16 cannot
/// hold); one value more goes in bf16 (rounded, within bf16's precision).
#[test]
fn auto_compression_across_a_slow_link_chooses_bf16_on_every_rank() {
    auto_across_a_slow_link(2);
}

/// The same on three hosts, where the latency path's limit is half as many values (64 KiB over
/// two peers).
#[test]
fn auto_compression_on_three_hosts_keeps_the_latency_path_whole() {
    auto_across_a_slow_link(3);
}

fn auto_across_a_slow_link(world: usize) {
    let Some(bed) = testbed(world, Some("100mbit")) else {
        return;
    };
    let token = JobToken::generate();
    let small = (64 << 10) / 4 / (world - 1);
    let large = small + 1;
    let children: Vec<Child> = (0..world)
        .map(|r| {
            let extra = [("TANDEM_TIMEOUT", "60"), ("TANDEM_COMPRESSION", "auto")];
            spawn_rank(
                &bed,
                &token,
                r,
                world,
                1,
                &["auto", &small.to_string(), &large.to_string()],
                &extra,
            )
        })
        .collect();
    let outs = wait_all(children, LIMIT);
    let said: Vec<Vec<String>> = outs
        .iter()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("AUTO"))
                .map(str::to_string)
                .collect()
        })
        .collect();
    // The sums are exact in f32; printed as f32 (shortest form), so read as f32.
    let want = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| {
                (0..world)
                    .map(|q| (q + 1) as f64 + (i % 4) as f64 / 1024.0)
                    .sum::<f64>() as f32
            })
            .collect()
    };
    let sums = |line: &str, len: usize| -> Vec<f32> {
        let json = line
            .strip_prefix(&format!("AUTOSUM {len} "))
            .unwrap_or_else(|| panic!("{line}"));
        serde_json::from_str(json).expect("sums")
    };
    for (r, lines) in said.iter().enumerate() {
        assert_eq!(lines.len(), 3, "rank {r}: {lines:?} {:?}", outs[r]);
        assert!(lines[0].starts_with("AUTO bf16 "), "rank {r}: {lines:?}");
        // The agreed times: the same on every rank.
        assert_eq!(lines[0], said[0][0], "rank {r} disagrees");
        assert_eq!(
            sums(&lines[1], small),
            want(small),
            "rank {r}: latency-bound, exact"
        );
        let (got, exact) = (sums(&lines[2], large), want(large));
        assert_ne!(got, exact, "rank {r}: {large} values went uncompressed");
        for (g, e) in got.iter().zip(&exact) {
            assert!(
                (g - e).abs() <= e.abs() * 2f32.powi(-7),
                "rank {r}: {g} vs {e}"
            );
        }
        assert_eq!(
            lines[2], said[0][2],
            "rank {r}: results differ between ranks"
        );
    }
}

/// A parameter server on host 0, two workers on hosts 1 and 2, sync SGD over the gRPC streams (no
/// same-host copies across hosts; pushes applied as the server reads them): the result is the
/// single-process reference's.
#[test]
fn the_parameter_server_trains_across_hosts() {
    ps_across_hosts("sync");
}

/// The same in async mode, where each push is applied at once as it arrives: training converges to
/// the true weights. Stale gradients slow it by an amount that depends on how the workers'
/// steps interleave, so the steps leave room for that: 150 per worker came within 0.108 of the
/// weights once under load (the bound is 0.1); 300 come within 0.0015 in
/// runs here.
#[test]
fn the_parameter_server_trains_across_hosts_asynchronously() {
    ps_across_hosts("async");
}

/// A parameter server on host 0 (the test node's `ps-server`, with `vars` and this run's
/// transport) and the address it printed.
fn ps_server_on_host_0(bed: &Testbed, vars: &[(&str, &str)]) -> (Child, String) {
    let bind = format!("{}:29600", bed.addr(0));
    let mut server = bed.command(0, NODE, &["ps-server", "--bind", &bind]);
    server
        .envs(vars.iter().copied())
        .envs(tandem_tests::transport_env());
    server.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut server = server.spawn().expect("server");
    let lines = stdout_lines(&mut server);
    let addr = loop {
        let line = lines
            .recv_timeout(LIMIT)
            .expect("server printed no address");
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (server, addr)
}

/// `auto` on a parameter server and its worker across a 100 Mbit/s link: the server takes each
/// worker's own choice, the worker measures its link when it connects (a stats round trip and
/// whole pulls of a 4 MiB model) and chooses bf16; a step through bf16 of values bf16 holds
/// exactly is exact.
#[test]
fn a_ps_worker_on_auto_across_a_slow_link_chooses_bf16() {
    let Some(bed) = testbed(2, Some("100mbit")) else {
        return;
    };
    let token = JobToken::generate();
    let vars = [
        ("TANDEM_JOB_TOKEN", token.as_str()),
        ("TANDEM_COMPRESSION", "auto"),
    ];
    let (mut server, addr) = ps_server_on_host_0(&bed, &vars);
    let mut worker = bed.command(
        1,
        NODE,
        &["ps-big", "--servers", &addr, "--elems", "1048576"],
    );
    worker.envs(vars).envs(tandem_tests::transport_env());
    worker.stdout(Stdio::piped()).stderr(Stdio::piped());
    let outs = wait_all(vec![worker.spawn().expect("worker")], LIMIT);
    let _ = server.kill();
    let _ = server.wait();
    let v = tandem_tests::result_json(&outs[0]);
    assert_eq!(v["compression"], "bf16", "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
}

fn ps_across_hosts(mode: &str) {
    let Some(bed) = testbed(3, None) else {
        return;
    };
    let token = JobToken::generate();
    let env = |c: &mut std::process::Command| {
        c.env("TANDEM_JOB_TOKEN", token.as_str())
            .envs(tandem_tests::transport_env());
    };
    let (server, addr) = ps_server_on_host_0(&bed, &[("TANDEM_JOB_TOKEN", token.as_str())]);
    let workers: Vec<Child> = (0..2)
        .map(|w| {
            let mut c = bed.command(
                w + 1,
                NODE,
                &[
                    "ps-worker",
                    "--servers",
                    &addr,
                    "--worker",
                    &w.to_string(),
                    "--workers",
                    "2",
                    "--mode",
                    mode,
                    "--steps",
                    if mode == "sync" { "40" } else { "300" },
                    "--lr",
                    if mode == "sync" { "0.05" } else { "0.03" },
                ],
            );
            env(&mut c);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().expect("worker")
        })
        .collect();
    let outs = wait_all(workers, LIMIT);
    let (want_w, want_b) = tandem_tests::linreg::reference_sync(2, 40, 0.05);
    for (w, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "worker {w}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let v = tandem_tests::result_json(o);
        assert_eq!(
            v["same_host"], false,
            "across hosts only the streams can carry tensors"
        );
        let got_w: Vec<f64> = v["w"]
            .as_array()
            .expect("w")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect();
        let got_b = v["b"].as_f64().expect("b");
        if mode == "async" {
            // Async steps interleave as they happen: no fixed reference, but the true weights.
            let (wt, bt) = tandem_tests::linreg::truth();
            let far = got_w
                .iter()
                .zip(&wt)
                .map(|(a, b)| (a - f64::from(*b)).abs())
                .fold((got_b - f64::from(bt)).abs(), f64::max);
            assert!(
                far < 0.1,
                "worker {w}: async SGD did not converge: {got_w:?} {got_b}"
            );
            continue;
        }
        for (got, want) in got_w.iter().zip(&want_w).chain([(&got_b, &want_b)]) {
            let want = f64::from(*want);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "worker {w}: {got} vs reference {want}"
            );
        }
    }
    let out = wait_output(server, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The parameter server's host is cut off while two workers train: both fail within their deadline
/// naming the server they cannot reach, instead of waiting forever.
#[test]
fn workers_cut_off_from_their_server_fail_naming_it() {
    let Some(bed) = testbed(3, None) else {
        return;
    };
    let token = JobToken::generate();
    let bind = format!("{}:29600", bed.addr(0));
    let mut server = bed.command(0, NODE, &["ps-server", "--bind", &bind]);
    server
        .env("TANDEM_JOB_TOKEN", token.as_str())
        .envs(tandem_tests::transport_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = server.spawn().expect("server");
    let mut workers: Vec<Child> = (0..2)
        .map(|w| {
            let mut c = bed.command(
                w + 1,
                NODE,
                &[
                    "ps-worker",
                    "--servers",
                    &bind,
                    "--worker",
                    &w.to_string(),
                    "--workers",
                    "2",
                    "--mode",
                    "sync",
                    "--steps",
                    "100000000",
                    "--timeout",
                    "5",
                ],
            );
            c.env("TANDEM_JOB_TOKEN", token.as_str())
                .envs(tandem_tests::transport_env())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().expect("worker")
        })
        .collect();
    // Training is under way once worker 0 reports steps.
    let lines = stdout_lines(&mut workers[0]);
    let end = Instant::now() + LIMIT;
    loop {
        let line = lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("worker 0 never trained");
        if line.starts_with("STEP ") {
            break;
        }
    }
    let rest = std::thread::spawn(move || lines.into_iter().collect::<Vec<String>>());
    bed.cut(0).expect("cut");
    // The client's deadline is 5 s (a push may wait 10 s more for its answer): generous bound.
    let outs = wait_all(workers, Duration::from_secs(60));
    let _ = server.kill();
    let _ = server.wait();
    let texts = [
        rest.join().unwrap_or_default().join("\n"),
        String::from_utf8_lossy(&outs[1].stdout).into_owned(),
    ];
    for (w, (o, text)) in outs.iter().zip(&texts).enumerate() {
        assert_eq!(o.status.code(), Some(3), "worker {w} must fail: {text}");
        let error = text
            .lines()
            .find(|l| l.starts_with("ERROR "))
            .unwrap_or_default();
        assert!(
            error.contains(&bind),
            "worker {w}'s error names the server {bind}: {text}"
        );
    }
}

/// What an eavesdropper on the switch saw of one job: an allreduce across the two hosts and a
/// parameter-server step loop between them.
struct Seen {
    token: bool,
    tensor: bool,
    bytes: usize,
}

fn eavesdrop(bed: &Testbed, transport: &[(&str, &str)]) -> Seen {
    let token = JobToken::generate();
    let capture = bed.capture().expect("capturing the switch");
    let ranks: Vec<Child> = (0..2)
        .map(|r| spawn_rank(bed, &token, r, 2, 1, &["async"], transport))
        .collect();
    for (r, o) in wait_all(ranks, LIMIT).iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} with {transport:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let bind = format!("{}:29601", bed.addr(0));
    let mut server = bed.command(0, NODE, &["ps-server", "--bind", &bind]);
    let mut worker = bed.command(1, NODE, &tandem_tests::sync_worker_args(&bind, 5));
    for c in [&mut server, &mut worker] {
        c.env("TANDEM_JOB_TOKEN", token.as_str())
            .envs(transport.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let server = server.spawn().expect("server");
    let worker = worker.spawn().expect("worker");
    for o in wait_all(vec![worker, server], LIMIT) {
        assert!(
            o.status.success(),
            "PS with {transport:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let wire = capture.finish().expect("the capture");
    // Windows of 8 values of each rank's first allreduce input (what the "async" mode sends):
    // a ring or a one-hop exchange puts some of them on the wire as they are.
    let tensor = (0..2).any(|rank| {
        let mine = tandem_tests::data::values(1000, rank, 10_007, DType::F32, Some(ReduceOp::Sum));
        let bytes = tandem_tests::data::to_bytes(DType::F32, &mine);
        bytes
            .chunks(64 * 4)
            .any(|c| tandem_testbed::contains(&wire, &c[..c.len().min(32)]))
    });
    Seen {
        token: tandem_testbed::contains(&wire, token.as_str().as_bytes()),
        tensor,
        bytes: wire.len(),
    }
}

/// Nothing of a job's secrets or data crosses the network readably: a capture on the switch of an
/// allreduce and a parameter-server job under TLS holds neither the job token nor any window of a
/// known input tensor. The control, the same jobs in plaintext (`TANDEM_INSECURE=1`), shows both,
/// so the capture would have seen them.
#[test]
fn a_capture_of_the_wire_shows_neither_the_token_nor_tensors() {
    let Some(bed) = testbed(2, None) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("tandem-capture-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    tandem::tls::init(&dir, None, "capture", &[bed.addr(0), bed.addr(1)], 1).expect("certs");
    let dir_s = dir.display().to_string();
    let secure = eavesdrop(&bed, &[("TANDEM_TLS_DIR", &dir_s)]);
    let clear = eavesdrop(&bed, &[("TANDEM_INSECURE", "1")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        clear.token && clear.tensor,
        "the control: a plaintext job's capture shows its token and tensors"
    );
    assert!(
        secure.bytes > 100_000,
        "the TLS job's traffic was captured: {} bytes",
        secure.bytes
    );
    assert!(!secure.token, "the job token crossed the network readably");
    assert!(!secure.tensor, "a tensor crossed the network readably");
}

/// The TCP sockets listening in host `i`'s network namespace, as (address in hex, port) from
/// `/proc/net/tcp` and `/proc/net/tcp6` read inside it.
fn listening(bed: &Testbed, i: usize) -> Vec<(String, u16)> {
    let out = bed
        .net_command(i, "cat", &["/proc/net/tcp", "/proc/net/tcp6"])
        .output()
        .expect("reading /proc/net/tcp");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local_address rem_address st ...; 0A is LISTEN.
            let (addr, port) = f.get(1)?.split_once(':')?;
            (f.get(3) == Some(&"0A"))
                .then(|| (addr.to_string(), u16::from_str_radix(port, 16).unwrap_or(0)))
        })
        .collect()
}

/// A running job listens only on the addresses it advertises: its rendezvous, ring listeners and
/// parameter server, on two hosts, are bound to the hosts' own addresses, never 0.0.0.0 or ::.
/// (Ranks 0 and 1 of a group of 3 whose rank 2 never comes keep their ring listeners open.)
#[test]
fn nothing_listens_on_every_interface() {
    let Some(bed) = testbed(2, None) else {
        return;
    };
    let token = JobToken::generate();
    let mut children: Vec<Child> = (0..2)
        .map(|r| spawn_rank(&bed, &token, r, 3, 1, &["loop"], &[]))
        .collect();
    let bind = format!("{}:29602", bed.addr(0));
    let mut server = bed.command(0, NODE, &["ps-server", "--bind", &bind]);
    server
        .env("TANDEM_JOB_TOKEN", token.as_str())
        .envs(tandem_tests::transport_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    children.push(server.spawn().expect("server"));
    // Host 0: the rendezvous, rank 0's ring listener and the server; host 1: rank 1's listener.
    let end = Instant::now() + LIMIT;
    let (mut host0, mut host1) = (Vec::new(), Vec::new());
    while Instant::now() < end && (host0.len() < 3 || host1.is_empty()) {
        std::thread::sleep(Duration::from_millis(50));
        host0 = listening(&bed, 0);
        host1 = listening(&bed, 1);
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(host0.len() >= 3 && !host1.is_empty(), "{host0:?} {host1:?}");
    let every = |a: &str| a.chars().all(|c| c == '0');
    for (host, socks) in [(0, &host0), (1, &host1)] {
        for (addr, port) in socks {
            assert!(
                !every(addr),
                "host {host} listens on every interface at port {port}"
            );
        }
    }
}
