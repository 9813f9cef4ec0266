//! The reader's side: a peer process whose memory this process can read.

use std::io::IoSliceMut;

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use crate::word::tag;
use crate::{ReadError, SeqWord};

/// Largest single read: keeps each system call short and its pinned pages few.
const MAX_READ: usize = 4 << 20;

/// A peer whose memory this process can read.
#[derive(Debug, Clone, Copy)]
pub struct PeerMemory {
    pid: Pid,
    word: usize,
    nonce: u64,
}

impl PeerMemory {
    /// Parses a peer's [`crate::LocalWord::advert`].
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

    /// A process to read from by address only (no word to probe; offers name their own word).
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
        let v = self.read_u64(self.word)?;
        if v == self.nonce {
            Ok(())
        } else {
            Err(std::io::Error::other(
                "read the peer's word but found another value (a different process with that pid?)",
            ))
        }
    }

    /// Whether the peer (known by its advert) is still inside operation `seq`, that is, holds the
    /// lease of `seq`: what was read from it during the operation is what it offered.
    pub fn still_in(&self, seq: u64) -> std::io::Result<bool> {
        Ok(self.read_u64(self.word)? == tag(self.nonce, seq))
    }

    /// Copies `dst.len()` bytes starting at the peer's address `addr` into `dst`. Nothing checks
    /// that the bytes are still offered: use an [`crate::Offer`] or [`PeerMemory::still_in`].
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

    /// One seqlock read of `dst.len()` bytes at `addr`, guarded by the [`SeqWord`] at `seq_addr`
    /// whose even value was `at_least` when the owner answered: the copy counts only if the word
    /// was even and unchanged around it. Returns the word's value; [`ReadError::Raced`] means try
    /// again (values newer than `at_least` are fine).
    pub fn read_consistent(
        &self,
        addr: usize,
        dst: &mut [u8],
        seq_addr: usize,
        at_least: u64,
    ) -> Result<u64, ReadError> {
        let before = self.read_u64(seq_addr)?;
        if before < at_least {
            return Err(ReadError::WentBack {
                expected: at_least,
                found: before,
            });
        }
        if !SeqWord::is_stable(before) {
            return Err(ReadError::Raced);
        }
        self.read(addr, dst)?;
        if self.read_u64(seq_addr)? != before {
            return Err(ReadError::Raced);
        }
        Ok(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalWord;

    /// This process as a peer, when the sandbox allows cross-memory reads at all.
    pub(crate) fn me(word: &LocalWord) -> Option<PeerMemory> {
        let peer = PeerMemory::parse(&word.advert()).expect("parses");
        match peer.probe() {
            Ok(()) => Some(peer),
            // Some sandboxes forbid the system call altogether; groups then stay on TCP.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => None,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => None,
            Err(e) => panic!("probe failed: {e}"),
        }
    }

    #[test]
    fn a_process_can_read_its_own_word_and_buffers() {
        let w = LocalWord::new();
        let Some(peer) = me(&w) else { return };
        {
            let _lease = w.lease(7);
            assert!(peer.still_in(7).expect("reads"));
            assert!(!peer.still_in(8).expect("reads"));
        }
        assert!(!peer.still_in(7).expect("reads"), "the lease ended");
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
        assert!(PeerMemory::of_process(0).is_none());
        assert!(PeerMemory::of_process(u32::MAX).is_none());
        assert_eq!(PeerMemory::of_process(1).map(|p| p.pid()), Some(1));
    }

    #[test]
    fn reading_an_unmapped_address_is_an_error() {
        let w = LocalWord::new();
        let Some(peer) = me(&w) else { return };
        let mut dst = [0u8; 16];
        assert!(peer.read(8, &mut dst).is_err());
    }
}
