//! Both ends of a connection in one process, over loopback: what each side concludes when the
//! other has the job's certificate, another job's, an expired one, none, or speaks plaintext.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::stream::{HandshakeError, Refused, accept, connect};
use crate::{Authority, Issued, Security, TlsContext};

const T: Duration = Duration::from_secs(5);

/// The TLS context of a process holding `cert` of `ca`.
pub(crate) fn tls_context(ca: &Authority, cert: &Issued) -> TlsContext {
    TlsContext::from_pem(
        ca.cert_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        ["ca".into(), "cert".into(), "key".into()],
    )
    .unwrap()
}

fn context(ca: &Authority, cert: &Issued) -> Security {
    Security::tls(tls_context(ca, cert))
}

/// A member `name` of `ca`'s job, reached at 127.0.0.1.
pub(crate) fn member(ca: &Authority, name: &str) -> Security {
    context(ca, &ca.issue(name, &["127.0.0.1".into()], 1).unwrap())
}

/// Accepts one connection with `server`, connects with `client`, and exchanges one message each
/// way when both admit the connection; returns what each side saw.
async fn pair(
    server: Security,
    client: Security,
) -> (Result<Vec<u8>, Refused>, Result<Vec<u8>, HandshakeError>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = accept(&server, tcp, T).await?;
        let mut got = [0u8; 5];
        if s.read_exact(&mut got).await.is_err() {
            return Ok(Vec::new());
        }
        let _ = s.write_all(b"world").await;
        let _ = s.flush().await;
        Ok(got.to_vec())
    });
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let cli = async {
        let mut s = connect(&client, tcp, &addr, T).await?;
        let _ = s.write_all(b"hello").await;
        let _ = s.flush().await;
        let mut got = [0u8; 5];
        match s.read_exact(&mut got).await {
            Ok(_) => Ok(got.to_vec()),
            Err(e) => Err(HandshakeError {
                reason: crate::stream::explain_io(&e),
                refused: true,
            }),
        }
    }
    .await;
    (srv.await.unwrap(), cli)
}

#[tokio::test]
async fn members_of_one_job_talk_encrypted() {
    let ca = Authority::generate("job", 1).unwrap();
    let (s, c) = pair(member(&ca, "rank-0"), member(&ca, "rank-1")).await;
    assert_eq!(s.unwrap(), b"hello");
    assert_eq!(c.unwrap(), b"world");
}

#[tokio::test]
async fn a_certificate_from_another_job_is_refused_by_both_sides() {
    let ours = Authority::generate("ours", 1).unwrap();
    let theirs = Authority::generate("theirs", 1).unwrap();
    // Their client dials our server: it finds our certificate foreign first and says so; our
    // server hears that its certificate was refused.
    let (s, c) = pair(member(&ours, "ps-0"), member(&theirs, "rank-0")).await;
    let c = c.unwrap_err();
    assert!(
        c.refused && c.reason.contains("not signed by this job's CA"),
        "{c:?}"
    );
    let s = s.unwrap_err();
    assert!(
        s.notable && s.reason.contains("refused this process's certificate"),
        "{s:?}"
    );
}

/// A server admitting one connection with a member's certificate of `ca`; its task returns what
/// `accept` concluded.
async fn one_server(
    ca: &Authority,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), Refused>>,
) {
    let server = member(ca, "ps-0");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        accept(&server, tcp, T).await.map(|_| ())
    });
    (addr, srv)
}

