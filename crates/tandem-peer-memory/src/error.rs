//! Why a read of a peer's memory failed, and what that means for what was read.

/// A read of a peer's memory that failed. See the crate's "What a reader may assume".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The peer's memory could not be read: it died, unmapped the region, or the kernel refused.
    #[error("the peer's memory could not be read: {0}")]
    Unreadable(#[from] std::io::Error),
    /// The peer's word no longer holds the offer's tag: it left the operation (and may be reusing
    /// the memory), so what this read copied is not what it offered.
    #[error("the peer withdrew its offer while it was being read")]
    Withdrawn,
    /// The request falls outside the regions the peer offered (or outside this machine's
    /// addresses).
    #[error("{0}")]
    OutOfBounds(String),
    /// A seqlock copy overlapped an update (the sequence word was odd, or changed).
    #[error("the values were updated during the copy")]
    Raced,
    /// The sequence word is lower than the owner said it was: another process, or corruption.
    #[error("the sequence word went back from {expected} to {found}")]
    WentBack {
        /// The value the owner reported.
        expected: u64,
        /// The value read.
        found: u64,
    },
}

impl ReadError {
    /// Whether the peer is gone or left (as opposed to a bad request or a race).
    pub fn peer_left(&self) -> bool {
        matches!(self, ReadError::Unreadable(_) | ReadError::Withdrawn)
    }
}
