//! Reduction kernels: `dst = dst ⊕ src` element-wise for every dtype and [`ReduceOp`].
//!
//! Loops are written so the compiler vectorises them. Integer arithmetic wraps rather than panics.
//! `f16`/`bf16` are computed in `f32` and rounded once per call; with `divisor` set (the last hop of
//! an average) the division happens in the same `f32` computation, so it adds no second rounding.
//! Buffers that are not aligned for their dtype (raw bytes from a user) take a slower element-wise path.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use tandem_core::{DType, Error, ReduceOp, Result};

/// Arithmetic a reduction needs from one element type.
trait Arith: bytemuck::Pod {
    /// `a + b`.
    fn add(a: Self, b: Self) -> Self;
    /// `a * b`.
    fn mul(a: Self, b: Self) -> Self;
    /// The smaller of `a` and `b`.
    fn min(a: Self, b: Self) -> Self;
    /// The larger of `a` and `b`.
    fn max(a: Self, b: Self) -> Self;
    /// `a / n` (for AVG).
    fn div(a: Self, n: usize) -> Self;
}

macro_rules! float_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(a: Self, b: Self) -> Self { a + b }
            #[inline(always)] fn mul(a: Self, b: Self) -> Self { a * b }
            #[inline(always)] fn min(a: Self, b: Self) -> Self { if b < a { b } else { a } }
            #[inline(always)] fn max(a: Self, b: Self) -> Self { if b > a { b } else { a } }
            #[inline(always)] fn div(a: Self, n: usize) -> Self { a / n as $t }
        }
    )*};
}
float_arith!(f32, f64);

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(a: Self, b: Self) -> Self { a.wrapping_add(b) }
            #[inline(always)] fn mul(a: Self, b: Self) -> Self { a.wrapping_mul(b) }
            #[inline(always)] fn min(a: Self, b: Self) -> Self { Ord::min(a, b) }
            #[inline(always)] fn max(a: Self, b: Self) -> Self { Ord::max(a, b) }
            #[inline(always)] fn div(a: Self, n: usize) -> Self { a / (n as $t) }
        }
    )*};
}
int_arith!(i32, i64, u8);

/// `a` combined with `b` by `op` (AVG sums; its division comes after).
#[inline(always)]
fn combine<T: Arith>(op: ReduceOp, a: T, b: T) -> T {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => T::add(a, b),
        ReduceOp::Prod => T::mul(a, b),
        ReduceOp::Min => T::min(a, b),
        ReduceOp::Max => T::max(a, b),
        _ => T::add(a, b),
    }
}

/// `dst = dst op src` element-wise, divided by `divisor` at the end when given.
#[inline(always)]
fn typed<T: Arith>(op: ReduceOp, dst: &mut [T], src: &[T], divisor: Option<usize>) {
    // One loop per operator so each one vectorises.
    match op {
        ReduceOp::Sum | ReduceOp::Avg => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::add(*d, *s)),
        ReduceOp::Prod => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::mul(*d, *s)),
        ReduceOp::Min => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::min(*d, *s)),
        ReduceOp::Max => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::max(*d, *s)),
        _ => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = combine(op, *d, *s)),
    }
    if let Some(n) = divisor.filter(|n| *n > 1) {
        dst.iter_mut().for_each(|d| *d = T::div(*d, n));
    }
}

/// Half types: blocks are widened to `f32` with the `half` crate's slice conversions (which use the
/// CPU's conversion instructions where it has them), reduced in `f32` and narrowed once.
fn typed_half<H>(op: ReduceOp, dst: &mut [H], src: &[H], divisor: Option<usize>)
where
    H: bytemuck::Pod,
    [H]: HalfFloatSliceExt,
{
    /// Elements widened to f32 at a time (on the stack).
    const BLOCK: usize = 512;
    let mut a = [0f32; BLOCK];
    let mut b = [0f32; BLOCK];
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        let (a, b) = (&mut a[..d.len()], &mut b[..d.len()]);
        d.convert_to_f32_slice(a);
        s.convert_to_f32_slice(b);
        typed(op, a, b, divisor);
        d.convert_from_f32_slice(a);
    }
}

/// bf16: as [`typed_half`], the widening and rounding written out so that, compiled for each
/// SIMD level (the best the CPU has chosen at run time), the whole block vectorises: the ring
/// runs this at every hop of a bf16 allreduce.
#[multiversion::multiversion(targets = "simd")]
fn typed_bf16(op: ReduceOp, dst: &mut [bf16], src: &[bf16], divisor: Option<usize>) {
    /// Elements widened to f32 at a time (on the stack).
    const BLOCK: usize = 512;
    let mut a = [0f32; BLOCK];
    let mut b = [0f32; BLOCK];
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        let (a, b) = (&mut a[..d.len()], &mut b[..d.len()]);
        a.iter_mut()
            .zip(d.iter())
            .for_each(|(x, h)| *x = h.to_f32());
        b.iter_mut().zip(s).for_each(|(x, h)| *x = h.to_f32());
        typed(op, a, b, divisor);
        d.iter_mut()
            .zip(a.iter())
            .for_each(|(h, x)| *h = bf16::from_f32(*x));
    }
}

