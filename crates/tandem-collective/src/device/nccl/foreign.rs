//! Foreign device memory ([`ForeignBuffer`]) through NCCL on the communicator's thread, or staged
//! through the host over the TCP ring. Before anything moves, the address is checked with the
//! driver: memory CUDA knows, on the group's GPU, with every byte inside one allocation.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::BytesMut;
use cudarc::driver::sys::{self, CUpointer_attribute_enum as Attr};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use tandem_core::tensor::aligned_zeroed;
use tandem_core::{DType, Error, ReduceOp, Result};

use super::{Inner, driver_error, nccl_error, op, sync};
use crate::device::ForeignBuffer;
use crate::observe::DeviceOp;

/// Foreign memory as cudarc's slice traits want it. No event tracking: the caller finished the
/// work on it before the call, and every call ends with a synchronize of the group's stream.
struct Foreign<T> {
    /// Device address.
    ptr: sys::CUdeviceptr,
    /// Elements of `T`.
    len: usize,
    /// The group's stream.
    stream: Arc<CudaStream>,
    /// The element type, without owning one.
    _t: PhantomData<fn() -> T>,
}

impl<T> Foreign<T> {
    /// `buf` as elements of `T` (the caller matched `T` to its dtype).
    fn typed(buf: &ForeignBuffer, stream: &Arc<CudaStream>) -> Foreign<T> {
        Foreign {
            ptr: buf.addr(),
            len: buf.len(),
            stream: stream.clone(),
            _t: PhantomData,
        }
    }
}

impl Foreign<u8> {
    /// `buf` as bytes, for the collectives that only move data.
    fn bytes(buf: &ForeignBuffer, stream: &Arc<CudaStream>) -> Result<Foreign<u8>> {
        Ok(Foreign {
            ptr: buf.addr(),
            len: buf.bytes("buffer")?,
            stream: stream.clone(),
            _t: PhantomData,
        })
    }
}

impl<T> DeviceSlice<T> for Foreign<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for Foreign<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for Foreign<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

/// Runs `$body` with `$t` the Rust type of `$dtype` (the element types NCCL reduces).
macro_rules! typed {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::I32 => {
                type $t = i32;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::U8 => {
                type $t = u8;
                $body
            }
            other => Err(Error::invalid(
                "dtype",
                format!("{} has no NCCL reduction here", other.name()),
            )),
        }
    };
}

/// One pointer attribute of `addr` from the driver.
fn attribute<V: Default>(addr: u64, attr: Attr) -> std::result::Result<V, sys::CUresult> {
    let mut value = V::default();
    #[allow(unsafe_code)]
    // SAFETY: `value` is the type the driver writes for each attribute asked for here (int for the
    // ordinal, CUdeviceptr for the range start, size_t for the range size), and lives past the call.
    let r = unsafe { sys::cuPointerGetAttribute(&mut value as *mut V as *mut c_void, attr, addr) };
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(value),
        e => Err(e),
    }
}

/// Checks with the driver that `buf` is memory on the stream's GPU, every byte inside one
/// allocation. Binds the group's context to this thread (the staged copies need it too).
fn check_on_gpu(stream: &CudaStream, what: &str, buf: &ForeignBuffer) -> Result<()> {
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| driver_error("binding the context", e))?;
    if buf.is_empty() {
        return Ok(());
    }
    let addr = buf.addr();
    let unknown = |e: sys::CUresult| {
        Error::invalid(
            what,
            format!(
                "{addr:#x} is not GPU memory CUDA knows ({e:?}): pass a CUDA tensor's data_ptr()"
            ),
        )
    };
    let ordinal: i32 =
        attribute(addr, Attr::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL).map_err(unknown)?;
    if usize::try_from(ordinal).ok() != Some(ctx.ordinal()) {
        return Err(Error::invalid(
            what,
            format!(
                "the memory is on GPU {ordinal}, but this group was set up on GPU {} (call \
                 torch.cuda.set_device, or move the tensor)",
                ctx.ordinal()
            ),
        ));
    }
    let start: sys::CUdeviceptr =
        attribute(addr, Attr::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR).map_err(unknown)?;
    let size: usize = attribute(addr, Attr::CU_POINTER_ATTRIBUTE_RANGE_SIZE).map_err(unknown)?;
    let end = start.saturating_add(size as u64);
    let want = addr.saturating_add(buf.bytes(what)? as u64);
    if want > end {
        return Err(Error::invalid(
            what,
            format!(
                "{} elements of {} at {addr:#x} run {} bytes past the end of their allocation",
                buf.len(),
                buf.dtype().name(),
                want - end
            ),
        ));
    }
    Ok(())
}

