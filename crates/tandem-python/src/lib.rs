//! The native half of Tandem's Python package (`tandem._native`): process groups and collectives on
//! numpy arrays, the parameter-server client and server, and the launcher. The Python package in
//! `python/tandem` wraps it; users import `tandem`, not this module.
//!
//! Every blocking call releases the GIL and raises `KeyboardInterrupt` on Ctrl-C; runtimes are
//! rebuilt in a child after `fork()`.
//!
//! # Layout
//! - `group.rs`: `ProcessGroup` and `Work`, collectives on numpy arrays (sync and async).
//! - `arrays.rs`: numpy arrays as the byte buffers collectives work on, checked before use.
//! - `blocking.rs`: running network work with the GIL released and Ctrl-C honoured.
//! - `board.rs`: a Python store (torch's) as the board a group's rank 0 publishes on.
//! - `elastic.rs`: one process's part of an elastic job.
//! - `ps.rs`: the parameter-server client and server.
//! - `observe.rs`: metrics, flight-recorder dumps and timeline spans.
//! - `errors.rs`: Tandem errors as `tandem.errors` exceptions.
//! - `launch.rs`: the `tandem` command inside the extension.
//!
//! Why numpy at this level: numpy arrays expose their memory (the buffer protocol), so the Rust
//! side works on the caller's own bytes with no copy; torch tensors reach it through numpy views
//! of their memory in `python/tandem` (`tandem.torch`), CPU tensors without a copy.

mod arrays;
mod blocking;
mod board;
mod compression;
mod device;
mod elastic;
mod errors;
mod group;
mod launch;
mod observe;
mod ps;

use pyo3::prelude::*;

/// The cluster spec resolved from the environment, as JSON (what `tandem info --json` prints).
#[pyfunction]
fn cluster_spec() -> PyResult<String> {
    let spec = tandem::cluster::ClusterSpec::from_env().map_err(errors::to_py)?;
    serde_json::to_string(&spec).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))
}

/// The address a server named `own` in its job listens on (see
/// `tandem::cluster::listen_address`): `own`, or the interface routing to `peers` when `own`
/// resolves to loopback while they are elsewhere.
#[pyfunction]
fn listen_address(own: &str, peers: Vec<String>) -> PyResult<String> {
    tandem::cluster::listen_address(own, &peers).map_err(errors::to_py)
}

/// The value of the `TANDEM_*` variable `name` read as `tandem::settings` declares it (the same
/// routine and wording as the Rust side): `None` when unset; an int, a float (seconds), a bool or
/// a str otherwise; a `ConfigError` naming the variable when its value is bad or `name` is not one
/// of Tandem's.
#[pyfunction]
fn setting(py: Python<'_>, name: &str) -> PyResult<Option<Py<PyAny>>> {
    use tandem::settings::{self, Value};
    let s = settings::find(name).ok_or_else(|| {
        errors::to_py(tandem::Error::config(
            name,
            "is not one of Tandem's variables",
        ))
    })?;
    let value = s
        .read(&tandem::cluster::ProcessEnv)
        .map_err(errors::to_py)?;
    Ok(match value {
        None => None,
        Some(Value::Integer(n)) => Some(n.into_pyobject(py)?.into_any().unbind()),
        Some(Value::Seconds(d)) => Some(d.as_secs_f64().into_pyobject(py)?.into_any().unbind()),
        Some(Value::Switch(b)) => Some(
            pyo3::types::PyBool::new(py, b)
                .to_owned()
                .into_any()
                .unbind(),
        ),
        Some(Value::Choice(w)) => Some(w.into_pyobject(py)?.into_any().unbind()),
        Some(Value::Text(t)) => Some(t.into_pyobject(py)?.into_any().unbind()),
        Some(Value::Bounds(a, b)) => Some((a, b).into_pyobject(py)?.into_any().unbind()),
    })
}

/// Sends Tandem's `tracing` logs to stderr, filtered by `TANDEM_LOG` (default `warn`). Idempotent.
#[pyfunction]
fn init_logging() {
    tandem_cli::init_logging();
}

/// The extension module `tandem._native`: the classes and functions the Python package wraps.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<group::PyProcessGroup>()?;
    m.add_class::<group::PyWork>()?;
    m.add_class::<compression::PyCompressor>()?;
    m.add_class::<device::PyDeviceGroup>()?;
    m.add_class::<ps::PsClient>()?;
    m.add_class::<elastic::PyElastic>()?;
    m.add_function(wrap_pyfunction!(ps::serve_ps, m)?)?;
    m.add_function(wrap_pyfunction!(launch::cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(cluster_spec, m)?)?;
    m.add_function(wrap_pyfunction!(listen_address, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(setting, m)?)?;
    m.add_function(wrap_pyfunction!(observe::metrics_text, m)?)?;
    m.add_function(wrap_pyfunction!(observe::dump_flight_recorder, m)?)?;
    m.add_function(wrap_pyfunction!(observe::timeline_span, m)?)?;
    m.add_function(wrap_pyfunction!(observe::timeline_flush, m)?)?;
    Ok(())
}
