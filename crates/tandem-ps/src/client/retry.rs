//! Calling one server: a call is retried with backoff while the server is unreachable
//! (restarting, say, or its connection broke under the call) until the client's deadline; any
//! other answer returns at once.
//!
//! Why only unreachable servers: a server that answered has decided, and sending the same call
//! again could apply a gradient twice; a server that could not be reached has done nothing, so
//! trying again until the deadline is safe, and rides over a restart or a failover.

use super::*;

impl Client {
    /// Calls server `s`, retrying with backoff while it is unreachable (restarting, say) until the
    /// client's deadline; other errors return at once.
    pub(super) async fn call<T, F, Fut>(
        &self,
        s: usize,
        what: &str,
        wait: Duration,
        f: F,
    ) -> Result<T>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        self.call_raw(s, what, wait, f).await.map_err(|e| match e {
            Failed::Status(st) => status_error(&self.addr(s), what, st, wait),
            Failed::Other(e) => e,
        })
    }

    /// Like [`Client::call`], handing back the server's status when it answered with one, so the
    /// caller can act on its typed reason.
    pub(super) async fn call_raw<T, F, Fut>(
        &self,
        s: usize,
        what: &str,
        wait: Duration,
        mut f: F,
    ) -> std::result::Result<T, Failed>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let mut backoff = tandem_core::Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(1),
            (Instant::now() + self.timeout).into_std(),
        );
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let addr = self.addr(s);
            match tokio::time::timeout(wait, f(self.grpc(s))).await {
                Ok(Ok(v)) => return Ok(v),
                // A connection that broke under the call (a server killed and restarting) shows as
                // unavailable, unknown or, when hyper drops the queued call, cancelled: the server
                // itself never answers with any of them.
                Ok(Err(st))
                    if matches!(
                        st.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) =>
                {
                    // Unreachable for a while: its standby, if it has one, takes over.
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= super::failover::FAILOVER_AFTER
                        && self.fail_over(s, st.message()).await
                    {
                        unreachable_since = None;
                        continue;
                    }
                    let Some(delay) = backoff.next_delay() else {
                        return Err(Failed::Status(st));
                    };
                    tracing::warn!(%addr, error = %st.message(), "parameter server unreachable; retrying");
                    tokio::time::sleep(delay).await;
                }
                Ok(Err(st)) => return Err(Failed::Status(st)),
                Err(_) => {
                    return Err(Failed::Other(Error::timeout(
                        format!("{what} at the parameter server {addr}"),
                        wait,
                    )));
                }
            }
        }
    }
}
