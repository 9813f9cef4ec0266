//! Collectives across separate OS processes on 127.0.0.1, checked against references computed here.

use std::process::Output;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tandem::collective::transport::frame::{HELLO_BAD_TOKEN, encode_hello, group_id};
use tandem::rendezvous::{Client, Host, JobToken, ServerConfig};
use tandem::{DType, ReduceOp};
use tandem_tests::check::{cases_of, check_case};
use tandem_tests::suite::cases;
use tandem_tests::{data, rank_env, spawn, stdout_lines, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

struct Job {
    rt: tokio::runtime::Runtime,
    host: Host,
    token: JobToken,
}

impl Job {
    fn new() -> Job {
        let rt = runtime();
        let token = JobToken::generate();
        let host = rt
            .block_on(Host::bind(
                "127.0.0.1:0",
                ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
            ))
            .expect("bind");
        Job { rt, host, token }
    }

    fn env(&self, rank: usize, world: usize, timeout_s: u64) -> Vec<(String, String)> {
        let mut env = rank_env(
            rank,
            world,
            &self.host.addr().to_string(),
            self.token.as_str(),
        );
        env.push(("TANDEM_RENDEZVOUS_EXTERNAL".into(), "1".into()));
        env.push(("TANDEM_SEGMENT_BYTES".into(), "4096".into()));
        env.push(("TANDEM_TIMEOUT".into(), timeout_s.to_string()));
        env.push(("TANDEM_CONNECT_TIMEOUT".into(), "60".into()));
        env
    }

    fn run(&self, world: usize, args: &[&str], timeout_s: u64) -> Vec<Output> {
        self.run_with(world, args, timeout_s, &[])
    }

    fn run_with(
        &self,
        world: usize,
        args: &[&str],
        timeout_s: u64,
        extra: &[(&str, &str)],
    ) -> Vec<Output> {
        let env = |r| {
            let mut e = self.env(r, world, timeout_s);
            e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            e
        };
        let children: Vec<_> = (0..world).map(|r| spawn(NODE, args, &env(r))).collect();
        wait_all(children, LIMIT)
    }
}

/// Runs the suite three times: with small allreduces in one hop (the default), with every allreduce
/// around the ring copying chunks by address, and around the ring with every byte on the sockets.
fn suite(world: usize) {
    suite_with(world, &[]);
    // Every ring operation, however small, copies by address where the machine allows.
    suite_with(
        world,
        &[
            ("TANDEM_DIRECT_BYTES", "0"),
            ("TANDEM_SAME_HOST_MIN_BYTES", "0"),
        ],
    );
    suite_with(
        world,
        &[("TANDEM_DIRECT_BYTES", "0"), ("TANDEM_SAME_HOST", "tcp")],
    );
}

fn suite_with(world: usize, extra: &[(&str, &str)]) {
    let job = Job::new();
    let outs = job.run_with(world, &["suite"], 60, extra);
    if outs.iter().any(|o| !o.status.success()) {
        let report: Vec<String> = outs
            .iter()
            .enumerate()
            .map(|(r, o)| {
                let err = String::from_utf8_lossy(&o.stderr);
                let tail: Vec<&str> = err.lines().rev().take(3).collect();
                format!(
                    "rank {r}: {}\n{}\n{}",
                    o.status,
                    lines_with(o, "ERROR").join("\n"),
                    tail.join("\n")
                )
            })
            .collect();
        panic!("the suite failed:\n{}", report.join("\n"));
    }
    let tcp_only = extra.contains(&("TANDEM_SAME_HOST", "tcp"));
    let want =
        u8::from(world > 1 && !tcp_only && tandem::collective::transport::peer_memory::available());
    // Every connection is carried as the run's transport says.
    let peers = world - 1;
    let links = if tandem_tests::local_on() {
        [peers, 0, 0]
    } else if tandem_tests::tls_on() {
        [0, peers, 0]
    } else {
        [0, 0, peers]
    };
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(
            lines_with(o, "SAMEHOST"),
            vec![format!("SAMEHOST {want}")],
            "rank {r} with {extra:?}"
        );
        assert_eq!(
            lines_with(o, "LINKS"),
            vec![format!("LINKS {} {} {}", links[0], links[1], links[2])],
            "rank {r} with {extra:?}"
        );
    }
    let results: Vec<_> = outs.iter().map(cases_of).collect();
    for case in cases(world) {
        check_case(&case, world, &results);
    }
}

