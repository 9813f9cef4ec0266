//! Tandem: a distributed training runtime. Parameter servers over gRPC and collectives (a TCP ring,
//! NCCL when GPUs are there), discovered from the environment that Kubernetes (Kubeflow TFJob,
//! PyTorchJob), Slurm or mpirun inject.
//!
//! This is the crate users depend on; it re-exports the others.
//!
//! # Layout
//! - [`cluster`], [`DType`], [`ReduceOp`], [`Tensor`], [`Error`]: the shared vocabulary (`tandem-core`).
//! - [`rendezvous`]: where the processes of a job meet (`tandem-rendezvous`).
//! - [`collective`], [`ProcessGroup`]: collectives over the TCP ring (`tandem-collective`).
//! - [`ps`]: the parameter server (`tandem-ps`).
//! - [`observe`]: the flight recorder, the timeline, metrics and trace analysis
//!   (`tandem-observe`); [`timeline`] marks spans of your own code.
//!
//! # Feature Flags
//! - `nccl`: collectives on GPU buffers through NCCL ([`collective::device`]); see
//!   `tandem-collective`. Off by default: the build then needs nothing of CUDA, and GPU buffers are
//!   staged through host memory over the TCP ring.
//!
//! ```
//! let spec = tandem::cluster::ClusterSpec::from_vars(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap();
//! assert_eq!(spec.world_size(), 2);
//! ```

pub use tandem_core::{
    ClusterSpec, Convention, DType, Element, Error, ReduceOp, Result, Role, Tensor, TensorMut,
};
pub use tandem_core::{dtype, error, half, settings, tensor};

/// The cluster spec and the launcher conventions it is read from.
pub mod cluster {
    pub use tandem_core::cluster::*;
}

/// Collectives over Tandem's TCP ring: allreduce, broadcast, allgather, reduce-scatter, reduce,
/// barrier, send/recv.
pub mod collective {
    pub use tandem_collective::*;
}

pub use tandem_collective::{GroupConfig, ProcessGroup, Work};

/// The parameter server: partition map, optimizers, the gRPC server and the worker client.
pub mod ps {
    pub use tandem_ps::*;
}

/// The rendezvous: an authenticated key-value store where a job's processes meet.
pub mod rendezvous {
    pub use tandem_rendezvous::*;
}
/// Keep training when a process is lost: membership epochs, committed state, the re-forming run.
pub mod elastic {
    pub use tandem_elastic::*;
}
/// Secure connections: the job's certificates and the rule for when plaintext is allowed.
pub mod tls {
    pub use tandem_tls::*;
}
/// Seeing inside a running job: the flight recorder, the timeline, metrics, trace analysis.
pub mod observe {
    pub use tandem_observe::*;
}
/// Marks regions of your code on the timeline (`TANDEM_TIMELINE=DIR`).
///
/// ```
/// let _s = tandem::timeline::span("forward");
/// ```
pub mod timeline {
    pub use tandem_observe::timeline::{Span, flush, span};
}

/// The Rust examples of the guides in `docs/`, compiled as doctests so that none of them rots
/// (the Python and shell examples are run by `python/tests/test_docs.py`).
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../../../docs/collectives.md")]
    struct Collectives;
    #[doc = include_str!("../../../docs/parameter-servers.md")]
    struct ParameterServers;
    #[doc = include_str!("../../../docs/elastic.md")]
    struct Elastic;
}
