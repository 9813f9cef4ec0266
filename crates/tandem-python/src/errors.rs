//! Tandem errors as Python exceptions of the `tandem.errors` hierarchy.
//!
//! Why a class per kind: Python callers catch what they can handle (a `TimeoutError`, a
//! `PeerLostError` in an elastic loop) and let the rest propagate; most classes also derive from
//! the builtin they resemble (`ValueError`, `TimeoutError`, `ConnectionError`, ...), so generic
//! handlers keep working.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tandem::Error;

/// The `tandem.errors` class for an error kind.
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Config { .. } => "ConfigurationError",
        Error::Timeout { .. } => "TimeoutError",
        Error::PeerLost { .. } => "PeerLostError",
        Error::OpMismatch(_) => "MismatchError",
        Error::ShapeMismatch { .. } | Error::DTypeMismatch { .. } => "ShapeError",
        Error::InvalidArgument { .. } => "InvalidArgumentError",
        Error::Authentication { .. } => "AuthenticationError",
        Error::BackendUnavailable { .. } => "BackendUnavailableError",
        Error::Unusable { .. } => "UnusableError",
        Error::Precondition { .. } => "PreconditionError",
        Error::PartiallyApplied { .. } => "PartiallyAppliedError",
        Error::LeaseExpired { .. } => "LeaseExpiredError",
        _ => "TransportError",
    }
}

/// Converts a Tandem error into the matching Python exception (`tandem.errors.*`), carrying the
/// error's message and its `kind` attribute (and, for a lost peer, its `rank`).
pub fn to_py(e: Error) -> PyErr {
    Python::attach(|py| {
        let msg = e.to_string();
        let made = py
            .import("tandem.errors")
            .and_then(|m| m.getattr(class_name(&e)))
            .and_then(|cls| cls.call1((msg.clone(),)))
            .and_then(|exc| {
                exc.setattr("kind", e.kind())?;
                if let Error::PeerLost { rank, .. } = &e {
                    exc.setattr("rank", *rank)?;
                }
                Ok(exc)
            });
        match made {
            Ok(exc) => PyErr::from_value(exc),
            // Only when the Python package is missing (the extension used on its own).
            Err(_) => PyRuntimeError::new_err(msg),
        }
    })
}

/// `Result<T, tandem::Error>` into `PyResult<T>`.
pub trait IntoPy<T> {
    /// Maps the error with [`to_py`].
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for tandem::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