/// Applies `f` element by element to buffers that are not aligned for `T`.
fn unaligned<T: bytemuck::Pod>(dst: &mut [u8], src: &[u8], f: impl Fn(&mut [T], &[T])) {
    let size = std::mem::size_of::<T>();
    for (d, s) in dst.chunks_exact_mut(size).zip(src.chunks_exact(size)) {
        let mut a = [bytemuck::pod_read_unaligned::<T>(d)];
        let b = [bytemuck::pod_read_unaligned::<T>(s)];
        f(&mut a, &b);
        d.copy_from_slice(bytemuck::bytes_of(&a[0]));
    }
}

/// Applies `f` to the buffers as slices of `T`, element by element when they are not aligned.
fn run<T: bytemuck::Pod>(dst: &mut [u8], src: &[u8], f: impl Fn(&mut [T], &[T])) {
    match (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(src),
    ) {
        (Ok(d), Ok(s)) => f(d, s),
        _ => unaligned::<T>(dst, src, f),
    }
}

/// `dst = dst ⊕ src`, then `/ divisor` when given (the last hop of an average). Both slices hold
/// little-endian elements of `dtype` and must have the same length, a multiple of the element size.
///
/// ```
/// use tandem_collective::algorithm::reduce::reduce_into;
/// use tandem_core::{DType, ReduceOp};
/// let mut a = [1.0f32, 5.0];
/// let b = [3.0f32, 1.0];
/// reduce_into(DType::F32, ReduceOp::Max, bytemuck::cast_slice_mut(&mut a), bytemuck::cast_slice(&b), None).unwrap();
/// assert_eq!(a, [3.0, 5.0]);
/// ```
pub fn reduce_into(
    dtype: DType,
    op: ReduceOp,
    dst: &mut [u8],
    src: &[u8],
    divisor: Option<usize>,
) -> Result<()> {
    if dst.len() != src.len() || !dst.len().is_multiple_of(dtype.size()) {
        return Err(Error::invalid(
            "buffer",
            format!(
                "cannot reduce {} bytes into {} bytes of {dtype}",
                src.len(),
                dst.len()
            ),
        ));
    }
    match dtype {
        DType::F32 => run::<f32>(dst, src, |d, s| typed(op, d, s, divisor)),
        DType::F64 => run::<f64>(dst, src, |d, s| typed(op, d, s, divisor)),
        DType::I32 => run::<i32>(dst, src, |d, s| typed(op, d, s, divisor)),
        DType::I64 => run::<i64>(dst, src, |d, s| typed(op, d, s, divisor)),
        DType::U8 => run::<u8>(dst, src, |d, s| typed(op, d, s, divisor)),
        DType::F16 => run::<f16>(dst, src, |d, s| typed_half(op, d, s, divisor)),
        DType::BF16 => run::<bf16>(dst, src, |d, s| typed_bf16(op, d, s, divisor)),
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other} cannot be reduced"),
            ));
        }
    }
    Ok(())
}

/// Reduces `parts` (each the bytes of one rank, in rank order) into `out`. Half types accumulate in
/// `f32` across all parts and are rounded once at the end; an average divides once at the end.
pub fn reduce_all(dtype: DType, op: ReduceOp, parts: &[&[u8]], out: &mut [u8]) -> Result<()> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(());
    };
    let n = parts.len();
    let divisor = (op == ReduceOp::Avg).then_some(n);
    match dtype {
        DType::F16 | DType::BF16 => {
            let widen = |b: &[u8], acc: &mut Vec<f32>| {
                acc.clear();
                match dtype {
                    DType::F16 => acc.extend(
                        b.chunks_exact(2)
                            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
                    ),
                    _ => acc.extend(
                        b.chunks_exact(2)
                            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                    ),
                }
            };
            let (mut acc, mut tmp) = (Vec::new(), Vec::new());
            widen(first, &mut acc);
            for (i, p) in rest.iter().enumerate() {
                widen(p, &mut tmp);
                typed(op, &mut acc, &tmp, if i + 2 == n { divisor } else { None });
            }
            for (o, v) in out.chunks_exact_mut(2).zip(&acc) {
                let bits = if dtype == DType::F16 {
                    f16::from_f32(*v).to_le_bytes()
                } else {
                    bf16::from_f32(*v).to_le_bytes()
                };
                o.copy_from_slice(&bits);
            }
            Ok(())
        }
        _ => {
            out.copy_from_slice(first);
            for (i, p) in rest.iter().enumerate() {
                reduce_into(dtype, op, out, p, if i + 2 == n { divisor } else { None })?;
            }
            Ok(())
        }
    }
}

