//! Streaming a pull: the partitions a pull asked for, copied out of the live values a chunk at a
//! time on the blocking pool, a few chunks ahead of the network (no snapshot per version).
//!
//! Why not a snapshot per version: a server with many workers pulling would copy its whole share
//! of the model once per step and hold several such copies while slow pulls drain. Copying one
//! chunk at a time out of the live values (each chunk under its partition's read lock, stamped with
//! the partition's update count) bounds the memory to a few chunks per pull, and a worker detects a
//! partition torn between two updates by the counts and pulls it again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Status;

use super::model::{Key, Model};
use crate::pb;

/// The partitions one pull streams, copied out of the live values a chunk at a time under the
/// partition's read lock (each chunk is one version of its rows; `part_version` says which).
pub(super) struct PulledChunks {
    /// The model pulled from.
    pub(super) model: Arc<Model>,
    /// The partitions asked for, in order.
    pub(super) keys: Vec<Key>,
    /// The version the pull answers.
    pub(super) version: u64,
    /// The server's incarnation, sent in every chunk.
    pub(super) incarnation: u64,
    /// Bytes per chunk (of f32, before any narrowing).
    pub(super) chunk_bytes: usize,
    /// How the values travel: f32, or narrowed to bf16 or fp16 (offsets then in their bytes).
    pub(super) wire: pb::Wire,
    /// Sent on the first chunk: this server's standby.
    pub(super) standby: String,
    /// Sync: the version asked for, and how long to wait for each partition to reach it (the
    /// pull's own wait); each partition is sent once it did (the step being applied may not be
    /// published yet: early.rs).
    pub(super) early: Option<(u64, Duration)>,
}

impl PulledChunks {
    /// Bytes `range` of a partition's values under its read lock, in the pull's encoding: the data,
    /// the partition's update count, and the offset in the encoding's bytes.
    fn copy(
        &self,
        entry: &super::model::PartEntry,
        range: std::ops::Range<usize>,
    ) -> (bytes::Bytes, u64, u64) {
        let d = entry.data.read().unwrap_or_else(|p| p.into_inner());
        match self.wire {
            pb::Wire::Bf16 | pb::Wire::Fp16 => {
                let values = &d.values[range.start / 4..range.end / 4];
                let data = crate::wire::encode_dense(values, self.wire);
                (data, d.version, range.start as u64 / 2)
            }
            _ => {
                let src: &[u8] = bytemuck::cast_slice(&d.values);
                let data = bytes::Bytes::copy_from_slice(&src[range.clone()]);
                (data, d.version, range.start as u64)
            }
        }
    }

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
            if let Some((min, patience)) = self.early {
                // Bounded: each partition within the pull's wait of the one before it; a
                // worker told the deadline passed asks again (it pulls in slices).
                let reached = runtime.block_on(self.model.wait_reached(key, min, patience));
                if !reached {
                    let why = format!(
                        "{:?} partition {} did not reach version {min} within {patience:?} (server at {}); a worker may be missing",
                        key.0,
                        key.1,
                        *self.model.version.borrow()
                    );
                    tracing::warn!("a pull stopped: {why}");
                    let st = crate::failure::status(
                        tonic::Code::DeadlineExceeded,
                        crate::pb::Reason::Deadline,
                        why,
                    );
                    let _ = runtime
                        .block_on(async { tokio::time::timeout(wait, tx.send(Err(st))).await });
                    return;
                }
            }
            let len = entry.numel * 4;
            let mut off = 0;
            loop {
                let end = (off + self.chunk_bytes).min(len);
                let (data, part_version, offset) = self.copy(entry, off..end);
                let n = data.len() as u64;
                let chunk = pb::PullChunk {
                    param: key.0.clone(),
                    part: key.1,
                    offset,
                    version: self.version,
                    data,
                    incarnation: self.incarnation,
                    part_version,
                    standby: std::mem::take(&mut standby),
                    wire: self.wire.into(),
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
