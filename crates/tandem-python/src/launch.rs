//! `python -m tandem.launch`: the same launcher as `tandem launch`.

use clap::Parser;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// `python -m tandem.launch`: start a job on this machine.
#[derive(Parser, Debug)]
#[command(name = "python -m tandem.launch", version)]
struct Cli {
    #[command(flatten)]
    launch: tandem_launch::LaunchArgs,
}

/// Parses `argv` (without the program name) like `tandem launch`, runs the job and returns the
/// exit code. Ctrl-C stops every process and returns 130.
#[pyfunction]
pub fn launch_main(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    let cli = match Cli::try_parse_from(
        std::iter::once("python -m tandem.launch".to_string()).chain(argv),
    ) {
        Ok(c) => c,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return Ok(code);
        }
    };
    let spec = cli.launch.to_spec().map_err(crate::errors::to_py)?;
    let deadline = cli.launch.deadline();
    let stop = AtomicBool::new(false);
    let outcome = py.detach(|| {
        tandem_launch::run(&spec, deadline, &|| {
            if !stop.load(Ordering::Relaxed) && Python::attach(|py| py.check_signals()).is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            stop.load(Ordering::Relaxed)
        })
    });
    let outcome = outcome.map_err(|e| PyValueError::new_err(e.to_string()))?;
    eprintln!("tandem launch: {}", outcome.summary);
    if let Some(dir) = &outcome.log_dir {
        eprintln!("tandem launch: logs in {}", dir.display());
    }
    Ok(outcome.code)
}
