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
    /// See [`Client::connect`].
    pub fn connect(
        addrs: &[String],
        token: &JobToken,
        worker: u32,
        map: PartitionMap,
        optimizer: Optimizer,
        mode: TrainingMode,
        deadline: Duration,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the parameter-server client's runtime", e))?;
        let inner = rt.block_on(Client::connect(
            addrs, token, worker, map, optimizer, mode, deadline,
        ))?;
        Ok(BlockingClient { rt, inner })
    }

    /// The async client inside.
    pub fn inner(&self) -> &Client {
        &self.inner
    }
    /// See [`Client::pull`].
    pub fn pull(&self, min_version: u64) -> Result<(u64, HashMap<String, Vec<f32>>)> {
        self.rt.block_on(self.inner.pull(min_version))
    }
    /// See [`Client::pull_into`].
    pub fn pull_into(&self, min_version: u64, out: &mut HashMap<String, Vec<f32>>) -> Result<u64> {
        self.rt.block_on(self.inner.pull_into(min_version, out))
    }
    /// See [`Client::push`].
    pub fn push(&self, step: u64, grads: &[(&str, &[f32])]) -> Result<PushOutcome> {
        self.rt.block_on(self.inner.push(step, grads))
    }
    /// See [`Client::pull_rows`].
    pub fn pull_rows(&self, name: &str, ids: &[u64]) -> Result<Vec<f32>> {
        self.rt.block_on(self.inner.pull_rows(name, ids))
    }
    /// See [`Client::push_rows`].
    pub fn push_rows(&self, name: &str, ids: &[u64], grads: &[f32]) -> Result<()> {
        self.rt.block_on(self.inner.push_rows(name, ids, grads))
    }
    /// See [`Client::checkpoint`].
    pub fn checkpoint(&self) -> Result<Vec<u64>> {
        self.rt.block_on(self.inner.checkpoint())
    }
    /// See [`Client::stats`].
    pub fn stats(&self) -> Result<Vec<crate::pb::StatsResponse>> {
        self.rt.block_on(self.inner.stats())
    }
    /// See [`Client::done`].
    pub fn done(&self) -> Result<()> {
        self.rt.block_on(self.inner.done())
    }
}
