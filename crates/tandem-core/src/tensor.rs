//! Host tensors: a `bytes` buffer plus a dtype and a shape, with zero-copy views to and from `ndarray`.
//!
//! [`Tensor`] is immutable and cheap to clone (it shares a [`Bytes`]); it is what travels over the
//! network. [`TensorMut`] owns a [`BytesMut`] that Tandem keeps aligned for its element type, so that
//! collectives can work in place. Buffers that come from the network are often not aligned for `f32`
//! (prost slices them out of a larger frame); [`Tensor::as_slice`] and [`Tensor::view`] borrow when the
//! alignment allows and copy only when it does not.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, CowArray, IxDyn};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// Alignment Tandem guarantees for buffers it allocates (enough for every [`Element`] and for SIMD loads).
pub const BUFFER_ALIGN: usize = 64;

/// Number of elements of a shape, or an error if the product overflows `usize`.
pub fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::invalid(
                "shape",
                format!("{shape:?} has more elements than fit in memory"),
            )
        })
}

fn byte_len(dtype: DType, shape: &[usize]) -> Result<usize> {
    numel(shape)?.checked_mul(dtype.size()).ok_or_else(|| {
        Error::invalid(
            "shape",
            format!("{shape:?} of {dtype} overflows a byte length"),
        )
    })
}

/// A zeroed `BytesMut` of `len` bytes whose first byte is aligned to [`BUFFER_ALIGN`].
pub fn aligned_zeroed(len: usize) -> BytesMut {
    let mut buf = BytesMut::zeroed(len + BUFFER_ALIGN);
    let pad = buf.as_ptr().align_offset(BUFFER_ALIGN).min(BUFFER_ALIGN);
    let _ = buf.split_to(pad);
    buf.truncate(len);
    buf
}

fn check_dtype<T: Element>(have: DType) -> Result<()> {
    if T::DTYPE == have {
        Ok(())
    } else {
        Err(Error::DTypeMismatch {
            name: "tensor".into(),
            expected: have,
            got: T::DTYPE,
        })
    }
}

/// Keeps a typed `Vec` alive behind a `Bytes` without copying it.
struct VecOwner<T: Element>(Vec<T>);

impl<T: Element> AsRef<[u8]> for VecOwner<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// An immutable host tensor: shared bytes, a dtype and a shape.
///
/// ```
/// use tandem_core::{DType, Tensor};
/// let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
/// assert_eq!(t.dtype(), DType::F32);
/// let v = t.view::<f32>().unwrap();
/// assert_eq!(v[[1, 0]], 3.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    data: Bytes,
    dtype: DType,
    shape: Vec<usize>,
}

/// Refuses `len` bytes that do not hold a `dtype` tensor of `shape`.
fn check_len(len: usize, dtype: DType, shape: &[usize]) -> Result<()> {
    let want = byte_len(dtype, shape)?;
    if len != want {
        return Err(Error::invalid(
            "data",
            format!("{len} bytes do not hold a {dtype} tensor of shape {shape:?} ({want} bytes)"),
        ));
    }
    Ok(())
}