/// Divides every element by `n` in place (an average over a world of one rank is the identity).
pub fn divide(dtype: DType, buf: &mut [u8], n: usize) -> Result<()> {
    if n <= 1 {
        return Ok(());
    }
    let zeros = vec![0u8; buf.len()];
    // x + 0 then / n: exact for the addition, one rounding for the division.
    reduce_into(dtype, ReduceOp::Sum, buf, &zeros, Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reduce_f32(op: ReduceOp, a: &[f32], b: &[f32], div: Option<usize>) -> Vec<f32> {
        let mut d = a.to_vec();
        reduce_into(
            DType::F32,
            op,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(b),
            div,
        )
        .unwrap();
        d
    }

    #[test]
    fn every_op_on_f32() {
        let a = [1.0f32, -2.0, 3.5];
        let b = [4.0f32, 0.5, -1.0];
        assert_eq!(reduce_f32(ReduceOp::Sum, &a, &b, None), [5.0, -1.5, 2.5]);
        assert_eq!(reduce_f32(ReduceOp::Prod, &a, &b, None), [4.0, -1.0, -3.5]);
        assert_eq!(reduce_f32(ReduceOp::Min, &a, &b, None), [1.0, -2.0, -1.0]);
        assert_eq!(reduce_f32(ReduceOp::Max, &a, &b, None), [4.0, 0.5, 3.5]);
        assert_eq!(
            reduce_f32(ReduceOp::Avg, &a, &b, Some(2)),
            [2.5, -0.75, 1.25]
        );
    }

    #[test]
    fn integers_wrap_instead_of_panicking() {
        let mut d = [i32::MAX, 7];
        reduce_into(
            DType::I32,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&[1i32, 2]),
            None,
        )
        .unwrap();
        assert_eq!(d, [i32::MIN, 9]);
        let mut d = [7i64, -7];
        reduce_into(
            DType::I64,
            ReduceOp::Avg,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&[0i64, 0]),
            Some(2),
        )
        .unwrap();
        assert_eq!(d, [3, -3]);
        let mut d = [200u8, 3];
        reduce_into(DType::U8, ReduceOp::Max, &mut d, &[100, 9], None).unwrap();
        assert_eq!(d, [200, 9]);
    }

    #[test]
    fn half_types_compute_in_f32_and_round_once() {
        let a: Vec<f16> = [1.0f32, 2049.0, 0.1]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let b: Vec<f16> = [2.0f32, 1.0, 0.2]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let mut d = a.clone();
        reduce_into(
            DType::F16,
            ReduceOp::Avg,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&b),
            Some(2),
        )
        .unwrap();
        for i in 0..3 {
            let exact = (a[i].to_f32() + b[i].to_f32()) / 2.0;
            assert_eq!(d[i], f16::from_f32(exact), "element {i}");
        }
        let a = [bf16::from_f32(3.0)];
        let mut d = [bf16::from_f32(-1.0)];
        reduce_into(
            DType::BF16,
            ReduceOp::Min,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&a),
            None,
        )
        .unwrap();
        assert_eq!(d[0].to_f32(), -1.0);
    }

    #[test]
    fn unaligned_buffers_give_the_same_result() {
        let a: Vec<f64> = (0..33).map(|i| i as f64 * 1.25).collect();
        let b: Vec<f64> = (0..33).map(|i| 100.0 - i as f64).collect();
        let mut raw = vec![0u8; 1 + 33 * 8];
        raw[1..].copy_from_slice(bytemuck::cast_slice(&a));
        reduce_into(
            DType::F64,
            ReduceOp::Sum,
            &mut raw[1..],
            bytemuck::cast_slice(&b),
            None,
        )
        .unwrap();
        let got: Vec<f64> = raw[1..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn reduce_all_rounds_half_types_once() {
        // 1 + 2^-11 + 2^-11 is not representable step by step in f16 (each partial rounds back to 1),
        // but the exact total 1 + 2^-10 is.
        let one = f16::from_f32(1.0).to_le_bytes();
        let tiny = f16::from_f32(2f32.powi(-11)).to_le_bytes();
        let mut out = [0u8; 2];
        reduce_all(DType::F16, ReduceOp::Sum, &[&one, &tiny, &tiny], &mut out).unwrap();
        assert_eq!(f16::from_le_bytes(out).to_f32(), 1.0 + 2f32.powi(-10));
        let parts: [&[u8]; 3] = [&[1, 0, 0, 0], &[2, 0, 0, 0], &[6, 0, 0, 0]];
        let mut out = [0u8; 4];
        reduce_all(DType::I32, ReduceOp::Avg, &parts, &mut out).unwrap();
        assert_eq!(i32::from_le_bytes(out), 3);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(reduce_into(DType::F32, ReduceOp::Sum, &mut [0u8; 8], &[0u8; 4], None).is_err());
        assert!(reduce_into(DType::F32, ReduceOp::Sum, &mut [0u8; 6], &[0u8; 6], None).is_err());
        let mut d = [9.0f32, 3.0];
        divide(DType::F32, bytemuck::cast_slice_mut(&mut d), 3).unwrap();
        assert_eq!(d, [3.0, 1.0]);
    }
}
