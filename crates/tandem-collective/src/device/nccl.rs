//! The NCCL side of [`super::DeviceGroup`]: library probing, the unique-id bootstrap through the
//! rendezvous, the thread that owns the communicator, and the host-staged fallback.
//!
//! Why so careful: cudarc panics when a library it needs is missing, NCCL's communicator is not
//! `Send`, and a rank that gives up on NCCL while the others wait in `ncclCommInitRank` hangs them.
//! So libraries are probed before any cudarc call, every setup step that can fail on one rank is
//! agreed by all ranks (`ProcessGroup::agree`) before anyone commits to NCCL, one thread owns the
//! communicator and its stream (ops are closures sent to it), and every op ends with a stream
//! synchronize under the group's deadline.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::sys::ncclResult_t;
use cudarc::nccl::{Comm, Id};
use tandem_core::{Error, ReduceOp, Result};

use super::{DeviceBuffer, DeviceElement};

mod foreign;
use crate::{BackendKind, ProcessGroup};

/// What cudarc's `NcclError` does not say: the meaning of NCCL's result code.
fn nccl_error(what: &str, e: NcclError) -> Error {
    let meaning = match e.0 {
        ncclResult_t::ncclUnhandledCudaError => "a CUDA call failed inside NCCL",
        ncclResult_t::ncclSystemError => {
            "a system call failed (network, shared memory, or out of resources)"
        }
        ncclResult_t::ncclInternalError => "NCCL internal error",
        ncclResult_t::ncclInvalidArgument => "invalid argument (buffer, count, type or root)",
        ncclResult_t::ncclInvalidUsage => {
            "invalid usage (e.g. two ranks on one GPU, or mismatched calls)"
        }
        ncclResult_t::ncclRemoteError => "a remote rank failed or disconnected",
        ncclResult_t::ncclInProgress => "operation still in progress",
        _ => "unknown NCCL result",
    };
    Error::transport(
        format!("NCCL {what}"),
        format!("{:?} (code {}: {meaning})", e.0, e.0 as u32),
    )
}

/// A CUDA driver failure as Tandem's error, naming what was being done.
fn driver_error(what: &str, e: DriverError) -> Error {
    Error::transport(format!("CUDA {what}"), e.to_string())
}

/// NCCL's operator for `op`; an operator NCCL lacks is refused, naming it.
fn op(op: ReduceOp) -> Result<cudarc::nccl::ReduceOp> {
    Ok(match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Avg => cudarc::nccl::ReduceOp::Avg,
        ReduceOp::Min => cudarc::nccl::ReduceOp::Min,
        ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
        ReduceOp::Prod => cudarc::nccl::ReduceOp::Prod,
        other => {
            return Err(Error::invalid(
                "op",
                format!("{other:?} has no NCCL equivalent"),
            ));
        }
    })
}

/// Whether libcuda and libnccl can be loaded. cudarc panics on the first call into a missing
/// library, so this is asked first.
fn libraries() -> (bool, bool) {
    #[allow(unsafe_code)]
    // SAFETY: both functions only try to dlopen the libraries by their usual names and drop the
    // handles again; no symbol is resolved or called.
    unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present(),
        )
    }
}

/// Why NCCL's library was not found, with the usual fix.
const NO_NCCL: &str = "libnccl.so was not found on the library path (the nvidia-nccl-cu12 wheel \
ships only libnccl.so.2: add a libnccl.so link to it in a folder on LD_LIBRARY_PATH, or install \
libnccl-dev)";

/// Work for the communicator's thread.
type Job = Box<dyn FnOnce(&Comm) + Send>;

/// The thread that owns the communicator.
#[derive(Debug)]
pub(crate) struct CommThread {
    /// Jobs for the communicator's thread.
    tx: Mutex<mpsc::Sender<Job>>,
    /// Set when a job panicked or timed out: the communicator is unusable.
    poisoned: Arc<AtomicBool>,
    /// Deadline of each job.
    timeout: Duration,
    /// Ranks in the communicator.
    world: usize,
    /// The communicator's flight recorder (its operations do not pass the ring's).
    log: Arc<tandem_observe::oplog::OpLog>,
    /// The number of the last operation recorded; held while one runs.
    seq: Mutex<u64>,
}