#[test]
fn every_op_dtype_and_reduce_op_world_1() {
    suite(1);
}

#[test]
fn every_op_dtype_and_reduce_op_world_2() {
    suite(2);
}

#[test]
fn every_op_dtype_and_reduce_op_world_3() {
    suite(3);
}

#[test]
fn every_op_dtype_and_reduce_op_world_4() {
    suite(4);
}

#[test]
fn every_op_dtype_and_reduce_op_world_5() {
    suite(5);
}

/// Processes of one machine talk over local sockets whatever certificates they hold, and a rank
/// that turned them off (TANDEM_LOCAL_SOCKETS=0) is reached over TLS by the others, who still
/// use local sockets among themselves: every result exact either way.
#[test]
fn local_sockets_carry_a_group_of_one_machine_and_mix_with_tls() {
    // The job's rendezvous speaks the run's transport: TLS here (the plaintext run has no
    // certificates to mix with).
    if !tandem_tests::tls_on() {
        return;
    }
    let world = 3;
    for off in [None, Some(1)] {
        let job = Job::new();
        let children: Vec<_> = (0..world)
            .map(|r| {
                let mut env = job.env(r, world, 60);
                let on = if off == Some(r) { "0" } else { "1" };
                env.retain(|(k, _)| k != LOCAL);
                env.push((LOCAL.into(), on.into()));
                spawn(NODE, &["suite"], &env)
            })
            .collect();
        let outs = wait_all(children, LIMIT);
        for (r, o) in outs.iter().enumerate() {
            assert!(
                o.status.success(),
                "rank {r} ({off:?} off): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let want = match off {
                None => "LINKS 2 0 0",
                Some(x) if x == r => "LINKS 0 2 0",
                Some(_) => "LINKS 1 1 0",
            };
            assert_eq!(lines_with(o, "LINKS"), vec![want], "rank {r} ({off:?} off)");
        }
        let results: Vec<_> = outs.iter().map(cases_of).collect();
        for case in cases(world) {
            check_case(&case, world, &results);
        }
    }
}

#[test]
fn many_async_ops_in_flight_keep_their_order() {
    let world = 3;
    let job = Job::new();
    let results: Vec<_> = job
        .run(world, &["async"], 60)
        .iter()
        .map(cases_of)
        .collect();
    for id in 0..8usize {
        let inputs: Vec<Vec<f64>> = (0..world)
            .map(|r| {
                data::values(
                    1000 + id as u64,
                    r,
                    10_007 + id,
                    DType::F32,
                    Some(ReduceOp::Sum),
                )
            })
            .collect();
        let want = data::reference(DType::F32, ReduceOp::Sum, &inputs);
        for (r, res) in results.iter().enumerate() {
            assert_eq!(res.get(&id), Some(&want), "op {id} on rank {r}");
        }
    }
}

const STREAMS: &str = "TANDEM_STREAMS_PER_PEER";
const LOCAL: &str = tandem_tls::local::LOCAL_VAR;

/// Three streams per peer on the sockets: large allreduces and broadcasts are cut into parts,
/// each around its own ring of connections (uneven parts: the length is prime), every element
/// checked; and the whole suite with two, where only its largest allreduce is cut.
#[test]
fn several_streams_per_peer_carry_large_collectives_exactly() {
    let job = Job::new();
    let outs = job.run_with(
        3,
        &["big", "2500009"],
        60,
        // Over TCP: each stream's connections are counted by their TCP counters.
        &[(STREAMS, "3"), ("TANDEM_SAME_HOST", "tcp"), (LOCAL, "0")],
    );
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(
            lines_with(o, "BIG"),
            vec!["BIG 0 0 0".to_string()],
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Every part went around its own ring: a connection from the left neighbour per stream.
        assert_eq!(
            lines_with(o, "BUSY"),
            vec!["BUSY 3".to_string()],
            "rank {r}"
        );
    }
    suite_with(
        3,
        &[
            (STREAMS, "2"),
            ("TANDEM_DIRECT_BYTES", "0"),
            ("TANDEM_SAME_HOST", "tcp"),
        ],
    );
}

