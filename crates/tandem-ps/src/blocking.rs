//! A blocking parameter-server client that owns a small runtime, for training loops without tokio.
//!
//! Why its own runtime: most training loops are plain Python or Rust without an async runtime, and
//! a worker must not make its user adopt one to push a gradient. The client keeps a small
//! runtime of two threads that drive its calls and keep its connections alive while the caller
//! computes; each call blocks only the caller's thread.

use std::collections::HashMap;
use std::time::Duration;

use tandem_core::{Error, Result};
use tandem_rendezvous::JobToken;

use crate::client::{Client, PushOutcome, TrainingMode};
use crate::optimizer::Optimizer;
use crate::placement::PartitionMap;

/// The blocking twin of [`Client`]. Do not use it from inside a tokio runtime.
#[derive(Debug)]
pub struct BlockingClient {
    /// The runtime the client's calls run on.
    rt: tokio::runtime::Runtime,
    /// The async client.
    inner: Client,
}

impl BlockingClient {
    /// See [`Client::connect`]: `servers` are its `addrs`, `timeout` its `deadline`.
    pub fn connect(
        servers: &[String],
        token: &JobToken,
        worker: u32,
        map: PartitionMap,
        optimizer: Optimizer,
        mode: TrainingMode,
        timeout: Duration,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the parameter-server client's runtime", e))?;
        let inner = rt.block_on(Client::connect(
            servers, token, worker, map, optimizer, mode, timeout,
        ))?;
        Ok(BlockingClient { rt, inner })
    }

    /// The async client inside.
    pub fn inner(&self) -> &Client {
        &self.inner
    }
    tandem_core::blocking_twins! {
        /// See [`Client::pull`].
        fn pull(&self, min_version: u64) -> Result<(u64, HashMap<String, Vec<f32>>)>;
        /// See [`Client::pull_into`].
        fn pull_into(&self, min_version: u64, out: &mut HashMap<String, Vec<f32>>) -> Result<u64>;
        /// See [`Client::push`].
        fn push(&self, step: u64, grads: &[(&str, &[f32])]) -> Result<PushOutcome>;
        /// See [`Client::pull_rows`].
        fn pull_rows(&self, name: &str, ids: &[u64]) -> Result<Vec<f32>>;
        /// See [`Client::push_rows`].
        fn push_rows(&self, name: &str, ids: &[u64], grads: &[f32]) -> Result<()>;
        /// See [`Client::checkpoint`].
        fn checkpoint(&self) -> Result<Vec<u64>>;
        /// See [`Client::stats`].
        fn stats(&self) -> Result<Vec<crate::pb::StatsResponse>>;
        /// See [`Client::done`].
        fn done(&self) -> Result<()>;
    }
}
