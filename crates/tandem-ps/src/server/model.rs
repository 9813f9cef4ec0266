//! The state one server holds: its partitions with their optimizer state, the sync-step aggregation,
//! worker progress for bounded staleness, and counters.
//!
//! Why partitions each under their own lock: async workers update different partitions at once,
//! and pulls by address read one partition while another is written. Each partition also has a
//! sequence word (`tandem_peer_memory::SeqWord`), odd while an update is being written, so a worker
//! copying values straight out of this process can tell a torn copy from a whole one.
//!
//! Why the sync step is summed piece by piece: on one machine a worker's gradient stays in its own
//! memory until the step is applied ([`GradientSource`]), and `finish_step` averages each partition
//! a 1 MiB piece at a time out of every worker in worker order, then applies it through the
//! optimizer piece by piece. The server therefore needs two pieces of scratch, not a sum as large
//! as the model, and the result is bit for bit what averaging whole gradients would give. When a
//! worker stops being readable part-way, what of its gradient was applied is recorded exactly
//! ([`Partial`]) so its push can say so. Who calls into this (one step thread in sync mode, the
//! blocking pool in async mode) is decided in `step.rs`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockWriteGuard};

use tokio::sync::watch;

use super::checkpoint::{PartSnapshot, Snapshot};
pub use super::pool::{BufferPool, POOLED_PER_SIZE};
pub use super::sync_step::{GradientSource, Partial, Pending, Sum, SyncStep};
use crate::init::Init;
use crate::optimizer::{self, Optimizer, State};

pub use crate::protocol::Key;

/// How training proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Synchronous steps (otherwise asynchronous).
    pub sync: bool,
    /// Number of workers.
    pub workers: u32,
    /// Sync: gradients aggregated per step.
    pub replicas_to_aggregate: u32,
    /// Async: the staleness bound, if any.
    pub staleness: Option<u32>,
    /// Refuse NaN/Inf gradients.
    pub reject_non_finite: bool,
}

/// One partition's values and optimizer state.
#[derive(Debug)]
pub struct PartData {
    /// Parameter values.
    pub values: Vec<f32>,
    /// Optimizer state.
    pub state: State,
    /// Updates applied to this partition.
    pub version: u64,
}

/// A partition as declared.
#[derive(Debug)]
pub struct PartEntry {
    /// Full shape of the parameter.
    pub shape: Vec<u64>,
    /// First row.
    pub row_start: u64,
    /// Rows.
    pub rows: u64,
    /// Elements.
    pub numel: usize,
    /// Data under a lock of its own (async mode never takes a global lock).
    pub data: RwLock<PartData>,
    /// Sequence word: odd while an update is being written. Workers on this machine copy the
    /// values straight out of this process and check the word is unchanged and even around the
    /// copy (a sequence lock), so they never see half an update.
    pub seq: tandem_peer_memory::SeqWord,
    /// The version the sync step being applied has finished writing into this partition, set
    /// before the step is published when pulls may read it early (see `early.rs`); 0 until then.
    pub ready: AtomicU64,
}

/// Write access to a partition; its sequence word is odd for as long as this is held.
pub struct Writing<'a> {
    // Fields drop in this order: the word turns even while the lock is still held, then the lock
    // goes. The other way round, a second writer could make the word odd+1 (even) while writing.
    _seq: tandem_peer_memory::SeqWrite<'a>,
    guard: RwLockWriteGuard<'a, PartData>,
}

impl std::ops::Deref for Writing<'_> {
    type Target = PartData;
    fn deref(&self) -> &PartData {
        &self.guard
    }
}

impl std::ops::DerefMut for Writing<'_> {
    fn deref_mut(&mut self) -> &mut PartData {
        &mut self.guard
    }
}

/// Where a partition's values lie in this process, for a reader on the same machine.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    /// Address of the first value.
    pub addr: usize,
    /// Bytes.
    pub len: usize,
    /// Address of the sequence word.
    pub seq_addr: usize,
    /// The sequence word's (even) value now.
    pub seq: u64,
}

impl PartEntry {
    fn new(shape: Vec<u64>, row_start: u64, rows: u64, data: PartData) -> Self {
        PartEntry {
            shape,
            row_start,
            rows,
            numel: data.values.len(),
            data: RwLock::new(data),
            seq: tandem_peer_memory::SeqWord::new(),
            ready: AtomicU64::new(0),
        }
    }

