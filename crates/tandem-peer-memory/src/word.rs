//! The owner's side: a word at a fixed address that proves who we are (the probe) and, during a
//! [`Lease`], that we still offer our memory.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A random 64-bit value (different in every process and call).
pub fn nonce() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish() | 1
}

/// The value a word made with `nonce` holds during operation `seq`.
pub fn tag(nonce: u64, seq: u64) -> u64 {
    nonce ^ seq.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// This process's word, at a fixed address for its whole life.
#[derive(Debug)]
pub struct LocalWord {
    word: Box<AtomicU64>,
    nonce: u64,
}

impl LocalWord {
    /// A word holding a fresh random value, which the probe reads.
    pub fn new() -> Self {
        let nonce = nonce();
        LocalWord {
            word: Box::new(AtomicU64::new(nonce)),
            nonce,
        }
    }

    /// What peers publish and probe: `pid:address:value`.
    pub fn advert(&self) -> String {
        format!(
            "{}:{}:{}",
            std::process::id(),
            self.address(),
            self.word.load(Ordering::SeqCst)
        )
    }

    /// The word's address in this process.
    pub fn address(&self) -> usize {
        let p: *const AtomicU64 = &*self.word;
        p as usize
    }

    /// The random value this word was created with; tags are derived from it.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Offers this process's memory for operation `seq` until the lease is dropped: the word holds
    /// [`tag`]`(nonce, seq)` meanwhile, and is cleared (with a fence) when the lease ends, before
    /// the caller gets its memory back.
    pub fn lease(&self, seq: u64) -> Lease<'_> {
        let tag = tag(self.nonce, seq);
        self.word.store(tag, Ordering::SeqCst);
        Lease { word: self, tag }
    }

    fn clear(&self) {
        self.word.store(0, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

impl Drop for LocalWord {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Default for LocalWord {
    fn default() -> Self {
        Self::new()
    }
}

/// An offer of this process's memory, live until dropped (see [`LocalWord::lease`]).
#[derive(Debug)]
#[must_use = "the offer ends when the lease is dropped"]
pub struct Lease<'w> {
    word: &'w LocalWord,
    tag: u64,
}

impl Lease<'_> {
    /// The value the word holds during this lease: what the reader checks.
    pub fn tag(&self) -> u64 {
        self.tag
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.word.clear();
    }
}
