//! A Python object as the board a group's rank 0 publishes its rendezvous on: the Store torch hands
//! a `torch.distributed` backend (`tandem.torch` wraps it), so a backend group forms through
//! torch's own store with no second port and no extra variable.
//!
//! Why a board and not a port: under torchrun the agreed address (`MASTER_ADDR:MASTER_PORT`) is
//! torch's own store; a second service on that port would collide. The store is a key-value board
//! every rank can read; rank 0 publishes its rendezvous's address there (and on one machine the job
//! token it made), and the others look it up, each call bounded by the group's connect deadline.

use std::time::Duration;

use pyo3::prelude::*;
use tandem::rendezvous::board::{Board, Published};
use tandem::{Error, Result};

/// Any object with `publish(data: bytes, timeout: float)` and `lookup(timeout: float) -> bytes`
/// (and optionally `describe() -> str`).
#[derive(Debug)]
pub struct PyBoard {
    /// The Python store.
    obj: Py<PyAny>,
    /// Its name, for errors.
    name: String,
}

impl PyBoard {
    /// Wraps `obj`, reading its description once.
    pub fn new(obj: &Bound<'_, PyAny>) -> PyBoard {
        let name = obj
            .call_method0("describe")
            .and_then(|d| d.extract::<String>())
            .unwrap_or_else(|_| "the Python store".into());
        PyBoard {
            obj: obj.clone().unbind(),
            name,
        }
    }

    /// A failure of the Python store's `what` as a transport error naming the store.
    fn failed(&self, what: &str, e: PyErr) -> Error {
        Error::transport(format!("{what} {}", self.name), e.to_string())
    }
}

impl Board for PyBoard {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn publish(&self, record: &Published, deadline: Duration) -> Result<()> {
        Python::attach(|py| {
            let data = pyo3::types::PyBytes::new(py, &record.encode());
            self.obj
                .call_method1(py, "publish", (data, deadline.as_secs_f64()))
                .map(|_| ())
                .map_err(|e| self.failed("publishing the rendezvous in", e))
        })
    }

    fn lookup(&self, deadline: Duration) -> Result<Published> {
        let bytes: Vec<u8> = Python::attach(|py| {
            self.obj
                .call_method1(py, "lookup", (deadline.as_secs_f64(),))
                .and_then(|b| b.extract::<Vec<u8>>(py))
                .map_err(|e| self.failed("reading the rendezvous from", e))
        })?;
        Published::decode(&bytes, &self.name)
    }
}
