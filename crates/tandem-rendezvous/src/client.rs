//! The async rendezvous client: connects with retry until a deadline, and gives every call a deadline.
//!
//! Why retry only the connection: ranks start in any order, so the rendezvous may not be up yet
//! when a rank first dials it; once connected, a failure is real and is reported at once with the
//! address and what was being done, never retried into a hang. The token is checked by one call
//! right after connecting, so a wrong token fails at start, not at the first barrier.

use std::time::Duration;

use bytes::Bytes;
use tandem_core::{Error, Result};
use tokio::time::Instant;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use tandem_tls::Security;

use crate::auth::{AttachToken, JobToken};
use crate::pb::rendezvous_client::RendezvousClient;
use crate::pb::*;

/// Extra time given to a gRPC call beyond the wait it asks the server for.
const SLACK: Duration = Duration::from_secs(10);

/// How long each connection attempt may take at most.
const ATTEMPT: Duration = Duration::from_secs(3);

/// Result of [`Client::compare_and_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// Whether the desired value was stored.
    pub swapped: bool,
    /// The value stored after the call.
    pub current: Option<Bytes>,
}

/// A connection to a job's rendezvous.
///
/// ```no_run
/// # async fn demo() -> tandem_core::Result<()> {
/// use std::time::Duration;
/// use tandem_rendezvous::{Client, JobToken};
/// let token = JobToken::new("my-job-secret")?;
/// let c = Client::connect("127.0.0.1:29500", &token, Duration::from_secs(30)).await?;
/// c.set("addr/3", "10.0.0.7:40111").await?;
/// let peers = c.wait(&["addr/0", "addr/1"], Duration::from_secs(60)).await?;
/// c.barrier("ready", 4, 3, Duration::from_secs(60)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    /// The gRPC client, the token attached to every call.
    inner: RendezvousClient<InterceptedService<Channel, AttachToken>>,
    /// The rendezvous's address.
    addr: String,
    /// Deadline of a call.
    op_timeout: Duration,
}

impl Client {
    /// Connects to `addr` (`host:port`), retrying with backoff until `deadline` has passed, and checks
    /// the token with one request. Fails with [`Error::Timeout`] naming the address and how long it
    /// tried, or [`Error::Authentication`] when the server refuses the token.
    pub async fn connect(addr: &str, token: &JobToken, deadline: Duration) -> Result<Client> {
        Self::connect_with(addr, token, &Security::from_env()?, deadline).await
    }