/// Ranks that disagree on the streams per peer fail while forming, each naming the setting and
/// the rank that differs, instead of waiting for connections that never come.
#[test]
fn ranks_with_different_streams_per_peer_name_the_setting() {
    let job = Job::new();
    let children: Vec<_> = (0..3)
        .map(|r| {
            let mut env = job.env(r, 3, 20);
            let streams = if r == 1 { "2" } else { "1" };
            env.push((STREAMS.into(), streams.into()));
            spawn(NODE, &["big", "1000"], &env)
        })
        .collect();
    for (r, o) in wait_all(children, LIMIT).iter().enumerate() {
        assert_eq!(o.status.code(), Some(3), "rank {r} must fail");
        let err = lines_with(o, "ERROR").join("\n");
        let other = if r == 1 { "rank 0" } else { "rank 1" };
        assert!(
            err.contains(STREAMS) && err.contains(other),
            "rank {r} must name {STREAMS} and {other}: {err}"
        );
    }
}

const CONGESTION: &str = "TANDEM_TCP_CONGESTION";

/// What the kernel lists in `/proc/sys/net/ipv4/<name>`.
fn kernel_list(name: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The congestion control the ring's busy connections use, as each rank reads it from its own
/// sockets: the one named; by default cubic wherever the kernel lets the process choose it (root,
/// or cubic allowed) and the system's otherwise; with `system`, the system's.
#[test]
fn connections_use_the_congestion_control_asked_for() {
    let system = kernel_list("tcp_congestion_control").join("");
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let has = |list: &str| kernel_list(list).iter().any(|n| n == "cubic");
    let default = if has("tcp_allowed_congestion_control")
        || (root && has("tcp_available_congestion_control"))
    {
        "cubic".to_string()
    } else {
        system.clone()
    };
    for (asked, want) in [
        (Some("reno"), "reno".to_string()),
        (None, default),
        (Some("system"), system.clone()),
    ] {
        let job = Job::new();
        let mut env = vec![(STREAMS, "2"), ("TANDEM_SAME_HOST", "tcp"), (LOCAL, "0")];
        env.extend(asked.map(|a| (CONGESTION, a)));
        let outs = job.run_with(3, &["big", "500009"], 60, &env);
        for (r, o) in outs.iter().enumerate() {
            assert_eq!(
                lines_with(o, "BIG"),
                vec!["BIG 0 0 0".to_string()],
                "rank {r}"
            );
            assert_eq!(
                lines_with(o, "BUSY"),
                vec!["BUSY 2".to_string()],
                "rank {r}"
            );
            assert_eq!(
                lines_with(o, "CONGESTION"),
                vec![format!("CONGESTION {want}")],
                "rank {r}, {CONGESTION}={asked:?}"
            );
        }
    }
}

/// A congestion control the kernel lacks, or a value that cannot be one, fails every rank before
/// it joins, naming the variable and the value.
#[test]
fn a_congestion_control_the_kernel_refuses_is_named() {
    for bad in ["nosuchcc", "not a name"] {
        let job = Job::new();
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut env = job.env(r, 2, 20);
                env.push((CONGESTION.into(), bad.into()));
                spawn(NODE, &["big", "1000"], &env)
            })
            .collect();
        for (r, o) in wait_all(children, LIMIT).iter().enumerate() {
            assert_eq!(o.status.code(), Some(3), "rank {r} must fail");
            let err = lines_with(o, "ERROR").join("\n");
            assert!(
                err.contains(CONGESTION) && err.contains(bad),
                "rank {r} must name {CONGESTION} and {bad:?}: {err}"
            );
        }
    }
}

fn lines_with(out: &Output, prefix: &str) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_killed_peer_is_named_by_every_survivor() {
    killed_peer(&["loop"]);
}

/// Same with 4 MiB allreduces around the ring, where ranks copy from each other's memory when the
/// machine allows it: the victim dies while its neighbours read its chunks or wait for it.
#[test]
fn a_peer_killed_during_large_ring_steps_is_named_by_every_survivor() {
    killed_peer(&["loop", "1048576"]);
}

/// Returns once `child` has finished three iterations of its loop (the group formed and works),
/// with the rest of its output: keep it, or the child's next line meets a closed pipe.
fn until_looping(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let lines = stdout_lines(child);
    loop {
        let line = lines
            .recv_timeout(LIMIT)
            .expect("the victim made no progress");
        if line == "ITER 3" {
            return lines;
        }
    }
}

