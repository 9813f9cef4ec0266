//! Applying a sync step: each partition averaged a piece at a time out of the stream sums and the
//! workers' memory, in worker order, then applied through the optimizer; what of a worker's
//! gradient was applied when it stopped being readable part-way is recorded exactly.

use std::collections::HashMap;

use super::*;

impl Model {
    /// Like [`Model::finish_step`] without publishing the new version: the caller publishes it
    /// (`version.send_replace(step.step)`) once the step is replicated.
    pub fn apply_step(&self, step: &mut SyncStep) -> HashMap<u32, Partial> {
        let mut sums = std::mem::take(&mut step.acc);
        let mut pending = std::mem::take(&mut step.pending);
        pending.sort_by_key(|p| p.worker);
        step.contributors.clear();
        let version = step.step;
        let mut keys: BTreeSet<Key> = sums.keys().cloned().collect();
        for p in &pending {
            keys.extend(p.source.partitions());
        }
        let mut reads = Reads::new(pending.len());
        for key in keys {
            let sum = sums.remove(&key);
            let from: Vec<usize> = (0..pending.len())
                .filter(|&i| pending[i].source.covers(&key))
                .collect();
            if from.is_empty() {
                if let Some(Sum { mut values, count }) = sum {
                    divide_piece(&mut values, count);
                    self.apply(&key, &mut values, version);
                    self.pool.give(values);
                }
            } else {
                self.apply_averaged_pieces(&key, sum, &pending, &from, &mut reads, version);
            }
            self.finished_part(&key, version + 1);
        }
        let partial = reads.partial(&pending);
        if !partial.is_empty() {
            *self.partial.lock().unwrap_or_else(|p| p.into_inner()) = (version, partial.clone());
        }
        step.step += 1;
        partial
    }

    /// Averages partition `key` a piece at a time (the streamed sum's piece, then each pending
    /// worker's piece in worker order) and applies it through the optimizer piece by piece.
    fn apply_averaged_pieces(
        &self,
        key: &Key,
        sum: Option<Sum>,
        pending: &[Pending],
        from: &[usize],
        reads: &mut Reads,
        version: u64,
    ) {
        let (mut piece, mut scratch) = (self.pool.take(PIECE), self.pool.take(PIECE));
        let mut included = vec![0usize; pending.len()];
        let applying = std::cell::Cell::new(false);
        let mut average = |at: usize, dst: &mut [f32]| -> Result<(), std::convert::Infallible> {
            let mut n = match &sum {
                Some(s) => {
                    dst.copy_from_slice(&s.values[at..at + dst.len()]);
                    s.count
                }
                None => {
                    dst.fill(0.0);
                    0
                }
            };
            for &i in from {
                if reads.lost[i].is_some() {
                    continue;
                }
                let theirs = &mut scratch[..dst.len()];
                match pending[i].source.read(key, at, theirs) {
                    Ok(()) => {
                        dst.iter_mut().zip(theirs.iter()).for_each(|(a, b)| *a += b);
                        n += 1;
                        if applying.get() {
                            included[i] = at + dst.len();
                        }
                    }
                    Err(why) => {
                        tracing::warn!(
                            worker = pending[i].worker,
                            step = version,
                            "gradient left out from element {at} of {:?}: {why}",
                            key.0
                        );
                        reads.lost[i] = Some(why);
                    }
                }
            }
            divide_piece(dst, n);
            Ok(())
        };
        // Clipping needs the averaged gradient's norm before any piece is applied: computed in a
        // first pass when every source can be read twice, else over the partition staged whole.
        let clip = self.optimizer.clip_norm > 0.0;
        let numel = self.parts.get(key).map_or(0, |e| e.numel);
        if clip && from.iter().any(|&i| !pending[i].source.rereadable()) {
            applying.set(true);
            let mut staged = self.pool.take(numel);
            let mut at = 0;
            while at < numel {
                let len = PIECE.min(numel - at);
                let Ok(()) = average(at, &mut staged[at..at + len]);
                at += len;
            }
            self.apply(key, &mut staged, version);
            self.pool.give(staged);
        } else {
            let mut norm_sq = 0.0;
            if clip {
                let mut at = 0;
                while at < numel {
                    let dst = &mut piece[..PIECE.min(numel - at)];
                    let Ok(()) = average(at, dst);
                    norm_sq = optimizer::add_squares(norm_sq, dst);
                    at += dst.len();
                }
            }
            applying.set(true);
            let Ok(()) = self.apply_pieces(key, version, norm_sq, &mut piece, &mut average);
        }
        for &i in from {
            if included[i] > 0 {
                reads.applied[i].push((key.clone(), included[i]));
            }
        }
        self.pool.give(piece);
        self.pool.give(scratch);
        if let Some(s) = sum {
            self.pool.give(s.values);
        }
    }