/// The NCCL group cannot be used, and why.
fn unusable(reason: &str) -> Error {
    Error::Unusable {
        what: "NCCL group".into(),
        reason: reason.into(),
    }
}

impl CommThread {
    /// Starts the thread that owns the communicator and runs the jobs sent to it.
    fn start(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: Id,
        timeout: Duration,
    ) -> Result<CommThread> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let poisoned = Arc::new(AtomicBool::new(false));
        let flag = poisoned.clone();
        std::thread::Builder::new()
            .name(format!("tandem-nccl-{rank}"))
            .spawn(move || {
                // NCCL takes its device from the calling thread's current context.
                if let Err(e) = stream.context().bind_to_thread() {
                    let _ = ready_tx.send(Err(driver_error("binding the context", e)));
                    return;
                }
                let comm = match Comm::from_rank(stream, rank, world, id) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(nccl_error("communicator init", e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = rx.recv() {
                    if catch_unwind(AssertUnwindSafe(|| job(&comm))).is_err() {
                        flag.store(true, Ordering::Release);
                        break;
                    }
                }
                // cudarc's Drop aborts the communicator and panics if that fails: keep it here.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(comm)));
            })
            .map_err(|e| Error::io("starting the NCCL thread", e))?;
        match ready_rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(CommThread {
                tx: Mutex::new(tx),
                poisoned,
                timeout,
                world,
                log: crate::observe::log(),
                seq: Mutex::new(0),
            }),
            Ok(Err(e)) => Err(e),
            // A blocking ncclCommInitRank cannot be interrupted; its thread is left to finish or
            // hang on its own, and nothing else uses it.
            Err(RecvTimeoutError::Timeout) => Err(Error::timeout(
                format!(
                    "NCCL communicator init on rank {rank} of {world} (a rank is missing, or NCCL cannot reach it)"
                ),
                timeout,
            )),
            Err(RecvTimeoutError::Disconnected) => Err(Error::transport(
                "NCCL communicator init",
                "its thread stopped",
            )),
        }
    }

    /// [`CommThread::run`], recorded as `op` (flight recorder, metrics, timeline); one
    /// operation at a time is recorded, as the thread runs them one at a time.
    fn observed<R: Send + 'static>(
        &self,
        what: &str,
        op: crate::observe::DeviceOp,
        job: impl FnOnce(&Comm) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let mut seq = self
            .seq
            .lock()
            .map_err(|_| unusable("its recorder was poisoned"))?;
        *seq += 1;
        crate::observe::device_op(&self.log, *seq, op, || self.run(what, job))
    }

    /// Runs `f` on the communicator's thread and waits for it within the group's deadline.
    fn run<R: Send + 'static>(
        &self,
        what: &str,
        job: impl FnOnce(&Comm) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(unusable("an earlier operation failed or timed out"));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let sent = self
            .tx
            .lock()
            .map_err(|_| unusable("its queue was poisoned"))?
            .send(Box::new(move |c: &Comm| {
                let _ = tx.send(job(c));
            }));
        if sent.is_err() {
            return Err(unusable("its thread stopped"));
        }
        let r = match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(Error::timeout(
                format!("NCCL {what} to finish"),
                self.timeout,
            )),
            Err(RecvTimeoutError::Disconnected) => Err(Error::transport(
                format!("NCCL {what}"),
                "the NCCL thread panicked",
            )),
        };
        if r.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        r
    }
}

/// NCCL, or the TCP ring through host memory.
#[derive(Debug)]
pub(crate) enum Inner {
    /// NCCL on the GPUs.
    Nccl {
        thread: CommThread,
        stream: Arc<CudaStream>,
    },
    /// The TCP ring through host memory (copies in and out of the GPU).
    Staged {
        pg: ProcessGroup,
        stream: Arc<CudaStream>,
    },
}

