//! Collectives on GPU buffers: NCCL when it can be used (the `nccl` cargo feature, a CUDA driver and
//! `libnccl` at run time, and an initialised communicator), otherwise Tandem's TCP ring through host
//! staging. Without the feature the API is the same and [`DeviceGroup::new`] says so.
//!
//! NCCL's communicator is not `Send`: one dedicated thread per group owns it (with the CUDA context
//! and stream) and the rest of Tandem talks to it through a channel. Buffers move to that thread and
//! back, so a call returns the buffer it was given. Each call waits until the collective has finished
//! on the group's stream, so a returned buffer is ready to read.
//!
//! ```no_run
//! use tandem_collective::ProcessGroup;
//! use tandem_collective::device::DeviceGroup;
//! use tandem_core::ReduceOp;
//! let pg = ProcessGroup::from_env()?;
//! let gpu = DeviceGroup::new(&pg, 0)?;                 // CUDA_VISIBLE_DEVICES picks the GPU
//! let grads = gpu.to_device(&vec![1.0f32; 1 << 20])?;
//! let grads = gpu.allreduce(grads, ReduceOp::Avg)?;   // NCCL, or the TCP ring through the host
//! let host = gpu.to_host(&grads)?;
//! # Ok::<(), tandem_core::Error>(())
//! ```

use tandem_core::{Element, Error, ReduceOp, Result};

use crate::ProcessGroup;

mod foreign;
#[cfg(feature = "nccl")]
mod nccl;

pub use foreign::ForeignBuffer;

/// Element types collectives on device buffers accept.
#[cfg(feature = "nccl")]
pub trait DeviceElement:
    Element
    + cudarc::nccl::NcclType
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Default
    + Send
    + 'static
{
}

/// Element types collectives on device buffers accept.
#[cfg(not(feature = "nccl"))]
pub trait DeviceElement: Element + Default + Send + 'static {}

impl DeviceElement for f32 {}
impl DeviceElement for f64 {}
impl DeviceElement for half::f16 {}
impl DeviceElement for half::bf16 {}
impl DeviceElement for i32 {}
impl DeviceElement for i64 {}
impl DeviceElement for u8 {}

/// A buffer of `T` on this process's GPU.
#[derive(Debug)]
pub struct DeviceBuffer<T: DeviceElement> {
    /// The device memory.
    #[cfg(feature = "nccl")]
    pub(crate) inner: cudarc::driver::CudaSlice<T>,
    /// Keeps `T` in the type without CUDA.
    #[cfg(not(feature = "nccl"))]
    _never: std::marker::PhantomData<T>,
    /// Elements (without CUDA: what the buffer would hold).
    len: usize,
}

impl<T: DeviceElement> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Wraps a cudarc slice (allocated on the group's context).
    #[cfg(feature = "nccl")]
    pub fn from_cuda(inner: cudarc::driver::CudaSlice<T>) -> Self {
        let len = inner.len();
        DeviceBuffer { inner, len }
    }
    /// The cudarc slice inside.
    #[cfg(feature = "nccl")]
    pub fn cuda(&self) -> &cudarc::driver::CudaSlice<T> {
        &self.inner
    }
    /// The cudarc slice inside, to write.
    #[cfg(feature = "nccl")]
    pub fn cuda_mut(&mut self) -> &mut cudarc::driver::CudaSlice<T> {
        &mut self.inner
    }
    /// Unwraps the cudarc slice.
    #[cfg(feature = "nccl")]
    pub fn into_cuda(self) -> cudarc::driver::CudaSlice<T> {
        self.inner
    }
}

/// Collectives on device buffers for the ranks of a [`ProcessGroup`].
#[derive(Debug)]
pub struct DeviceGroup {
    /// NCCL, or the ring through host memory.
    #[cfg(feature = "nccl")]
    inner: nccl::Inner,
    /// This process's rank.
    rank: usize,
    /// Ranks in the group.
    world: usize,
}

/// The error every device call gives in a build without the `nccl` feature.
#[cfg(not(feature = "nccl"))]
fn not_built() -> Error {
    Error::BackendUnavailable {
        backend: "nccl".into(),
        reason: "Tandem was built without the nccl feature (rebuild with --features nccl)".into(),
    }
}

