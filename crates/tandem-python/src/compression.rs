//! `tandem._native.Compressor` and compressed allreduces of numpy `float32` gradients.
//!
//! Why an object per tensor: top-k and PowerSGD keep a residual (what error feedback still owes
//! the next steps) and PowerSGD a warm start; they belong to one gradient tensor across steps, and
//! to the training state when it is saved (`state()` / `Compressor.restore`). Half precision keeps
//! none, but goes through the same object so code does not change with the setting.

use std::sync::{Arc, Mutex};

use numpy::{PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use tandem::collective::compression::{Compression, Compressor};

use crate::errors::IntoPy;

/// The compression state of one gradient tensor.
#[pyclass(module = "tandem._native", name = "Compressor")]
#[derive(Clone)]
pub struct PyCompressor {
    /// The compressor, shared with the allreduce running it (the GIL released meanwhile).
    pub(crate) inner: Arc<Mutex<Compressor>>,
}

#[pymethods]
impl PyCompressor {
    /// A compressor for one tensor: `compression` is none, fp16, bf16, topk:FRACTION or
    /// powersgd:RANK; `columns` is the tensor's last dimension for PowerSGD (0: about square).
    #[new]
    #[pyo3(signature = (compression, columns=0))]
    fn new(compression: &str, columns: usize) -> PyResult<Self> {
        let c =
            Compression::parse(compression).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyCompressor {
            inner: Arc::new(Mutex::new(Compressor::new(c).with_columns(columns))),
        })
    }

    /// The setting, as its name (`bf16`, `topk:0.01`, ...).
    #[getter]
    fn compression(&self) -> PyResult<String> {
        Ok(self.lock()?.compression.to_string())
    }

    /// The residual and warm start, as bytes to save with the training state.
    fn state(&self) -> PyResult<Vec<u8>> {
        Ok(self.lock()?.state())
    }

    /// A compressor from what `state()` saved.
    #[staticmethod]
    fn restore(state: Vec<u8>) -> PyResult<Self> {
        let c = Compressor::restore(&state).py_err()?;
        Ok(PyCompressor {
            inner: Arc::new(Mutex::new(c)),
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("Compressor({:?})", self.compression()?))
    }
}

impl PyCompressor {
    /// The compressor, or an error when a panic poisoned it.
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Compressor>> {
        self.inner
            .lock()
            .map_err(|_| PyValueError::new_err("this compressor was poisoned by a panic"))
    }
}

/// Calls `f` with the `float32` contents of `array` to write, or a TypeError naming it.
pub(crate) fn with_f32_mut<R>(
    array: &Bound<'_, PyAny>,
    f: impl FnOnce(&mut [f32]) -> PyResult<R>,
) -> PyResult<R> {
    let a = array.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyTypeError::new_err(
            "compressed allreduces take float32 gradients (a numpy.ndarray of float32)",
        )
    })?;
    let mut rw = a
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("array: {e}")))?;
    let s = rw
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(format!("array: {e}")))?;
    f(s)
}

/// Calls `f` with the `float32` contents of every array of `arrays` to write (`what` names the
/// list in errors: a non-float32 array, a non-contiguous one, the same array twice).
pub(crate) fn with_many_f32_mut<R>(
    arrays: &[Bound<'_, PyAny>],
    what: &str,
    f: impl FnOnce(Vec<&mut [f32]>) -> PyResult<R>,
) -> PyResult<R> {
    let mut guards = Vec::with_capacity(arrays.len());
    for (i, array) in arrays.iter().enumerate() {
        let a = array.cast::<PyArrayDyn<f32>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{what}[{i}]: compressed allreduces take float32 gradients (a numpy.ndarray of float32)"
            ))
        })?;
        guards.push(
            a.try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("{what}[{i}]: {e}")))?,
        );
    }
    let mut slices = Vec::with_capacity(guards.len());
    for (i, rw) in guards.iter_mut().enumerate() {
        slices.push(
            rw.as_slice_mut()
                .map_err(|e| PyValueError::new_err(format!("{what}[{i}]: {e}")))?,
        );
    }
    f(slices)
}

/// Locks every compressor of `compressors` for one call (the same one twice is refused, not
/// deadlocked on).
pub(crate) fn lock_all<'a>(
    compressors: &'a [PyRef<'_, PyCompressor>],
) -> PyResult<Vec<std::sync::MutexGuard<'a, Compressor>>> {
    compressors
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.inner.try_lock().map_err(|e| {
                PyValueError::new_err(match e {
                    std::sync::TryLockError::WouldBlock => format!(
                        "compressors[{i}] is given twice or in use by another call: keep one compressor per tensor"
                    ),
                    std::sync::TryLockError::Poisoned(_) => {
                        format!("compressors[{i}] was poisoned by a panic")
                    }
                })
            })
        })
        .collect()
}

/// The compressor shared with a running allreduce, or an error when a panic poisoned it.
pub(crate) fn locked(
    state: &Arc<Mutex<Compressor>>,
) -> tandem::Result<std::sync::MutexGuard<'_, Compressor>> {
    state.lock().map_err(|_| tandem::Error::Unusable {
        what: "compressor".into(),
        reason: "a panic poisoned it".into(),
    })
}
