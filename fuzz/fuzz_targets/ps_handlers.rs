//! Every parameter-server request handler, fed arbitrary protobufs through a real server on
//! loopback: the input is a sequence of calls (a byte choosing the method, two bytes of length,
//! the encoded message; a push is a run of chunks), sent in order by a client holding the token.
//! The server must answer each with a status, never panic or stop serving. Waits are cut to
//! milliseconds, and declarations of more than a million elements are skipped (a fuzzer's memory
//! limit, not the server's).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

#[path = "calls.rs"]
mod calls;
use prost::Message;
use tandem_ps::pb;
use tandem_ps::pb::parameter_server_client::ParameterServerClient;
use tandem_ps::server::{Limits, Server, ServerConfig};
use tandem_rendezvous::{AttachToken, JobToken};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = ParameterServerClient<InterceptedService<Channel, AttachToken>>;

struct Harness {
    rt: tokio::runtime::Runtime,
    client: Client,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let token = JobToken::new("fuzz-token-0123456789").expect("token");
        let client = rt.block_on(async {
            let mut config = ServerConfig::new(token.clone())
                .with_security(tandem_tls::Security::loopback_only());
            config.exit_when_done = false;
            config.limits = Limits {
                max_wait: Duration::from_millis(5),
                receive_wait: Duration::from_millis(50),
                ..Limits::default()
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = Server::new(config).await.expect("server");
            tokio::spawn(server.run(listener, std::future::pending()));
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let header = format!("Bearer {}", token.as_str())
                .parse()
                .expect("header");
            ParameterServerClient::with_interceptor(ch, AttachToken::from_token(header))
        });
        Harness { rt, client }
    })
}

/// Chunks of a push: the body split at each 0xFF byte, each piece a `PushChunk`.
fn chunks(body: &[u8]) -> Vec<pb::PushChunk> {
    body.split(|b| *b == 0xFF)
        .filter_map(|p| pb::PushChunk::decode(p).ok())
        .take(16)
        .collect()
}

fn small(d: &pb::DeclareRequest) -> bool {
    let mut total: u64 = 0;
    for p in &d.partitions {
        let row: u64 = p
            .shape
            .iter()
            .skip(1)
            .fold(1u64, |a, b| a.saturating_mul(*b));
        total = total.saturating_add(p.rows.saturating_mul(row));
    }
    total <= 1 << 20 && d.partitions.len() <= 64
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let mut c = h.client.clone();
    h.rt.block_on(async move {
        for (method, body) in calls::calls(data, 32) {
            let call = async {
                match method % 11 {
                    0 => {
                        if let Ok(m) = pb::DeclareRequest::decode(body)
                            && small(&m)
                        {
                            let _ = c.declare(m).await;
                        }
                    }
                    1 => {
                        let _ = c.push(futures::stream::iter(chunks(body))).await;
                    }
                    2 => {
                        if let Ok(mut m) = pb::PullRequest::decode(body) {
                            m.timeout_ms = m.timeout_ms.min(5);
                            if let Ok(r) = c.pull(m).await {
                                let mut s = r.into_inner();
                                while let Ok(Some(_)) = s.message().await {}
                            }
                        }
                    }
                    3 => {
                        if let Ok(m) = pb::DoneRequest::decode(body) {
                            let _ = c.done(m).await;
                        }
                    }
                    4 => {
                        let _ = c.stats(pb::StatsRequest {}).await;
                    }
                    5 => {
                        if let Ok(m) = pb::RowsRequest::decode(body) {
                            let _ = c.pull_rows(m).await;
                        }
                    }
                    6 => {
                        if let Ok(m) = pb::RowsPush::decode(body) {
                            let _ = c.push_rows(m).await;
                        }
                    }
                    7 => {
                        let _ = c.checkpoint(pb::CheckpointRequest {}).await;
                    }
                    8 => {
                        if let Ok(m) = pb::AttachRequest::decode(body) {
                            let _ = c.attach(m).await;
                        }
                    }
                    9 => {
                        if let Ok(m) = pb::SharedPush::decode(body) {
                            let _ = c.push_shared(m).await;
                        }
                    }
                    _ => {
                        if let Ok(mut m) = pb::PullRequest::decode(body) {
                            m.timeout_ms = m.timeout_ms.min(5);
                            let _ = c.pull_shared(m).await;
                        }
                    }
                }
            };
            // A call the server leaves unanswered for a second is a hang: a finding.
            if tokio::time::timeout(Duration::from_secs(1), call)
                .await
                .is_err()
            {
                panic!("the server left call {method} unanswered for a second");
            }
        }
        // Still serving: an answer (stats, or "nothing declared yet"), not a broken transport.
        match c.stats(pb::StatsRequest {}).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
            Err(s) => panic!("the server stopped serving: {s:?}"),
        }
    });
});
