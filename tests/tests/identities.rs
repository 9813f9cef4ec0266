//! Identities per process, with separate processes: a parameter server and its workers, each
//! holding its own certificate naming its job and role. A server in the wrong role or of another
//! job is refused by the workers, whatever the CA; a worker's certificate cannot serve at all; the
//! rendezvous is only served by a role that may host it. The right identities train.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem::rendezvous::{Client, Host, JobToken, ServerConfig};
use tandem_tests::{spawn, stdout_lines, wait_output};

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LIMIT: Duration = Duration::from_secs(120);

/// A CA of job `job` in a folder of its own, and a function issuing a process's folder for an
/// identity of any job (another job's processes signed by the same CA: a CA shared by mistake).
struct Job {
    root: PathBuf,
    ca: tandem_tls::Authority,
}

impl Job {
    fn new(tag: &str) -> Job {
        let root = std::env::temp_dir().join(format!("tandem-ids-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("folder");
        Job {
            root,
            ca: tandem_tls::Authority::generate("job", 1).expect("CA"),
        }
    }

    /// The folder of `role` of `job`: ca.pem, cert.pem, key.pem.
    fn issue(&self, role: &str, job: &str) -> PathBuf {
        let id = tandem_tls::identity::Identity::parse(role, job).expect("identity");
        let c = self
            .ca
            .issue_identity(&id, &["127.0.0.1".into(), "localhost".into()], 1)
            .expect("certificate");
        let dir = self.root.join(format!("{job}-{role}"));
        std::fs::create_dir_all(&dir).expect("folder");
        for (f, text) in [
            ("ca.pem", &self.ca.cert_pem),
            ("cert.pem", &c.cert_pem),
            ("key.pem", &c.key_pem),
        ] {
            std::fs::write(dir.join(f), text).expect("write");
        }
        dir
    }

    fn security(&self, role: &str, job: &str) -> tandem_tls::Security {
        let dir = self.issue(role, job);
        let files = tandem_tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        tandem_tls::Security::tls(tandem_tls::TlsContext::load(&files).expect("load"))
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A parameter server process holding the certificate in `dir`; its address.
fn server(token: &JobToken, dir: &Path) -> (std::process::Child, String) {
    let env = vec![
        ("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string()),
        ("TANDEM_TLS_DIR".to_string(), dir.display().to_string()),
    ];
    let mut s = spawn(NODE, &["ps-server"], &env);
    let lines = stdout_lines(&mut s);
    let addr = loop {
        let line = lines.recv_timeout(LIMIT).expect("server address");
        if let Some(a) = line.strip_prefix("ADDR ") {
            break a.to_string();
        }
    };
    (s, addr)
}

/// A worker process (worker 0 of 1, sync, 3 steps) holding `dir`'s certificate.
fn worker(token: &JobToken, dir: &Path, addr: &str) -> std::process::Output {
    let env = vec![
        ("TANDEM_JOB_TOKEN".to_string(), token.as_str().to_string()),
        ("TANDEM_TLS_DIR".to_string(), dir.display().to_string()),
    ];
    let mut args = tandem_tests::sync_worker_args(addr, 3);
    args.extend(["--timeout".into(), "10".into()]);
    wait_output(spawn(NODE, &args, &env), LIMIT)
}

/// Workers refuse a parameter server that is not the one of their job they named (another role,
/// another server's index, another job), a worker's certificate cannot serve, and the right
/// identities train.
#[test]
fn workers_take_only_a_parameter_server_of_their_job() {
    // Tests of TLS between processes of this machine: over TCP, never local sockets.
    tandem_tls::local::set_enabled(false);
    let job = Job::new("ps");
    let token = JobToken::generate();
    let me = job.issue("worker-0", "train");
    for (role, of, refused) in [
        ("rank-1", "train", "a role that may not act here"),
        // Server 0 of the worker's list must be ps-0, not another server's certificate.
        ("ps-1", "train", "a role that may not act here"),
        ("chief", "train", "a role that may not act here"),
        ("ps-0", "other", "not a process of job train"),
        ("worker-1", "train", "not issued for this use"),
    ] {
        let (mut s, addr) = server(&token, &job.issue(role, of));
        let out = worker(&token, &me, &addr);
        let t = text(&out);
        assert!(!out.status.success(), "{role} of {of}: {t}");
        assert!(t.contains(refused), "{role} of {of}: {t}");
        let _ = s.kill();
        let _ = s.wait();
    }
    // The server side: a client of another job is refused, one of the job trains.
    let (mut s, addr) = server(&token, &job.issue("ps-0", "train"));
    let out = worker(&token, &job.issue("worker-0", "other"), &addr);
    assert!(!out.status.success(), "{}", text(&out));
    let out = worker(&token, &me, &addr);
    assert!(out.status.success(), "{}", text(&out));
    let _ = s.kill();
    let log = text(&wait_output(s, LIMIT));
    assert!(log.contains("not a process of job train"), "{log}");
}

/// Only a role that may host the rendezvous serves it: a rank other than 0 or a parameter
/// server is refused by its clients, `rendezvous`, `chief` and rank 0 are taken.
#[test]
fn the_rendezvous_is_served_only_by_a_role_that_may_host_it() {
    // Tests of TLS between processes of this machine: over TCP, never local sockets.
    tandem_tls::local::set_enabled(false);
    let job = Job::new("rdzv");
    let token = JobToken::generate();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = job.security("worker-1", "train");
    for (role, ok) in [
        ("rendezvous", true),
        ("chief", true),
        ("rank-0", true),
        ("rank-1", false),
        ("ps-0", false),
    ] {
        let host = rt
            .block_on(Host::bind(
                "127.0.0.1:0",
                ServerConfig::new(token.clone()).with_security(job.security(role, "train")),
            ))
            .expect("bind");
        let got = rt.block_on(Client::connect_with(
            &host.addr().to_string(),
            &token,
            &client,
            Duration::from_secs(10),
        ));
        match got {
            Ok(c) => {
                assert!(ok, "{role} served the rendezvous");
                rt.block_on(c.set("k", b"v".to_vec())).expect("set");
            }
            Err(e) => {
                assert!(!ok, "{role}: {e}");
                assert!(
                    e.to_string().contains("a role that may not act here"),
                    "{role}: {e}"
                );
            }
        }
    }
}