/// Waits for the stream's queued work.
fn sync(comm: &Comm) -> Result<()> {
    comm.stream()
        .synchronize()
        .map_err(|e| driver_error("stream synchronize", e))
}

impl Inner {
    /// Makes the NCCL communicator of `pg`'s ranks on GPU `device`, its unique id passed through the
    /// group.
    pub(crate) fn new(pg: &ProcessGroup, device: usize) -> Result<Inner> {
        let (cuda, nccl) = libraries();
        if !cuda {
            return Err(Error::BackendUnavailable {
                backend: "cuda".into(),
                reason: "libcuda.so was not found: this machine has no NVIDIA driver".into(),
            });
        }
        let count = CudaContext::device_count().map_err(|e| driver_error("counting GPUs", e))?;
        if device >= count.max(0) as usize {
            return Err(Error::invalid(
                "device",
                format!("GPU {device} does not exist: {count} visible (CUDA_VISIBLE_DEVICES)"),
            ));
        }
        let ctx = CudaContext::new(device)
            .map_err(|e| driver_error(&format!("context on GPU {device}"), e))?;
        let stream = ctx.default_stream();
        let kind = pg.backend_kind();
        let staged = || Inner::Staged {
            pg: pg.clone(),
            stream: stream.clone(),
        };
        if kind == BackendKind::Tcp {
            tracing::info!("device collectives: tcp ring through the host (TANDEM_BACKEND=tcp)");
            return Ok(staged());
        }
        let fallback = |why: String| -> Result<Inner> {
            if kind == BackendKind::Nccl {
                return Err(Error::BackendUnavailable {
                    backend: "nccl".into(),
                    reason: why,
                });
            }
            tracing::warn!("device collectives: tcp ring through the host ({why})");
            Ok(staged())
        };
        // Every step that can fail on one rank is agreed by all, so no rank waits on a communicator
        // the others gave up on, and all ranks end on the same backend.
        let agreed =
            |mine: std::result::Result<(), &str>| -> Result<std::result::Result<(), crate::Declined>> {
                // Longer than a communicator init may take, so a rank stuck there is waited for.
                pg.with_timeout(pg.timeout().saturating_mul(2)).agree(mine)
            };
        if let Err(why) = agreed(if nccl { Ok(()) } else { Err(NO_NCCL) })? {
            return fallback(why.to_string());
        }
        // Rank 0 makes the unique id and shares it through the rendezvous (empty if it could not);
        // no files, no sleeps.
        let made = if pg.rank() == 0 {
            let made = Id::new().map_err(|e| nccl_error("unique id", e));
            let bytes: Vec<u8> = match &made {
                Ok(id) => id.internal().iter().map(|&c| c as u8).collect(),
                Err(_) => Vec::new(),
            };
            pg.share("nccl-id", Some(bytes))?;
            made.map(Some)
        } else {
            let bytes = pg.share("nccl-id", None)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() == internal.len() {
                for (d, s) in internal.iter_mut().zip(&bytes) {
                    *d = *s as std::ffi::c_char;
                }
                Ok(Some(Id::uninit(internal)))
            } else if bytes.is_empty() {
                Ok(None) // rank 0 could not make one: it says why below
            } else {
                Err(Error::transport(
                    "the NCCL unique id",
                    format!("{} bytes instead of 128", bytes.len()),
                ))
            }
        };
        let why = made.as_ref().err().map(|e| e.to_string());
        if let Err(why) = agreed(why.as_deref().map_or(Ok(()), Err))? {
            return fallback(format!("NCCL could not start: {why}"));
        }
        let Ok(Some(id)) = made else {
            return fallback("NCCL could not start: no unique id from rank 0".into());
        };
        let started =
            CommThread::start(stream.clone(), pg.rank(), pg.world_size(), id, pg.timeout());
        let why = started.as_ref().err().map(|e| e.to_string());
        match (agreed(why.as_deref().map_or(Ok(()), Err))?, started) {
            (Ok(()), Ok(thread)) => {
                tracing::info!(rank = pg.rank(), device, "device collectives: nccl");
                Ok(Inner::Nccl { thread, stream })
            }
            // A communicator that started here is dropped (aborted on its own thread) when another
            // rank's did not.
            (Err(why), _) => fallback(format!("NCCL could not start: {why}")),
            (Ok(()), Err(e)) => fallback(format!("NCCL could not start: {e}")),
        }
    }