/// Same with 4 MiB allreduces cut over two streams per peer (each half on its own connections
/// and thread): the survivors name the victim whichever stream saw it go.
#[test]
fn a_peer_killed_during_allreduces_over_several_streams_is_named_by_every_survivor() {
    killed_peer_with(
        &["loop", "1048576"],
        &[(STREAMS, "2"), ("TANDEM_SAME_HOST", "tcp")],
    );
}

fn killed_peer(args: &[&str]) {
    killed_peer_with(args, &[]);
}

fn killed_peer_with(args: &[&str], extra: &[(&str, &str)]) {
    let world = 4;
    let victim = 2;
    let job = Job::new();
    let env = |r| {
        let mut e = job.env(r, world, 20);
        e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        e
    };
    let mut children: Vec<_> = (0..world).map(|r| spawn(NODE, args, &env(r))).collect();
    let _lines = until_looping(&mut children[victim]);
    children[victim].kill().expect("kill");
    let _ = children[victim].wait();
    let outs = wait_all(children, LIMIT);
    for (r, out) in outs.into_iter().enumerate() {
        if r == victim {
            continue;
        }
        assert_eq!(out.status.code(), Some(3), "rank {r} should fail");
        let err = lines_with(&out, "ERROR").join("\n");
        assert!(
            err.contains(&format!("rank {victim}")),
            "rank {r} must name rank {victim}: {err}"
        );
        assert!(err.contains("op #"), "rank {r} must name the op: {err}");
        let after = lines_with(&out, "AFTER").join("\n");
        assert!(after.contains("no longer usable"), "rank {r}: {after}");
    }
}

/// The error every survivor raises when a rank stalls, once the group asked every rank what it is
/// doing: it must name `culprit`, say `how`, and name the operation.
fn assert_culprit(outs: &[Output], skip: &[usize], culprit: &str, how: &str) {
    for (r, out) in outs.iter().enumerate() {
        if skip.contains(&r) {
            continue;
        }
        assert_eq!(out.status.code(), Some(3), "rank {r} should fail");
        let err = lines_with(out, "ERROR").join("\n");
        assert!(
            err.starts_with("ERROR timeout") && err.contains(culprit) && err.contains(how),
            "rank {r} must name {culprit} ({how}): {err}"
        );
    }
}

/// A rank stopped (SIGSTOP, as a swapping or frozen process would be) answers nothing: every other
/// rank names it, whichever timed out first, instead of the neighbour each was waiting on.
#[test]
fn a_stopped_rank_is_named_by_every_survivor() {
    let world = 4;
    let victim = 2;
    let job = Job::new();
    let mut children: Vec<_> = (0..world)
        .map(|r| spawn(NODE, &["loop", "65536"], &job.env(r, world, 4)))
        .collect();
    let _lines = until_looping(&mut children[victim]);
    let pid = children[victim].id().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
    };
    assert!(signal("-STOP").success());
    let mut victim_child = children.remove(victim);
    let outs = wait_all(children, LIMIT);
    let _ = victim_child.kill();
    let _ = signal("-CONT");
    let _ = victim_child.wait();
    // Survivors are ranks 0, 1 and 3 (index 2 of `outs` is rank 3).
    assert_culprit(&outs, &[], "rank 2", "stopped answering");
    for out in &outs {
        let err = lines_with(out, "ERROR").join("\n");
        assert!(err.contains("op #"), "{err}");
    }
}

/// A rank busy in its own code past the deadline (a straggler beyond the timeout, or stuck) is
/// named as not having started the operation; its neighbours are not blamed.
#[test]
fn a_rank_outside_collectives_past_the_deadline_is_named() {
    let world = 4;
    let job = Job::new();
    let mut children: Vec<_> = (0..world)
        .map(|r| {
            spawn(
                NODE,
                &["stall", "--how", "user", "--culprit", "2"],
                &job.env(r, world, 3),
            )
        })
        .collect();
    let mut culprit = children.remove(2);
    let outs = wait_all(children, LIMIT);
    let _ = culprit.kill();
    let _ = culprit.wait();
    assert_culprit(&outs, &[], "rank 2", "has not started it");
}

/// Two ranks each blocked receiving from the other: the cycle is named, on both of them and on a
/// third rank waiting in a barrier behind them.
#[test]
fn two_ranks_receiving_from_each_other_are_named_as_a_cycle() {
    let job = Job::new();
    let outs = job.run(3, &["stall", "--how", "recv-cycle"], 3);
    assert_culprit(&outs, &[], "ranks 0 and 1", "wait on each other");
}

