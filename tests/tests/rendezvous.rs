//! The rendezvous across separate OS processes on 127.0.0.1, and its failure paths.

use std::collections::BTreeSet;
use std::time::Duration;

use tandem::Error;
use tandem::rendezvous::{Client, Host, JobToken, ServerConfig};
use tandem_tests::{rank_env, result_json, spawn, stdout_lines, wait_output};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Checks that every rank saw exactly the values the ranks reported as their own.
fn check_meeting(results: &[serde_json::Value], n: usize) {
    let own: Vec<String> = results
        .iter()
        .map(|r| r["mine"].as_str().expect("mine").to_string())
        .collect();
    let distinct: BTreeSet<&String> = own.iter().collect();
    assert_eq!(
        distinct.len(),
        n,
        "each rank publishes its own value: {own:?}"
    );
    for r in results {
        let seen: Vec<String> = r["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(seen, own, "rank {} saw other values", r["rank"]);
        assert_eq!(
            r["counter"].as_str(),
            Some((n * (n + 1) / 2).to_string().as_str())
        );
    }
}

#[test]
fn four_processes_meet_through_an_external_rendezvous() {
    let rt = runtime();
    let token = JobToken::generate();
    let host = rt
        .block_on(Host::bind(
            "127.0.0.1:0",
            ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
        ))
        .expect("bind");
    let addr = host.addr().to_string();
    let n = 4;
    let children: Vec<_> = (0..n)
        .map(|r| spawn(NODE, &["meet"], &rank_env(r, n, &addr, token.as_str())))
        .collect();
    let results: Vec<_> = children
        .into_iter()
        .map(|c| {
            let out = wait_output(c, LIMIT);
            assert!(
                out.status.success(),
                "rank failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            result_json(&out)
        })
        .collect();
    check_meeting(&results, n);
    rt.block_on(host.stop()).expect("stop");
}

#[test]
fn rank_zero_hosts_the_rendezvous_in_process() {
    let token = JobToken::generate();
    let n = 4;
    let mut first = spawn(
        NODE,
        &["meet", "--host"],
        &rank_env(0, n, "127.0.0.1:1", token.as_str()),
    );
    let lines = stdout_lines(&mut first);
    let addr = loop {
        let line = lines
            .recv_timeout(LIMIT)
            .expect("rank 0 printed no address");
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_string();
        }
    };
    let others: Vec<_> = (1..n)
        .map(|r| spawn(NODE, &["meet"], &rank_env(r, n, &addr, token.as_str())))
        .collect();
    let mut results: Vec<_> = others
        .into_iter()
        .map(|c| {
            let out = wait_output(c, LIMIT);
            assert!(
                out.status.success(),
                "rank failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            result_json(&out)
        })
        .collect();
    let out0 = wait_output(first, LIMIT);
    assert!(
        out0.status.success(),
        "rank 0 failed: {}",
        String::from_utf8_lossy(&out0.stderr)
    );
    let line0 = std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(5)).ok())
        .find_map(|l| l.strip_prefix("RESULT ").map(str::to_string))
        .expect("rank 0 result");
    results.insert(0, serde_json::from_str(&line0).expect("json"));
    check_meeting(&results, n);
}

#[test]
fn a_wrong_token_is_refused_and_touches_nothing() {
    let rt = runtime();
    let token = JobToken::generate();
    let host = rt
        .block_on(Host::bind(
            "127.0.0.1:0",
            ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
        ))
        .expect("bind");
    let addr = host.addr().to_string();

    // A separate process with the wrong token fails with an authentication error.
    let out = wait_output(
        spawn(NODE, &["meet"], &rank_env(0, 1, &addr, "not-the-job-token")),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ERROR authentication"), "{text}");

    rt.block_on(async {
        // Calls made with a wrong token do not reach the store: nothing was written by the stranger.
        let good = Client::connect_with(
            &addr,
            &token,
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        assert_eq!(good.get("value/0").await.expect("get"), None);
        let e = Client::connect_with(
            &addr,
            &JobToken::new("wrong-token-123").expect("token"),
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect_err("a wrong token must be refused");
        assert!(matches!(e, Error::Authentication { .. }), "{e}");
        host.stop().await.expect("stop");
    });
}

#[test]
fn a_wait_that_times_out_names_the_missing_keys() {
    let rt = runtime();
    rt.block_on(async {
        let token = JobToken::generate();
        let host = Host::bind(
            "127.0.0.1:0",
            ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
        )
        .await
        .expect("bind");
        let c = Client::connect_with(
            &host.addr().to_string(),
            &token,
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        c.set("here", "1").await.expect("set");
        let e = c
            .wait(&["here", "gone/1", "gone/2"], Duration::from_millis(300))
            .await
            .expect_err("must time out");
        let text = e.to_string();
        assert!(matches!(e, Error::Timeout { .. }), "{text}");
        assert!(
            text.contains("gone/1") && text.contains("gone/2") && !text.contains("here,"),
            "{text}"
        );
        let e = c
            .barrier("half", 2, 0, Duration::from_millis(300))
            .await
            .expect_err("alone at a barrier of 2");
        assert!(e.to_string().contains("members [1]"), "{e}");
        host.stop().await.expect("stop");
    });
}

#[test]
fn a_client_that_cannot_reach_the_server_fails_within_its_deadline() {
    let rt = runtime();
    rt.block_on(async {
        // A port nobody listens on: bind one, then close it.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let token = JobToken::generate();
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            Client::connect_with(
                &addr,
                &token,
                &tandem_tests::security(),
                Duration::from_millis(800),
            ),
        )
        .await
        .expect("connect must give up by itself");
        let e = r.expect_err("nothing listens there");
        let text = e.to_string();
        assert!(matches!(e, Error::Timeout { .. }), "{text}");
        assert!(text.contains(&addr), "{text}");
    });
}

#[test]
fn a_missing_peer_makes_the_others_time_out_naming_it() {
    let rt = runtime();
    let token = JobToken::generate();
    let host = rt
        .block_on(Host::bind(
            "127.0.0.1:0",
            ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
        ))
        .expect("bind");
    let addr = host.addr().to_string();
    let n = 3;
    // Rank 2 never starts.
    let children: Vec<_> = (0..2)
        .map(|r| {
            spawn(
                NODE,
                &["meet", "--timeout", "1"],
                &rank_env(r, n, &addr, token.as_str()),
            )
        })
        .collect();
    for c in children {
        let out = wait_output(c, LIMIT);
        assert_eq!(out.status.code(), Some(3));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("ERROR timeout") && text.contains("value/2"),
            "{text}"
        );
    }
    rt.block_on(host.stop()).expect("stop");
}
