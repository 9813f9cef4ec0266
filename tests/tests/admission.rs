//! Admission under floods, with separate processes: outsiders that connect and close at once,
//! hold idle sockets or speak garbage neither end a forming group nor keep members out of the
//! ring, the rendezvous or a parameter server; the job's results stay exact.

use std::future::Future;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tandem::rendezvous::{Client, Host, JobToken, ServerConfig};
use tandem::{DType, ReduceOp};
use tandem_tests::check::cases_of;
use tandem_tests::{data, rank_env, spawn, start_ps_server, wait_all};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);
/// Connect-and-close attempts per target, and idle sockets held open on it.
const CLOSING: usize = 300;
const IDLE: usize = 64;
/// How long a member's connection may take during a flood: shorter than what an idle socket
/// could hold a handshake slot (or the accept loop) for before admission was bounded (10 s), and
/// loose enough for a loaded 2-core machine. (How fast members get in is measured, not tested.)
const MEMBER_DEADLINE: Duration = Duration::from_secs(5);

/// Floods `targets` from a background thread: `IDLE` idle sockets each, held until the flood
/// stops, and `CLOSING` connect-and-close attempts each, then garbage and closes, again and again
/// until `stop`. Returns the thread and how many connections it made.
fn flood(targets: Vec<String>, stop: Arc<AtomicBool>) -> (JoinHandle<()>, Arc<AtomicUsize>) {
    let made = Arc::new(AtomicUsize::new(0));
    let count = made.clone();
    let handle = std::thread::spawn(move || {
        let mut idle = Vec::new();
        for t in &targets {
            for _ in 0..IDLE {
                if let Ok(s) = TcpStream::connect(t) {
                    count.fetch_add(1, Ordering::Relaxed);
                    idle.push(s);
                }
            }
        }
        let mut round = 0usize;
        while !stop.load(Ordering::Relaxed) && round < 20 {
            for t in &targets {
                for i in 0..CLOSING {
                    if let Ok(mut s) = TcpStream::connect(t) {
                        count.fetch_add(1, Ordering::Relaxed);
                        if i % 10 == 0 {
                            let _ = s.write_all(b"\x16\x03\x01\x00\x05garbage that is no hello");
                        }
                    }
                }
            }
            round += 1;
        }
        drop(idle);
    });
    (handle, made)
}