    /// What of worker `worker`'s gradient for sync step `step` was applied, if only part of it was.
    pub fn partial_of(&self, step: u64, worker: u32) -> Option<Partial> {
        let p = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        if p.0 == step {
            p.1.get(&worker).cloned()
        } else {
            None
        }
    }

    /// Applies one worker's whole gradient, read a piece at a time from `source` (async mode;
    /// `norms` holds each partition's squared norm, for clipping; without them a clipping
    /// optimizer stages each partition whole to take its norm). If the source stops being
    /// readable part-way, the pieces before stay applied and the error says exactly which.
    pub fn apply_source(
        &self,
        source: &dyn GradientSource,
        version: u64,
        norms: Option<&[f32]>,
        scratch: &mut [f32],
    ) -> Result<(), Partial> {
        let mut applied = Vec::new();
        let stage = norms.is_none() && self.optimizer.clip_norm > 0.0;
        for (i, key) in source.partitions().into_iter().enumerate() {
            let numel = self.parts.get(&key).map_or(0, |e| e.numel);
            if stage {
                let mut staged = self.pool.take(numel);
                let r = read_whole(source, &key, &mut staged);
                if r.is_ok() {
                    self.apply(&key, &mut staged, version);
                }
                self.pool.give(staged);
                if let Err(why) = r {
                    return Err(Partial { applied, why });
                }
                applied.push((key, numel));
                continue;
            }
            let norm_sq = norms.and_then(|n| n.get(i)).copied().unwrap_or(0.0);
            let mut done = 0;
            let r = self.apply_pieces(&key, version, norm_sq, scratch, |at, dst| {
                source.read(&key, at, dst)?;
                done = at + dst.len();
                Ok::<(), Unreadable>(())
            });
            if let Err(why) = r {
                if done > 0 {
                    applied.push((key, done));
                }
                return Err(Partial { applied, why });
            }
            applied.push((key, numel));
        }
        Ok(())
    }
}

/// Reads a source's whole gradient for `key` into `dst`, a piece at a time.
fn read_whole(source: &dyn GradientSource, key: &Key, dst: &mut [f32]) -> Result<(), Unreadable> {
    let mut at = 0;
    while at < dst.len() {
        let len = PIECE.min(dst.len() - at);
        source.read(key, at, &mut dst[at..at + len])?;
        at += len;
    }
    Ok(())
}

impl Model {
    /// Copies worker `worker`'s gradient, still in its memory, into the step's sums and forgets
    /// where it was, so that its push can return before the step is applied. Returns whether it
    /// was pending; an error says why it could not be read (then it is withdrawn from the step).
    pub fn copy_in(&self, step: &mut SyncStep, worker: u32) -> Result<bool, Unreadable> {
        let Some(i) = step.pending.iter().position(|p| p.worker == worker) else {
            return Ok(false);
        };
        let pending = step.pending.remove(i);
        let mut grads = HashMap::new();
        for key in pending.source.partitions() {
            let numel = self.parts.get(&key).map_or(0, |e| e.numel);
            let mut buf = self.pool.take(numel);
            if let Err(why) = read_whole(&*pending.source, &key, &mut buf) {
                self.pool.give(buf);
                grads.into_values().for_each(|g| self.pool.give(g));
                step.contributors.remove(&worker);
                return Err(why);
            }
            grads.insert(key, buf);
        }
        step.add(grads, &self.pool);
        Ok(true)
    }
}

/// Per pending worker of a step: what of its gradient is in the applied update so far, and why it
/// stopped being readable (if it did).
struct Reads {
    /// Per source: the partitions applied.
    applied: Vec<Vec<(Key, usize)>>,
    /// Per source: why it could no longer be read, if it could not.
    lost: Vec<Option<Unreadable>>,
}

impl Reads {
    /// Nothing read yet from `n` sources.
    fn new(n: usize) -> Self {
        Reads {
            applied: vec![Vec::new(); n],
            lost: vec![None; n],
        }
    }

    /// The workers that were read only in part, with what of theirs was applied.
    fn partial(self, pending: &[Pending]) -> HashMap<u32, Partial> {
        pending
            .iter()
            .zip(self.applied)
            .zip(self.lost)
            .filter_map(|((p, applied), lost)| lost.map(|why| (p.worker, Partial { applied, why })))
            .collect()
    }
}

/// A sum of `n` gradients divided by `n`; where none arrived, no gradient (zeros).
fn divide_piece(piece: &mut [f32], n: u32) {
    if n == 0 {
        piece.fill(0.0);
    } else {
        let n = n as f32;
        piece.iter_mut().for_each(|a| *a /= n);
    }
}