    /// `nccl`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Inner::Nccl { .. } => "nccl",
            Inner::Staged { .. } => "tcp (staged through the host)",
        }
    }

    /// The CUDA stream the communicator's work runs on.
    fn stream(&self) -> &Arc<CudaStream> {
        match self {
            Inner::Nccl { stream, .. } | Inner::Staged { stream, .. } => stream,
        }
    }

    /// Ranks in the communicator.
    fn world(&self) -> usize {
        match self {
            Inner::Nccl { thread, .. } => thread.world,
            Inner::Staged { pg, .. } => pg.world_size(),
        }
    }

    /// A device copy of `host`.
    pub(crate) fn to_device<T: DeviceElement>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let inner = self
            .stream()
            .clone_htod(host)
            .map_err(|e| driver_error("copy to the GPU", e))?;
        Ok(DeviceBuffer::from_cuda(inner))
    }

    /// A host copy of `buf`.
    pub(crate) fn to_host<T: DeviceElement>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        self.stream()
            .clone_dtoh(&buf.inner)
            .map_err(|e| driver_error("copy from the GPU", e))
    }

    /// A device buffer of `n` zeros.
    fn zeros<T: DeviceElement>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        let inner = self
            .stream()
            .alloc_zeros::<T>(n)
            .map_err(|e| driver_error("allocation", e))?;
        Ok(DeviceBuffer::from_cuda(inner))
    }

    /// Copies `host` into `buf`.
    fn upload<T: DeviceElement>(&self, host: &[T], buf: &mut DeviceBuffer<T>) -> Result<()> {
        let s = self.stream();
        s.memcpy_htod(host, &mut buf.inner)
            .map_err(|e| driver_error("copy to the GPU", e))?;
        s.synchronize()
            .map_err(|e| driver_error("stream synchronize", e))
    }

    /// Allreduces several device buffers in one group call.
    pub(crate) fn allreduce_many<T: DeviceElement>(
        &self,
        mut bufs: Vec<DeviceBuffer<T>>,
        reduce: ReduceOp,
    ) -> Result<Vec<DeviceBuffer<T>>> {
        match self {
            Inner::Nccl { thread, .. } => {
                let nop = op(reduce)?;
                let count = bufs.iter().map(DeviceBuffer::len).sum();
                let what = crate::observe::DeviceOp {
                    kind: 0,
                    dtype: T::DTYPE,
                    op: Some(reduce),
                    root: None,
                    count,
                };
                thread.observed("allreduce", what, move |comm| {
                    cudarc::nccl::group_start().map_err(|e| nccl_error("group start", e))?;
                    let mut r = Ok(());
                    for b in bufs.iter_mut() {
                        if let Err(e) = comm.all_reduce_in_place(&mut b.inner, &nop) {
                            r = Err(nccl_error("allreduce", e));
                            break;
                        }
                    }
                    let end = cudarc::nccl::group_end().map_err(|e| nccl_error("group end", e));
                    r?;
                    end?;
                    sync(comm)?;
                    Ok(bufs)
                })
            }
            Inner::Staged { pg, .. } => {
                // One fused host buffer, one allreduce over the ring.
                let mut host = Vec::with_capacity(bufs.iter().map(DeviceBuffer::len).sum());
                for b in &bufs {
                    host.extend(self.to_host(b)?);
                }
                pg.allreduce(&mut host, reduce)?;
                let mut at = 0;
                for b in bufs.iter_mut() {
                    let n = b.len();
                    self.upload(&host[at..at + n], b)?;
                    at += n;
                }
                Ok(bufs)
            }
        }
    }

    /// Broadcasts `buf` from `root`.
    pub(crate) fn broadcast<T: DeviceElement>(
        &self,
        mut buf: DeviceBuffer<T>,
        root: usize,
    ) -> Result<DeviceBuffer<T>> {
        match self {
            Inner::Nccl { thread, .. } => thread.observed(
                "broadcast",
                crate::observe::DeviceOp {
                    kind: 1,
                    dtype: T::DTYPE,
                    op: None,
                    root: Some(root),
                    count: buf.len(),
                },
                move |comm| {
                    comm.broadcast_in_place(&mut buf.inner, root as i32)
                        .map_err(|e| nccl_error("broadcast", e))?;
                    sync(comm)?;
                    Ok(buf)
                },
            ),
            Inner::Staged { pg, .. } => {
                let mut host = self.to_host(&buf)?;
                pg.broadcast(&mut host, root)?;
                self.upload(&host, &mut buf)?;
                Ok(buf)
            }
        }
    }

    /// Reduces into `root`'s buffer.
    pub(crate) fn reduce<T: DeviceElement>(
        &self,
        mut buf: DeviceBuffer<T>,
        reduce: ReduceOp,
        root: usize,
    ) -> Result<DeviceBuffer<T>> {
        match self {
            Inner::Nccl { thread, .. } => {
                let nop = op(reduce)?;
                let what = crate::observe::DeviceOp {
                    kind: 4,
                    dtype: T::DTYPE,
                    op: Some(reduce),
                    root: Some(root),
                    count: buf.len(),
                };
                thread.observed("reduce", what, move |comm| {
                    comm.reduce_in_place(&mut buf.inner, &nop, root as i32)
                        .map_err(|e| nccl_error("reduce", e))?;
                    sync(comm)?;
                    Ok(buf)
                })
            }
            Inner::Staged { pg, .. } => {
                let mut host = self.to_host(&buf)?;
                pg.reduce(&mut host, reduce, root)?;
                if pg.rank() == root {
                    self.upload(&host, &mut buf)?;
                }
                Ok(buf)
            }
        }
    }

    /// Gathers every rank's `send` into `recv`, in rank order.
    pub(crate) fn allgather<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<T>)> {
        let world = self.world();
        let mut out = self.zeros::<T>(buf.len() * world)?;
        match self {
            Inner::Nccl { thread, .. } => thread.observed(
                "allgather",
                crate::observe::DeviceOp {
                    kind: 2,
                    dtype: T::DTYPE,
                    op: None,
                    root: None,
                    count: buf.len(),
                },
                move |comm| {
                    comm.all_gather(&buf.inner, &mut out.inner)
                        .map_err(|e| nccl_error("allgather", e))?;
                    sync(comm)?;
                    Ok((buf, out))
                },
            ),
            Inner::Staged { pg, .. } => {
                let host = self.to_host(&buf)?;
                let mut all = vec![T::default(); host.len() * world];
                pg.allgather(&host, &mut all)?;
                self.upload(&all, &mut out)?;
                Ok((buf, out))
            }
        }
    }

    /// Reduces `send` and scatters it: each rank receives its part in `recv`.
    pub(crate) fn reduce_scatter<T: DeviceElement>(
        &self,
        buf: DeviceBuffer<T>,
        reduce: ReduceOp,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<T>)> {
        let part = buf.len() / self.world().max(1);
        let mut out = self.zeros::<T>(part)?;
        match self {
            Inner::Nccl { thread, .. } => {
                let nop = op(reduce)?;
                let what = crate::observe::DeviceOp {
                    kind: 3,
                    dtype: T::DTYPE,
                    op: Some(reduce),
                    root: None,
                    count: buf.len(),
                };
                thread.observed("reduce-scatter", what, move |comm| {
                    comm.reduce_scatter(&buf.inner, &mut out.inner, &nop)
                        .map_err(|e| nccl_error("reduce-scatter", e))?;
                    sync(comm)?;
                    Ok((buf, out))
                })
            }
            Inner::Staged { pg, .. } => {
                let mut host = self.to_host(&buf)?;
                let range = pg.reduce_scatter(&mut host, reduce)?;
                self.upload(&host[range], &mut out)?;
                Ok((buf, out))
            }
        }
    }
}
