//! The state one server holds: its partitions with their optimizer state, the sync-step aggregation,
//! worker progress for bounded staleness, and counters.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockWriteGuard};

use tokio::sync::watch;

use super::checkpoint::{PartSnapshot, Snapshot};
use crate::init::Init;
use crate::optimizer::{self, Optimizer, State};

/// Key of a partition: parameter name and partition index.
pub type Key = (String, u32);

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
    /// The values as bytes at some version, shared by the streamed pulls of that version.
    pub snapshot: Mutex<Option<(u64, bytes::Bytes)>>,
    /// Sequence word: odd while an update is being written. Workers on this machine copy the
    /// values straight out of this process and check the word is unchanged and even around the
    /// copy (a sequence lock), so they never see half an update. Boxed: its address is published.
    pub seq: Box<AtomicU64>,
}

/// Write access to a partition; its sequence word is odd for as long as this is held.
pub struct Writing<'a> {
    guard: RwLockWriteGuard<'a, PartData>,
    seq: &'a AtomicU64,
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

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
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
            snapshot: Mutex::new(None),
            seq: Box::new(AtomicU64::new(0)),
        }
    }

    /// Locks the partition for an update; readers by address see the sequence word odd until the
    /// returned guard is dropped.
    pub fn write(&self) -> Writing<'_> {
        let guard = self.data.write().unwrap_or_else(|p| p.into_inner());
        self.seq.fetch_add(1, Ordering::SeqCst);
        Writing {
            guard,
            seq: &self.seq,
        }
    }

    /// Where the values are, and the sequence word between updates.
    pub fn locate(&self) -> Located {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let seq: *const AtomicU64 = &*self.seq;
        Located {
            addr: d.values.as_ptr() as usize,
            len: d.values.len() * 4,
            seq_addr: seq as usize,
            seq: self.seq.load(Ordering::SeqCst),
        }
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.numel / self.rows.max(1) as usize
    }

    /// The values as bytes: one copy per version, however many workers pull it.
    pub fn bytes(&self) -> bytes::Bytes {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let mut cache = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        match &*cache {
            Some((v, b)) if *v == d.version => b.clone(),
            _ => {
                let src: &[u8] = bytemuck::cast_slice(&d.values);
                // Reuse the previous version's allocation when no pull holds it any more: no fresh
                // pages to fault in and zero every step.
                let b = match cache.take().map(|(_, old)| old.try_into_mut()) {
                    Some(Ok(mut buf)) if buf.capacity() >= src.len() => {
                        buf.clear();
                        buf.extend_from_slice(src);
                        buf.freeze()
                    }
                    _ => bytes::Bytes::copy_from_slice(src),
                };
                *cache = Some((d.version, b.clone()));
                b
            }
        }
    }
}

/// Buffers of one length a pool keeps: a few pushes in flight plus the step's sum.
pub const POOLED_PER_SIZE: usize = 4;

/// Gradient buffers kept for the next push, so the hot path does not fault in and zero fresh pages
/// for every gradient (a quarter of the cycles of a sync benchmark went there). Bounded per size.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<HashMap<usize, Vec<Vec<f32>>>>,
    per_size: usize,
}

impl BufferPool {
    /// A pool that keeps at most `per_size` buffers of each length.
    pub fn new(per_size: usize) -> Self {
        BufferPool {
            free: Mutex::default(),
            per_size,
        }
    }

