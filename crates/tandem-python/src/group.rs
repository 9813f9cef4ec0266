//! `tandem._native.ProcessGroup`: collectives on numpy arrays.
//!
//! Why this shape: a Python training loop calls collectives on arrays it keeps using, so every call
//! works in place on the array's own memory (checked to be C-contiguous, writable and of a
//! supported dtype first), with the GIL released while the bytes move, and Ctrl-C still honoured
//! (`blocking.rs`). Async calls cannot borrow the array past the call, so they stage one copy and
//! copy back on `wait()`.
//!
//! The operations: allreduce, broadcast, reduce, allgather, barrier, send and receive, each with
//! an optional per-call deadline (the rest of torch's and Horovod's set is built on these in
//! `python/tandem`); the `_async` forms return a `Work` whose `wait()` copies the result back
//! into the caller's array; `abort` fails every rank's current and later operations, naming this
//! rank and the reason.
//!
//! Two ways to form a group: `from_env` joins the job the environment describes (every launcher
//! convention the cluster spec reads), `from_board` forms one through a Python store (torch's, for
//! the `tandem` torch.distributed backend), rank 0 publishing its rendezvous there.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tandem::cluster::{ClusterSpec, ProcessEnv};
use tandem::rendezvous::JobToken;
use tandem::tensor::aligned_zeroed;
use tandem::{DType, GroupConfig, ProcessGroup, ReduceOp, TensorMut, Work};

use crate::arrays::{new_array, with_bytes, with_bytes_mut};
use crate::blocking::collective;
use crate::errors::IntoPy;

/// A reduce operator from its Python name (`sum`, `avg`, `min`, ...).
fn reduce_op(op: &str) -> PyResult<ReduceOp> {
    op.parse::<ReduceOp>().map_err(|_| {
        PyValueError::new_err(format!("op={op:?} is not one of sum, avg, min, max, prod"))
    })
}

/// A deadline given in seconds, checked positive and finite; `what` names the argument.
fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            PyValueError::new_err(format!("{what}={s} is not a positive number of seconds"))
        })
}

/// The group's settings from the `TANDEM_*` variables, with the caller's deadlines (seconds).
fn config_with(timeout: Option<f64>, connect_timeout: Option<f64>) -> PyResult<GroupConfig> {
    tandem::settings::check_env().py_err()?;
    let mut config = GroupConfig::from_vars(&ProcessEnv).py_err()?;
    if let Some(t) = timeout {
        config.timeout = seconds("timeout", t)?;
    }
    if let Some(t) = connect_timeout {
        config.connect_timeout = seconds("connect_timeout", t)?;
    }
    Ok(config)
}

/// Forms the group with the GIL released. Ctrl-C while it forms cancels whatever step it is at
/// (joining the rendezvous, waiting for the other ranks, connecting), instead of waiting out the
/// connect timeout.
fn form(
    py: Python<'_>,
    spec: ClusterSpec,
    token: Option<JobToken>,
    config: GroupConfig,
) -> PyResult<PyProcessGroup> {
    let (local_rank, local_world_size) = (spec.local_rank(), spec.local_world_size());
    let cancel = tandem::collective::Cancel::new();
    let on_signal = cancel.clone();
    let pg = collective(
        py,
        move || ProcessGroup::init_cancellable(&spec, token.as_ref(), config, &cancel),
        move || on_signal.cancel("interrupted by a signal (Ctrl-C)"),
    )?;
    Ok(PyProcessGroup {
        pg: Some(pg),
        local_rank,
        local_world_size,
    })
}

/// A process group formed from the environment (TF_CONFIG, torchrun, Slurm, Open MPI, TANDEM_*).
#[pyclass(module = "tandem._native", name = "ProcessGroup")]
pub struct PyProcessGroup {
    /// The group (none once shut down).
    pg: Option<ProcessGroup>,
    /// This process's rank on its machine.
    local_rank: usize,
    /// Processes on its machine.
    local_world_size: usize,
}

impl PyProcessGroup {
    /// Wraps a group formed elsewhere (an elastic epoch's).
    pub(crate) fn wrap(pg: ProcessGroup, local_rank: usize, local_world_size: usize) -> Self {
        PyProcessGroup {
            pg: Some(pg),
            local_rank,
            local_world_size,
        }
    }

