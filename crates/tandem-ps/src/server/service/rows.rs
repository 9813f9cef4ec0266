//! Sparse access to rows of a partition (embedding tables): reading selected rows, and applying
//! gradients to selected rows only, so only their optimizer state changes.
//!
//! Why apply rows apart from dense pushes: a dense step touches every element's optimizer state
//! (Adam's moments, momentum); applied to an embedding, the rows a batch did not look up would
//! decay as if they had received zero gradients. Here only the rows pushed are updated, repeated ids
//! add up first, and the partition's version still advances once per push.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tonic::{Code, Status};

use super::{Service, all_finite, part_of};
use crate::failure::{invalid, status};
use crate::pb;
use crate::pb::Reason;
use crate::server::model::{Key, Model, PartEntry};
use crate::server::runtime::blocking;

/// Every row index must fall inside the partition.
pub fn check_rows(entry: &PartEntry, key: &Key, rows: &[u64]) -> Result<(), Status> {
    match rows.iter().find(|x| **x >= entry.rows) {
        Some(bad) => Err(invalid(format!(
            "row {bad} of {:?} partition {} is beyond its {} rows; nothing applied",
            key.0, key.1, entry.rows
        ))),
        None => Ok(()),
    }
}

impl Service {
    /// Rows of a partition (sparse pull), with the partition's version.
    pub(super) fn read_rows(&self, r: pb::RowsRequest) -> Result<pb::RowsResponse, Status> {
        let model = self.declared()?;
        let key = (r.param, r.part);
        let entry = part_of(&model, &key)?;
        let row_len = entry.row_len();
        check_rows(entry, &key, &r.rows)?;
        let mut out: Vec<f32> = Vec::with_capacity(r.rows.len().saturating_mul(row_len));
        let d = entry.data.read().unwrap_or_else(|p| p.into_inner());
        for row in &r.rows {
            // In range: checked above against the partition's rows.
            let at = *row as usize * row_len;
            out.extend_from_slice(&d.values[at..at + row_len]);
        }
        let version = d.version;
        drop(d);
        let data = Bytes::copy_from_slice(bytemuck::cast_slice(&out));
        model
            .counters
            .bytes_out
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(pb::RowsResponse { data, version })
    }

    /// Row gradients of a partition (sparse push), applied at once.
    pub(super) async fn apply_rows(&self, r: pb::RowsPush) -> Result<pb::PushResponse, Status> {
        let model = self.declared()?;
        let key = (r.param, r.part);
        let entry = part_of(&model, &key)?;
        let row_len = entry.row_len();
        let reject = |st: Status| {
            model.counters.rejected.fetch_add(1, Ordering::Relaxed);
            Err(st)
        };
        let want = r
            .rows
            .len()
            .checked_mul(row_len)
            .and_then(|n| n.checked_mul(4));
        if want != Some(r.data.len()) {
            return reject(invalid(format!(
                "row gradients for {:?}: {} bytes for {} rows of {row_len}; nothing applied",
                key.0,
                r.data.len(),
                r.rows.len()
            )));
        }
        if let Err(st) = check_rows(entry, &key, &r.rows) {
            return reject(st);
        }
        let received = r.data.len() as u64;
        let model2 = model.clone();
        let applied =
            blocking(move || apply_row_gradients(&model2, &key, &r.rows, &r.data)).await?;
        let version = match applied {
            Ok(v) => v,
            Err(st) => return reject(st),
        };
        model
            .counters
            .bytes_in
            .fetch_add(received, Ordering::Relaxed);
        model.counters.applied.fetch_add(1, Ordering::Relaxed);
        Ok(pb::PushResponse {
            applied: true,
            dropped: false,
            version,
        })
    }
}

/// Applies gradients `data` (f32, little-endian, one row after another) to rows `rows` of partition
/// `key`, on the blocking pool; repeated rows add up. Returns the partition's new version.
fn apply_row_gradients(model: &Model, key: &Key, rows: &[u64], data: &[u8]) -> Result<u64, Status> {
    let entry = part_of(model, key)?;
    let row_len = entry.row_len();
    let g: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if model.mode.reject_non_finite && !all_finite(&g) {
        return Err(status(
            Code::InvalidArgument,
            Reason::NonFinite,
            format!(
                "row gradients for {:?} hold NaN or Inf; nothing applied",
                key.0
            ),
        ));
    }
    // Repeated ids add up, as an embedding lookup used twice contributes twice.
    let mut merged: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for (row, grad) in rows.iter().zip(g.chunks_exact(row_len.max(1))) {
        let acc = merged
            .entry(*row as usize)
            .or_insert_with(|| vec![0.0; row_len]);
        acc.iter_mut().zip(grad).for_each(|(a, b)| *a += b);
    }
    let mut rows: Vec<(usize, Vec<f32>)> = merged.into_iter().collect();
    model
        .update_versioned(key, |values, state, version| {
            crate::optimizer::apply_rows(
                &model.optimizer,
                state,
                values,
                row_len,
                &mut rows,
                version,
            )
        })
        .map(|(_, version)| version)
        // `part_of` found it above, and partitions are never removed.
        .map_or_else(|| part_of(model, key).map(|_| 0), Ok)
}
