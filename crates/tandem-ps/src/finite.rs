//! The check every gradient passes before it changes a parameter: no NaN, no Inf. Shared by the
//! server (which checks what it reads) and the client (which checks before it sends, so a bad
//! gradient is refused whole instead of stopping part-way through a push applied as it is read).

/// Whether every value is finite (no NaN, no Inf). Branch-free within blocks so that it compiles to
/// vector instructions: a gradient is checked at memory speed.
///
/// ```
/// use tandem_ps::finite::all_finite;
/// assert!(all_finite(&[1.0, -2.5, 0.0]));
/// assert!(!all_finite(&[1.0, f32::NAN]));
/// ```
pub fn all_finite(xs: &[f32]) -> bool {
    /// The f32 exponent bits: all set means Inf or NaN.
    const EXPONENT: u32 = 0x7f80_0000;
    xs.chunks(4096).all(|block| {
        block.iter().fold(0u32, |bad, v| {
            bad | u32::from(v.to_bits() & EXPONENT == EXPONENT)
        }) == 0
    })
}

/// Whether every f32 in `b` (little-endian bytes, any alignment) is finite.
///
/// ```
/// use tandem_ps::finite::bytes_finite;
/// let good: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
/// assert!(bytes_finite(&good));
/// assert!(bytes_finite(&good[1..5]) == f32::from_le_bytes([good[1], good[2], good[3], good[4]]).is_finite());
/// ```
pub fn bytes_finite(b: &[u8]) -> bool {
    match bytemuck::try_cast_slice::<u8, f32>(b) {
        Ok(xs) => all_finite(xs),
        Err(_) => b
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found_anywhere() {
        let mut xs = vec![1.5f32; 10_000];
        assert!(all_finite(&xs));
        assert!(all_finite(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, 4095, 4096, 9_999] {
                xs[at] = bad;
                assert!(!all_finite(&xs), "{bad} at {at}");
                xs[at] = f32::MAX;
            }
        }
        assert!(
            all_finite(&xs),
            "MAX, MIN_POSITIVE and subnormals are finite"
        );
        assert!(all_finite(&[f32::MIN_POSITIVE, 1e-45, -0.0]));
    }

    #[test]
    fn unaligned_bytes_are_checked_value_by_value() {
        let vals = [1.0f32, f32::NAN, 3.0];
        let mut bytes = vec![0u8];
        bytes.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        // Offset by one byte: never aligned for f32.
        assert!(!bytes_finite(&bytes[1..]));
        assert!(bytes_finite(&bytes[1..5]));
        assert!(!bytes_finite(&bytes[5..9]));
        assert!(bytes_finite(&bytes[9..13]));
        let aligned: Vec<f32> = vec![2.0; 8];
        assert!(bytes_finite(bytemuck::cast_slice(&aligned)));
    }
}
