//! The process group: the collective API users call, in blocking and async forms.
//!
//! - `config`: [`GroupConfig`] from the environment.
//! - `form`: forming a group (rendezvous, mesh, same-host probe), cancellable.
//! - `work`: the async queue and the fence that keeps issue order.
//! - `control`: share, agree, abort and shutdown through the rendezvous.
//!
//! This file holds the group itself and the operations: argument checks here, the bytes moved by
//! the backend.

mod auto;
mod cancel;
mod compressed;
mod config;
mod control;
mod form;
mod peers;
mod work;

pub use cancel::Cancel;
pub use config::{DEFAULT_NAME, GroupConfig, MAX_STREAMS_PER_PEER, STREAMS_VAR};
use control::Control;
pub use control::Declined;
pub use work::Work;
use work::{Job, Queue, poisoned_queue};

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ndarray::{ArrayBase, DataMut, Dimension};
use tandem_core::cluster::Vars;
use tandem_core::{ClusterSpec, DType, Element, Error, ReduceOp, Result, Tensor, TensorMut};
use tandem_rendezvous::{JobToken, Session, TOKEN_VAR};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::backend::tcp_ring::{Publish, SameHost, TcpRing, Tuning};
use crate::backend::{Backend, BackendKind, resolve};
use crate::transport::frame::group_id;
use crate::transport::mesh::{MeshSpec, establish};
use crate::transport::peer_memory::{LocalWord, PeerMemory};

/// What a group and its clones share: who it is, its backend, its queue of background work.
struct Shared {
    /// The group's name.
    name: String,
    /// Its default compression of gradient allreduces.
    compression: crate::compression::Compression,
    /// Whether every rank is on this machine (`auto` compression measures nothing then).
    one_machine: bool,
    /// What `auto` compression chose, once measured.
    auto: Mutex<Option<crate::compression::AutoChoice>>,
    /// The largest allreduce (its bytes times `world − 1`) that takes the latency path (one hop
    /// or recursive doubling), which `auto` never compresses.
    direct_bytes: usize,
    /// Which backend it asked for.
    kind: BackendKind,
    /// This rank.
    rank: usize,
    /// Ranks in the group.
    world: usize,
    /// The backend (none after shutdown, or for a group of one).
    backend: Option<Box<dyn Backend>>,
    /// Background operations submitted and completed.
    queue: Mutex<Queue>,
    /// Notified when every submitted operation completed.
    drained: Condvar,
    /// The worker thread's queue, once started.
    engine: Mutex<Option<mpsc::Sender<Job>>>,
    /// The control plane (none for a group of one).
    control: Option<Control>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        tandem_observe::timeline::flush();
        if let Some(c) = &self.control
            && let Ok(mut w) = c.watcher.lock()
            && let Some(h) = w.take()
        {
            h.abort();
        }
    }
}

