//! numpy arrays as the byte buffers collectives work on: in place, without copies, and with a clear
//! `TypeError` or `ValueError` for what cannot be used.
//!
//! Why refuse rather than copy: a collective that silently copied a strided or read-only array
//! would leave the caller's array unchanged while appearing to succeed; an error naming the array
//! and what is wrong with it is better than silently wrong numbers.
//!
//! The dtypes accepted are the ones Tandem reduces: float32, float64, float16, bfloat16 (numpy
//! has no bfloat16 of its own; `ml_dtypes` provides it, and torch's is viewed through it), int32,
//! int64 and uint8.

use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use tandem::{DType, Element};

/// The numpy dtype names Tandem accepts, and their Tandem dtypes.
pub const SUPPORTED: &str = "float32, float64, float16, bfloat16 (ml_dtypes), int32, int64, uint8";

/// The dtype of a numpy dtype name; `None` for one Tandem does not reduce.
fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "int32" => DType::I32,
        "int64" => DType::I64,
        "uint8" => DType::U8,
        _ => return None,
    })
}

/// Checks that `a` is a C-contiguous numpy array of a supported dtype; returns its dtype and shape.
pub fn inspect(a: &Bound<'_, PyAny>, what: &str) -> PyResult<(DType, Vec<usize>)> {
    let arr = a.cast::<PyUntypedArray>().map_err(|_| {
        let ty = a
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{what} must be a numpy.ndarray (for a torch tensor pass t.numpy()), got {ty}"
        ))
    })?;
    let name = arr.dtype().to_string();
    let dtype = dtype_of(&name).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "{what} has dtype {name}, which Tandem cannot reduce; use one of {SUPPORTED}"
        ))
    })?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} (shape {:?}) is not C-contiguous; pass numpy.ascontiguousarray({what}) and copy the result back",
            arr.shape()
        )));
    }
    Ok((dtype, arr.shape().to_vec()))
}

/// A numpy borrow refused (the array is borrowed elsewhere, or read-only where it is written)
/// as a ValueError naming the argument.
fn borrow_error(what: &str, e: numpy::BorrowError) -> PyErr {
    let text = e.to_string();
    if text.contains("not writeable") {
        PyValueError::new_err(format!(
            "{what} is read-only; collectives write their result into it"
        ))
    } else {
        PyValueError::new_err(format!(
            "{what} is already in use by another Tandem call ({text})"
        ))
    }
}

macro_rules! by_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            other => Err(PyTypeError::new_err(format!(
                "dtype {other} is not supported here"
            ))),
        }
    };
}

/// `a` as an array of `T`, or a TypeError naming the argument.
fn typed<'a, 'py, T: numpy::Element>(
    a: &'a Bound<'py, PyAny>,
    what: &str,
) -> PyResult<&'a Bound<'py, PyArrayDyn<T>>> {
    a.cast::<PyArrayDyn<T>>()
        .map_err(|e| PyTypeError::new_err(format!("{what}: {e}")))
}

/// Calls `f` with the array's bytes to write in place, its dtype and its shape.
pub fn with_bytes_mut<R>(
    a: &Bound<'_, PyAny>,
    what: &str,
    f: impl FnOnce(&mut [u8], DType, &[usize]) -> PyResult<R>,
) -> PyResult<R> {
    let (dtype, shape) = inspect(a, what)?;
    by_dtype!(dtype, T => {
        let arr = typed::<T>(a, what)?;
        let mut rw = arr.try_readwrite().map_err(|e| borrow_error(what, e))?;
        let s: &mut [T] = rw
            .as_slice_mut()
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        f(bytemuck::cast_slice_mut(s), <T as Element>::DTYPE, &shape)
    })
}

/// Calls `f` with the array's bytes to read, its dtype and its shape.
pub fn with_bytes<R>(
    a: &Bound<'_, PyAny>,
    what: &str,
    f: impl FnOnce(&[u8], DType, &[usize]) -> PyResult<R>,
) -> PyResult<R> {
    let (dtype, shape) = inspect(a, what)?;
    by_dtype!(dtype, T => {
        let arr = typed::<T>(a, what)?;
        let ro = arr.try_readonly().map_err(|e| borrow_error(what, e))?;
        let s: &[T] = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        f(bytemuck::cast_slice(s), <T as Element>::DTYPE, &shape)
    })
}

/// A new numpy array of `dtype` and `shape` holding a copy of `bytes`.
pub fn new_array<'py>(
    py: Python<'py>,
    dtype: DType,
    shape: &[usize],
    bytes: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!(dtype, T => {
        let arr = PyArrayDyn::<T>::zeros(py, shape, false);
        {
            let mut rw = arr.try_readwrite().map_err(|e| borrow_error("result", e))?;
            let s: &mut [T] = rw
                .as_slice_mut()
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            let dst: &mut [u8] = bytemuck::cast_slice_mut(s);
            if dst.len() != bytes.len() {
                return Err(PyValueError::new_err(format!(
                    "internal: {} bytes for an array of {}",
                    bytes.len(),
                    dst.len()
                )));
            }
            dst.copy_from_slice(bytes);
        }
        Ok(arr.into_any())
    })
}
