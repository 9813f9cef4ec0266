//! Reading a peer's buffer directly when both processes run on the same machine.
//!
//! Linux's cross-memory attach (`process_vm_readv`) copies bytes straight from another process's
//! address space into ours: one copy by the kernel instead of the two a loopback TCP stream makes (into
//! the socket buffer and out again), and none of TCP's per-packet work. The collective ring uses it for
//! the large steps of reduce-scatter and allgather when every rank can read its left neighbour (the
//! sockets then carry only small descriptors and acknowledgements); parameter servers and workers on
//! one machine use it for pushes and pulls.
//!
//! ```
//! use tandem_peer_memory::{LocalWord, PeerMemory};
//! let word = LocalWord::new();
//! // Another process would receive this advert over an authenticated channel.
//! let peer = PeerMemory::parse(&word.advert()).expect("well formed");
//! if peer.probe().is_ok() {
//!     let src = vec![7u8; 1000];
//!     let mut dst = vec![0u8; 1000];
//!     peer.read(src.as_ptr() as usize, &mut dst)?;
//!     assert_eq!(src, dst);
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! The kernel allows it between processes of the same user when ptrace would be allowed (containers
//! whose seccomp profile forbids `process_vm_readv`, or Yama's `ptrace_scope` ≥ 1 between processes
//! that are not parent and child, deny it). Whether it works is found out by a probe when the group
//! forms, not assumed: each rank publishes its pid, the address of a word and the word's random
//! value, and its right neighbour reads the word back. Any failure keeps the group on plain TCP.
//!
//! Each side only ever reads the other's memory and writes its own, so a peer that misbehaves can at
//! worst hand us wrong bytes, never corrupt our memory. A reader checks after each read that the
//! owner is still inside the same operation (its word holds the operation's tag): an owner that gave
//! up and handed its buffer back to the caller has cleared the word, so stale bytes are detected
//! instead of being reduced silently.

use std::hash::{BuildHasher, Hasher};
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

/// The variable that turns same-machine copies off: `tcp` keeps every byte on the sockets, `auto`
/// (the default) uses copies wherever the probe succeeds.
pub const SAME_HOST_VAR: &str = "TANDEM_SAME_HOST";

/// Whether this process's environment allows same-machine copies (`TANDEM_SAME_HOST` is not `tcp`).
pub fn allowed_by_env() -> bool {
    std::env::var(SAME_HOST_VAR).map_or(true, |v| v != "tcp")
}

/// Whether this process can read another process's memory at all: it probes its own word (what a
/// peer would do), for callers that need to know what a group will choose.
pub fn available() -> bool {
    let word = LocalWord::new();
    PeerMemory::parse(&word.advert()).is_some_and(|p| p.probe().is_ok())
}

/// Largest single read: keeps each system call short and its pinned pages few.
const MAX_READ: usize = 4 << 20;

/// A random 64-bit value (different in every process and call).
pub fn nonce() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish() | 1
}

/// This process's side: the word peers check, at a fixed address for the life of the group.
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

    /// Marks this rank as inside operation `seq`: peers may read its buffers.
    pub fn enter(&self, seq: u64) {
        self.word.store(tag(self.nonce, seq), Ordering::SeqCst);
    }

    /// Marks the operation as over before the buffers go back to the caller.
    pub fn leave(&self) {
        self.word.store(0, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

impl Drop for LocalWord {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Default for LocalWord {
    fn default() -> Self {
        Self::new()
    }
}

/// The value a rank's word holds during operation `seq`.
pub fn tag(nonce: u64, seq: u64) -> u64 {
    nonce ^ seq.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A peer whose memory this process can read.
#[derive(Debug, Clone, Copy)]
pub struct PeerMemory {
    pid: Pid,
    word: usize,
    nonce: u64,
}

impl PeerMemory {
    /// Parses a peer's [`LocalWord::advert`].
    pub fn parse(advert: &str) -> Option<PeerMemory> {
        let mut it = advert.split(':');
        let pid = it.next()?.parse::<i32>().ok()?;
        let word = it.next()?.parse::<usize>().ok()?;
        let nonce = it.next()?.parse::<u64>().ok()?;
        (it.next().is_none() && pid > 0).then_some(PeerMemory {
            pid: Pid::from_raw(pid),
            word,
            nonce,
        })
    }

    /// A process to read from by address only (no word to probe or check).
    pub fn of_process(pid: u32) -> Option<PeerMemory> {
        let pid = i32::try_from(pid).ok().filter(|p| *p > 0)?;
        Some(PeerMemory {
            pid: Pid::from_raw(pid),
            word: 0,
            nonce: 0,
        })
    }

    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Reads the 8-byte word at the peer's address `addr`.
    pub fn read_u64(&self, addr: usize) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Reads the peer's word and checks it holds the advertised value: proves this process can read
    /// the peer's memory (same machine, same process namespace, permission granted).
    pub fn probe(&self) -> std::io::Result<()> {
        let v = self.word()?;
        if v == self.nonce {
            Ok(())
        } else {
            Err(std::io::Error::other(
                "read the peer's word but found another value (a different process with that pid?)",
            ))
        }
    }

    fn word(&self) -> std::io::Result<u64> {
        self.read_u64(self.word)
    }

    /// Whether the peer is still inside operation `seq` (so what was read from it during the
    /// operation is what it meant to send).
    pub fn still_in(&self, seq: u64) -> std::io::Result<bool> {
        Ok(self.word()? == tag(self.nonce, seq))
    }

    /// Copies `dst.len()` bytes starting at the peer's address `addr` into `dst`.
    pub fn read(&self, addr: usize, dst: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        // Bounded: every pass makes progress or returns an error.
        while done < dst.len() {
            let want = (dst.len() - done).min(MAX_READ);
            let base = addr.checked_add(done).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "address overflows")
            })?;
            let remote = [RemoteIoVec { base, len: want }];
            let mut local = [IoSliceMut::new(&mut dst[done..done + want])];
            let n =
                process_vm_readv(self.pid, &mut local, &remote).map_err(std::io::Error::from)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer's memory ended early",
                ));
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_can_read_its_own_word_and_buffers() {
        let w = LocalWord::new();
        let peer = PeerMemory::parse(&w.advert()).expect("parses");
        match peer.probe() {
            Ok(()) => {}
            // Some sandboxes forbid the system call altogether; the group then stays on TCP.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => return,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => return,
            Err(e) => panic!("probe failed: {e}"),
        }
        w.enter(7);
        assert!(peer.still_in(7).expect("reads"));
        assert!(!peer.still_in(8).expect("reads"));
        w.leave();
        assert!(!peer.still_in(7).expect("reads"));
        let src: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        peer.read(src.as_ptr() as usize, &mut dst).expect("reads");
        assert_eq!(src, dst);
    }

    #[test]
    fn malformed_adverts_are_rejected() {
        for bad in ["", "1:2", "x:1:2", "1:2:3:4", "0:1:2", "-5:1:2"] {
            assert!(PeerMemory::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn reading_an_unmapped_address_is_an_error() {
        let w = LocalWord::new();
        let peer = PeerMemory::parse(&w.advert()).expect("parses");
        if peer.probe().is_err() {
            return;
        }
        let mut dst = [0u8; 16];
        assert!(peer.read(8, &mut dst).is_err());
    }
}