impl DeviceGroup {
    /// Sets up collectives on GPU `device` (an index among the visible GPUs) for `pg`'s ranks. With
    /// `TANDEM_BACKEND=auto` it uses NCCL when it can and otherwise logs why and stages through the
    /// host over the TCP ring; with `nccl` it fails instead; with `tcp` it always stages.
    pub fn new(pg: &ProcessGroup, device: usize) -> Result<DeviceGroup> {
        #[cfg(feature = "nccl")]
        {
            Ok(DeviceGroup {
                inner: nccl::Inner::new(pg, device)?,
                rank: pg.rank(),
                world: pg.world_size(),
            })
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = (pg, device);
            Err(not_built())
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// `nccl`, or `tcp (staged through the host)`.
    pub fn backend_name(&self) -> &'static str {
        #[cfg(feature = "nccl")]
        {
            self.inner.name()
        }
        #[cfg(not(feature = "nccl"))]
        {
            "none"
        }
    }

    /// Copies `host` to a new device buffer.
    pub fn to_device<T: DeviceElement>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        #[cfg(feature = "nccl")]
        {
            self.inner.to_device(host)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = host;
            Err(not_built())
        }
    }

    /// Copies a device buffer to the host.
    pub fn to_host<T: DeviceElement>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        #[cfg(feature = "nccl")]
        {
            self.inner.to_host(buf)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = buf;
            Err(not_built())
        }
    }

    /// Allreduce in place; returns the buffer.
    pub fn allreduce<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
        op: ReduceOp,
    ) -> Result<DeviceBuffer<T>> {
        let mut v = self.allreduce_many(vec![buf], op)?;
        v.pop()
            .ok_or_else(|| Error::transport("allreduce", "no buffer came back"))
    }

    /// Allreduce of many buffers in one grouped call (one NCCL group, or one fused staging).
    pub fn allreduce_many<T: DeviceElement>(
        &self,
        bufs: Vec<DeviceBuffer<T>>,
        op: ReduceOp,
    ) -> Result<Vec<DeviceBuffer<T>>> {
        #[cfg(feature = "nccl")]
        {
            self.inner.allreduce_many(bufs, op)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = (bufs, op);
            Err(not_built())
        }
    }

    /// Broadcast from `root`, in place.
    pub fn broadcast<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
        root: usize,
    ) -> Result<DeviceBuffer<T>> {
        self.check_root(root)?;
        #[cfg(feature = "nccl")]
        {
            self.inner.broadcast(buf, root)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = buf;
            Err(not_built())
        }
    }

    /// Reduce into `root`'s buffer (other ranks' buffers are left as they were).
    pub fn reduce<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
        op: ReduceOp,
        root: usize,
    ) -> Result<DeviceBuffer<T>> {
        self.check_root(root)?;
        #[cfg(feature = "nccl")]
        {
            self.inner.reduce(buf, op, root)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = (buf, op);
            Err(not_built())
        }
    }

    /// Every rank's buffer, concatenated in rank order: returns `(input, gathered)`, the second a new
    /// buffer of `world × len`.
    pub fn allgather<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<T>)> {
        #[cfg(feature = "nccl")]
        {
            self.inner.allgather(buf)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = buf;
            Err(not_built())
        }
    }

    /// Reduces every rank's buffer; returns `(input, part)`, the second this rank's `len / world`
    /// elements (NCCL needs the length to be a multiple of the world size; other lengths are an
    /// error naming it).
    pub fn reduce_scatter<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
        op: ReduceOp,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<T>)> {
        if !buf.len().is_multiple_of(self.world) {
            return Err(Error::invalid(
                "buffer",
                format!(
                    "{} elements do not split evenly over {} ranks",
                    buf.len(),
                    self.world
                ),
            ));
        }
        #[cfg(feature = "nccl")]
        {
            self.inner.reduce_scatter(buf, op)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = op;
            Err(not_built())
        }
    }

    /// Refuses a root that is not a rank of the group, naming it.
    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::invalid(
                "root",
                format!("rank {root} is not below the world size {}", self.world),
            ));
        }
        Ok(())
    }
}
