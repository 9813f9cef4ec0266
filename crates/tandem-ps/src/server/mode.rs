//! How training proceeds ([`Mode`]) and the most workers a server keeps: plain values that the
//! model, the declaration's checks and the checkpoint format all read, below each of them.
//!
//! Why a module of their own: the mode is read by the declaration's checks, stored in
//! checkpoints and consulted by the model at every step; below all three, none of them has to
//! import another for it.

/// Most workers a declaration may name (the server keeps a step per worker).
pub const MAX_WORKERS: u32 = 1 << 16;

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