#[test]
fn mismatched_calls_name_both_sides_on_every_rank() {
    let world = 4;
    let job = Job::new();
    let outs = job.run(world, &["mismatch", "--odd", "2"], 20);
    for (r, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(3), "rank {r} should fail");
        let err = lines_with(out, "ERROR").join("\n");
        assert!(err.starts_with("ERROR mismatch"), "rank {r}: {err}");
        assert!(
            err.contains("broadcast(f32 x 10, root 0)")
                && err.contains("allreduce(f32 x 12, sum)")
                && err.contains("op #0"),
            "rank {r}: {err}"
        );
    }
}

#[test]
fn ranks_agree_on_whether_something_worked_everywhere() {
    let world = 3;
    for (fail, want) in [
        ("", vec!["AGREE ok"; 3]),
        (
            "2",
            vec![
                "AGREE rank 2: no luck on rank 2",
                "AGREE rank 2: no luck on rank 2",
                "AGREE no luck on rank 2",
            ],
        ),
        (
            "1,2",
            vec![
                "AGREE rank 1: no luck on rank 1",
                "AGREE no luck on rank 1",
                "AGREE rank 1: no luck on rank 1",
            ],
        ),
    ] {
        let outs = Job::new().run(world, &["agree", "--fail", fail], 20);
        for (r, out) in outs.iter().enumerate() {
            assert!(out.status.success(), "rank {r}: {out:?}");
            assert_eq!(
                lines_with(out, "AGREE"),
                [want[r]],
                "rank {r}, failing {fail:?}"
            );
            assert_eq!(lines_with(out, "AFTER"), ["AFTER 3"], "rank {r}");
        }
    }
}

#[test]
fn strangers_and_wrong_tokens_are_refused_by_the_mesh() {
    let world = 2;
    let job = Job::new();
    // Rank 1 starts alone and waits for rank 0's connection.
    let rank1 = spawn(NODE, &["async"], &job.env(1, world, 30));
    let addr = job.rt.block_on(async {
        let c = Client::connect_with(
            &job.host.addr().to_string(),
            &job.token,
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let v = c
            .wait(&["tandem/pg/default/addr/1"], Duration::from_secs(60))
            .await
            .expect("rank 1 address");
        // Rank 1 accepts once it knows every address; rank 0 will publish its real one later.
        c.set("tandem/pg/default/addr/0", "127.0.0.1:1")
            .await
            .expect("placeholder");
        // One stream per peer: no ports of other streams.
        c.set("tandem/pg/default/streams/0", "")
            .await
            .expect("placeholder");
        String::from_utf8_lossy(&v[0]).into_owned()
    });
    // A connection with the wrong token is refused with a reason code (inside TLS, when the run
    // has it: the token is a second factor there).
    let reply = job.rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let mut s = tandem_tls::stream::connect(&tandem_tests::security(), tcp, &addr, LIMIT)
            .await
            .expect("a TLS session with the job's certificate");
        s.write_all(&encode_hello(0, group_id("default"), "not-the-job-token"))
            .await
            .expect("hello");
        s.flush().await.expect("flush");
        let mut reply = [0u8; 1];
        s.read_exact(&mut reply).await.expect("a refusal");
        reply[0]
    });
    assert_eq!(reply, HELLO_BAD_TOKEN);
    if tandem_tests::tls_on() {
        // Plaintext, even with the right token, gets a TLS alert and nothing else.
        let mut s = std::net::TcpStream::connect(&addr).expect("connect to rank 1");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::io::Write::write_all(
            &mut s,
            &encode_hello(0, group_id("default"), job.token.as_str()),
        )
        .expect("hello");
        let mut reply = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut reply).expect("an alert");
        assert_eq!(reply[0], tandem_tls::stream::TLS_ALERT);
        // A certificate of another job's CA is refused in the handshake.
        let other = std::env::temp_dir().join(format!("tandem-other-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        tandem_tls::init(&other, None, "other", &["127.0.0.1".into()], 1).expect("other CA");
        let files = tandem_tls::TlsFiles {
            ca: other.join("ca.pem"),
            cert: other.join("cert.pem"),
            key: other.join("key.pem"),
        };
        let stranger =
            tandem_tls::Security::tls(tandem_tls::TlsContext::load(&files).expect("load"));
        let _ = std::fs::remove_dir_all(&other);
        let refused = job.rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            tandem_tls::stream::connect(&stranger, tcp, &addr, LIMIT).await
        });
        let e = refused.expect_err("another job's certificate");
        assert!(
            e.refused && e.reason.contains("not signed by this job's CA"),
            "{e:?}"
        );
    }
    // A stranger speaking another protocol is refused too.
    let mut s = std::net::TcpStream::connect(&addr).expect("connect to rank 1");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut reply = [0u8; 1];
    let n = std::io::Read::read(&mut s, &mut reply).unwrap_or(0);
    assert!(n == 0 || reply[0] != 1, "a stranger must not be admitted");
    // The real rank 0 is still admitted and the group works.
    let rank0 = spawn(NODE, &["async"], &job.env(0, world, 30));
    let results: Vec<_> = wait_all(vec![rank0, rank1], LIMIT)
        .iter()
        .map(cases_of)
        .collect();
    let inputs: Vec<Vec<f64>> = (0..world)
        .map(|r| data::values(1000, r, 10_007, DType::F32, Some(ReduceOp::Sum)))
        .collect();
    let want = data::reference(DType::F32, ReduceOp::Sum, &inputs);
    for res in &results {
        assert_eq!(res.get(&0), Some(&want));
    }
}

