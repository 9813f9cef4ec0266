//! Blocking work from Python: the GIL released, Ctrl-C honoured, and fork-safe runtimes.
//!
//! Every call that can wait on the network goes through [`collective`] or [`future`]: the GIL is
//! released while it runs, and every 50 ms the calling (main) thread takes the GIL back briefly to
//! let Python run its signal handlers, so Ctrl-C raises `KeyboardInterrupt` instead of hanging.
//!
//! A blocking collective runs on a helper thread owned by the calling Python thread (one per
//! Python thread, made on first use): two Python threads driving two groups run at once instead
//! of queueing behind one process-wide helper, and one thread's calls keep their order.
//!
//! Why a short spin before sleeping: a small collective takes tens of microseconds, less than a
//! thread's sleep and wake-up; the caller polls for `SPIN` (yielding the CPU) before it waits on the
//! result, so small operations do not pay a scheduler round trip.
//!
//! Why runtimes know their process: after `fork()` only the forking thread exists in the child, so
//! a runtime made by the parent would wait forever on threads that are not there; each runtime
//! records the pid that made it, and a child makes its own at its first call.

use std::future::Future;
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::to_py;

/// How often a blocked call looks for pending signals.
const SIGNAL_POLL: Duration = Duration::from_millis(50);
/// How long the caller polls for a short job's result (yielding the CPU) before sleeping: a sleep and
/// wake-up costs more than a small collective takes.
const SPIN: Duration = Duration::from_micros(100);

/// A value made once per process: the pid that made it (a forked child makes its own) and the
/// value.
type Owned<T> = Mutex<Option<(u32, Arc<T>)>>;

/// The runtime that runs blocking calls' futures off the Python thread.
static RUNTIME: Owned<tokio::runtime::Runtime> = Mutex::new(None);

thread_local! {
    /// This Python thread's helper (and the process that made it: a forked child makes its own).
    static HELPER: std::cell::RefCell<Option<(u32, Arc<rayon::ThreadPool>)>> =
        const { std::cell::RefCell::new(None) };
}

/// One instance per process: a child made by `fork()` builds its own (the parent's threads do not
/// exist there) and never drops the parent's.
fn per_process<T>(slot: &Owned<T>, make: impl FnOnce() -> PyResult<T>) -> PyResult<Arc<T>> {
    let pid = std::process::id();
    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, v)) = g.as_ref()
        && *owner == pid
    {
        return Ok(v.clone());
    }
    if let Some((_, stale)) = g.take() {
        // Dropping it would join threads that do not exist in this process.
        std::mem::forget(stale);
    }
    let v = Arc::new(make()?);
    *g = Some((pid, v.clone()));
    Ok(v)
}

/// The process's tokio runtime (parameter-server clients and servers).
pub fn runtime() -> PyResult<Arc<tokio::runtime::Runtime>> {
    per_process(&RUNTIME, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tandem-py")
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))
    })
}

/// The calling thread's helper thread.
fn pool() -> PyResult<Arc<rayon::ThreadPool>> {
    let pid = std::process::id();
    HELPER.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some((owner, p)) = slot.as_ref()
            && *owner == pid
        {
            return Ok(p.clone());
        }
        if let Some((_, stale)) = slot.take() {
            // Made before a fork: its thread does not exist in this process; never join it.
            std::mem::forget(stale);
        }
        let p = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "tandem-py-collective".into())
                .build()
                .map_err(|e| {
                    PyRuntimeError::new_err(format!("cannot start the collective thread: {e}"))
                })?,
        );
        *slot = Some((pid, p.clone()));
        Ok(p)
    })
}

/// Runs a blocking collective `job` on the helper thread with the GIL released, while this thread
/// watches for signals. On a signal `on_interrupt` runs (it aborts the group, or cancels forming it,
/// so `job` ends promptly), the job is waited for (it borrows the caller's buffers), and the first
/// signal's exception is raised.
pub fn collective<T: Send>(
    py: Python<'_>,
    job: impl FnOnce() -> tandem::Result<T> + Send,
    on_interrupt: impl Fn() + Send + Sync,
) -> PyResult<T> {
    let pool = pool()?;
    let outcome = py.detach(|| {
        let (tx, rx) = sync_channel(1);
        let mut interrupt: Option<PyErr> = None;
        let mut result = None;
        pool.in_place_scope(|s| {
            s.spawn(move |_| {
                let _ = tx.send(job());
            });
            let started = std::time::Instant::now();
            while started.elapsed() < SPIN {
                match rx.try_recv() {
                    Ok(r) => {
                        result = Some(r);
                        return;
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            loop {
                match rx.recv_timeout(SIGNAL_POLL) {
                    Ok(r) => {
                        result = Some(r);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        // Every signal is looked at, not just the first: each one aborts again
                        // (idempotent), and the first one's exception is raised once the job
                        // (which borrows the caller's buffers) has ended.
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            interrupt.get_or_insert(e);
                            on_interrupt();
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        });
        (result, interrupt)
    });
    match outcome {
        (_, Some(signal)) => Err(signal),
        (Some(r), None) => r.map_err(to_py),
        (None, None) => Err(PyRuntimeError::new_err(
            "the collective thread ended without a result",
        )),
    }
}

/// Runs `fut` on the process's runtime with the GIL released; a signal cancels it and raises.
pub fn future<T: Send>(
    py: Python<'_>,
    fut: impl Future<Output = tandem::Result<T>> + Send,
) -> PyResult<T> {
    let rt = runtime()?;
    let outcome: PyResult<tandem::Result<T>> = py.detach(|| {
        rt.block_on(async {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => return Ok(r),
                    _ = tokio::time::sleep(SIGNAL_POLL) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    });
    outcome?.map_err(to_py)
}