    /// The group, or UnusableError once it was shut down.
    pub(crate) fn pg(&self) -> PyResult<&ProcessGroup> {
        self.pg.as_ref().ok_or_else(|| {
            crate::errors::to_py(tandem::Error::Unusable {
                what: "process group".into(),
                reason: "it was shut down".into(),
            })
        })
    }

    /// Runs a blocking collective; Ctrl-C aborts the group on every rank.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        job: impl FnOnce(&ProcessGroup) -> tandem::Result<T> + Send,
    ) -> PyResult<T> {
        let base = self.pg()?;
        let pg = match timeout {
            Some(t) => base.with_timeout(seconds("timeout", t)?),
            None => base.clone(),
        };
        let aborter = pg.clone();
        collective(
            py,
            move || job(&pg),
            move || {
                let _ = aborter.abort("interrupted by a signal (Ctrl-C)");
            },
        )
    }
}

#[pymethods]
impl PyProcessGroup {
    /// Joins the job described by the environment; `timeout` (seconds) is every operation's default
    /// deadline, `connect_timeout` bounds forming the group, `compression` is the group's default
    /// compression of gradient allreduces (over `TANDEM_COMPRESSION`).
    #[staticmethod]
    #[pyo3(signature = (timeout=None, connect_timeout=None, name=None, compression=None))]
    fn from_env(
        py: Python<'_>,
        timeout: Option<f64>,
        connect_timeout: Option<f64>,
        name: Option<String>,
        compression: Option<&str>,
    ) -> PyResult<PyProcessGroup> {
        let spec = ClusterSpec::from_env().py_err()?;
        let token = JobToken::from_env().py_err()?;
        let mut config = config_with(timeout, connect_timeout)?;
        if let Some(n) = name {
            config.name = n;
        }
        if let Some(c) = compression {
            config.compression = tandem::collective::compression::Compression::parse(c)
                .map_err(|e| PyValueError::new_err(format!("compression={c:?}: {e}")))?;
        }
        form(py, spec, token, config)
    }

    /// Forms a group of `world_size` ranks through `board` (an object with `publish(data,
    /// timeout)` and `lookup(timeout)`, such as the Store torch hands a backend): rank 0 hosts the
    /// rendezvous and publishes its address there. `one_machine` (every rank on rank 0's machine)
    /// binds it to loopback and lets rank 0 make the job token when `TANDEM_JOB_TOKEN` is unset;
    /// otherwise `towards` (an address rank 0 routes to) picks its interface.
    #[staticmethod]
    #[pyo3(signature = (rank, world_size, board, one_machine, name, towards=None, local_rank=0, local_world_size=1, timeout=None, connect_timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_board(
        py: Python<'_>,
        rank: usize,
        world_size: usize,
        board: &Bound<'_, PyAny>,
        one_machine: bool,
        name: String,
        towards: Option<String>,
        local_rank: usize,
        local_world_size: usize,
        timeout: Option<f64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyProcessGroup> {
        let spec = ClusterSpec::builder()
            .rank(rank)
            .world_size(world_size)
            .local(local_rank, local_world_size.max(local_rank + 1))
            .build()
            .py_err()?;
        let token = JobToken::from_env().py_err()?;
        let mut config = config_with(timeout, connect_timeout)?;
        config.name = name;
        config.board = Some(tandem::rendezvous::board::BoardPlan {
            board: std::sync::Arc::new(crate::board::PyBoard::new(board)),
            one_machine,
            towards,
        });
        form(py, spec, token, config)
    }