/// A client built by hand with rustls: trusts `ca`, presents `cert` (or nothing).
fn hand_built_client(ca: &Authority, cert: Option<&Issued>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = Authority::generate("job", 1).unwrap();
    let (addr, srv) = one_server(&ca).await;
    // A TLS client that trusts the job's CA but presents nothing.
    let config = hand_built_client(&ca, None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let client = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    // TLS 1.3: the client learns of the refusal at its first read.
    let seen = match client {
        Err(e) => crate::stream::explain_io(&e),
        Ok(mut s) => {
            let mut b = [0u8; 1];
            match s.read(&mut b).await {
                Err(e) => crate::stream::explain_io(&e),
                Ok(n) => format!("read {n} bytes"),
            }
        }
    };
    assert!(
        seen.contains("required this process's certificate"),
        "{seen}"
    );
    let s = srv.await.unwrap().unwrap_err();
    assert!(s.reason.contains("presented no certificate"), "{s:?}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_at_start_and_by_peers() {
    let ca = Authority::generate("job", 1).unwrap();
    let now = OffsetDateTime::now_utc();
    let old = ca
        .sign(
            "rank-1",
            &["127.0.0.1".into()],
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    // This process's own: a clear error when it loads, naming the file.
    let e = TlsContext::from_pem(
        ca.cert_pem.as_bytes(),
        old.cert_pem.as_bytes(),
        old.key_pem.as_bytes(),
        ["ca.pem".into(), "old/cert.pem".into(), "key".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("old/cert.pem") && e.contains("expired"), "{e}");
    // A peer that presents one anyway (a client built by hand) is refused by the server.
    let (addr, srv) = one_server(&ca).await;
    let config = hand_built_client(&ca, Some(&old));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let c = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    if let Ok(mut s) = c {
        let mut b = [0u8; 1];
        let seen = s.read(&mut b).await.unwrap_err();
        let seen = crate::stream::explain_io(&seen);
        assert!(seen.contains("expired"), "{seen}");
    }
    let s = srv.await.unwrap().unwrap_err();
    assert!(s.reason.contains("expired"), "{s:?}");
}

#[tokio::test]
async fn plaintext_and_tls_refuse_each_other_with_the_reason() {
    let ca = Authority::generate("job", 1).unwrap();
    // A plaintext client against a TLS server: the server says who spoke plaintext; the client
    // reads a TLS alert record where it expected its peer's answer.
    let (s, c) = pair(member(&ca, "ps-0"), Security::loopback_only()).await;
    let s = s.unwrap_err();
    assert!(s.reason.contains("spoke plaintext"), "{s:?}");
    assert!(
        c.is_err() || c.as_ref().is_ok_and(|b| b[0] == crate::stream::TLS_ALERT),
        "{c:?}"
    );
    // A TLS client against a plaintext server: the server says the client wants TLS; the client
    // says the server closed during the handshake (and may be retried: not a refusal).
    let (s, c) = pair(Security::loopback_only(), member(&ca, "rank-0")).await;
    let s = s.unwrap_err();
    assert!(s.reason.contains("speaks TLS"), "{s:?}");
    let c = c.unwrap_err();
    assert!(!c.refused && c.reason.contains("runs without TLS"), "{c:?}");
    // Plaintext on both ends works.
    let (s, c) = pair(Security::loopback_only(), Security::loopback_only()).await;
    assert_eq!(
        (s.unwrap(), c.unwrap()),
        (b"hello".to_vec(), b"world".to_vec())
    );
}

#[tokio::test]
async fn a_silent_connection_is_dropped_at_the_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _quiet = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = l.accept().await.unwrap();
    let r = accept(&Security::loopback_only(), tcp, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(r.notable && r.reason.contains("sent nothing"), "{r:?}");
    drop(_quiet);
    let closing = TcpStream::connect(addr).await.unwrap();
    drop(closing);
    let (tcp, _) = l.accept().await.unwrap();
    let r = accept(&Security::loopback_only(), tcp, T)
        .await
        .unwrap_err();
    assert!(!r.notable, "{r:?}");
}

#[test]
fn ranks_named_by_certificates() {
    let ca = Authority::generate("job", 1).unwrap();
    let der = |name: &str| {
        let c = ca.issue(name, &["h".into()], 1).unwrap();
        CertificateDer::from_pem_slice(c.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    assert_eq!(crate::peer_rank(&der("rank-12")), Some(12));
    assert_eq!(crate::peer_rank(&der("rank-x")), None);
    assert_eq!(crate::peer_rank(&der("job")), None);
    assert_eq!(crate::common_name(&der("ps-3")).as_deref(), Some("ps-3"));
}

#[test]
fn load_names_the_file_that_is_wrong() {
    let ca = Authority::generate("job", 1).unwrap();
    let other = Authority::generate("other", 1).unwrap();
    let c = ca.issue("p", &["h".into()], 1).unwrap();
    let load = |ca: &str, cert: &str, key: &str| {
        TlsContext::from_pem(
            ca.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
            ["CA.pem".into(), "CERT.pem".into(), "KEY.pem".into()],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert_eq!(load(&ca.cert_pem, &c.cert_pem, &c.key_pem), Ok(()));
    let e = load("nothing", &c.cert_pem, &c.key_pem).unwrap_err();
    assert!(e.contains("CA.pem"), "{e}");
    let e = load(&ca.cert_pem, "", &c.key_pem).unwrap_err();
    assert!(e.contains("CERT.pem"), "{e}");
    let e = load(&ca.cert_pem, &c.cert_pem, "junk").unwrap_err();
    assert!(e.contains("KEY.pem"), "{e}");
    let wrong_key = ca.issue("q", &["h".into()], 1).unwrap().key_pem;
    let e = load(&ca.cert_pem, &c.cert_pem, &wrong_key).unwrap_err();
    assert!(e.contains("KEY.pem") && e.contains("does not fit"), "{e}");
    let e = load(&other.cert_pem, &c.cert_pem, &c.key_pem).unwrap_err();
    assert!(
        e.contains("CERT.pem") && e.contains("not signed by this job's CA"),
        "{e}"
    );
}

fn identity_of(ca: &Authority, role: &str, job: &str) -> Security {
    let id = crate::identity::Identity::parse(role, job).unwrap();
    let issued = ca.issue_identity(&id, &["127.0.0.1".into()], 1).unwrap();
    Security::tls(tls_context(ca, &issued))
}

/// Certificates carry the key usage of their role: a worker's (other than worker 0) cannot serve,
/// the rendezvous's cannot dial; the handshake itself refuses them.
#[tokio::test]
async fn a_roles_key_usage_is_enforced_by_the_handshake() {
    let ca = Authority::generate("job", 1).unwrap();
    let ok = pair(
        identity_of(&ca, "ps-0", "job"),
        identity_of(&ca, "worker-1", "job"),
    )
    .await;
    assert_eq!(ok.0.unwrap(), b"hello", "a worker dials a server");
    let (_, c) = pair(
        identity_of(&ca, "worker-1", "job"),
        identity_of(&ca, "worker-2", "job"),
    )
    .await;
    let e = c.expect_err("a worker's certificate serving");
    assert!(e.reason.contains("not issued for this use"), "{e:?}");
    let (s, _) = pair(
        identity_of(&ca, "ps-0", "job"),
        identity_of(&ca, "rendezvous", "job"),
    )
    .await;
    assert!(s.is_err(), "the rendezvous's certificate dialling");
    // Worker 0 and the chief may host the rendezvous: they serve.
    for host in ["worker-0", "chief"] {
        let (s, c) = pair(
            identity_of(&ca, host, "job"),
            identity_of(&ca, "worker-1", "job"),
        )
        .await;
        assert!(s.is_ok() && c.is_ok(), "{host}");
    }
}

/// Through the gRPC connector and a server's admission, once a process has an identity: a server
/// in the wrong role or of another job is refused by the client, a client in a role the server
/// does not serve (or of another job) by the server; a process without identities checks nothing
/// more than the CA.
#[tokio::test]
async fn roles_and_jobs_are_checked_on_both_ends() {
    use tower_service::Service;
    let ca = Authority::generate("job", 1).unwrap();
    // (server's identity, its job, whom it serves) -> what a worker-1 of "job" expecting a PS sees.
    let cases = [
        ("ps-0", "job", true),
        ("ps-3", "job", true),
        ("rank-1", "job", false),
        ("chief", "job", false),
        ("ps-0", "other", false),
    ];
    for (role, job, admitted) in cases {
        let server = identity_of(&ca, role, job);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut incoming = crate::grpc::incoming(l, server, "test", |_| true);
        let mut c = crate::grpc::Connector::new(identity_of(&ca, "worker-1", "job"))
            .over_tcp()
            .expecting("the parameter server", |r| {
                matches!(r, crate::identity::Role::Ps(_))
            });
        let got = c.call(format!("http://{addr}").parse().unwrap()).await;
        assert_eq!(got.is_ok(), admitted, "{role} of {job}: {:?}", got.err());
        if let Err(e) = got {
            assert!(
                e.refused && e.reason.contains("the parameter server"),
                "{e:?}"
            );
        }
        drop(tokio_stream::StreamExt::next(&mut incoming));
    }
    // The server side: a server admits the roles it serves from its job only (here: not chiefs).
    for (role, job, admitted) in [
        ("worker-1", "job", true),
        ("chief", "job", false),
        ("worker-1", "other", false),
    ] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut incoming = crate::grpc::incoming(l, identity_of(&ca, "ps-0", "job"), "test", |r| {
            !matches!(r, crate::identity::Role::Chief)
        });
        let mut c = crate::grpc::Connector::new(identity_of(&ca, role, job)).over_tcp();
        // The client's handshake completes either way; the server drops what it refuses.
        assert!(
            c.call(format!("http://{addr}").parse().unwrap())
                .await
                .is_ok()
        );
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            tokio_stream::StreamExt::next(&mut incoming),
        )
        .await;
        assert_eq!(next.is_ok(), admitted, "{role} of {job}");
    }
    // Without identities (one shared certificate), only the CA is checked.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let _incoming = crate::grpc::incoming(l, member(&ca, "shared"), "test", |_| false);
    let mut c = crate::grpc::Connector::new(member(&ca, "shared"))
        .over_tcp()
        .expecting("the parameter server", |_| false);
    assert!(
        c.call(format!("http://{addr}").parse().unwrap())
            .await
            .is_ok()
    );
}