impl Tensor {
    /// Wraps bytes as a tensor, checking that their length matches the dtype and shape.
    pub fn new(data: Bytes, dtype: DType, shape: &[usize]) -> Result<Self> {
        check_len(data.len(), dtype, shape)?;
        Ok(Tensor {
            data,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// Takes ownership of a `Vec` without copying it.
    pub fn from_vec<T: Element>(values: Vec<T>, shape: &[usize]) -> Result<Self> {
        let want = numel(shape)?;
        if values.len() != want {
            return Err(Error::ShapeMismatch {
                name: "values".into(),
                expected: shape.to_vec(),
                got: vec![values.len()],
            });
        }
        Ok(Tensor {
            data: Bytes::from_owner(VecOwner(values)),
            dtype: T::DTYPE,
            shape: shape.to_vec(),
        })
    }

    /// Takes ownership of an `ndarray` array; zero-copy when it is in standard (C) layout.
    pub fn from_array<T: Element>(array: ArrayD<T>) -> Self {
        let shape = array.shape().to_vec();
        let n = array.len();
        let values = if array.is_standard_layout() {
            let (vec, offset) = array.into_raw_vec_and_offset();
            if offset.unwrap_or(0) == 0 && vec.len() == n {
                vec
            } else {
                // A standard-layout window into a larger buffer: keep only the window.
                let start = offset.unwrap_or(0);
                vec[start..start + n].to_vec()
            }
        } else {
            // Not contiguous in C order: rebuild once in C order.
            array.as_standard_layout().iter().copied().collect()
        };
        Tensor {
            data: Bytes::from_owner(VecOwner(values)),
            dtype: T::DTYPE,
            shape,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// Gives back the raw bytes.
    pub fn into_bytes(self) -> Bytes {
        self.data
    }

    /// The elements as a slice: borrowed when the bytes are aligned for `T`, copied when they are not.
    pub fn as_slice<T: Element>(&self) -> Result<Cow<'_, [T]>> {
        check_dtype::<T>(self.dtype)?;
        Ok(match bytemuck::try_cast_slice::<u8, T>(&self.data) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(&self.data)),
        })
    }

    /// Whether the bytes are aligned for the tensor's dtype (so views borrow rather than copy).
    pub fn is_aligned(&self) -> bool {
        self.data.as_ptr().align_offset(self.dtype.size()) == 0
    }

    /// An `ndarray` view: borrowed when aligned, owned (one copy) when the bytes are misaligned.
    pub fn view<T: Element>(&self) -> Result<CowArray<'_, T, IxDyn>> {
        let shape = IxDyn(&self.shape);
        let bad = |e: ndarray::ShapeError| Error::invalid("shape", e.to_string());
        Ok(match self.as_slice::<T>()? {
            Cow::Borrowed(s) => CowArray::from(ArrayViewD::from_shape(shape, s).map_err(bad)?),
            Cow::Owned(v) => CowArray::from(ArrayD::from_shape_vec(shape, v).map_err(bad)?),
        })
    }
}

/// A mutable host tensor whose buffer is aligned for its dtype, for in-place work.
///
/// ```
/// use tandem_core::{DType, TensorMut};
/// let mut t = TensorMut::zeros(DType::F32, &[2, 3]).unwrap();
/// t.view_mut::<f32>().unwrap().fill(1.5);
/// let frozen = t.freeze();
/// assert_eq!(frozen.as_slice::<f32>().unwrap().iter().sum::<f32>(), 9.0);
/// ```
#[derive(Debug)]
pub struct TensorMut {
    data: BytesMut,
    dtype: DType,
    shape: Vec<usize>,
}

impl TensorMut {
    /// A zero-filled tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Self> {
        Ok(TensorMut {
            data: aligned_zeroed(byte_len(dtype, shape)?),
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// Wraps a buffer, copying it once only if it is not aligned for `dtype`.
    pub fn from_bytes_mut(data: BytesMut, dtype: DType, shape: &[usize]) -> Result<Self> {
        check_len(data.len(), dtype, shape)?;
        let data = if data.as_ptr().align_offset(dtype.size()) == 0 {
            data
        } else {
            let mut aligned = aligned_zeroed(data.len());
            aligned.copy_from_slice(&data);
            aligned
        };
        Ok(TensorMut {
            data,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A mutable copy of an immutable tensor.
    pub fn from_tensor(t: &Tensor) -> Self {
        let mut data = aligned_zeroed(t.bytes().len());
        data.copy_from_slice(t.bytes());
        TensorMut {
            data,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw bytes, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The elements as a mutable slice.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        check_dtype::<T>(self.dtype)?;
        // Alignment is an invariant of TensorMut, so this cast cannot fail on it.
        bytemuck::try_cast_slice_mut(&mut self.data).map_err(|e| {
            Error::invalid(
                "tensor",
                format!("buffer cannot be viewed as {}: {e}", T::DTYPE),
            )
        })
    }

    /// A mutable `ndarray` view without copying.
    pub fn view_mut<T: Element>(&mut self) -> Result<ArrayViewMutD<'_, T>> {
        let shape = IxDyn(&self.shape.clone());
        let s = self.as_mut_slice::<T>()?;
        ArrayViewMutD::from_shape(shape, s).map_err(|e| Error::invalid("shape", e.to_string()))
    }

    /// Turns the tensor into an immutable, shareable [`Tensor`] without copying.
    pub fn freeze(self) -> Tensor {
        Tensor {
            data: self.data.freeze(),
            dtype: self.dtype,
            shape: self.shape,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn from_array_is_zero_copy_in_c_order() {
        let a = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32).into_dyn();
        let ptr = a.as_ptr() as *const u8;
        let t = Tensor::from_array(a);
        assert_eq!(t.bytes().as_ptr(), ptr);
        assert_eq!(t.view::<f32>().unwrap()[[2, 3]], 11.0);
    }

    #[test]
    fn from_array_fortran_order_keeps_values() {
        let a = Array2::from_shape_fn((2, 3), |(i, j)| (i * 10 + j) as i64);
        let t = Tensor::from_array(a.t().to_owned().into_dyn());
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(
            t.as_slice::<i64>().unwrap().as_ref(),
            &[0, 10, 1, 11, 2, 12]
        );
    }

    #[test]
    fn misaligned_bytes_are_copied_aligned_are_borrowed() {
        let values: Vec<f32> = (0..16).map(|i| i as f32 * 0.5).collect();
        let mut raw = vec![0u8; 1];
        raw.extend_from_slice(bytemuck::cast_slice(&values));
        let all = Bytes::from(raw);
        let misaligned = all.slice(1..);
        let t = Tensor::new(misaligned, DType::F32, &[4, 4]).unwrap();
        if !t.is_aligned() {
            assert!(matches!(t.as_slice::<f32>().unwrap(), Cow::Owned(_)));
        }
        assert_eq!(t.as_slice::<f32>().unwrap().as_ref(), values.as_slice());
        let aligned = Tensor::from_vec(values.clone(), &[16]).unwrap();
        assert!(matches!(
            aligned.as_slice::<f32>().unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn wrong_dtype_and_length_are_errors() {
        let t = Tensor::from_vec(vec![1i32, 2, 3], &[3]).unwrap();
        assert!(matches!(
            t.as_slice::<f32>(),
            Err(Error::DTypeMismatch { .. })
        ));
        let e = Tensor::new(Bytes::from_static(&[0; 7]), DType::F32, &[2]).unwrap_err();
        assert!(e.to_string().contains("7 bytes"), "{e}");
        assert!(Tensor::from_vec(vec![1u8; 5], &[2, 2]).is_err());
        assert!(numel(&[usize::MAX, 2]).is_err());
    }

    #[test]
    fn tensor_mut_round_trip_and_realign() {
        let mut raw = BytesMut::zeroed(1 + 8 * 4);
        let _ = raw.split_to(1);
        let mut t = TensorMut::from_bytes_mut(raw, DType::F64, &[4]).unwrap();
        t.as_mut_slice::<f64>()
            .unwrap()
            .copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        let frozen = t.freeze();
        assert_eq!(
            frozen.as_slice::<f64>().unwrap().as_ref(),
            &[1.0, 2.0, 3.0, 4.0]
        );
        let mut back = TensorMut::from_tensor(&frozen);
        back.view_mut::<f64>().unwrap()[[0]] = 9.0;
        assert_eq!(back.freeze().as_slice::<f64>().unwrap()[0], 9.0);
    }

    #[test]
    fn half_types_work() {
        let v: Vec<half::bf16> = (0..4).map(|i| half::bf16::from_f32(i as f32)).collect();
        let t = Tensor::from_vec(v.clone(), &[2, 2]).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.as_slice::<half::bf16>().unwrap().as_ref(), v.as_slice());
    }
}