    /// A buffer of `len` elements; its contents are unspecified (callers overwrite all of it).
    pub fn take(&self, len: usize) -> Vec<f32> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&len)
            .and_then(Vec::pop);
        reused.unwrap_or_else(|| vec![0.0; len])
    }

    /// Returns a buffer for reuse (dropped when the pool holds enough of its length).
    pub fn give(&self, buf: Vec<f32>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let list = free.entry(buf.len()).or_default();
        if list.len() < self.per_size {
            list.push(buf);
        }
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
/// which such a gradient is checked and added, so a server needs one piece-sized buffer per push in
/// flight rather than a buffer as large as the push.
pub const PIECE: usize = 256 * 1024;

/// One partition's running sum in a sync step, and how many gradients each piece of it holds.
#[derive(Debug)]
pub struct Sum {
    /// Sum of the gradients added so far.
    pub values: Vec<f32>,
    /// Gradients added to each [`PIECE`] of `values`: all equal, unless a worker that was being read
    /// died half-way, in which case the pieces it reached hold one gradient more than the rest.
    pub counts: Vec<u32>,
}

/// Contributions to the current sync step.
#[derive(Debug, Default)]
pub struct SyncStep {
    /// The step being aggregated.
    pub step: u64,
    /// Workers whose gradient for this step has been added.
    pub contributors: BTreeSet<u32>,
    /// Running sum of each partition's gradients: one buffer per partition whatever the number of
    /// workers, so memory stays bounded.
    pub acc: HashMap<Key, Sum>,
}

impl SyncStep {
    /// Adds one worker's whole gradients into the running sums (in arrival order). The caller
    /// records the worker among the contributors.
    pub fn add(&mut self, grads: HashMap<Key, Vec<f32>>, pool: &BufferPool) {
        for (key, g) in grads {
            match self.acc.get_mut(&key) {
                Some(sum) => {
                    sum.values.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
                    sum.counts.iter_mut().for_each(|c| *c += 1);
                    pool.give(g);
                }
                None => {
                    let counts = vec![1; g.len().div_ceil(PIECE)];
                    self.acc.insert(key, Sum { values: g, counts });
                }
            }
        }
    }

    /// Adds one partition's gradient that arrives in pieces: `fill(at, dst)` writes elements
    /// `at..at + dst.len()` (at most [`PIECE`] of them) into `dst`. The first gradient of a step is
    /// written straight into the sum; later ones go through `scratch` (at least [`PIECE`] long). If
    /// `fill` fails, the pieces before it stay added and are counted as such, and its error is
    /// returned.
    pub fn add_pieces<E>(
        &mut self,
        key: &Key,
        numel: usize,
        pool: &BufferPool,
        scratch: &mut [f32],
        mut fill: impl FnMut(usize, &mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let fresh = !self.acc.contains_key(key);
        let sum = self.acc.entry(key.clone()).or_insert_with(|| Sum {
            values: pool.take(numel),
            counts: vec![0; numel.div_ceil(PIECE)],
        });
        let mut at = 0;
        while at < numel {
            let len = PIECE.min(numel - at);
            let dst = &mut sum.values[at..at + len];
            let got = if fresh {
                fill(at, dst)
            } else {
                let piece = &mut scratch[..len];
                fill(at, piece)
                    .map(|()| dst.iter_mut().zip(piece.iter()).for_each(|(a, b)| *a += b))
            };
            if let Err(e) = got {
                if fresh {
                    // What was not read holds no gradient yet.
                    sum.values[at..].fill(0.0);
                }
                return Err(e);
            }
            sum.counts[at / PIECE] += 1;
            at += len;
        }
        Ok(())
    }
}

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
    /// Sync aggregation.
    pub sync: Mutex<SyncStep>,
    /// Version: sync steps applied, or async gradients applied.
    pub version: watch::Sender<u64>,
    /// Steps pushed by each worker (async staleness bound; per-worker lag in stats).
    pub worker_steps: watch::Sender<Vec<u64>>,
    /// Counters.
    pub counters: Counters,
    /// Gradient buffers for reuse.
    pub pool: BufferPool,
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
            sync: Mutex::new(SyncStep::default()),
            version: watch::Sender::new(0),
            worker_steps: watch::Sender::new(vec![0; mode.workers as usize]),
            counters: Counters::default(),
            pool: BufferPool::new(POOLED_PER_SIZE),
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
            sync: Mutex::new(SyncStep {
                step: snap.version,
                ..SyncStep::default()
            }),
            version: watch::Sender::new(snap.version),
            worker_steps: watch::Sender::new(vec![snap.version; workers]),
            counters: Counters::default(),
            pool: BufferPool::new(POOLED_PER_SIZE),
        }
    }

    /// Copies everything a checkpoint holds. In sync mode call it with the step lock held, so the
    /// copy is one consistent step.
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

    /// Applies one averaged (sync) or single (async) gradient to a partition.
    pub fn apply(&self, key: &Key, grad: &mut [f32], version: u64) {
        if let Some(entry) = self.parts.get(key) {
            let mut d = entry.write();
            let PartData {
                values,
                state,
                version: v,
            } = &mut *d;
            optimizer::apply(&self.optimizer, state, values, grad, version);
            *v += 1;
        }
    }

    /// Applies one gradient that arrives in pieces (async mode, from a worker's memory): see
    /// [`optimizer::apply_chunks`]. A failure part-way leaves the pieces before it applied.
    pub fn apply_pieces<E>(
        &self,
        key: &Key,
        version: u64,
        norm_sq: f32,
        scratch: &mut [f32],
        fill: impl FnMut(usize, &mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(entry) = self.parts.get(key) else {
            return Ok(());
        };
        let mut d = entry.write();
        let PartData {
            values,
            state,
            version: v,
        } = &mut *d;
        let r = optimizer::apply_chunks(
            &self.optimizer,
            state,
            values,
            version,
            norm_sq,
            scratch,
            fill,
        );
        *v += 1;
        r
    }

    /// Completes a sync step: averages each partition's summed gradients and applies them.
    pub fn finish_step(&self, step: &mut SyncStep) {
        let sums = std::mem::take(&mut step.acc);
        step.contributors.clear();
        let version = step.step;
        for (key, Sum { mut values, counts }) in sums {
            if counts.iter().all(|n| *n == 0) {
                self.pool.give(values);
                continue;
            }
            for (piece, n) in values.chunks_mut(PIECE).zip(counts) {
                if n == 0 {
                    // Only a worker that died while being read reached this partition, and not
                    // this piece: no gradient for it.
                    piece.fill(0.0);
                } else {
                    let n = n as f32;
                    piece.iter_mut().for_each(|a| *a /= n);
                }
            }
            self.apply(&key, &mut values, version);
            self.pool.give(values);
        }
        step.step += 1;
        self.version.send_replace(step.step);
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    fn one_partition(numel: usize) -> Model {
        let mode = Mode {
            sync: true,
            workers: 3,
            replicas_to_aggregate: 2,
            staleness: None,
            reject_non_finite: true,
        };
        let key: Key = ("w".into(), 0);
        Model::new(
            1,
            Optimizer::sgd(1.0),
            mode,
            vec![(key, vec![numel as u64], 0, numel as u64, Init::Zeros)],
        )
    }

    #[test]
    fn sums_added_in_pieces_equal_sums_added_whole() {
        let numel = 2 * PIECE + 5;
        let key: Key = ("w".into(), 0);
        let pool = BufferPool::new(2);
        let grads: Vec<Vec<f32>> = (0..3)
            .map(|w| {
                (0..numel)
                    .map(|i| ((i * 7 + w * 13) % 101) as f32 * 0.37 - 17.0)
                    .collect()
            })
            .collect();
        let (mut whole, mut pieces) = (SyncStep::default(), SyncStep::default());
        let mut scratch = vec![0.0; PIECE];
        for g in &grads {
            whole.add(HashMap::from([(key.clone(), g.clone())]), &pool);
            pieces
                .add_pieces(&key, numel, &pool, &mut scratch, |at, dst| {
                    dst.copy_from_slice(&g[at..at + dst.len()]);
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
        let (a, b) = (&whole.acc[&key], &pieces.acc[&key]);
        assert!(
            a.values
                .iter()
                .zip(&b.values)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_eq!(a.counts, [3, 3, 3]);
        assert_eq!(b.counts, [3, 3, 3]);
    }

    #[test]
    fn a_worker_lost_half_way_counts_only_where_it_was_read() {
        let numel = 2 * PIECE + 5;
        let model = one_partition(numel);
        let key: Key = ("w".into(), 0);
        let mut step = SyncStep::default();
        let mut scratch = vec![0.0; PIECE];
        // The first gradient of the step is lost after its first piece.
        let lost = step.add_pieces(&key, numel, &model.pool, &mut scratch, |at, dst| {
            if at > 0 {
                return Err("worker gone");
            }
            dst.fill(3.0);
            Ok(())
        });
        assert_eq!(lost, Err("worker gone"));
        assert_eq!(step.acc[&key].counts, [1, 0, 0]);
        // Two whole ones follow.
        for _ in 0..2 {
            step.add(
                HashMap::from([(key.clone(), vec![6.0; numel])]),
                &model.pool,
            );
        }
        assert_eq!(step.acc[&key].counts, [3, 2, 2]);
        model.finish_step(&mut step);
        let d = model.parts[&key].data.read().unwrap();
        // SGD with lr 1 from zeros: minus the mean of what reached each element.
        assert!(d.values[..PIECE].iter().all(|v| *v == -5.0));
        assert!(d.values[PIECE..].iter().all(|v| *v == -6.0));
        assert_eq!(*model.version.borrow(), 1);
    }

    #[test]
    fn the_pool_reuses_buffers_of_the_same_length_and_keeps_a_bounded_number() {
        let pool = BufferPool::new(2);
        let a = pool.take(8);
        assert_eq!(a.len(), 8);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(8);
        assert_eq!(b.as_ptr(), ptr, "the same allocation comes back");
        assert_eq!(pool.take(3).len(), 3, "other lengths are fresh");
        for _ in 0..5 {
            pool.give(vec![1.0; 8]);
        }
        let kept = pool.free.lock().unwrap().get(&8).map_or(0, Vec::len);
        assert_eq!(kept, 2);
        drop(b);
    }
}
