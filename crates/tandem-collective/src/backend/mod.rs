//! Backends carry out operations on host buffers; the process group in front of them validates
//! arguments, orders operations and offers blocking and async calls.
//!
//! [`TcpRing`](tcp_ring::TcpRing) is Tandem's own ring over TCP, the one backend of host buffers.
//! NCCL is not behind this trait: it works on GPU buffers owned by one thread per communicator, so
//! it lives in [`crate::device`], which picks it (with [`BackendKind::Auto`], when the `nccl`
//! feature, the driver and `libnccl` are all there) or stages through host memory over this ring,
//! and logs which and why.

pub mod ops;
pub mod streams;
pub mod tcp_ring;

use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use tandem_core::{DType, Error, ReduceOp, Result};

/// Operations on byte buffers of a known dtype. Arguments arrive validated by the process group:
/// lengths are multiples of the element size, roots and peers are in range, `world_size() > 1`.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name for logs (`"tcp"`, `"nccl"`).
    fn name(&self) -> &'static str;
    /// Whether large ring steps copy straight from the neighbour's memory (ranks on one machine).
    fn same_host(&self) -> bool {
        false
    }
    /// How this rank's connections to its peers are carried (none for backends without).
    fn links(&self) -> crate::transport::mesh::Links {
        crate::transport::mesh::Links::default()
    }
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In-place allreduce.
    fn allreduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        timeout: Duration,
    ) -> Result<()>;
    /// In-place broadcast from `root`.
    fn broadcast(&self, buf: &mut [u8], dtype: DType, root: usize, timeout: Duration)
    -> Result<()>;
    /// `output` receives `world` blocks of `input.len()` bytes.
    fn allgather(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        timeout: Duration,
    ) -> Result<()>;
    /// In-place reduce-scatter; returns this rank's element range.
    fn reduce_scatter(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        timeout: Duration,
    ) -> Result<Range<usize>>;
    /// Reduce into `root`'s buffer.
    fn reduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
        timeout: Duration,
    ) -> Result<()>;
    /// Returns once every rank has entered.
    fn barrier(&self, timeout: Duration) -> Result<()>;
    /// Sends `buf` to rank `to`.
    fn send(&self, buf: &[u8], dtype: DType, to: usize, timeout: Duration) -> Result<()>;
    /// Receives into `buf` from rank `from`.
    fn recv(&self, buf: &mut [u8], dtype: DType, from: usize, timeout: Duration) -> Result<()>;
}

/// Which backend a group should use (`TANDEM_BACKEND=auto|nccl|tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// NCCL for device buffers when it is available, the TCP ring otherwise.
    #[default]
    Auto,
    /// Tandem's TCP ring.
    Tcp,
    /// NCCL; an error where it cannot be used.
    Nccl,
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(BackendKind::Auto),
            "tcp" => Ok(BackendKind::Tcp),
            "nccl" => Ok(BackendKind::Nccl),
            other => Err(Error::config(
                tandem_core::settings::BACKEND.name,
                format!("unknown backend {other:?}; expected auto, nccl or tcp"),
            )),
        }
    }
}

/// Whether this build can use NCCL at all.
pub const NCCL_COMPILED: bool = cfg!(feature = "nccl");

/// Resolves a [`BackendKind`] for host buffers to the backend that will run, logging the choice.
/// Host buffers always use the TCP ring; NCCL serves device buffers ([`crate::device`]), so `nccl`
/// is accepted only by builds with the `nccl` feature.
///
/// ```
/// use tandem_collective::backend::{BackendKind, NCCL_COMPILED, resolve};
/// assert_eq!(resolve(BackendKind::Auto).unwrap(), BackendKind::Tcp);
/// assert_eq!(resolve(BackendKind::Nccl).is_ok(), NCCL_COMPILED);
/// ```
pub fn resolve(kind: BackendKind) -> Result<BackendKind> {
    match kind {
        BackendKind::Tcp => Ok(BackendKind::Tcp),
        BackendKind::Auto => {
            let why = if NCCL_COMPILED {
                "buffers are on the host"
            } else {
                "Tandem was built without the nccl feature"
            };
            tracing::info!("collective backend: tcp ({why})");
            Ok(BackendKind::Tcp)
        }
        BackendKind::Nccl if NCCL_COMPILED => {
            tracing::info!("collective backend: tcp for host buffers, nccl for device buffers");
            Ok(BackendKind::Tcp)
        }
        BackendKind::Nccl => Err(Error::BackendUnavailable {
            backend: "nccl".into(),
            reason: "Tandem was built without the nccl feature (rebuild with --features nccl)"
                .into(),
        }),
    }
}
