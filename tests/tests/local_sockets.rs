//! Processes of one machine talk over local sockets (Unix domain, the kernel vouching for the
//! user) instead of TLS over loopback, on every connection type: a parameter server, the
//! rendezvous and the ring. Shown with separate processes the one way that cannot be faked: a
//! process without certificates reaches TLS servers of its machine (possible only over the local
//! socket), is refused by the same servers once local sockets are off (so the local path is what
//! let it in), and is still refused with a wrong job token.

use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem_tests::{spawn, stdout_lines, wait_output};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);
const LOCAL: &str = tandem_tls::local::LOCAL_VAR;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A TLS parameter server (local sockets on) trains a worker that holds no certificate over its
/// local socket; the same worker with local sockets off, or with another token, is refused.
#[test]
fn a_worker_without_certificates_reaches_its_machines_server_over_the_local_socket() {
    let token = JobToken::generate();
    let mut env = vec![("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string())];
    env.extend(tandem_tests::tls_env());
    env.retain(|(k, _)| k != LOCAL);
    env.push((LOCAL.into(), "1".into()));
    let mut server = spawn(NODE, &["ps-server"], &env);
    let lines = stdout_lines(&mut server);
    let addr = loop {
        let line = lines.recv_timeout(LIMIT).expect("server address");
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_string();
        }
    };
    let worker = |token: &str, local: &str| {
        // No certificates: plaintext towards loopback only, unless the local socket carries it.
        let env = vec![
            ("TANDEM_JOB_TOKEN".to_string(), token.to_string()),
            (LOCAL.to_string(), local.to_string()),
            ("TANDEM_TLS_DIR".to_string(), String::new()),
        ];
        let mut args = tandem_tests::sync_worker_args(&addr, 3);
        args.extend(["--timeout".into(), "10".into()]);
        wait_output(spawn(NODE, &args, &env), LIMIT)
    };
    let local = worker(token.as_str(), "1");
    assert!(local.status.success(), "{}", text(&local));
    let tcp = worker(token.as_str(), "0");
    assert!(!tcp.status.success(), "{}", text(&tcp));
    let t = text(&tcp);
    assert!(t.contains("no TLS certificates"), "{t}");
    let stranger = worker("not-this-jobs-token-at-all", "1");
    assert!(!stranger.status.success(), "{}", text(&stranger));
    let s = text(&stranger);
    assert!(s.contains("token"), "{s}");
    let _ = server.kill();
    let _ = server.wait();
}

/// A ring whose ranks hold no certificates forms through a TLS rendezvous and trains, every
/// connection local; with local sockets off the same ranks cannot reach the rendezvous.
#[test]
fn ranks_without_certificates_form_through_a_tls_rendezvous_over_local_sockets() {
    let token = JobToken::generate();
    // The rendezvous runs in its own process, with the job's certificates.
    let mut env = vec![("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string())];
    env.extend(tandem_tests::tls_env());
    env.retain(|(k, _)| k != LOCAL);
    env.push((LOCAL.into(), "1".into()));
    let mut host = spawn(NODE, &["rendezvous"], &env);
    let lines = stdout_lines(&mut host);
    let addr = loop {
        let line = lines.recv_timeout(LIMIT).expect("rendezvous address");
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_string();
        }
    };
    let ranks = |local: &str| {
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut env = tandem_tests::rank_env(r, 2, &addr, token.as_str());
                env.retain(|(k, _)| {
                    !k.starts_with("TANDEM_TLS") && k != tandem_tls::INSECURE_VAR && k != LOCAL
                });
                env.push(("TANDEM_TLS_DIR".into(), String::new()));
                env.push((LOCAL.into(), local.into()));
                env.push(("TANDEM_RENDEZVOUS_EXTERNAL".into(), "1".into()));
                env.push(("TANDEM_CONNECT_TIMEOUT".into(), "5".into()));
                spawn(NODE, &["suite"], &env)
            })
            .collect();
        tandem_tests::wait_all(children, LIMIT)
    };
    for o in ranks("1") {
        assert!(o.status.success(), "{}", text(&o));
        let links: Vec<&str> = std::str::from_utf8(&o.stdout)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("LINKS"))
            .collect();
        assert_eq!(links, ["LINKS 1 0 0"], "{}", text(&o));
    }
    for o in ranks("0") {
        assert!(!o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(t.contains("TLS"), "{t}");
    }
    let _ = host.kill();
    let _ = host.wait();
}