    /// [`Client::connect`] with connections secured by `security` instead of what the environment
    /// says. A certificate refused by either side fails at once with [`Error::Authentication`]
    /// saying why; plaintext to an address outside loopback is refused unless insecure.
    pub async fn connect_with(
        addr: &str,
        token: &JobToken,
        security: &Security,
        deadline: Duration,
    ) -> Result<Client> {
        tandem_core::cluster::check_address("rendezvous address", addr)?;
        security.check_peers("the rendezvous client", &[addr])?;
        // Only a process that may host the rendezvous serves it (not any member of the job).
        let connector = tandem_tls::grpc::Connector::new(security.clone())
            .expecting("the rendezvous", |r| r.hosts_rendezvous());
        let header = token.header()?;
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::config("rendezvous address", format!("{addr:?}: {e}")))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let start = Instant::now();
        let end = start + deadline;
        let mut backoff = tandem_core::Backoff::new(
            Duration::from_millis(20),
            Duration::from_secs(1),
            end.into_std(),
        );
        let mut last_error;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let attempt = endpoint
                .clone()
                .connect_timeout(left.min(ATTEMPT).max(Duration::from_millis(10)));
            match tokio::time::timeout(
                left.min(ATTEMPT),
                attempt.connect_with_connector(connector.clone()),
            )
            .await
            {
                Ok(Ok(channel)) => {
                    let inner =
                        RendezvousClient::with_interceptor(channel, AttachToken(header.clone()))
                            .max_decoding_message_size(64 << 20);
                    let client = Client {
                        inner,
                        addr: addr.to_string(),
                        op_timeout: Duration::from_secs(30),
                    };
                    match client.probe().await {
                        Ok(()) => return Ok(client),
                        Err(e @ Error::Authentication { .. }) => return Err(e),
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Ok(Err(e)) => {
                    if let Some(why) = tandem_tls::grpc::refusal(&e) {
                        return Err(Error::Authentication {
                            peer: format!("rendezvous at {addr}"),
                            reason: why,
                        });
                    }
                    last_error = tandem_core::error::source_chain(&e);
                }
                Err(_) => last_error = "connection attempt timed out".into(),
            }
            let Some(delay) = backoff.next_delay() else {
                return Err(Error::timeout(
                    format!(
                        "the rendezvous at {addr} (tried for {:?}; last error: {last_error})",
                        start.elapsed()
                    ),
                    deadline,
                ));
            };
            tracing::debug!(%addr, error = %last_error, "rendezvous not reachable yet; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sets the deadline of calls that do not wait (default 30 s).
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// A failed call `what` as Tandem's error: a timeout, a refused token, or the server's reason.
    fn map(&self, what: &str, s: Status) -> Error {
        if let Some(why) = tandem_tls::grpc::refusal(&s) {
            return Error::Authentication {
                peer: format!("rendezvous at {}", self.addr),
                reason: why,
            };
        }
        match s.code() {
            Code::Unauthenticated => Error::Authentication {
                peer: format!("rendezvous at {}", self.addr),
                reason: s.message().to_string(),
            },
            Code::InvalidArgument | Code::FailedPrecondition | Code::ResourceExhausted => {
                Error::invalid(what.to_string(), s.message().to_string())
            }
            Code::DeadlineExceeded => Error::timeout(
                format!("{what} at the rendezvous {}", self.addr),
                self.op_timeout,
            ),
            _ => Error::transport(
                format!("{what} at the rendezvous {}", self.addr),
                format!("{}{}", s.message(), tandem_tls::grpc::plaintext_hint(&s)),
            ),
        }
    }

    /// Runs call `what` under `timeout`, mapping its failure (see [`Client::map`]).
    async fn call<T, F, Fut>(&self, what: &str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(RendezvousClient<InterceptedService<Channel, AttachToken>>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(timeout, f(self.inner.clone())).await;
        // A watcher's long poll (an hour) is not a round trip.
        if timeout <= LONG_POLL {
            tandem_observe::metrics::rendezvous(call_name(what), started.elapsed().as_secs_f64());
        }
        match outcome {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.map(what, s)),
            Err(_) => Err(Error::timeout(
                format!("{what} at the rendezvous {}", self.addr),
                timeout,
            )),
        }
    }

    /// A request carrying `timeout` as its gRPC deadline.
    fn request<T>(msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// Stores `value` under `key`.
    pub async fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<()> {
        let msg = SetRequest {
            key: key.into(),
            value: value.into(),
        };
        let t = self.op_timeout;
        self.call(&format!("set {key:?}"), t, |mut c| async move {
            c.set(Self::request(msg, t)).await
        })
        .await
        .map(|_| ())
    }

    /// The first call after connecting: checks the token (and, under TLS, that the server admitted
    /// this process's certificate).
    async fn probe(&self) -> Result<()> {
        self.get("tandem/connect-probe").await.map(|_| ())
    }

    /// Reads `key` without waiting.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let msg = GetRequest { key: key.into() };
        let t = self.op_timeout;
        let r = self
            .call(&format!("get {key:?}"), t, |mut c| async move {
                c.get(Self::request(msg, t)).await
            })
            .await?;
        Ok(r.found.then_some(r.value))
    }

    /// Waits until every key is set; the values come back in the order of `keys`. A timeout names the
    /// keys still missing.
    pub async fn wait(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Bytes>> {
        let msg = WaitRequest {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        };
        let r = self
            .call("wait", timeout + SLACK, |mut c| async move {
                c.wait(Self::request(msg, timeout + SLACK)).await
            })
            .await?;
        if r.complete {
            if r.values.len() != keys.len() {
                return Err(Error::transport(
                    "wait",
                    format!(
                        "asked for {} keys, got {} values",
                        keys.len(),
                        r.values.len()
                    ),
                ));
            }
            Ok(r.values)
        } else {
            Err(Error::timeout(
                format!(
                    "keys [{}] at the rendezvous {}",
                    r.missing.join(", "),
                    self.addr
                ),
                timeout,
            ))
        }
    }

    /// Atomically adds `delta` to the counter at `key` (created at 0); returns the new value.
    pub async fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let msg = AddRequest {
            key: key.into(),
            delta,
        };
        let t = self.op_timeout;
        let r = self
            .call(&format!("add {key:?}"), t, |mut c| async move {
                c.add(Self::request(msg, t)).await
            })
            .await?;
        Ok(r.value)
    }

    /// Stores `desired` only if the value at `key` equals `expected` (`None`: the key is absent).
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        desired: impl Into<Bytes>,
    ) -> Result<Swap> {
        let msg = CompareAndSetRequest {
            key: key.into(),
            expect_absent: expected.is_none(),
            expected: expected.map(Bytes::copy_from_slice).unwrap_or_default(),
            desired: desired.into(),
        };
        let t = self.op_timeout;
        let r = self
            .call(&format!("compare_and_set {key:?}"), t, |mut c| async move {
                c.compare_and_set(Self::request(msg, t)).await
            })
            .await?;
        Ok(Swap {
            swapped: r.swapped,
            current: r.found.then_some(r.current),
        })
    }

    /// Removes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let msg = DeleteRequest { key: key.into() };
        let t = self.op_timeout;
        let r = self
            .call(&format!("delete {key:?}"), t, |mut c| async move {
                c.delete(Self::request(msg, t)).await
            })
            .await?;
        Ok(r.existed)
    }

    /// Enters the named barrier as `member` of `participants`; returns when all have entered. A timeout
    /// names the members that never arrived.
    pub async fn barrier(
        &self,
        name: &str,
        participants: usize,
        member: usize,
        timeout: Duration,
    ) -> Result<()> {
        let to_u32 = |n: usize, what: &str| {
            u32::try_from(n)
                .map_err(|_| Error::invalid(what.to_string(), format!("{n} is too large")))
        };
        let msg = BarrierRequest {
            name: name.into(),
            participants: to_u32(participants, "participants")?,
            member: to_u32(member, "member")?,
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        };
        let r = self
            .call(
                &format!("barrier {name:?}"),
                timeout + SLACK,
                |mut c| async move { c.barrier(Self::request(msg, timeout + SLACK)).await },
            )
            .await?;
        if r.complete {
            Ok(())
        } else {
            let missing: Vec<String> = r.missing.iter().map(u32::to_string).collect();
            Err(Error::timeout(
                format!(
                    "barrier {name:?}: members [{}] never arrived",
                    missing.join(", ")
                ),
                timeout,
            ))
        }
    }
}

/// Calls allowed longer than this are long polls, left out of the round-trip metrics.
const LONG_POLL: Duration = Duration::from_secs(600);

/// The metric label of a call described as `what` ("set \"key\"" is `set`).
fn call_name(what: &str) -> &'static str {
    match what.split([' ', '(']).next().unwrap_or("") {
        "set" => "set",
        "get" => "get",
        "wait" => "wait",
        "add" => "add",
        "compare_and_set" => "compare_and_set",
        "delete" => "delete",
        "barrier" => "barrier",
        _ => "other",
    }
}