    /// Locks the partition for an update; readers by address see the sequence word odd until the
    /// returned guard is dropped.
    pub fn write(&self) -> Writing<'_> {
        let guard = self.data.write().unwrap_or_else(|p| p.into_inner());
        Writing {
            _seq: self.seq.write(),
            guard,
        }
    }

    /// Where the values are, and the sequence word between updates.
    pub fn locate(&self) -> Located {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        Located {
            addr: d.values.as_ptr() as usize,
            len: d.values.len() * 4,
            seq_addr: self.seq.address(),
            seq: self.seq.load(),
        }
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.numel / self.rows.max(1) as usize
    }
}

/// Counters reported by `Stats` and the logs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Gradients applied (per push, all partitions).
    pub applied: AtomicU64,
    /// Late gradients dropped (sync with backups).
    pub dropped: AtomicU64,
    /// Gradients refused (NaN/Inf, bad shapes).
    pub rejected: AtomicU64,
    /// Bytes received in pushes.
    pub bytes_in: AtomicU64,
    /// Bytes sent in pulls.
    pub bytes_out: AtomicU64,
    /// Staleness of applied async gradients: 0, 1, 2-3, 4-7, ... (powers of two).
    pub staleness: [AtomicU64; 16],
}

impl Counters {
    /// Records the staleness of one applied gradient.
    pub fn record_staleness(&self, s: u64) {
        let bucket = if s == 0 {
            0
        } else {
            (64 - s.leading_zeros()) as usize
        };
        self.staleness[bucket.min(15)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Elements in one piece of a gradient read out of a worker's memory (1 MiB of f32): the unit in
/// which such a gradient is checked, summed and applied, so a server needs piece-sized buffers rather
/// than buffers as large as a push.
pub const PIECE: usize = 256 * 1024;

/// Everything a declared server holds.
#[derive(Debug)]
pub struct Model {
    /// Hash of the partition map every client must match.
    pub map_hash: u64,
    /// Update rule.
    pub optimizer: Optimizer,
    /// Training mode.
    pub mode: Mode,
    /// This server's partitions.
    pub parts: HashMap<Key, PartEntry>,
    /// Workers whose gradient was applied in part only in the last sync step that had any (the
    /// step, and what of each was applied), so their pushes can say so instead of "applied".
    pub partial: Mutex<(u64, HashMap<u32, Partial>)>,
    /// Version: sync steps applied, or async gradients applied.
    pub version: watch::Sender<u64>,
    /// Steps pushed by each worker (async staleness bound; per-worker lag in stats).
    pub worker_steps: watch::Sender<Vec<u64>>,
    /// Counters.
    pub counters: Counters,
    /// Gradient buffers for reuse.
    pub pool: BufferPool,
    /// Workers silent past their lease that the server goes on without, until they push again.
    pub gone: Mutex<std::collections::BTreeMap<u32, super::lease::Gone>>,
    /// Partitions a sync step finished before it was published: pulls may stream them at once
    /// (`early.rs`).
    pub early: super::early::EarlyPulls,
}

impl Model {
    /// Allocates and initialises the declared partitions.
    pub fn new(
        map_hash: u64,
        optimizer: Optimizer,
        mode: Mode,
        decls: Vec<(Key, Vec<u64>, u64, u64, Init)>,
    ) -> Self {
        let mut parts = HashMap::new();
        for (key, shape, row_start, rows, init) in decls {
            let row_len: u64 = shape.iter().skip(1).product();
            let numel = (rows * row_len) as usize;
            let mut values = vec![0.0f32; numel];
            init.fill((row_start * row_len) as usize, &mut values);
            let data = PartData {
                values,
                state: State::default(),
                version: 0,
            };
            parts.insert(key, PartEntry::new(shape, row_start, rows, data));
        }
        Model {
            map_hash,
            optimizer,
            mode,
            parts,
            partial: Mutex::default(),
            version: watch::Sender::new(0),
            worker_steps: watch::Sender::new(vec![0; mode.workers as usize]),
            counters: Counters::default(),
            pool: BufferPool::new(POOLED_PER_SIZE),
            gone: Mutex::default(),
            early: Default::default(),
        }
    }

    /// Rebuilds a server from its checkpoint.
    pub fn from_snapshot(snap: Snapshot) -> Self {
        let mut parts = HashMap::new();
        for p in snap.parts {
            let state = State {
                m: p.m,
                v: p.v,
                t: p.t,
            };
            let data = PartData {
                values: p.values,
                state,
                version: p.version,
            };
            parts.insert(
                (p.param, p.part),
                PartEntry::new(p.shape, p.row_start, p.rows, data),
            );
        }
        let workers = snap.mode.workers as usize;
        Model {
            map_hash: snap.map_hash,
            optimizer: snap.optimizer,
            mode: snap.mode,
            parts,
            partial: Mutex::default(),
            version: watch::Sender::new(snap.version),
            worker_steps: watch::Sender::new(vec![snap.version; workers]),
            counters: Counters::default(),
            pool: BufferPool::new(POOLED_PER_SIZE),
            gone: Mutex::default(),
            early: Default::default(),
        }
    }

    /// Copies everything a checkpoint holds. In sync mode only the step's owner calls it (between
    /// steps), so the copy is one consistent step.
    pub fn snapshot(&self) -> Snapshot {
        let parts = self
            .parts
            .iter()
            .map(|((param, part), e)| {
                let d = e.data.read().unwrap_or_else(|p| p.into_inner());
                PartSnapshot {
                    param: param.clone(),
                    part: *part,
                    shape: e.shape.clone(),
                    row_start: e.row_start,
                    rows: e.rows,
                    values: d.values.clone(),
                    m: d.state.m.clone(),
                    v: d.state.v.clone(),
                    t: d.state.t,
                    version: d.version,
                }
            })
            .collect();
        Snapshot {
            map_hash: self.map_hash,
            version: *self.version.borrow(),
            mode: self.mode,
            optimizer: self.optimizer,
            parts,
        }
    }

    /// Runs one update of partition `key` (values and optimizer state) under its write guard and
    /// counts it; `None` for a partition this server does not hold.
    fn update<R>(&self, key: &Key, f: impl FnOnce(&mut Vec<f32>, &mut State) -> R) -> Option<R> {
        let entry = self.parts.get(key)?;
        let mut d = entry.write();
        let PartData {
            values,
            state,
            version,
        } = &mut *d;
        let r = f(values, state);
        *version += 1;
        Some(r)
    }

    /// Applies one averaged (sync) or single (async) gradient to a partition.
    pub fn apply(&self, key: &Key, grad: &mut [f32], version: u64) {
        self.update(key, |values, state| {
            optimizer::apply(&self.optimizer, state, values, grad, version)
        });
    }

    /// Applies one gradient that arrives in pieces (read out of workers' memory: one worker's in
    /// async mode, a step's average in sync mode): see [`optimizer::apply_chunks`]. A failure
    /// part-way leaves the pieces before it applied.
    pub fn apply_pieces<E>(
        &self,
        key: &Key,
        version: u64,
        norm_sq: f32,
        scratch: &mut [f32],
        fill: impl FnMut(usize, &mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.update(key, |values, state| {
            optimizer::apply_chunks(
                &self.optimizer,
                state,
                values,
                version,
                norm_sq,
                scratch,
                fill,
            )
        })
        .unwrap_or(Ok(()))
    }

    /// Completes a sync step: averages each partition's gradients and applies them. Sums received
    /// through the streams are averaged whole; partitions with gradients still in workers' memory
    /// are averaged and applied a piece at a time (the stream sum of a piece first, then each
    /// worker's piece in worker order), so they need two piece-sized buffers. A worker that can no
    /// longer be read is left out from that piece on, each piece is divided by the gradients it
    /// holds, and the worker is returned with exactly what of its gradient was applied (its push
    /// must not report it applied). The same map is kept in [`Model::partial`].
    pub fn finish_step(&self, step: &mut SyncStep) -> HashMap<u32, Partial> {
        let partial = self.apply_step(step);
        self.version.send_replace(step.step);
        partial
    }

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
                Ok::<(), String>(())
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
fn read_whole(source: &dyn GradientSource, key: &Key, dst: &mut [f32]) -> Result<(), String> {
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
    pub fn copy_in(&self, step: &mut SyncStep, worker: u32) -> Result<bool, String> {
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
    applied: Vec<Vec<(Key, usize)>>,
    lost: Vec<Option<String>>,
}

impl Reads {
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

#[cfg(test)]
impl Mode {
    /// Sync over `workers`, `k` gradients per step, non-finite gradients refused (for tests).
    pub(crate) fn sync_for_test(workers: u32, k: u32) -> Mode {
        Mode {
            sync: true,
            workers,
            replicas_to_aggregate: k,
            staleness: None,
            reject_non_finite: true,
        }
    }
}

#[cfg(test)]
impl Model {
    /// A model of one partition `w` of `elems` zeros, declared with `hash` (for tests).
    pub(crate) fn one_partition_for_test(
        hash: u64,
        optimizer: Optimizer,
        mode: Mode,
        elems: u64,
    ) -> Model {
        Model::new(
            hash,
            optimizer,
            mode,
            vec![(("w".into(), 0), vec![elems], 0, elems, Init::Zeros)],
        )
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