/// A group of ranks that run collectives together.
///
/// Every operation has a deadline (the group's default, or [`ProcessGroup::with_timeout`]); a peer that
/// dies, stops answering or calls a different operation makes every rank return an error that names it.
/// After such an error the group is unusable and says so.
///
/// ```no_run
/// use tandem_collective::ProcessGroup;
/// use tandem_core::ReduceOp;
/// let pg = ProcessGroup::from_env()?;          // RANK/WORLD_SIZE, TF_CONFIG, Slurm, ...
/// let mut grads = vec![1.0f32; 1024];
/// pg.allreduce(&mut grads, ReduceOp::Avg)?;
/// pg.shutdown()?;
/// # Ok::<(), tandem_core::Error>(())
/// ```
#[derive(Clone)]
pub struct ProcessGroup {
    /// What the group's clones share.
    shared: Arc<Shared>,
    /// Default deadline of each operation.
    timeout: Duration,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.shared.rank)
            .field("world", &self.shared.world)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ProcessGroup {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.shared.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Whether large ring steps copy straight from the neighbouring rank's memory (all ranks on one
    /// machine and the kernel allows it) instead of streaming through TCP sockets.
    pub fn same_host(&self) -> bool {
        self.shared.backend.as_ref().is_some_and(|b| b.same_host())
    }

    /// How this rank's connections to its peers are carried: over local sockets (processes of
    /// this user on this machine), TLS or plaintext TCP. All zero for a world of one.
    pub fn links(&self) -> crate::transport::mesh::Links {
        self.shared
            .backend
            .as_ref()
            .map_or_else(Default::default, |b| b.links())
    }

    /// The backend in use (`"tcp"`, or `"local"` for a world of one).
    pub fn backend_name(&self) -> &'static str {
        self.shared.backend.as_ref().map_or("local", |b| b.name())
    }

    /// A handle on the same group whose operations use `timeout` instead of the default.
    pub fn with_timeout(&self, timeout: Duration) -> ProcessGroup {
        ProcessGroup {
            shared: self.shared.clone(),
            timeout,
        }
    }

    /// The deadline operations of this handle use.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The backend, or Unusable once the group was shut down.
    fn backend(&self) -> Result<&dyn Backend> {
        self.shared
            .backend
            .as_deref()
            .ok_or_else(|| Error::invalid("world", "a world of one has no backend"))
    }

    /// Refuses a root that is not a rank of the group, naming the operation.
    fn check_root(&self, name: &str, root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(Error::invalid(
                name,
                format!(
                    "rank {root} is not below the world size {}",
                    self.shared.world
                ),
            ));
        }
        Ok(())
    }

    /// In-place allreduce of raw little-endian bytes of `dtype`.
    pub fn allreduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.allreduce(buf, dtype, op, self.timeout)
    }

    /// In-place broadcast of raw bytes from `root`.
    pub fn broadcast_bytes(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_root("root", root)?;
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.broadcast(buf, dtype, root, self.timeout)
    }

    /// Allgather of raw bytes: `output` holds `world` blocks of `input.len()` bytes, block `r` from rank `r`.
    pub fn allgather_bytes(&self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        check_len("input", input.len(), dtype)?;
        let want = input.len() * self.shared.world;
        if output.len() != want {
            return Err(Error::invalid(
                "output",
                format!(
                    "holds {} bytes; allgather of {} bytes over {} ranks needs {want}",
                    output.len(),
                    input.len(),
                    self.shared.world
                ),
            ));
        }
        if self.shared.world == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        self.fence()?;
        self.backend()?
            .allgather(input, output, dtype, self.timeout)
    }

    /// In-place reduce-scatter of raw bytes; returns the element range of `buf` that holds this rank's
    /// reduced part (the ranks' parts differ by at most one element).
    pub fn reduce_scatter_bytes(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Range<usize>> {
        check_len("buffer", buf.len(), dtype)?;
        if self.shared.world == 1 {
            return Ok(0..buf.len() / dtype.size());
        }
        self.fence()?;
        self.backend()?.reduce_scatter(buf, dtype, op, self.timeout)
    }

    /// Reduce of raw bytes into `root`'s buffer. Other ranks' buffers are used as scratch.
    pub fn reduce_bytes(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_root("root", root)?;
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.reduce(buf, dtype, op, root, self.timeout)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        self.fence()?;
        self.backend()?.barrier(self.timeout)
    }

    /// Sends raw bytes to rank `to`; it must call a matching receive.
    pub fn send_bytes(&self, buf: &[u8], dtype: DType, to: usize) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_peer("to", to)?;
        self.fence()?;
        self.backend()?.send(buf, dtype, to, self.timeout)
    }

    /// Receives raw bytes from rank `from`; the sender's dtype and length must match.
    pub fn recv_bytes(&self, buf: &mut [u8], dtype: DType, from: usize) -> Result<()> {
        check_len("buffer", buf.len(), dtype)?;
        self.check_peer("from", from)?;
        self.fence()?;
        self.backend()?.recv(buf, dtype, from, self.timeout)
    }

    /// Refuses a peer that is not another rank of the group, naming the operation.
    fn check_peer(&self, name: &str, peer: usize) -> Result<()> {
        self.check_root(name, peer)?;
        if peer == self.shared.rank {
            return Err(Error::invalid(
                name,
                format!("rank {peer} is this rank; a rank cannot message itself"),
            ));
        }
        Ok(())
    }

    /// In-place allreduce of a typed slice.
    pub fn allreduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.allreduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// In-place allreduce of an `ndarray` array in standard (C) layout, without copying it.
    pub fn allreduce_array<T: Element, S: DataMut<Elem = T>, D: Dimension>(
        &self,
        a: &mut ArrayBase<S, D>,
        op: ReduceOp,
    ) -> Result<()> {
        self.allreduce(contiguous(a)?, op)
    }

    /// In-place broadcast of a typed slice from `root`.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, root)
    }

    /// In-place broadcast of an `ndarray` array in standard layout.
    pub fn broadcast_array<T: Element, S: DataMut<Elem = T>, D: Dimension>(
        &self,
        a: &mut ArrayBase<S, D>,
        root: usize,
    ) -> Result<()> {
        self.broadcast(contiguous(a)?, root)
    }

    /// Allgather of typed slices: `output.len() == input.len() * world_size()`.
    pub fn allgather<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.allgather_bytes(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
        )
    }

    /// In-place reduce-scatter of a typed slice; returns this rank's range of reduced elements.
    pub fn reduce_scatter<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<Range<usize>> {
        self.reduce_scatter_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// Reduce of a typed slice into `root`'s buffer.
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op, root)
    }

    /// Sends a typed slice to rank `to`.
    pub fn send<T: Element>(&self, buf: &[T], to: usize) -> Result<()> {
        self.send_bytes(bytemuck::cast_slice(buf), T::DTYPE, to)
    }

    /// Receives a typed slice from rank `from`.
    pub fn recv<T: Element>(&self, buf: &mut [T], from: usize) -> Result<()> {
        self.recv_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, from)
    }

    /// The backend kind the group was configured with (`TANDEM_BACKEND`).
    pub fn backend_kind(&self) -> BackendKind {
        self.shared.kind
    }
}

/// Refuses a buffer whose length is not a whole number of `dtype` elements.
fn check_len(name: &str, len: usize, dtype: DType) -> Result<()> {
    if !len.is_multiple_of(dtype.size()) {
        return Err(Error::invalid(
            name,
            format!("{len} bytes are not a whole number of {dtype} elements"),
        ));
    }
    Ok(())
}

/// The array's elements as one slice, or an error when it is not contiguous.
fn contiguous<T, S: DataMut<Elem = T>, D: Dimension>(a: &mut ArrayBase<S, D>) -> Result<&mut [T]> {
    let shape = a.shape().to_vec();
    a.as_slice_mut().ok_or_else(|| {
        Error::invalid(
            "array",
            format!(
                "array of shape {shape:?} is not contiguous in C order; use .as_standard_layout()"
            ),
        )
    })
}