    /// This process's rank.
    #[getter]
    fn rank(&self) -> PyResult<usize> {
        Ok(self.pg()?.rank())
    }
    /// Number of ranks.
    #[getter]
    fn world_size(&self) -> PyResult<usize> {
        Ok(self.pg()?.world_size())
    }
    /// Rank on this machine.
    #[getter]
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Ranks on this machine.
    #[getter]
    fn local_world_size(&self) -> usize {
        self.local_world_size
    }
    /// The backend in use (`tcp`, or `local` for a world of one).
    #[getter]
    fn backend(&self) -> PyResult<&'static str> {
        Ok(self.pg()?.backend_name())
    }

    /// In-place allreduce.
    #[pyo3(signature = (array, op="sum", timeout=None))]
    fn allreduce(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        op: &str,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        with_bytes_mut(array, "array", |buf, dtype, _| {
            self.run(py, timeout, move |pg| pg.allreduce_bytes(buf, dtype, op))
        })
    }

    /// In-place allreduce of a float32 gradient, compressed as `compressor` says (its residual
    /// updated for the next step).
    #[pyo3(signature = (array, op, compressor, timeout=None))]
    fn allreduce_compressed(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        op: &str,
        compressor: &crate::compression::PyCompressor,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        let state = compressor.inner.clone();
        crate::compression::with_f32_mut(array, |buf| {
            self.run(py, timeout, move |pg| {
                let mut c = crate::compression::locked(&state)?;
                pg.allreduce_compressed(buf, op, &mut c)
            })
        })
    }

    /// Several float32 gradients allreduced as one fused gradient through `compressor` (half
    /// precision rounds each straight into one wire buffer: no packed copy).
    #[pyo3(signature = (arrays, op, compressor, timeout=None))]
    fn allreduce_compressed_many(
        &self,
        py: Python<'_>,
        arrays: Vec<Bound<'_, PyAny>>,
        op: &str,
        compressor: &crate::compression::PyCompressor,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        let state = compressor.inner.clone();
        crate::compression::with_many_f32_mut(&arrays, "arrays", |bufs| {
            self.run(py, timeout, move |pg| {
                let mut c = crate::compression::locked(&state)?;
                pg.allreduce_compressed_many(bufs, op, &mut c)
            })
        })
    }

    /// PowerSGD of several float32 gradients in two allreduces: `matrices[i]` through
    /// `compressors[i]` (each `powersgd:RANK`), the `exact` ones summed or averaged exactly.
    #[pyo3(signature = (matrices, compressors, exact, op, timeout=None))]
    fn allreduce_powersgd(
        &self,
        py: Python<'_>,
        matrices: Vec<Bound<'_, PyAny>>,
        compressors: Vec<PyRef<'_, crate::compression::PyCompressor>>,
        exact: Vec<Bound<'_, PyAny>>,
        op: &str,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        if matrices.len() != compressors.len() {
            return Err(PyValueError::new_err(format!(
                "{} matrices but {} compressors: one compressor per matrix",
                matrices.len(),
                compressors.len()
            )));
        }
        let mut locked = crate::compression::lock_all(&compressors)?;
        crate::compression::with_many_f32_mut(&matrices, "matrices", |bufs| {
            crate::compression::with_many_f32_mut(&exact, "exact", |exact| {
                let pairs: Vec<_> = bufs
                    .into_iter()
                    .zip(locked.iter_mut().map(|g| &mut **g))
                    .collect();
                self.run(py, timeout, move |pg| {
                    pg.allreduce_power_sgd_batch(pairs, exact, op)
                })
            })
        })
    }

    /// The group's default compression of gradient allreduces (`TANDEM_COMPRESSION`, or
    /// `init(compression=...)`).
    #[getter]
    fn compression(&self) -> PyResult<String> {
        Ok(self.pg()?.compression().to_string())
    }

    /// What `auto` compression chose for this group and why: `(chosen, reason, none_seconds,
    /// bf16_seconds)`, the probe's times absent where nothing was measured (one machine). A
    /// collective call the first time (every rank asks together).
    fn auto_compression(
        &self,
        py: Python<'_>,
    ) -> PyResult<(String, String, Option<f64>, Option<f64>)> {
        let choice = self.run(py, None, |pg| pg.auto_compression())?;
        Ok((
            choice.chosen.to_string(),
            choice.reason(),
            choice.none_secs,
            choice.bf16_secs,
        ))
    }

    /// In-place broadcast from `root`.
    #[pyo3(signature = (array, root=0, timeout=None))]
    fn broadcast(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        root: usize,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        with_bytes_mut(array, "array", |buf, dtype, _| {
            self.run(py, timeout, move |pg| pg.broadcast_bytes(buf, dtype, root))
        })
    }

    /// In-place reduce into `root`'s array (other ranks' arrays are used as scratch).
    #[pyo3(signature = (array, op="sum", root=0, timeout=None))]
    fn reduce(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        op: &str,
        root: usize,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        with_bytes_mut(array, "array", |buf, dtype, _| {
            self.run(py, timeout, move |pg| pg.reduce_bytes(buf, dtype, op, root))
        })
    }

    /// Every rank's array, stacked: shape `[world_size, *array.shape]`.
    #[pyo3(signature = (array, timeout=None))]
    fn allgather<'py>(
        &self,
        py: Python<'py>,
        array: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let world = self.pg()?.world_size();
        let (dtype, shape, out) = with_bytes(array, "array", |input, dtype, shape| {
            let mut out = aligned_zeroed(input.len() * world);
            self.run(py, timeout, |pg| pg.allgather_bytes(input, &mut out, dtype))?;
            Ok((dtype, shape.to_vec(), out))
        })?;
        let mut full = vec![world];
        full.extend_from_slice(&shape);
        new_array(py, dtype, &full, &out)
    }

    /// Every rank's array written into `out` (C-contiguous, `world_size` times the array's
    /// elements, the same dtype), in rank order, without an intermediate copy. `out` must not
    /// overlap the array.
    #[pyo3(signature = (array, out, timeout=None))]
    fn allgather_into(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let world = self.pg()?.world_size();
        with_bytes(array, "array", |input, dtype, _| {
            with_bytes_mut(out, "out", |output, out_dtype, _| {
                if out_dtype != dtype || output.len() != input.len() * world {
                    return Err(PyValueError::new_err(format!(
                        "out holds {} bytes of {out_dtype}; {world} ranks' arrays of {} bytes of {dtype} need {}",
                        output.len(),
                        input.len(),
                        input.len() * world
                    )));
                }
                self.run(py, timeout, |pg| pg.allgather_bytes(input, output, dtype))
            })
        })
    }

    /// Reduces every rank's array and returns this rank's part: rank r gets the r-th of
    /// `world_size` nearly equal runs of the flattened array (the first `n % world_size` one element
    /// longer). When the first dimension divides evenly the part keeps the other dimensions.
    #[pyo3(signature = (array, op="sum", timeout=None))]
    fn reduce_scatter<'py>(
        &self,
        py: Python<'py>,
        array: &Bound<'py, PyAny>,
        op: &str,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let op = reduce_op(op)?;
        let world = self.pg()?.world_size();
        let (dtype, shape, buf, range) = with_bytes(array, "array", |input, dtype, shape| {
            let mut buf = aligned_zeroed(input.len());
            buf.copy_from_slice(input);
            let range = self.run(py, timeout, |pg| {
                pg.reduce_scatter_bytes(&mut buf, dtype, op)
            })?;
            Ok((dtype, shape.to_vec(), buf, range))
        })?;
        let part = &buf[range.start * dtype.size()..range.end * dtype.size()];
        let out_shape = match shape.split_first() {
            Some((&d0, rest)) if d0 % world == 0 && !rest.is_empty() => {
                let mut s = vec![d0 / world];
                s.extend_from_slice(rest);
                s
            }
            _ => vec![range.len()],
        };
        new_array(py, dtype, &out_shape, part)
    }

    /// Waits until every rank reached the barrier.
    #[pyo3(signature = (timeout=None))]
    fn barrier(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        self.run(py, timeout, |pg| pg.barrier())
    }

    /// Sends the array to rank `dst` (which calls `recv` with an array of the same shape and dtype).
    #[pyo3(signature = (array, dst, timeout=None))]
    fn send(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        dst: usize,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        with_bytes(array, "array", |buf, dtype, _| {
            self.run(py, timeout, move |pg| pg.send_bytes(buf, dtype, dst))
        })
    }

    /// Receives into the array from rank `src`.
    #[pyo3(signature = (array, src, timeout=None))]
    fn recv(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        src: usize,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        with_bytes_mut(array, "array", |buf, dtype, _| {
            self.run(py, timeout, move |pg| pg.recv_bytes(buf, dtype, src))
        })
    }

    /// Starts an allreduce in the background; `wait()` writes the result into `array`. The array
    /// is staged through one copy, so it may be read (not written) meanwhile.
    #[pyo3(signature = (array, op="sum"))]
    fn allreduce_async(&self, array: &Bound<'_, PyAny>, op: &str) -> PyResult<PyWork> {
        let op = reduce_op(op)?;
        let t = staged(array)?;
        let work = self.pg()?.allreduce_async(t, op);
        Ok(PyWork::new(work, Some(array.clone().unbind()), None))
    }

    /// Starts a broadcast from `root` in the background; `wait()` writes the result into `array`.
    #[pyo3(signature = (array, root=0))]
    fn broadcast_async(&self, array: &Bound<'_, PyAny>, root: usize) -> PyResult<PyWork> {
        let t = staged(array)?;
        let work = self.pg()?.broadcast_async(t, root);
        Ok(PyWork::new(work, Some(array.clone().unbind()), None))
    }

    /// Starts an allgather in the background; `wait()` returns the stacked array.
    fn allgather_async(&self, array: &Bound<'_, PyAny>) -> PyResult<PyWork> {
        let t = staged(array)?.freeze();
        let work = self.pg()?.allgather_async(t);
        Ok(PyWork::new(work, None, None))
    }

    /// Starts a barrier in the background.
    fn barrier_async(&self) -> PyResult<PyWork> {
        let work = self.pg()?.barrier_async();
        Ok(PyWork::new_unit(work))
    }

    /// Fails every rank's current and later operations, naming this rank and `reason`.
    fn abort(&self, py: Python<'_>, reason: &str) -> PyResult<()> {
        let pg = self.pg()?.clone();
        let reason = reason.to_string();
        py.detach(move || pg.abort(&reason)).py_err()
    }

    /// Leaves the group (waits for queued operations first). Later calls raise `UnusableError`.
    fn shutdown(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.pg.take() {
            Some(pg) => collective(py, move || pg.shutdown(), || {}),
            None => Ok(()),
        }
    }
}

