//! Reading a peer's buffer directly when both processes run on the same machine: the one home of
//! Tandem's same-host data plane, used by the collective ring and by parameter servers and their
//! workers alike.
//!
//! Linux's cross-memory attach (`process_vm_readv`) copies bytes straight from another process's
//! address space into ours: one copy by the kernel instead of the two a loopback TCP stream makes
//! (into the socket buffer and out again), and none of TCP's per-packet work.
//!
//! # The protocol
//! 1. **Advert and probe.** Each side makes a [`LocalWord`] (a boxed 64-bit word at a fixed
//!    address holding a random value) and sends its [`LocalWord::advert`] (`pid:address:value`)
//!    over an authenticated channel (the rendezvous, or a gRPC call carrying the job token). The
//!    receiver's [`PeerMemory::probe`] reads the word back: success proves same machine, same
//!    process namespace and permission. Any failure keeps the pair on sockets.
//! 2. **Lease.** An owner offers memory only inside a [`Lease`] ([`LocalWord::lease`]): while the
//!    lease lives, its word holds a tag derived from the operation; dropping the lease clears the
//!    word *before* the memory goes back to its caller.
//! 3. **Offer.** The owner tells the reader the regions it offers (address, length) and the tag.
//!    The reader builds an [`Offer`], which refuses regions that do not fit this machine's
//!    addresses and reads only inside them ([`Offer::read`]), checking the owner's word still
//!    holds the tag after every read.
//! 4. **Seqlock.** Memory an owner keeps changing (a parameter server's values) is guarded by a
//!    [`SeqWord`], odd while the owner writes ([`SeqWord::write`]); a reader's
//!    [`PeerMemory::read_consistent`] keeps a copy only if the word was even and unchanged around
//!    it.
//!
//! # What a reader may assume
//! Each side only ever *reads* the other's memory and writes its own, so a misbehaving peer can
//! hand over wrong bytes but never corrupt ours. After a read that returned `Ok`, the bytes are
//! what the owner offered (the tag was still there after the copy). After a [`ReadError`], the
//! bytes of the failed read are garbage and nothing later may be read; bytes of earlier successful
//! reads stay valid. [`ReadError::Withdrawn`] and [`ReadError::Unreadable`] mean the owner left or
//! died; [`ReadError::OutOfBounds`] that the request was not what the owner offered;
//! [`ReadError::Raced`] that a seqlock copy overlapped an update (try again, or use the sockets).
//!
//! ```
//! use tandem_peer_memory::{LocalWord, Offer, PeerMemory};
//! let word = LocalWord::new();
//! // Another process would receive this advert over an authenticated channel.
//! let peer = PeerMemory::parse(&word.advert()).expect("well formed");
//! if peer.probe().is_ok() {
//!     let src = vec![7u8; 1000];
//!     let lease = word.lease(1);
//!     let offer = Offer::new(peer, word.address() as u64, lease.tag(), &[(src.as_ptr() as u64, 1000)])?;
//!     let mut dst = vec![0u8; 1000];
//!     offer.read(0, 0, &mut dst)?;
//!     assert_eq!(src, dst);
//!     drop(lease);
//!     assert!(offer.read(0, 0, &mut dst).is_err(), "withdrawn");
//! }
//! # Ok::<(), tandem_peer_memory::ReadError>(())
//! ```
//!
//! The kernel allows it between processes of the same user when ptrace would be allowed (containers
//! whose seccomp profile forbids `process_vm_readv`, or Yama's `ptrace_scope` ≥ 1 between processes
//! that are not parent and child, deny it). Processes in different pid namespaces (containers,
//! simulated hosts) cannot find each other by pid, so the probe fails and they use sockets.

mod error;
mod offer;
mod peer;
mod seqlock;
mod word;

pub use error::ReadError;
pub use offer::{Offer, check_region};
pub use peer::PeerMemory;
pub use seqlock::{SeqWord, SeqWrite};
pub use word::{Lease, LocalWord, nonce, tag};

/// The variable that turns same-machine copies off: `tcp` keeps every byte on the sockets, `auto`
/// (the default) uses copies wherever the probe succeeds.
pub const SAME_HOST_VAR: &str = tandem_core::settings::SAME_HOST.name;

/// Whether this process's environment allows same-machine copies (`TANDEM_SAME_HOST` is not `tcp`).
pub fn allowed_by_env() -> bool {
    tandem_core::settings::SAME_HOST
        .choice(&tandem_core::cluster::ProcessEnv)
        .map_or(true, |v| v != Some("tcp"))
}

/// Whether this process can read another process's memory at all: it probes its own word (what a
/// peer would do), for callers that need to know what a group will choose.
pub fn available() -> bool {
    let word = LocalWord::new();
    PeerMemory::parse(&word.advert()).is_some_and(|p| p.probe().is_ok())
}
