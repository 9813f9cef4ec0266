//! Sparse access to embedding tables: selected rows pulled and pushed, split by partition.
//!
//! Why rows: an embedding table is mostly untouched by one batch. Pulling and pushing whole
//! partitions would move the table every step; the rows a batch looks up are a tiny fraction. The
//! client groups the requested ids by the partition (row range) that holds them, so each server gets
//! one call with its own rows, and the answers are put back in the order asked.

use super::*;

impl Client {
    /// Splits global row `ids` of `name` by partition: `(part index in the map, local rows, positions)`.
    pub(super) fn rows_by_part(&self, name: &str, ids: &[u64]) -> Result<(usize, Vec<RowGroup>)> {
        let decl = self
            .map
            .param(name)
            .ok_or_else(|| Error::invalid("rows", format!("unknown parameter {name:?}")))?;
        let (rows, row_len) = decl.rows_and_row_len();
        let parts: Vec<(usize, &crate::placement::Part)> = self
            .map
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.param == name)
            .collect();
        let mut groups: Vec<(usize, Vec<u64>, Vec<usize>)> = parts
            .iter()
            .map(|(i, _)| (*i, Vec::new(), Vec::new()))
            .collect();
        for (pos, id) in ids.iter().enumerate() {
            if *id as usize >= rows {
                return Err(Error::invalid(
                    "rows",
                    format!("row {id} of {name:?} is beyond its {rows} rows"),
                ));
            }
            let (k, (_, p)) = parts
                .iter()
                .enumerate()
                .find(|(_, (_, p))| (p.row_start..p.row_start + p.rows).contains(&(*id as usize)))
                .ok_or_else(|| {
                    Error::invalid("rows", format!("row {id} of {name:?} is in no partition"))
                })?;
            groups[k].1.push(*id - p.row_start as u64);
            groups[k].2.push(pos);
        }
        Ok((
            row_len,
            groups.into_iter().filter(|g| !g.1.is_empty()).collect(),
        ))
    }

    /// Reads rows `ids` of the table `name`: `ids.len() * row length` values, in the order asked.
    pub async fn pull_rows(&self, name: &str, ids: &[u64]) -> Result<Vec<f32>> {
        let (row_len, groups) = self.rows_by_part(name, ids)?;
        let calls = groups.iter().map(|(pi, local, _)| {
            let p = &self.map.parts[*pi];
            let req = pb::RowsRequest {
                param: p.param.clone(),
                part: p.part,
                rows: local.clone(),
            };
            self.call(p.server, "pulling rows", self.timeout, move |mut c| {
                let req = req.clone();
                async move { c.pull_rows(req).await.map(|r| r.into_inner().data) }
            })
        });
        let results = futures::future::try_join_all(calls).await?;
        let mut out = vec![0.0f32; ids.len() * row_len];
        for ((_, local, positions), data) in groups.iter().zip(results) {
            if data.len() != local.len() * row_len * 4 {
                return Err(Error::transport(
                    "pulling rows",
                    format!("{} bytes for {} rows", data.len(), local.len()),
                ));
            }
            for (k, pos) in positions.iter().enumerate() {
                let dst: &mut [u8] =
                    bytemuck::cast_slice_mut(&mut out[pos * row_len..(pos + 1) * row_len]);
                dst.copy_from_slice(&data[k * row_len * 4..(k + 1) * row_len * 4]);
            }
        }
        Ok(out)
    }

    /// Applies gradients to rows `ids` of the table `name` (`grads` holds `ids.len() * row length`
    /// values); only those rows and their optimizer state change. Repeated ids add up.
    pub async fn push_rows(&self, name: &str, ids: &[u64], grads: &[f32]) -> Result<()> {
        let (row_len, groups) = self.rows_by_part(name, ids)?;
        if grads.len() != ids.len() * row_len {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![ids.len(), row_len],
                got: vec![grads.len()],
            });
        }
        let rows_per_call = ((1usize << 20) / (row_len * 4).max(1)).max(1);
        let mut calls = Vec::new();
        for (pi, local, positions) in &groups {
            let p = &self.map.parts[*pi];
            for (lc, pc) in local
                .chunks(rows_per_call)
                .zip(positions.chunks(rows_per_call))
            {
                let mut data = Vec::with_capacity(lc.len() * row_len * 4);
                for pos in pc {
                    data.extend_from_slice(bytemuck::cast_slice(
                        &grads[pos * row_len..(pos + 1) * row_len],
                    ));
                }
                let req = pb::RowsPush {
                    worker: self.worker,
                    param: p.param.clone(),
                    part: p.part,
                    rows: lc.to_vec(),
                    data: data.into(),
                };
                calls.push(
                    self.call(p.server, "pushing rows", self.timeout, move |mut c| {
                        let req = req.clone();
                        async move { c.push_rows(req).await.map(|_| ()) }
                    }),
                );
            }
        }
        futures::future::try_join_all(calls).await.map(|_| ())
    }
}