/// A rendezvous of `token`'s job on an ephemeral loopback port, secured as this run's processes.
fn rendezvous(rt: &tokio::runtime::Runtime, token: &JobToken) -> Host {
    rt.block_on(Host::bind(
        "127.0.0.1:0",
        ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
    ))
    .expect("bind")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A 4-rank group forms and computes exact allreduces while its ranks' ports are flooded: ranks
/// 1-3 start first and publish their addresses, the flood hits them (the connections queue until
/// they accept), then rank 0 starts and the group forms with the flood still going.
#[test]
fn a_group_forms_and_trains_while_outsiders_flood_its_ports() {
    // Tests of TLS between processes of this machine: over TCP, never local sockets.
    tandem_tls::local::set_enabled(false);
    let world = 4;
    let rt = runtime();
    let token = JobToken::generate();
    let host = rendezvous(&rt, &token);
    let env = |rank: usize| {
        let mut e = rank_env(rank, world, &host.addr().to_string(), token.as_str());
        e.push(("TANDEM_RENDEZVOUS_EXTERNAL".into(), "1".into()));
        e.push(("TANDEM_TIMEOUT".into(), "60".into()));
        e.push(("TANDEM_CONNECT_TIMEOUT".into(), "60".into()));
        e
    };
    let late: Vec<_> = (1..world)
        .map(|r| spawn(NODE, &["async"], &env(r)))
        .collect();
    let addrs: Vec<String> = rt.block_on(async {
        let c = Client::connect_with(
            &host.addr().to_string(),
            &token,
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let keys: Vec<String> = (1..world)
            .map(|r| format!("tandem/pg/default/addr/{r}"))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let v = c
            .wait(&keys, Duration::from_secs(60))
            .await
            .expect("addresses");
        v.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (flooder, made) = flood(addrs, stop.clone());
    // Let the idle sockets land (they queue until the ranks accept) before the group can form;
    // the connect-and-close waves go on while it forms.
    while made.load(Ordering::Relaxed) < 3 * IDLE && !flooder.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let first = spawn(NODE, &["async"], &env(0));
    let mut all = vec![first];
    all.extend(late);
    let outs = wait_all(all, LIMIT);
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flood thread");
    let made = made.load(Ordering::Relaxed);
    assert!(
        made > 3 * IDLE,
        "the flood never reached the ranks: {made} connections"
    );
    let inputs: Vec<Vec<f64>> = (0..world)
        .map(|r| data::values(1000, r, 10_007, DType::F32, Some(ReduceOp::Sum)))
        .collect();
    let want = data::reference(DType::F32, ReduceOp::Sum, &inputs);
    for (r, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(cases_of(out).get(&0), Some(&want), "rank {r}");
    }
}

/// The rendezvous keeps answering members while outsiders flood it.
#[test]
fn the_rendezvous_admits_members_during_a_flood() {
    // Tests of TLS between processes of this machine: over TCP, never local sockets.
    tandem_tls::local::set_enabled(false);
    let rt = runtime();
    let token = JobToken::generate();
    let host = rendezvous(&rt, &token);
    let addr = host.addr().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (flooder, made) = flood(vec![addr.clone()], stop.clone());
    while made.load(Ordering::Relaxed) < IDLE + 100 && !flooder.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 0..5 {
        let got = rt.block_on(async {
            let c = Client::connect_with(&addr, &token, &tandem_tests::security(), MEMBER_DEADLINE)
                .await
                .expect("a member connects during the flood");
            c.set(&format!("k{i}"), format!("v{i}").into_bytes())
                .await
                .expect("set");
            c.get(&format!("k{i}")).await.expect("get")
        });
        assert_eq!(got.as_deref(), Some(format!("v{i}").as_bytes()));
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flood thread");
}

/// A parameter server keeps admitting workers while outsiders flood it.
#[test]
fn a_parameter_server_admits_workers_during_a_flood() {
    // Tests of TLS between processes of this machine: over TCP, never local sockets.
    tandem_tls::local::set_enabled(false);
    let token = JobToken::generate();
    let (mut server, addr) = start_ps_server(NODE, token.as_str(), &[], "tcp");
    let stop = Arc::new(AtomicBool::new(false));
    let (flooder, made) = flood(vec![addr.clone()], stop.clone());
    while made.load(Ordering::Relaxed) < IDLE + 100 && !flooder.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rt = runtime();
    for _ in 0..5 {
        // Connecting and the call together, within the deadline.
        let stats = rt.block_on(async {
            tokio::time::timeout(MEMBER_DEADLINE, async {
                let mut c = tandem_tests::ps_client(&addr, token.as_str()).await;
                c.stats(tandem_ps::pb::StatsRequest {}).await
            })
            .await
            .expect("a worker connects and is answered within the deadline")
        });
        // Admitted and answered (a server with nothing declared says so).
        match stats {
            Ok(_) => {}
            Err(st) => assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flood thread");
    let _ = server.kill();
    let _ = server.wait();
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS a server announces to a member's HTTP/2 connection (the
/// HTTP/2 layer refuses streams beyond it).
async fn announced_streams<T>(io: T) -> usize
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client, mut conn) = h2::client::handshake(io)
        .await
        .expect("an HTTP/2 connection");
    let req = http::Request::post("/tandem.none.v1.None/Nothing")
        .body(())
        .expect("a request");
    let (resp, _) = client.send_request(req, true).expect("a stream");
    let mut resp = Box::pin(resp);
    // Drive the connection until the server answered: its SETTINGS came first.
    let answered = std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut conn).poll(cx);
        resp.as_mut().poll(cx)
    })
    .await;
    assert!(answered.is_ok(), "{answered:?}");
    // The settings take effect once acknowledged, on the connection's next turns.
    let _ = tokio::time::timeout(Duration::from_millis(300), &mut conn).await;
    conn.max_concurrent_send_streams()
}

/// A member's connection may hold at most MAX_STREAMS calls at once, at the rendezvous and at a
/// parameter server.
#[test]
fn servers_bound_the_streams_of_one_connection() {
    // Tests of TLS between processes of this machine: over TCP, never local sockets.
    tandem_tls::local::set_enabled(false);
    let rt = runtime();
    let token = JobToken::generate();
    let host = rendezvous(&rt, &token);
    let addr = host.addr().to_string();
    let rendezvous = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let s = tandem_tls::stream::connect(&tandem_tests::security(), tcp, &addr, LIMIT)
            .await
            .expect("a secure connection");
        announced_streams(s).await
    });
    assert_eq!(rendezvous, tandem::rendezvous::MAX_STREAMS as usize);
    let (mut server, addr) = start_ps_server(NODE, token.as_str(), &[], "tcp");
    let ps = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let s = tandem_tls::stream::connect(&tandem_tests::security(), tcp, &addr, LIMIT)
            .await
            .expect("a connection with this run's transport");
        announced_streams(s).await
    });
    assert_eq!(ps, tandem_ps::server::MAX_STREAMS as usize);
    let _ = server.kill();
    let _ = server.wait();
}