/// `world` ranks of which rank 1 is 10 ms late to each of 130 small allreduces; every rank succeeds.
fn straggle(world: usize) -> Vec<Output> {
    let outs = Job::new().run(world, &["straggle", "--slow", "1"], 60);
    for (r, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    outs
}

#[test]
fn a_consistently_late_rank_is_named_as_a_straggler_by_its_first_partner_in_recursive_doubling() {
    let outs = straggle(4);
    // Rank 0 swaps with rank 1 in the first round, so it sees rank 1 start late; rank 2 waits on rank
    // 0 in the second round only because rank 0 waited on rank 1, and must not blame it.
    let log0 = String::from_utf8_lossy(&outs[0].stderr);
    assert!(log0.contains("straggler: rank 1 started"), "{log0}");
    for r in [1, 2, 3] {
        let log = String::from_utf8_lossy(&outs[r].stderr);
        for innocent in [0, 2, 3] {
            assert!(
                !log.contains(&format!("straggler: rank {innocent} ")),
                "rank {r} blames rank {innocent}: {log}"
            );
        }
    }
}

#[test]
fn a_consistently_late_rank_is_named_as_a_straggler() {
    let outs = straggle(3);
    // Rank 2 reads rank 1's headers, so it sees rank 1 arrive late.
    let log = String::from_utf8_lossy(&outs[2].stderr);
    assert!(log.contains("straggler: rank 1 started"), "{log}");
    let log0 = String::from_utf8_lossy(&outs[0].stderr);
    assert!(
        !log0.contains("straggler: rank 2"),
        "rank 2 was on time: {log0}"
    );
}

/// A certificate that names a rank binds its holder to that rank: two ranks holding rank 0's
/// certificate cannot form a group; rank 0 finds that its peer's certificate is not rank 1's, and
/// says so. With each rank's own certificate the same group works.
#[test]
fn a_rank_cannot_use_another_ranks_certificate() {
    let base = std::env::temp_dir().join(format!("tandem-rank-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ca = base.join("ca");
    for r in 0..2 {
        let out = base.join(format!("rank-{r}"));
        tandem_tls::init_as(
            &ca,
            Some(&out),
            "job",
            &format!("rank-{r}"),
            &["127.0.0.1".into()],
            1,
        )
        .expect("certificate");
    }
    let run = |dirs: [&str; 2]| {
        // Rank 0 hosts the rendezvous, with its own certificate (one CA for the whole job).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let token = JobToken::generate();
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let mut env = rank_env(r, 2, &format!("127.0.0.1:{port}"), token.as_str());
                env.push(("TANDEM_CONNECT_TIMEOUT".into(), "5".into()));
                env.retain(|(k, _)| {
                    !k.starts_with("TANDEM_TLS") && k != "TANDEM_INSECURE" && k != LOCAL
                });
                env.push((
                    "TANDEM_TLS_DIR".into(),
                    base.join(dirs[r]).display().to_string(),
                ));
                spawn(NODE, &["async"], &env)
            })
            .collect();
        wait_all(ranks, LIMIT)
    };
    let outs = run(["rank-0", "rank-0"]);
    let said = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(!outs[0].status.success() && !outs[1].status.success());
    let s = said(&outs[0]);
    assert!(
        s.contains("ERROR authentication") && s.contains("rank 0's, not rank 1's"),
        "{s}"
    );
    let outs = run(["rank-0", "rank-1"]);
    for o in &outs {
        assert!(o.status.success(), "{}", said(o));
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Rank `r`'s gradient element `i` in the compression job (as the helper computes it).
fn compressed_value(r: usize, i: usize) -> f64 {
    f64::from((((i * 37 + r * 101) % 997) as f32 / 997.0 - 0.5) * (1.0 + (i % 7) as f32))
}

/// The sum of the entries of rank r's `acc` that a top-k of `k` keeps (largest magnitudes, ties
/// to the lower index), and what is left over.
fn top_k_reference(acc: &[f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut order: Vec<usize> = (0..acc.len()).collect();
    order.sort_by(|&a, &b| acc[b].abs().total_cmp(&acc[a].abs()).then(a.cmp(&b)));
    let mut kept = vec![0.0; acc.len()];
    let mut left = acc.to_vec();
    for &i in &order[..k] {
        kept[i] = acc[i];
        left[i] = 0.0;
    }
    (kept, left)
}

/// Gradient allreduces under fp16, bf16, top-k and PowerSGD across 3 processes: every rank ends
/// with the same values; half precision is within its rounding of the exact sum; top-k equals the
/// sum of every rank's largest quarter, and its second step adds what the first left over (error
/// feedback); PowerSGD of full rank reproduces the sum; bad calls are refused before sending.
#[test]
fn compressed_allreduces_agree_on_every_rank_and_match_their_references() {
    let (world, len, cols) = (3usize, 96usize, 8usize);
    let job = Job::new();
    let outs = job.run(
        world,
        &["compressed", &len.to_string(), &cols.to_string()],
        60,
    );
    let parse = |o: &Output| -> Vec<(String, Vec<f64>)> {
        lines_with(o, "COMPRESSED")
            .iter()
            .map(|l| {
                let mut it = l.splitn(4, ' ');
                let (_, name, step, json) = (it.next(), it.next(), it.next(), it.next());
                let key = format!("{} {}", name.unwrap_or(""), step.unwrap_or(""));
                (
                    key,
                    serde_json::from_str(json.unwrap_or("[]")).expect("values"),
                )
            })
            .collect()
    };
    let results: Vec<Vec<(String, Vec<f64>)>> = outs.iter().map(parse).collect();
    assert_eq!(
        results[0].len(),
        8,
        "{:?}",
        String::from_utf8_lossy(&outs[0].stdout)
    );
    for (r, res) in results.iter().enumerate().skip(1) {
        assert_eq!(res, &results[0], "rank {r} differs from rank 0");
    }
    let got = |key: &str| -> &Vec<f64> {
        &results[0]
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key}"))
            .1
    };
    let exact: Vec<f64> = (0..len)
        .map(|i| (0..world).map(|r| compressed_value(r, i)).sum())
        .collect();
    let magnitude: Vec<f64> = (0..len)
        .map(|i| (0..world).map(|r| compressed_value(r, i).abs()).sum())
        .collect();
    // Half precision: each input and each hop's sum rounded once (2^-11 for fp16, 2^-8 for bf16).
    for (key, unit, scale) in [
        ("fp16/Sum 0", 2f64.powi(-11), 1.0),
        ("bf16/Sum 0", 2f64.powi(-8), 1.0),
        ("bf16/Avg 0", 2f64.powi(-8), world as f64),
    ] {
        for i in 0..len {
            let want = exact[i] / scale;
            let tol = 2.0 * world as f64 * unit * magnitude[i] / scale;
            assert!(
                (got(key)[i] - want).abs() <= tol,
                "{key} [{i}]: {} vs {want}",
                got(key)[i]
            );
        }
    }
    // Top-k: a quarter of 96 is 24 per rank; the second step's input is the gradient again plus
    // what the first step left over.
    let k = 24;
    let mut first = vec![0.0; len];
    let mut second = vec![0.0; len];
    for r in 0..world {
        let g: Vec<f64> = (0..len).map(|i| compressed_value(r, i)).collect();
        let (kept, left) = top_k_reference(&g, k);
        let acc: Vec<f64> = g.iter().zip(&left).map(|(a, b)| a + b).collect();
        let (kept2, _) = top_k_reference(&acc, k);
        for i in 0..len {
            first[i] += kept[i];
            second[i] += kept2[i];
        }
    }
    for (key, want) in [("topk:0.25/Sum 0", &first), ("topk:0.25/Sum 1", &second)] {
        for (i, (g, w)) in got(key).iter().zip(want.iter()).enumerate() {
            assert!((g - w).abs() <= 1e-5, "{key} [{i}]: {g} vs {w}");
        }
    }
    // PowerSGD of rank `cols` keeps the whole matrix: the exact sum, up to f32 arithmetic.
    let full = format!("powersgd:{cols}/Sum 0");
    for i in 0..len {
        assert!(
            (got(&full)[i] - exact[i]).abs() <= 1e-3 * magnitude[i].max(1.0),
            "{full} [{i}]"
        );
    }
    // Rank 2 of a 12 × 8 matrix is an approximation, the same on every rank (checked above), and
    // error feedback makes the two steps differ.
    assert_ne!(got("powersgd:2/Avg 0"), got("powersgd:2/Avg 1"));
    for o in &outs {
        let refused = lines_with(o, "REFUSED");
        assert!(
            refused
                .iter()
                .any(|l| l.starts_with("REFUSED max") && l.contains("topk")),
            "{refused:?}"
        );
        assert!(
            refused
                .iter()
                .any(|l| l.starts_with("REFUSED length") && l.contains("96 elements, not 97")),
            "{refused:?}"
        );
    }
}

/// A bf16 allreduce large enough to go in pieces (two pieces and an uneven rest), the casts
/// pipelined with the ring: every element within bf16's bound of the exact sum (a piece out of
/// place would be far off), and the same bits on every rank.
#[test]
fn a_large_bf16_allreduce_in_pieces_is_within_its_bound_and_identical_on_every_rank() {
    use tandem::collective::compression::HALF_PIECE;
    let world = 3usize;
    let len = 2 * HALF_PIECE + 12_345;
    let job = Job::new();
    let outs = job.run_with(world, &["halfbig", &len.to_string()], 120, &[]);
    let said: Vec<Vec<String>> = outs.iter().map(|o| lines_with(o, "HALFBIG ")).collect();
    for (r, lines) in said.iter().enumerate() {
        assert_eq!(lines.len(), 1, "rank {r}: {:?}", outs[r]);
        let worst: f64 = lines[0]
            .split(' ')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("worst");
        assert!(worst <= 1.0, "rank {r}: an element is {worst} bounds off");
        assert_eq!(lines[0], said[0][0], "rank {r} differs from rank 0");
    }
}

/// `auto` compression on one machine: nothing is measured (no link to save time on), every rank
/// chooses none, and `auto` allreduces, small and large, are the exact sums (of values bf16
/// cannot hold).
#[test]
fn auto_compression_on_one_machine_chooses_none_without_measuring() {
    let world = 3usize;
    let lens = [1000usize, 65536];
    let job = Job::new();
    let outs = job.run_with(
        world,
        &["auto", &lens[0].to_string(), &lens[1].to_string()],
        60,
        &[("TANDEM_COMPRESSION", "auto")],
    );
    for (r, o) in outs.iter().enumerate() {
        let said = lines_with(o, "AUTO ");
        assert_eq!(said, ["AUTO none - -"], "rank {r}: {:?}", o);
        let sums = lines_with(o, "AUTOSUM ");
        assert_eq!(sums.len(), lens.len(), "rank {r}: {o:?}");
        for (line, len) in sums.iter().zip(lens) {
            let json = line
                .strip_prefix(&format!("AUTOSUM {len} "))
                .unwrap_or_else(|| panic!("rank {r}: {line}"));
            // Printed as f32 (shortest form), so read as f32; the sums are exact in f32.
            let got: Vec<f32> = serde_json::from_str(json).expect("sums");
            let want: Vec<f32> = (0..len)
                .map(|i| {
                    (0..world)
                        .map(|q| (q + 1) as f64 + (i % 4) as f64 / 1024.0)
                        .sum::<f64>() as f32
                })
                .collect();
            assert_eq!(got, want, "rank {r}, {len} values");
        }
    }
}
