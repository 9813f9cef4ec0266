//! What a sync step aggregates until it is applied: streamed gradients summed on arrival (one
//! running sum per partition, whatever the number of workers), and gradients left in workers'
//! memory on this machine ([`GradientSource`]), read a piece at a time when the step is applied.
//!
//! Why two kinds: a gradient received through the stream is in the server already and is summed at
//! once (memory stays one sum per partition); a gradient in a worker's memory on this machine is
//! cheaper left where it is and read once, piece by piece, when the step is applied. Either can fail
//! to be read part-way (the worker died); what was applied is then reported exactly.

use std::collections::{BTreeSet, HashMap};

use super::model::{BufferPool, Key};

/// One partition's running sum of the gradients received through the streams in a sync step.
#[derive(Debug)]
pub struct Sum {
    /// Sum of the gradients added so far.
    pub values: Vec<f32>,
    /// How many.
    pub count: u32,
}

/// Why a gradient left where it is can no longer be read: its worker is then left out of the
/// step from that piece on (and its push told exactly what of it was applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// The worker left the push (it withdrew its offer, or ended while being read).
    #[error("worker {worker} left the push while its gradient was being read{detail}")]
    Left {
        /// The worker.
        worker: u32,
        /// What was seen, if anything (` (...)`).
        detail: String,
    },
    /// The source holds no gradient for a partition it was asked for.
    #[error("no gradient for {param:?} partition {part}")]
    NoPartition {
        /// The parameter.
        param: String,
        /// Its partition.
        part: u32,
    },
    /// Non-finite values, refused as the job asks.
    #[error("worker {worker}'s gradient for {param:?} holds NaN or Inf from element {at}")]
    NonFinite {
        /// The worker.
        worker: u32,
        /// The parameter.
        param: String,
        /// The first element of the piece that holds them.
        at: usize,
    },
    /// A streamed push that stopped, broke, or sent what was not due.
    #[error("worker {worker}'s push {problem}")]
    Stream {
        /// The worker.
        worker: u32,
        /// What went wrong with its stream.
        problem: String,
    },
    /// Reading the worker's memory failed.
    #[error("reading worker {worker}'s gradient for {param:?} from its memory: {detail}")]
    Memory {
        /// The worker.
        worker: u32,
        /// The parameter.
        param: String,
        /// What the read said.
        detail: String,
    },
}

/// A gradient that stays where it is (in a worker's memory on this machine) until its step is
/// applied, read a piece at a time then.
pub trait GradientSource: Send + std::fmt::Debug {
    /// The partitions it holds gradients for, with their elements: what [`Self::covers`] and
    /// [`Self::partitions`] read unless a source answers them itself.
    fn held(&self) -> &[(Key, usize)] {
        &[]
    }
    /// Whether it holds a gradient for partition `key`.
    fn covers(&self, key: &Key) -> bool {
        self.held().iter().any(|(k, _)| k == key)
    }
    /// The partitions it holds gradients for.
    fn partitions(&self) -> Vec<Key> {
        self.held().iter().map(|(k, _)| k.clone()).collect()
    }
    /// Copies elements `at..at + dst.len()` of its gradient for `key` into `dst`; an error says
    /// why it cannot be read any more (the worker left or died).
    fn read(&self, key: &Key, at: usize, dst: &mut [f32]) -> Result<(), Unreadable>;
    /// Whether a piece may be read more than once (memory can; a stream is read once, in order:
    /// each partition's pieces in turn, partitions in ascending key order). Clipping, which needs
    /// a partition's norm before applying any of it, stages the partition for sources that cannot.
    fn rereadable(&self) -> bool {
        true
    }
}

/// A worker's gradient for the current sync step, left where it is until the step is applied.
#[derive(Debug)]
pub struct Pending {
    /// The worker.
    pub worker: u32,
    /// Where its gradient is.
    pub source: Box<dyn GradientSource>,
}

/// What part of a gradient was applied when its source stopped being readable part-way (the worker
/// died, or left its push): exactly these elements, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    /// Per partition, the elements `[0, n)` applied; partitions not listed: none.
    pub applied: Vec<(Key, usize)>,
    /// Why reading stopped.
    pub why: Unreadable,
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied.is_empty() {
            return write!(f, "nothing applied ({})", self.why);
        }
        for (i, ((param, part), n)) in self.applied.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{param:?} partition {part}: elements 0..{n}")?;
        }
        write!(f, " applied, nothing else ({})", self.why)
    }
}

/// Contributions to the current sync step.
#[derive(Debug, Default)]
pub struct SyncStep {
    /// The step being aggregated.
    pub step: u64,
    /// Workers whose gradient for this step has been added.
    pub contributors: BTreeSet<u32>,
    /// Running sum of each partition's gradients received through the streams: one buffer per
    /// partition whatever the number of workers, so memory stays bounded.
    pub acc: HashMap<Key, Sum>,
    /// Gradients still in their workers' memory (same machine), summed piece by piece, in worker
    /// order, when the step is applied: no sum buffer for them at all.
    pub pending: Vec<Pending>,
}

impl SyncStep {
    /// Adds one worker's whole gradients into the running sums (in arrival order). The caller
    /// records the worker among the contributors.
    pub fn add(&mut self, grads: HashMap<Key, Vec<f32>>, pool: &BufferPool) {
        for (key, g) in grads {
            match self.acc.get_mut(&key) {
                Some(sum) => {
                    sum.values.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
                    sum.count += 1;
                    pool.give(g);
                }
                None => {
                    self.acc.insert(
                        key,
                        Sum {
                            values: g,
                            count: 1,
                        },
                    );
                }
            }
        }
    }
}
