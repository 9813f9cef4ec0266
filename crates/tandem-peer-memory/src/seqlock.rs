//! A sequence word for memory its owner keeps updating while peers read it by address: odd while
//! an update is being written, so a reader can tell a torn copy from a whole one.

use std::sync::atomic::{AtomicU64, Ordering};

/// The owner's sequence word, boxed so its address (which readers are told) never moves.
#[derive(Debug, Default)]
pub struct SeqWord(Box<AtomicU64>);

impl SeqWord {
    /// A word at 0 (no update yet).
    pub fn new() -> Self {
        SeqWord::default()
    }

    /// Marks an update as in progress until the guard is dropped (the word is odd meanwhile).
    /// Hold the lock of the guarded memory first: updates must not overlap.
    pub fn write(&self) -> SeqWrite<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        SeqWrite(&self.0)
    }

    /// The word's address in this process.
    pub fn address(&self) -> usize {
        let p: *const AtomicU64 = &*self.0;
        p as usize
    }

    /// Its value now.
    pub fn load(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Whether a value means "no update in progress".
    pub fn is_stable(value: u64) -> bool {
        value.is_multiple_of(2)
    }
}

/// An update in progress (see [`SeqWord::write`]).
#[derive(Debug)]
pub struct SeqWrite<'a>(&'a AtomicU64);

impl Drop for SeqWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalWord, PeerMemory, ReadError};

    #[test]
    fn a_copy_racing_an_update_is_refused_and_a_whole_one_kept() {
        let probe = LocalWord::new();
        let Some(me) = PeerMemory::parse(&probe.advert()).filter(|p| p.probe().is_ok()) else {
            return; // this sandbox forbids cross-memory reads
        };
        let seq = SeqWord::new();
        let values = [3u8; 64];
        let mut dst = [0u8; 64];
        let addr = values.as_ptr() as usize;
        assert_eq!(
            me.read_consistent(addr, &mut dst, seq.address(), 0).ok(),
            Some(0)
        );
        assert_eq!(dst, values);
        {
            let _w = seq.write();
            assert!(matches!(
                me.read_consistent(addr, &mut dst, seq.address(), 0),
                Err(ReadError::Raced)
            ));
        }
        assert_eq!(seq.load(), 2);
        assert!(matches!(
            me.read_consistent(addr, &mut dst, seq.address(), 4),
            Err(ReadError::WentBack {
                expected: 4,
                found: 2
            })
        ));
    }
}
