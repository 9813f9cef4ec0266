//! A blocking rendezvous client that owns a small runtime, for code without tokio.
//!
//! Why: elastic membership rounds and other callers run on plain threads; a small runtime owned
//! by the client keeps async out of their way.

use std::time::Duration;

use bytes::Bytes;
use tandem_core::{Error, Result};

use crate::auth::JobToken;
use crate::client::{Client, Swap};

/// The blocking twin of [`Client`]. Do not use it from inside a tokio runtime.
///
/// ```no_run
/// use std::time::Duration;
/// use tandem_rendezvous::{BlockingClient, JobToken};
/// let token = JobToken::new("my-job-secret").unwrap();
/// let c = BlockingClient::connect("127.0.0.1:29500", &token, Duration::from_secs(30)).unwrap();
/// c.set("ready/0", "yes").unwrap();
/// ```
#[derive(Debug)]
pub struct BlockingClient {
    /// The runtime the calls run on.
    rt: tokio::runtime::Runtime,
    /// The async client.
    inner: Client,
}

impl BlockingClient {
    /// See [`Client::connect`].
    pub fn connect(addr: &str, token: &JobToken, deadline: Duration) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the rendezvous client's runtime", e))?;
        let inner = rt.block_on(Client::connect(addr, token, deadline))?;
        Ok(BlockingClient { rt, inner })
    }

    tandem_core::blocking_twins! {
        /// See [`Client::set`].
        fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<()>;
        /// See [`Client::get`].
        fn get(&self, key: &str) -> Result<Option<Bytes>>;
        /// See [`Client::wait`].
        fn wait(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Bytes>>;
        /// See [`Client::add`].
        fn add(&self, key: &str, delta: i64) -> Result<i64>;
        /// See [`Client::compare_and_set`].
        fn compare_and_set(&self, key: &str, expected: Option<&[u8]>, desired: impl Into<Bytes>) -> Result<Swap>;
        /// See [`Client::delete`].
        fn delete(&self, key: &str) -> Result<bool>;
        /// See [`Client::barrier`].
        fn barrier(&self, name: &str, participants: usize, member: usize, timeout: Duration) -> Result<()>;
    }
}
