//! `tandem._native.PsClient` and `serve_ps`: the parameter server from Python.
//!
//! Why a thin layer: the Rust client already does placement, retries and both data planes; this
//! turns numpy arrays into the slices it pushes (no copy) and pulled parameters into arrays, runs
//! every call with the GIL released on the process's runtime (Ctrl-C cancels it), and maps errors
//! to `tandem.errors` classes.
//!
//! `serve_ps` runs a server in the calling process until every worker said done (or Ctrl-C), with
//! the checkpoint, worker-timeout, lease and standby settings of `tandem ps`.

use std::path::PathBuf;
use std::time::Duration;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tandem::ps::client::{Client, TrainingMode};
use tandem::ps::init::Init;
use tandem::ps::optimizer::Optimizer;
use tandem::ps::placement::{ParamDecl, place_split};
use tandem::ps::server::{CheckpointPolicy, Server, ServerConfig};
use tandem::rendezvous::JobToken;

use crate::blocking::future;
use crate::errors::IntoPy;

/// One declared parameter as Python passes it: (name, shape, init, a, b, seed).
type Decl = (String, Vec<usize>, String, f64, f64, u64);

/// The job token: `token=`, else `TANDEM_JOB_TOKEN`, else a configuration error saying both.
fn token_from(token: Option<String>) -> PyResult<JobToken> {
    match token {
        Some(t) => JobToken::new(t).py_err(),
        None => JobToken::from_env().py_err()?.ok_or_else(|| {
            crate::errors::to_py(tandem::Error::config(
                tandem::rendezvous::TOKEN_VAR,
                "is not set; pass token= or start the job with tandem launch",
            ))
        }),
    }
}

/// Gradient `name` as a float32 array, or a TypeError naming it and the dtype it has.
fn f32_array<'py>(name: &str, a: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let arr = a.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "gradient {name:?} must be a float32 numpy.ndarray (got {})",
            a.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "gradient {name:?} is not C-contiguous; pass numpy.ascontiguousarray(...)"
        )));
    }
    arr.try_readonly()
        .map_err(|e| PyValueError::new_err(format!("gradient {name:?}: {e}")))
}

/// A worker's connection to every parameter server of a job.
#[pyclass(module = "tandem._native", name = "PsClient")]
pub struct PsClient {
    /// The client.
    client: Client,
    /// Each parameter's name and shape, to hand arrays back.
    shapes: Vec<(String, Vec<usize>)>,
    /// Whether training is synchronous.
    sync: bool,
}

/// The arrays of a gradient dict, held (read-only) while they are pushed.
fn held_arrays<'py>(
    grads: &Bound<'py, PyDict>,
) -> PyResult<Vec<(String, PyReadonlyArrayDyn<'py, f32>)>> {
    let mut held = Vec::with_capacity(grads.len());
    for (k, v) in grads.iter() {
        let name: String = k.extract()?;
        let arr = f32_array(&name, &v)?;
        held.push((name, arr));
    }
    Ok(held)
}

/// Views of held arrays (contiguous ones: `f32_array` made sure).
fn slices_of<'a>(
    held: &'a [(String, PyReadonlyArrayDyn<'_, f32>)],
) -> PyResult<Vec<(&'a str, &'a [f32])>> {
    held.iter()
        .map(|(n, a)| {
            Ok((
                n.as_str(),
                a.as_slice()
                    .map_err(|e| PyValueError::new_err(e.to_string()))?,
            ))
        })
        .collect()
}

impl PsClient {
    /// Pulled tensors as `{name: array}` in their declared shapes (moved, not copied).
    fn to_dict<'py>(
        &self,
        py: Python<'py>,
        mut values: std::collections::HashMap<String, Vec<f32>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (name, shape) in &self.shapes {
            if let Some(v) = values.remove(name) {
                let arr = PyArray1::from_vec(py, v).reshape(shape.as_slice())?;
                out.set_item(name, arr)?;
            }
        }
        Ok(out)
    }
}

/// `mode="sync"` or `"async"` (with its staleness bound) for `workers` workers.
fn training_mode(mode: &str, workers: u32, staleness: Option<u32>) -> PyResult<TrainingMode> {
    match mode {
        "sync" => Ok(TrainingMode::sync(workers)),
        "async" => Ok(TrainingMode::asynchronous(workers, staleness)),
        other => Err(PyValueError::new_err(format!(
            "mode={other:?} is not \"sync\" or \"async\""
        ))),
    }
}

/// The declared parameters, their initialisers read from Python's description.
fn declarations(params: &[Decl]) -> PyResult<Vec<ParamDecl>> {
    params
        .iter()
        .map(|(name, shape, init, a, b, seed)| {
            let init = Init::from_wire(init, *a, *b, *seed).py_err()?;
            Ok(ParamDecl::new(name.clone(), shape, init))
        })
        .collect()
}

