//! What a parameter server refuses, with separate processes: declarations whose sizes overflow,
//! and workers without the job's certificates (another job's CA, or none). Each refusal names
//! what was wrong, on both sides, and the server keeps serving.

use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem_tests::{spawn, start_ps_server, stdout_lines};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);

/// Declarations whose sizes overflow (u64 row ranges, shape products, offsets) are refused by a
/// server process with a typed reason naming the field; the server keeps serving, and a valid
/// declaration after them is accepted.
#[test]
fn overflowing_declarations_are_refused_and_the_server_keeps_serving() {
    use tandem_ps::pb;
    let token = JobToken::new("overflow-test-token").expect("token");
    let (mut server, addr) = start_ps_server(NODE, token.as_str(), &[], "tcp");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let partition = |shape: Vec<u64>, row_start: u64, rows: u64| pb::Partition {
        param: "w".into(),
        part: 0,
        shape,
        row_start,
        rows,
        dtype: "f32".into(),
        init: None,
    };
    let declare = |p: pb::Partition| {
        let req = pb::DeclareRequest {
            partitions: vec![p],
            optimizer: Some(pb::Optimizer {
                kind: "sgd".into(),
                lr: 0.1,
                ..Default::default()
            }),
            mode: Some(pb::Mode {
                sync: true,
                workers: 1,
                ..Default::default()
            }),
            map_hash: 7,
            compression: String::new(),
        };
        rt.block_on(async {
            let mut c = tandem_tests::ps_client(&addr, token.as_str()).await;
            c.declare(req).await.map(|r| r.into_inner().version)
        })
    };
    for (p, needle) in [
        (partition(vec![u64::MAX], u64::MAX, 2), "row_start"),
        (partition(vec![4, u64::MAX, 3], 0, 4), "overflows"),
        (partition(vec![u64::MAX / 2, 4], 0, 1), "more elements"),
        (partition(vec![1 << 20, 1 << 15], 0, 1 << 20), "too large"),
        (partition(vec![10, 2], 9, 2), "not inside"),
    ] {
        let st = declare(p).expect_err("an overflowing declaration must be refused");
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        assert_eq!(
            tandem_ps::failure::reason_of(&st),
            pb::Reason::Invalid,
            "{st:?}"
        );
        assert!(st.message().contains(needle), "{needle}: {}", st.message());
    }
    // The same server, still serving, accepts a declaration right at the edge.
    assert_eq!(declare(partition(vec![10, 2], 8, 2)).expect("valid"), 0);
    let _ = server.kill();
    let _ = server.wait();
}

/// A TLS server's workers that do not hold the job's certificates are refused with the reason on
/// both sides: one with another job's CA, one without certificates (plaintext). The server keeps
/// serving a worker that has them.
#[test]
fn workers_without_the_jobs_certificates_are_refused_with_the_reason() {
    let token = JobToken::generate();
    let mut env = vec![("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string())];
    env.extend(tandem_tests::tls_env());
    let mut server = spawn(NODE, &["ps-server"], &env);
    let lines = stdout_lines(&mut server);
    let addr = loop {
        let line = lines.recv_timeout(LIMIT).expect("server address");
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_string();
        }
    };
    let other = std::env::temp_dir().join(format!("tandem-ps-other-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&other);
    tandem_tls::init(&other, None, "other-job", &["127.0.0.1".into()], 1).expect("other CA");
    let worker = |transport: (&str, String)| {
        let env = vec![
            ("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string()),
            (transport.0.to_string(), transport.1),
        ];
        let mut args = tandem_tests::sync_worker_args(&addr, 3);
        args.extend(["--timeout".into(), "10".into()]);
        tandem_tests::wait_output(spawn(NODE, &args, &env), LIMIT)
    };
    let stranger = worker(("TANDEM_TLS_DIR", other.display().to_string()));
    let plain = worker(("TANDEM_INSECURE", "1".to_string()));
    let _ = std::fs::remove_dir_all(&other);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let s = text(&stranger);
    assert!(!stranger.status.success(), "{s}");
    assert!(
        s.contains("ERROR authentication") && s.contains("not signed by this job's CA"),
        "{s}"
    );
    let p = text(&plain);
    assert!(!plain.status.success(), "{p}");
    assert!(
        p.contains("no TLS certificates") && p.contains("TANDEM_TLS_DIR"),
        "{p}"
    );
    // A good worker still trains.
    let mut good_env = vec![("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string())];
    good_env.extend(tandem_tests::tls_env());
    let args = tandem_tests::sync_worker_args(&addr, 3);
    let good = tandem_tests::wait_output(spawn(NODE, &args, &good_env), LIMIT);
    assert!(good.status.success(), "{}", text(&good));
    let _ = server.kill();
    let out = tandem_tests::wait_output(server, LIMIT);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(log.contains("refused a connection"), "{log}");
    assert!(log.contains("spoke plaintext"), "{log}");
    assert!(
        log.contains("refused this process's certificate") || log.contains("not signed"),
        "{log}"
    );
}