/// A copy of the array in a Tandem tensor, for operations that outlive the call.
fn staged(array: &Bound<'_, PyAny>) -> PyResult<TensorMut> {
    with_bytes(array, "array", |bytes, dtype, shape| {
        let mut t = TensorMut::zeros(dtype, shape).py_err()?;
        t.bytes_mut().copy_from_slice(bytes);
        Ok(t)
    })
}

/// What a background operation will hand back: a tensor (copied into `into` or returned) or
/// nothing.
enum Pending {
    /// An operation returning a tensor.
    Tensor(Work<TensorMut>),
    /// An operation returning nothing.
    Unit(Work<()>),
}

/// The handle of a background operation.
#[pyclass(module = "tandem._native", name = "Work")]
pub struct PyWork {
    /// The operation, until waited for.
    pending: std::sync::Mutex<Option<Pending>>,
    /// The array the result is copied into.
    into: Option<Py<PyAny>>,
    /// The array returned as the result.
    result: Option<Py<PyAny>>,
}

impl PyWork {
    /// The handle of an operation that returns a tensor, written into `into` or returned as `result`.
    fn new(work: Work<TensorMut>, into: Option<Py<PyAny>>, result: Option<Py<PyAny>>) -> Self {
        PyWork {
            pending: std::sync::Mutex::new(Some(Pending::Tensor(work))),
            into,
            result,
        }
    }
    /// The handle of an operation that returns nothing (a barrier).
    fn new_unit(work: Work<()>) -> Self {
        PyWork {
            pending: std::sync::Mutex::new(Some(Pending::Unit(work))),
            into: None,
            result: None,
        }
    }
}

