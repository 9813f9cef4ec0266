//! Streaming a pull: the partitions a pull asked for, copied out of the live values a chunk at a
//! time on the blocking pool, a few chunks ahead of the network (no snapshot per version).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Status;

use super::model::{Key, Model};
use crate::pb;

/// The partitions one pull streams, copied out of the live values a chunk at a time under the
/// partition's read lock (each chunk is one version of its rows; `part_version` says which).
pub(super) struct PulledChunks {
    pub(super) model: Arc<Model>,
    pub(super) keys: Vec<Key>,
    pub(super) version: u64,
    pub(super) incarnation: u64,
    pub(super) chunk_bytes: usize,
    /// Sent on the first chunk: this server's standby.
    pub(super) standby: String,
}

impl PulledChunks {
    /// Copies and sends every chunk, each within `wait` of the receiver making room; stops when the
    /// puller is gone or stalled.
    pub(super) fn send(
        self,
        tx: &tokio::sync::mpsc::Sender<Result<pb::PullChunk, Status>>,
        runtime: &tokio::runtime::Handle,
        wait: Duration,
    ) {
        let mut standby = self.standby.clone();
        for key in &self.keys {
            let Some(entry) = self.model.parts.get(key) else {
                continue;
            };
            let len = entry.numel * 4;
            let mut off = 0;
            loop {
                let end = (off + self.chunk_bytes).min(len);
                let (data, part_version) = {
                    let d = entry.data.read().unwrap_or_else(|p| p.into_inner());
                    let src: &[u8] = bytemuck::cast_slice(&d.values);
                    (bytes::Bytes::copy_from_slice(&src[off..end]), d.version)
                };
                let n = data.len() as u64;
                let chunk = pb::PullChunk {
                    param: key.0.clone(),
                    part: key.1,
                    offset: off as u64,
                    version: self.version,
                    data,
                    incarnation: self.incarnation,
                    part_version,
                    standby: std::mem::take(&mut standby),
                };
                let sent = runtime
                    .block_on(async { tokio::time::timeout(wait, tx.send(Ok(chunk))).await });
                if !matches!(sent, Ok(Ok(()))) {
                    tracing::warn!(
                        "a pull stopped: its receiver is gone or took more than {wait:?} for a chunk"
                    );
                    return;
                }
                self.model
                    .counters
                    .bytes_out
                    .fetch_add(n, Ordering::Relaxed);
                off = end;
                if off >= len {
                    break;
                }
            }
        }
    }
}