/// A host copy of `buf` (aligned for its dtype).
fn download(buf: &ForeignBuffer) -> Result<BytesMut> {
    let mut host = aligned_zeroed(buf.bytes("buffer")?);
    #[allow(unsafe_code)]
    // SAFETY: `check_on_gpu` bound the context and checked that the bytes lie in one allocation on
    // this GPU; ForeignBuffer's contract keeps it allocated and idle during the call.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host[..], buf.addr()) }
        .map_err(|e| driver_error("copy from the GPU", e))?;
    Ok(host)
}

/// Writes `host` to device address `addr` (checked by `check_on_gpu` to hold as many bytes).
fn upload(host: &[u8], addr: u64) -> Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: as in `download`: the range was checked and the memory is the caller's to write.
    unsafe { cudarc::driver::result::memcpy_htod_sync(addr, host) }
        .map_err(|e| driver_error("copy to the GPU", e))
}

impl Inner {
    /// Allreduce in place.
    pub(crate) fn allreduce_foreign(&self, buf: ForeignBuffer, reduce: ReduceOp) -> Result<()> {
        check_on_gpu(self.stream(), "buffer", &buf)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let nop = op(reduce)?;
                let what = DeviceOp::of(0, &buf, Some(reduce), None);
                typed!(buf.dtype(), T => {
                    let mut f = Foreign::<T>::typed(&buf, stream);
                    thread.observed("allreduce", what, move |comm| {
                        comm.all_reduce_in_place(&mut f, &nop)
                            .map_err(|e| nccl_error("allreduce", e))?;
                        sync(comm)
                    })
                })
            }
            Inner::Staged { pg, .. } => {
                let mut host = download(&buf)?;
                pg.allreduce_bytes(&mut host, buf.dtype(), reduce)?;
                upload(&host, buf.addr())
            }
        }
    }

    /// Broadcast from `root`, in place.
    pub(crate) fn broadcast_foreign(&self, buf: ForeignBuffer, root: usize) -> Result<()> {
        check_on_gpu(self.stream(), "buffer", &buf)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let mut f = Foreign::bytes(&buf, stream)?;
                let what = DeviceOp::of(1, &buf, None, Some(root));
                thread.observed("broadcast", what, move |comm| {
                    comm.broadcast_in_place(&mut f, root as i32)
                        .map_err(|e| nccl_error("broadcast", e))?;
                    sync(comm)
                })
            }
            Inner::Staged { pg, .. } => {
                let mut host = download(&buf)?;
                pg.broadcast_bytes(&mut host, buf.dtype(), root)?;
                upload(&host, buf.addr())
            }
        }
    }

    /// Reduce into `root`'s memory; the others' is left as it was.
    pub(crate) fn reduce_foreign(
        &self,
        buf: ForeignBuffer,
        reduce: ReduceOp,
        root: usize,
    ) -> Result<()> {
        check_on_gpu(self.stream(), "buffer", &buf)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let nop = op(reduce)?;
                let what = DeviceOp::of(4, &buf, Some(reduce), Some(root));
                typed!(buf.dtype(), T => {
                    let mut f = Foreign::<T>::typed(&buf, stream);
                    thread.observed("reduce", what, move |comm| {
                        comm.reduce_in_place(&mut f, &nop, root as i32)
                            .map_err(|e| nccl_error("reduce", e))?;
                        sync(comm)
                    })
                })
            }
            Inner::Staged { pg, .. } => {
                // The ring uses the host copy as scratch; only the root's result goes back.
                let mut host = download(&buf)?;
                pg.reduce_bytes(&mut host, buf.dtype(), reduce, root)?;
                if pg.rank() == root {
                    upload(&host, buf.addr())?;
                }
                Ok(())
            }
        }
    }

    /// Every rank's `input` into `output`, in rank order.
    pub(crate) fn allgather_foreign(
        &self,
        input: ForeignBuffer,
        output: ForeignBuffer,
    ) -> Result<()> {
        check_on_gpu(self.stream(), "input", &input)?;
        check_on_gpu(self.stream(), "output", &output)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let send = Foreign::bytes(&input, stream)?;
                let mut recv = Foreign::bytes(&output, stream)?;
                let what = DeviceOp::of(2, &input, None, None);
                thread.observed("allgather", what, move |comm| {
                    comm.all_gather(&send, &mut recv)
                        .map_err(|e| nccl_error("allgather", e))?;
                    sync(comm)
                })
            }
            Inner::Staged { pg, .. } => {
                let host = download(&input)?;
                let mut all = aligned_zeroed(output.bytes("output")?);
                pg.allgather_bytes(&host, &mut all, input.dtype())?;
                upload(&all, output.addr())
            }
        }
    }

    /// Reduces every rank's `input`; this rank's block of the result into `output`.
    pub(crate) fn reduce_scatter_foreign(
        &self,
        input: ForeignBuffer,
        output: ForeignBuffer,
        reduce: ReduceOp,
    ) -> Result<()> {
        check_on_gpu(self.stream(), "input", &input)?;
        check_on_gpu(self.stream(), "output", &output)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let nop = op(reduce)?;
                let what = DeviceOp::of(3, &input, Some(reduce), None);
                typed!(input.dtype(), T => {
                    let send = Foreign::<T>::typed(&input, stream);
                    let mut recv = Foreign::<T>::typed(&output, stream);
                    thread.observed("reduce-scatter", what, move |comm| {
                        comm.reduce_scatter(&send, &mut recv, &nop)
                            .map_err(|e| nccl_error("reduce-scatter", e))?;
                        sync(comm)
                    })
                })
            }
            Inner::Staged { pg, .. } => {
                let mut host = download(&input)?;
                let range = pg.reduce_scatter_bytes(&mut host, input.dtype(), reduce)?;
                let size = input.dtype().size();
                // The blocks are equal (checked), so the ring's part for this rank is its block.
                if range.len() != output.len() {
                    return Err(Error::transport(
                        "reduce-scatter",
                        format!(
                            "this rank's part has {} elements, its output {}",
                            range.len(),
                            output.len()
                        ),
                    ));
                }
                upload(&host[range.start * size..range.end * size], output.addr())
            }
        }
    }

    /// Sends `buf` to rank `to`.
    pub(crate) fn send_foreign(&self, buf: ForeignBuffer, to: usize) -> Result<()> {
        check_on_gpu(self.stream(), "buffer", &buf)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let f = Foreign::bytes(&buf, stream)?;
                let what = DeviceOp::of(6, &buf, None, Some(to));
                thread.observed("send", what, move |comm| {
                    comm.send(&f, to as i32)
                        .map_err(|e| nccl_error("send", e))?;
                    sync(comm)
                })
            }
            Inner::Staged { pg, .. } => {
                let host = download(&buf)?;
                pg.send_bytes(&host, buf.dtype(), to)
            }
        }
    }

    /// Receives into `buf` from rank `from`.
    pub(crate) fn recv_foreign(&self, buf: ForeignBuffer, from: usize) -> Result<()> {
        check_on_gpu(self.stream(), "buffer", &buf)?;
        match self {
            Inner::Nccl { thread, stream } => {
                let mut f = Foreign::bytes(&buf, stream)?;
                let what = DeviceOp::of(7, &buf, None, Some(from));
                thread.observed("receive", what, move |comm| {
                    comm.recv(&mut f, from as i32)
                        .map_err(|e| nccl_error("receive", e))?;
                    sync(comm)
                })
            }
            Inner::Staged { pg, .. } => {
                let mut host = aligned_zeroed(buf.bytes("buffer")?);
                pg.recv_bytes(&mut host, buf.dtype(), from)?;
                upload(&host, buf.addr())
            }
        }
    }
}

impl DeviceOp {
    /// Operation `kind` (an index into the metrics' kinds) on `buf`.
    fn of(kind: usize, buf: &ForeignBuffer, op: Option<ReduceOp>, root: Option<usize>) -> DeviceOp {
        DeviceOp {
            kind,
            dtype: buf.dtype(),
            op,
            root,
            count: buf.len(),
        }
    }
}