#[pymethods]
impl PyWork {
    /// Whether the operation finished (so `wait()` returns at once).
    fn is_done(&self) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match &*pending {
            Some(Pending::Tensor(w)) => w.is_done(),
            Some(Pending::Unit(w)) => w.is_done(),
            None => true,
        }
    }

    /// Waits for the operation and returns its result (the array, or `None` for a barrier).
    /// Raises the operation's error; Ctrl-C raises `KeyboardInterrupt` and leaves it pending.
    fn wait(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let poll = Duration::from_millis(50);
        loop {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let done: Option<tandem::Result<Option<TensorMut>>> = match pending.as_mut() {
                None => return Ok(self.result.as_ref().map(|r| r.clone_ref(py))),
                Some(Pending::Tensor(w)) => py.detach(|| w.wait_timeout(poll)).map(|r| r.map(Some)),
                Some(Pending::Unit(w)) => {
                    py.detach(|| w.wait_timeout(poll)).map(|r| r.map(|()| None))
                }
            };
            if done.is_some() {
                *pending = None;
            }
            drop(pending);
            match done {
                None => py.check_signals()?,
                Some(r) => {
                    let tensor = r.py_err()?;
                    let out = match (tensor, self.into.take()) {
                        (Some(mut t), Some(into)) => {
                            let bound = into.bind(py);
                            with_bytes_mut(bound, "array", |buf, _, _| {
                                buf.copy_from_slice(t.bytes_mut());
                                Ok(())
                            })?;
                            Some(into)
                        }
                        (Some(mut t), None) => {
                            let shape = t.shape().to_vec();
                            let dtype: DType = t.dtype();
                            Some(new_array(py, dtype, &shape, t.bytes_mut())?.unbind())
                        }
                        (None, _) => None,
                    };
                    self.result = out.as_ref().map(|o| o.clone_ref(py));
                    return Ok(out);
                }
            }
        }
    }
}
