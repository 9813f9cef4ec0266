//! Tandem's command line inside the extension: the Python package's `tandem` command,
//! `python -m tandem` and `python -m tandem.launch` run exactly the `tandem` binary's CLI.
//!
//! Why inside the extension: a user who installed the wheel has no Rust toolchain and no `tandem`
//! binary; the CLI compiled into the extension makes `tandem launch`, `tandem demo` and the rest
//! work from the package alone.

use pyo3::prelude::*;

/// Runs the `tandem` command line `argv` (the program's name first) with the GIL released and
/// returns its exit status. The caller sets `TANDEM_CLI` and `TANDEM_PYTHON` so that the
/// processes a command starts run this same CLI and interpreter.
#[pyfunction]
pub fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    i32::from(py.detach(|| tandem_cli::run(argv)))
}