/// `compression=` as given, or `TANDEM_COMPRESSION` when not; a bad value is a ValueError naming it.
fn compression_from(
    compression: Option<&str>,
) -> PyResult<tandem::collective::compression::Compression> {
    use tandem::collective::compression::Compression;
    match compression {
        Some(c) => Compression::parse(c)
            .map_err(|e| PyValueError::new_err(format!("compression={c:?}: {e}"))),
        None => Compression::from_env().py_err(),
    }
}

#[pymethods]
impl PsClient {
    /// Connects to `servers` and declares `params`; see `tandem.ps.Client` for the arguments.
    #[new]
    #[pyo3(signature = (servers, params, *, worker, workers, optimizer="sgd", lr=0.01, momentum=0.9,
        beta1=0.9, beta2=0.999, eps=None, weight_decay=0.0, clip_norm=0.0, decay_rate=1.0, decay_steps=0,
        mode="sync", staleness=None, replicas_to_aggregate=None, reject_non_finite=true, token=None,
        timeout=60.0, min_partition_bytes=1048576, max_partition_bytes=0, compression=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        servers: Vec<String>,
        params: Vec<Decl>,
        worker: u32,
        workers: u32,
        optimizer: &str,
        lr: f32,
        momentum: f32,
        beta1: f32,
        beta2: f32,
        eps: Option<f32>,
        weight_decay: f32,
        clip_norm: f32,
        decay_rate: f32,
        decay_steps: u64,
        mode: &str,
        staleness: Option<u32>,
        replicas_to_aggregate: Option<u32>,
        reject_non_finite: bool,
        token: Option<String>,
        timeout: f64,
        min_partition_bytes: usize,
        max_partition_bytes: usize,
        compression: Option<&str>,
    ) -> PyResult<PsClient> {
        let compression = compression_from(compression)?;
        let token = token_from(token)?;
        let kind = Optimizer::kind_from_name(optimizer).py_err()?;
        let mut opt = Optimizer::sgd(lr);
        opt.kind = kind;
        if kind == tandem::ps::optimizer::Kind::Adagrad {
            opt.eps = 1e-10;
        }
        opt.momentum = momentum;
        opt.beta1 = beta1;
        opt.beta2 = beta2;
        if let Some(e) = eps {
            opt.eps = e;
        }
        opt.weight_decay = weight_decay;
        opt.clip_norm = clip_norm;
        opt.decay_rate = decay_rate;
        opt.decay_steps = decay_steps;
        let mut training = training_mode(mode, workers, staleness)?;
        if let Some(k) = replicas_to_aggregate {
            training.replicas_to_aggregate = k;
        }
        training.reject_non_finite = reject_non_finite;
        let decls = declarations(&params)?;
        let shapes = params.iter().map(|p| (p.0.clone(), p.1.clone())).collect();
        let map = place_split(
            &decls,
            servers.len(),
            min_partition_bytes,
            max_partition_bytes,
        )
        .py_err()?;
        let deadline = Duration::try_from_secs_f64(timeout)
            .map_err(|_| PyValueError::new_err(format!("timeout={timeout} is not a duration")))?;
        let client = future(
            py,
            Client::connect_compressed(
                &servers,
                &token,
                worker,
                (map, opt, training),
                compression,
                deadline,
            ),
        )?;
        Ok(PsClient {
            client,
            shapes,
            sync: training.sync,
        })
    }

    /// Whether this client trains synchronously.
    #[getter]
    fn sync(&self) -> bool {
        self.sync
    }

    /// The compression in force with the servers (`auto` resolved when connecting).
    #[getter]
    fn compression(&self) -> String {
        self.client.compression().to_string()
    }

    /// Top-k's residuals still owed to the servers, as bytes to save with the worker's state.
    fn compression_state(&self) -> Vec<u8> {
        self.client.compression_state()
    }

    /// Takes back what `compression_state()` saved (refused, naming why, with nothing changed).
    fn restore_compression_state(&self, state: Vec<u8>) -> PyResult<()> {
        self.client.restore_compression_state(&state).py_err()
    }

    /// Waits until every server reached `min_version` and returns `(version, {name: array})`.
    #[pyo3(signature = (min_version=0))]
    fn pull<'py>(&self, py: Python<'py>, min_version: u64) -> PyResult<(u64, Bound<'py, PyDict>)> {
        let (version, values) = future(py, self.client.pull(min_version))?;
        Ok((version, self.to_dict(py, values)?))
    }

    /// Pushes gradients `{name: float32 array}` for `step`; returns `(applied, dropped, version)`.
    fn push(
        &self,
        py: Python<'_>,
        step: u64,
        grads: &Bound<'_, PyDict>,
    ) -> PyResult<(bool, bool, u64)> {
        let held = held_arrays(grads)?;
        let slices = slices_of(&held)?;
        let out = future(py, self.client.push(step, &slices))?;
        Ok((out.applied, out.dropped, out.version))
    }

    /// Pushes gradients for `step` and pulls the next parameters (sync: those of step `step + 1`,
    /// at once, each partition streamed as soon as it is applied; async: after the push);
    /// returns `(version, {name: array})`.
    fn push_pull<'py>(
        &self,
        py: Python<'py>,
        step: u64,
        grads: &Bound<'py, PyDict>,
    ) -> PyResult<(u64, Bound<'py, PyDict>)> {
        let held = held_arrays(grads)?;
        let slices = slices_of(&held)?;
        let mut values = std::collections::HashMap::new();
        let (_, version) = future(py, self.client.push_pull_into(step, &slices, &mut values))?;
        Ok((version, self.to_dict(py, values)?))
    }

    /// Embedding rows `ids` of `name`, shape `(len(ids), dim)`.
    fn pull_rows<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        ids: Vec<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let v = future(py, self.client.pull_rows(name, &ids))?;
        let dim = if ids.is_empty() {
            0
        } else {
            v.len() / ids.len()
        };
        Ok(PyArray1::from_vec(py, v)
            .reshape([ids.len(), dim])?
            .into_any())
    }

    /// Pushes row gradients `grads` (shape `(len(ids), dim)`, float32) for rows `ids` of `name`.
    fn push_rows(
        &self,
        py: Python<'_>,
        name: &str,
        ids: Vec<u64>,
        grads: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let arr = f32_array(name, grads)?;
        let g = arr
            .as_slice()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        future(py, self.client.push_rows(name, &ids, g))
    }

    /// Asks every server to write a checkpoint now; returns the version each wrote.
    fn checkpoint(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        future(py, self.client.checkpoint())
    }

    /// Tells the servers this worker is done (they exit once every worker is).
    fn done(&self, py: Python<'_>) -> PyResult<()> {
        future(py, self.client.done())
    }

    /// Each server's counters, as dicts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let stats = future(py, self.client.stats())?;
        let list = PyList::empty(py);
        for s in stats {
            let d = PyDict::new(py);
            d.set_item("version", s.version)?;
            d.set_item("applied", s.applied)?;
            d.set_item("dropped", s.dropped)?;
            d.set_item("rejected", s.rejected)?;
            d.set_item("bytes_in", s.bytes_in)?;
            d.set_item("bytes_out", s.bytes_out)?;
            d.set_item("staleness_histogram", s.staleness_histogram)?;
            d.set_item("worker_steps", s.worker_steps)?;
            d.set_item("gone_workers", s.gone_workers)?;
            list.append(d)?;
        }
        Ok(list)
    }
}

