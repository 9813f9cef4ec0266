//! Collectives for data-parallel training: allreduce, broadcast, allgather, reduce-scatter, reduce,
//! barrier and point-to-point send/recv, over Tandem's own TCP ring.
//!
//! Failures are errors, not hangs: every operation carries a header (sequence number, kind, dtype,
//! count, root, reduce op) that neighbours compare, so ranks that call different things get an error
//! naming both calls; a peer that dies or stops answering makes every rank fail within the deadline
//! with an error naming it; a rank that is consistently late is named in a log line.
//!
//! # Layout
//! - [`algorithm`]: pure functions: [`chunking`](algorithm::chunking), the [`ring`](algorithm::ring)
//!   schedule and the [`reduce`](algorithm::reduce) kernels.
//! - [`transport`]: wire formats ([`frame`](transport::frame)) and the authenticated TCP
//!   [`mesh`](transport::mesh).
//! - [`backend`]: the [`Backend`](backend::Backend) trait, backend selection, and the
//!   [`TcpRing`](backend::tcp_ring::TcpRing).
//! - [`ProcessGroup`]: the API, blocking and async ([`Work`]); forming a group can be cancelled
//!   ([`Cancel`]).
//! - [`device`]: collectives on GPU buffers ([`DeviceGroup`](device::DeviceGroup)): NCCL when it can
//!   be used, else the TCP ring through host memory; `device/nccl.rs` owns the communicator.
//! - [`stats`]: straggler detection.
//! - `observe.rs`: what every operation tells the flight recorder, the metrics and the timeline
//!   ([`tandem_observe`]).
//!
//! # Feature Flags
//! - `nccl`: [`device::DeviceGroup`] uses NCCL (through cudarc, loading `libcuda` and `libnccl` at
//!   run time, so the build needs no CUDA). Without it the same API falls back to the TCP ring or,
//!   with `TANDEM_BACKEND=nccl`, says NCCL is unavailable. Host buffers always use the TCP ring.
//!
//! # One allreduce
//! ```text
//! buffer cut into world chunks; step s of reduce-scatter: send chunk (r-s-1) right while
//! receiving chunk (r-s-2) from the left in segments, reducing each segment as it lands.
//! After world-1 steps rank r owns chunk r reduced; world-1 allgather steps pass the
//! reduced chunks around, received straight into place. 2(world-1)/world of the buffer
//! crosses each link: busbw = algbw * 2(n-1)/n.
//! ```

pub mod algorithm;
pub mod backend;
pub mod compression;
pub mod device;
mod group;
pub mod messages;
mod observe;
pub mod stall;
pub mod stats;
pub mod transport;

pub use backend::BackendKind;
pub use group::{
    Cancel, Declined, GroupConfig, MAX_STREAMS_PER_PEER, ProcessGroup, STREAMS_VAR, Work,
};
pub use transport::mesh::Links;
