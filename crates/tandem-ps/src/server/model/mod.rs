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
pub use super::sync_step::{GradientSource, Partial, Pending, Sum, SyncStep, Unreadable};
use crate::init::Init;
use crate::optimizer::{self, Optimizer, State};

pub use super::mode::Mode;
pub use crate::protocol::Key;

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
    /// Holds the partition's sequence word odd while written.
    _seq: tandem_peer_memory::SeqWrite<'a>,
    /// The partition, locked for writing.
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
    /// A partition of the parameter of `shape`: rows from `row_start` holding `data`.
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
    /// The sum of those stalenesses.
    pub staleness_sum: AtomicU64,
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
        self.staleness_sum.fetch_add(s, Ordering::Relaxed);
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
        self.update_versioned(key, |values, state, _| f(values, state))
            .map(|(r, _)| r)
    }

    /// [`Self::update`] handing `f` the partition's version before the update; returns `f`'s
    /// answer and the new version.
    pub(crate) fn update_versioned<R>(
        &self,
        key: &Key,
        f: impl FnOnce(&mut Vec<f32>, &mut State, u64) -> R,
    ) -> Option<(R, u64)> {
        let entry = self.parts.get(key)?;
        let mut d = entry.write();
        let PartData {
            values,
            state,
            version,
        } = &mut *d;
        let r = f(values, state, *version);
        *version += 1;
        Some((r, *version))
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

mod apply;

#[cfg(test)]
#[path = "../model_tests.rs"]
mod tests;