/// Runs a parameter server on `bind` until every worker is done (or Ctrl-C); calls `on_ready`
/// with the bound address first.
#[pyfunction]
#[pyo3(signature = (bind, *, index=0, checkpoint_dir=None, checkpoint_every=0, keep_running=false, token=None, on_ready=None, worker_timeout=None, worker_lease=None, follow=None, compression=None))]
#[allow(clippy::too_many_arguments)]
pub fn serve_ps(
    py: Python<'_>,
    bind: String,
    index: usize,
    checkpoint_dir: Option<PathBuf>,
    checkpoint_every: u64,
    keep_running: bool,
    token: Option<String>,
    on_ready: Option<Bound<'_, PyAny>>,
    worker_timeout: Option<f64>,
    worker_lease: Option<f64>,
    follow: Option<String>,
    compression: Option<&str>,
) -> PyResult<()> {
    let token = token_from(token)?;
    let mut config = ServerConfig::new(token);
    if compression.is_some() {
        config.compression = Some(compression_from(compression)?);
    }
    config.exit_when_done = !keep_running;
    if let Some(t) = worker_timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(PyValueError::new_err(format!(
                "worker_timeout={t} must be a positive number of seconds"
            )));
        }
        config.worker_timeout = Some(std::time::Duration::from_secs_f64(t));
    }
    if let Some(t) = worker_lease {
        if !(t.is_finite() && t > 0.0 && t <= 86_400.0) {
            return Err(PyValueError::new_err(format!(
                "worker_lease={t} must be more than 0 and at most 86400 seconds"
            )));
        }
        config.worker_lease = Some(std::time::Duration::from_secs_f64(t));
    }
    if let Some(primary) = follow {
        tandem::cluster::check_address("follow", &primary).map_err(crate::errors::to_py)?;
        let host = bind.rsplit_once(':').map_or(bind.as_str(), |(h, _)| h);
        config.follow = Some(tandem::ps::server::FollowConfig {
            primary,
            bind: format!("{host}:0"),
        });
    }
    if let Some(dir) = checkpoint_dir {
        config.checkpoint = Some(CheckpointPolicy {
            dir,
            index,
            every: checkpoint_every,
        });
    }
    let (listener, server) = future(py, async {
        let l = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|e| tandem::Error::io(format!("binding the parameter server to {bind}"), e))?;
        let s = Server::new(config).await?;
        Ok((l, s))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let servers = tandem::ClusterSpec::from_env()
        .ok()
        .and_then(|s| s.peers().get(&tandem::Role::Ps).map(|p| p.len()))
        .unwrap_or(index + 1);
    tandem::ps::server::observe(index, servers, &server.service());
    if let Some(cb) = on_ready {
        cb.call1((addr.to_string(),))?;
    }
    future(py, server.run(listener, std::future::pending::<()>()))
}
