//! `tandem._native.DeviceGroup`: collectives on GPU memory that torch owns (a CUDA tensor's
//! `data_ptr()`), through NCCL when Tandem is built with the `nccl` feature and a GPU is there,
//! staged through the host over the TCP ring when `TANDEM_BACKEND` allows and NCCL cannot start.
//!
//! Why addresses and not tensors: the extension does not link torch. `tandem.torch` passes the
//! address, element count and dtype of a contiguous CUDA tensor after synchronizing the stream
//! that wrote it; each call returns once the result is in the tensor's memory. Every address is
//! checked with the CUDA driver (on this group's GPU, inside one allocation) before anything
//! moves. Without the `nccl` feature, making a `DeviceGroup` fails with `BackendUnavailableError`
//! saying how to rebuild.

use pyo3::prelude::*;
use tandem::collective::device::{DeviceGroup, ForeignBuffer};
use tandem::{DType, ReduceOp};

use crate::errors::IntoPy;
use crate::group::PyProcessGroup;

/// Collectives on CUDA memory for the ranks of a process group.
#[pyclass(name = "DeviceGroup", module = "tandem._native", frozen)]
pub struct PyDeviceGroup {
    /// The device group.
    inner: DeviceGroup,
}

/// A dtype from its name (`float32`, `bf16`, ...).
fn dtype(name: &str) -> PyResult<DType> {
    name.parse::<DType>().py_err()
}

/// A reduce operator from its name.
fn reduce_op(name: &str) -> PyResult<ReduceOp> {
    name.parse::<ReduceOp>().py_err()
}

/// The buffer a caller names by address; the driver checks it before any use.
fn foreign(addr: u64, numel: usize, dtype: DType) -> ForeignBuffer {
    #[allow(unsafe_code)]
    // SAFETY: `tandem.torch` passes a live CUDA tensor's data_ptr(), numel and dtype, holds the
    // tensor for the call, and synchronized the stream that wrote it. Whatever the address, every
    // call first asks the CUDA driver that it lies inside one allocation on this group's GPU.
    unsafe {
        ForeignBuffer::new(addr, numel, dtype)
    }
}

#[pymethods]
impl PyDeviceGroup {
    /// Sets up collectives on GPU `device` for `group`'s ranks (every rank calls it).
    #[new]
    fn new(py: Python<'_>, group: PyRef<'_, PyProcessGroup>, device: usize) -> PyResult<Self> {
        let pg = group.pg()?.clone();
        let inner = py.detach(move || DeviceGroup::new(&pg, device)).py_err()?;
        Ok(PyDeviceGroup { inner })
    }

    /// Whether this build has the `nccl` feature (CUDA memory can be used at all).
    #[staticmethod]
    fn built_with_nccl() -> bool {
        tandem::collective::backend::NCCL_COMPILED
    }

    /// `nccl`, or `tcp (staged through the host)`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend_name()
    }

    /// In-place allreduce of `numel` elements of `dtype` at device address `addr`.
    fn allreduce(
        &self,
        py: Python<'_>,
        addr: u64,
        numel: usize,
        dtype: &str,
        op: &str,
    ) -> PyResult<()> {
        let (buf, op) = (foreign(addr, numel, self::dtype(dtype)?), reduce_op(op)?);
        py.detach(|| self.inner.allreduce_foreign(buf, op)).py_err()
    }

    /// In-place broadcast from `root`.
    fn broadcast(
        &self,
        py: Python<'_>,
        addr: u64,
        numel: usize,
        dtype: &str,
        root: usize,
    ) -> PyResult<()> {
        let buf = foreign(addr, numel, self::dtype(dtype)?);
        py.detach(|| self.inner.broadcast_foreign(buf, root))
            .py_err()
    }

    /// Reduce into `root`'s memory (the others' is left as it was).
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &self,
        py: Python<'_>,
        addr: u64,
        numel: usize,
        dtype: &str,
        op: &str,
        root: usize,
    ) -> PyResult<()> {
        let (buf, op) = (foreign(addr, numel, self::dtype(dtype)?), reduce_op(op)?);
        py.detach(|| self.inner.reduce_foreign(buf, op, root))
            .py_err()
    }

    /// Every rank's `numel` elements at `input` written to `output`, in rank order.
    fn allgather(
        &self,
        py: Python<'_>,
        input: u64,
        output: u64,
        numel: usize,
        dtype: &str,
    ) -> PyResult<()> {
        let d = self::dtype(dtype)?;
        let world = self.inner.world_size();
        let total = numel.saturating_mul(world);
        let (i, o) = (foreign(input, numel, d), foreign(output, total, d));
        py.detach(|| self.inner.allgather_foreign(i, o)).py_err()
    }

    /// Reduces every rank's `world × numel` elements at `input`; this rank's block to `output`.
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        input: u64,
        output: u64,
        numel: usize,
        dtype: &str,
        op: &str,
    ) -> PyResult<()> {
        let (d, op) = (self::dtype(dtype)?, reduce_op(op)?);
        let total = numel.saturating_mul(self.inner.world_size());
        let (i, o) = (foreign(input, total, d), foreign(output, numel, d));
        py.detach(|| self.inner.reduce_scatter_foreign(i, o, op))
            .py_err()
    }

    /// Sends `numel` elements at `addr` to rank `peer`.
    fn send(
        &self,
        py: Python<'_>,
        addr: u64,
        numel: usize,
        dtype: &str,
        peer: usize,
    ) -> PyResult<()> {
        let buf = foreign(addr, numel, self::dtype(dtype)?);
        py.detach(|| self.inner.send_foreign(buf, peer)).py_err()
    }

    /// Receives `numel` elements into `addr` from rank `peer`.
    #[pyo3(name = "recv")]
    fn receive(
        &self,
        py: Python<'_>,
        addr: u64,
        numel: usize,
        dtype: &str,
        peer: usize,
    ) -> PyResult<()> {
        let buf = foreign(addr, numel, self::dtype(dtype)?);
        py.detach(|| self.inner.recv_foreign(buf, peer)).py_err()
    }
}
