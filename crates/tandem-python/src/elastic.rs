//! `tandem._native.ElasticSession`: one process's part of an elastic job (tandem-elastic), for
//! `python/tandem/elastic.py`, which keeps the state and runs the training function.
//!
//! Why split between Rust and Python: membership, epochs and re-forming the group are the same for
//! every binding and live in tandem-elastic; what the user's state is (arrays, a torch model) is
//! Python's to know, so the Python side commits and restores it.
//!
//! Each method runs with the GIL released: a membership round can wait for members for as long as
//! `TANDEM_ELASTIC_WAIT`, and other Python threads (a data loader) keep running meanwhile.

use std::sync::Mutex;

use pyo3::prelude::*;
use tandem::elastic::{Elastic, ElasticConfig};

use crate::errors::to_py;
use crate::group::PyProcessGroup;

/// Membership rounds and each epoch's group (see `tandem::elastic`).
#[pyclass(module = "tandem._native", name = "ElasticSession")]
pub struct PyElastic {
    /// The elastic run.
    inner: Mutex<Elastic>,
    /// This process's local rank and the processes of its machine.
    local: (usize, usize),
}

impl PyElastic {
    /// Runs `f` on the elastic state with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Elastic) -> tandem::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| match self.inner.lock() {
            Ok(mut e) => f(&mut e),
            Err(_) => Err(tandem::Error::Unusable {
                what: "elastic session".into(),
                reason: "a previous call panicked".into(),
            }),
        })
        .map_err(to_py)
    }
}

#[pymethods]
impl PyElastic {
    /// Joins the elastic job the environment describes (`TANDEM_ELASTIC`, an external rendezvous).
    #[new]
    fn new(py: Python<'_>) -> PyResult<Self> {
        let spec = tandem::cluster::ClusterSpec::from_env().map_err(to_py)?;
        let local = (spec.local_rank(), spec.local_world_size());
        let e = py
            .detach(|| ElasticConfig::from_env().and_then(Elastic::from_env))
            .map_err(to_py)?;
        Ok(PyElastic {
            inner: Mutex::new(e),
            local,
        })
    }

    /// Joins the next epoch and returns its group.
    fn form(&self, py: Python<'_>) -> PyResult<PyProcessGroup> {
        let pg = self.with(py, |e| e.form())?;
        Ok(PyProcessGroup::wrap(pg, self.local.0, self.local.1))
    }

    /// The current epoch's group lost rank `rank` (a `PeerLostError`'s `rank`): the next `form`
    /// reports that member, so the survivors do not wait the settle time for it.
    fn lost_rank(&self, rank: usize) {
        if let Ok(mut e) = self.inner.lock() {
            let lost = tandem::Error::PeerLost {
                rank,
                context: String::new(),
            };
            e.failed_on(&lost);
        }
    }

    /// Whether processes wait to join after the current epoch.
    fn pending(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |e| e.pending())
    }

    /// After a (re-)formation at `commits` commits: the next commit looks for waiting processes.
    fn reset_checks(&self, commits: u64) {
        if let Ok(e) = self.inner.lock() {
            e.reset_checks(commits);
        }
    }

    /// Whether the commit that made `commits` commits must look for waiting processes: this
    /// member's proposal of commits until the next look, or None.
    fn check_due(&self, commits: u64) -> Option<u64> {
        self.inner.lock().ok().and_then(|e| e.check_due(commits))
    }

    /// Every member agreed at `commits` to look again `k` commits later.
    fn check_agreed(&self, commits: u64, k: u64) {
        if let Ok(e) = self.inner.lock() {
            e.check_agreed(commits, k);
        }
    }

    /// Whether the last `form` found fewer than MIN members within the wait.
    #[getter]
    fn short(&self) -> bool {
        self.inner.lock().is_ok_and(|e| e.short())
    }

    /// The current epoch (0 before the first `form`).
    #[getter]
    fn epoch(&self) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|e| e.membership().map(|m| m.epoch))
            .unwrap_or(0)
    }

    /// The current epoch's members' ids, in rank order.
    #[getter]
    fn members(&self) -> Vec<u64> {
        self.inner
            .lock()
            .ok()
            .and_then(|e| e.membership().map(|m| m.members.clone()))
            .unwrap_or_default()
    }

    /// This process's id.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.lock().map(|e| e.id()).unwrap_or(0)
    }
}
