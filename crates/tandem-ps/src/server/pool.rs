//! Reusable gradient buffers, so the hot path does not fault in and zero fresh pages for every
//! gradient.
//!
//! Why: with gradients of tens of megabytes, allocating one per push made the kernel fault in and
//! zero fresh pages every step (measured: about a tenth of a server's time, BENCHMARKS.md). The pool
//! keeps a few freed buffers per length and hands them out again; it is bounded, so a burst does not
//! keep memory forever.
//!
//! Buffers come back through [`BufferPool::give`] when a step is done with them.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers of one length a pool keeps: a few pushes in flight plus the step's sum.
pub const POOLED_PER_SIZE: usize = 4;

/// Gradient buffers kept for the next push, so the hot path does not fault in and zero fresh pages
/// for every gradient (a quarter of the cycles of a sync benchmark went there). Bounded per size.
#[derive(Debug, Default)]
pub struct BufferPool {
    /// Free buffers by length.
    free: Mutex<HashMap<usize, Vec<Vec<f32>>>>,
    /// Buffers kept per length at most.
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

#[cfg(test)]
mod tests {
    use super::*;

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
