//! Gradients and parameters in fewer bytes between workers and servers: pushes and pulls in bf16 or
//! fp16 (the servers keep f32 master weights and widen what they receive), and top-k pushes whose
//! error stays in the worker (each push sends the largest elements of gradient plus residual).
//!
//! Why per chunk: every pushed chunk says how its data is encoded ([`crate::pb::Wire`]), so the server
//! decodes each on its own into plain f32 pieces before anything else sees them: the checks, the
//! streamed application and the sync step are the same for every setting. A top-k partition travels
//! as one chunk of (index, value) pairs; where the pairs would be larger than the dense values
//! (fractions from one half up) the partition goes dense.
//!
//! ```
//! use tandem_ps::pb::Wire;
//! use tandem_ps::wire::{decode_dense, encode_dense};
//! let values = [1.0f32, -2.5, 3.0];
//! let half = encode_dense(&values, Wire::Bf16);
//! assert_eq!(half.len(), 6);
//! let (f32_bytes, offset) = decode_dense(&half, 6, Wire::Bf16).unwrap();
//! assert_eq!((f32_bytes.len(), offset), (12, 12));
//! ```

use bytes::Bytes;
use tandem_core::DType;
use tandem_core::compression::{Compression, narrow, top_k, widen};

use crate::pb::Wire;

/// Refuses a setting the parameter servers cannot carry (PowerSGD factors allreduced gradients
/// only), naming what they take.
pub fn check_setting(c: Compression) -> tandem_core::Result<Compression> {
    if let Compression::PowerSgd { .. } = c {
        return Err(tandem_core::Error::invalid(
            "compression",
            format!(
                "{c} compresses allreduces only; parameter servers and their workers take none, bf16, fp16, topk:FRACTION or auto"
            ),
        ));
    }
    Ok(c)
}

/// Bytes of one element of a dense encoding (none for top-k, whose chunks hold pairs).
pub fn element_bytes(wire: Wire) -> Option<usize> {
    match wire {
        Wire::F32 => Some(4),
        Wire::Bf16 | Wire::Fp16 => Some(2),
        Wire::Topk => None,
    }
}

/// The half type of a dense half encoding.
fn half_of(wire: Wire) -> Option<DType> {
    match wire {
        Wire::Bf16 => Some(DType::BF16),
        Wire::Fp16 => Some(DType::F16),
        _ => None,
    }
}

/// How pulls come back under `c`: in its half type for fp16 and bf16, else in f32 (top-k
/// compresses pushes only).
pub fn pull_wire(c: Compression) -> Wire {
    match c {
        Compression::Bf16 => Wire::Bf16,
        Compression::Fp16 => Wire::Fp16,
        _ => Wire::F32,
    }
}

/// `values` in a dense encoding: its little-endian bytes (one copy; f32 too, for callers holding
/// values rather than bytes).
pub fn encode_dense(values: &[f32], wire: Wire) -> Bytes {
    match half_of(wire) {
        Some(dtype) => {
            let mut out = vec![0u8; values.len() * 2];
            // Lengths match by construction, and the types are half types.
            let _ = narrow(values, dtype, &mut out);
            Bytes::from(out)
        }
        None => Bytes::copy_from_slice(bytemuck::cast_slice(values)),
    }
}

/// A dense chunk's data (`offset` in its own bytes) as f32 bytes and the f32 byte offset; an
/// encoding that is not dense, or data that is not whole elements, is refused in words.
pub fn decode_dense(data: &[u8], offset: u64, wire: Wire) -> Result<(Bytes, u64), String> {
    let Some(dtype) = half_of(wire) else {
        return match wire {
            Wire::F32 => Ok((Bytes::copy_from_slice(data), offset)),
            _ => Err(format!("{wire:?} is not a dense encoding")),
        };
    };
    if !data.len().is_multiple_of(2) || !offset.is_multiple_of(2) {
        return Err(format!(
            "{} bytes at byte {offset} of {wire:?} are not whole elements",
            data.len()
        ));
    }
    // Widened straight into the bytes handed on (aligned for f32): no second copy.
    let mut out = tandem_core::tensor::aligned_zeroed(data.len() * 2);
    let values: &mut [f32] =
        bytemuck::try_cast_slice_mut(&mut out[..]).map_err(|e| e.to_string())?;
    widen(data, dtype, values).map_err(|e| e.to_string())?;
    Ok((out.freeze(), offset * 2))
}

/// One top-k partition of a push: `acc` is its gradient plus residual (it becomes the new
/// residual: what was not sent); returns the chunk data and its encoding: (index, value) pairs
/// of the largest `fraction` of the elements, or the dense values (residual zero) where the pairs
/// would not be smaller.
pub fn encode_top_k(acc: &mut [f32], fraction: f64) -> (Bytes, Wire) {
    let n = acc.len();
    let k = ((n as f64 * fraction).ceil() as usize)
        .clamp(1, n.max(1))
        .min(n);
    if k * 8 >= n * 4 {
        let dense = encode_dense(acc, Wire::F32);
        acc.fill(0.0);
        return (dense, Wire::F32);
    }
    let idx = top_k(acc, k);
    let mut pairs = Vec::with_capacity(idx.len() * 8);
    for i in idx {
        let slot = &mut acc[i as usize];
        pairs.extend_from_slice(&i.to_le_bytes());
        pairs.extend_from_slice(&slot.to_le_bytes());
        *slot = 0.0;
    }
    (Bytes::from(pairs), Wire::Topk)
}

/// A top-k chunk read back as dense pieces of at most `piece` elements, in order, covering the
/// whole partition of `numel` elements (zeros where no pair fell): at most one piece is held at
/// a time. Pairs must be whole, ascending by index and inside the partition.
#[derive(Debug)]
pub struct SparsePieces {
    /// The pairs, as received.
    pairs: Bytes,
    /// The next pair to place.
    next: usize,
    /// Elements of the partition.
    numel: usize,
    /// Elements emitted so far.
    at: usize,
    /// Elements per piece.
    piece: usize,
    /// The last index placed (pairs must ascend).
    last: Option<u32>,
}

impl SparsePieces {
    /// Reads `pairs` for a partition of `numel` elements, `piece` elements at a time; refuses data
    /// that is not whole pairs.
    pub fn new(pairs: Bytes, numel: usize, piece: usize) -> Result<SparsePieces, String> {
        if !pairs.len().is_multiple_of(8) {
            return Err(format!(
                "{} bytes of top-k pairs are not whole (index, value) pairs of 8 bytes",
                pairs.len()
            ));
        }
        Ok(SparsePieces {
            pairs,
            next: 0,
            numel,
            at: 0,
            piece: piece.max(1),
            last: None,
        })
    }
}

impl Iterator for SparsePieces {
    /// The byte offset (f32) of the piece and its values, or why the pairs are bad.
    type Item = Result<(u64, Vec<f32>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.numel {
            // Pairs left over point past the partition's end.
            if self.next * 8 < self.pairs.len() {
                let b = &self.pairs[self.next * 8..self.next * 8 + 4];
                let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.next = self.pairs.len() / 8;
                return Some(Err(format!(
                    "top-k index {i} is beyond the partition's {} elements",
                    self.numel
                )));
            }
            return None;
        }
        let end = (self.at + self.piece).min(self.numel);
        let mut out = vec![0f32; end - self.at];
        while self.next * 8 < self.pairs.len() {
            let b = &self.pairs[self.next * 8..self.next * 8 + 8];
            let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if self.last.is_some_and(|l| i <= l) {
                self.at = self.numel;
                self.next = self.pairs.len() / 8;
                return Some(Err(format!(
                    "top-k indices must ascend: {i} follows {}",
                    self.last.unwrap_or(0)
                )));
            }
            if i as usize >= end {
                break;
            }
            out[i as usize - self.at] = f32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            self.last = Some(i);
            self.next += 1;
        }
        let offset = self.at as u64 * 4;
        self.at = end;
        Some(Ok((offset, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn half_encodings_round_once_and_come_back_as_f32_at_doubled_offsets() {
        let v = [1.0f32, 1.0 + 1.0 / 512.0, -3.25, 65504.0];
        for (wire, unit) in [(Wire::Bf16, 1.0 / 128.0), (Wire::Fp16, 1.0 / 1024.0)] {
            let e = encode_dense(&v, wire);
            assert_eq!(e.len(), 8);
            // From an odd address too, as bytes off a network may be.
            let mut backing = [0u16; 5];
            let odd: &mut [u8] = bytemuck::cast_slice_mut(&mut backing);
            odd[1..9].copy_from_slice(&e);
            let (back, off) = decode_dense(&odd[1..9], 10, wire).expect("decodes");
            assert_eq!(off, 20);
            for (a, b) in f32s(&back).iter().zip(&v) {
                assert!((a - b).abs() <= unit * b.abs(), "{wire:?}: {a} vs {b}");
            }
        }
        let (same, off) = decode_dense(&encode_dense(&v, Wire::F32), 4, Wire::F32).expect("f32");
        assert_eq!((f32s(&same), off), (v.to_vec(), 4));
        assert!(decode_dense(&[0, 0, 0], 0, Wire::Bf16).is_err());
        assert!(decode_dense(&[0, 0], 1, Wire::Bf16).is_err());
        assert!(decode_dense(&[0; 8], 0, Wire::Topk).is_err());
        assert_eq!(pull_wire(Compression::Bf16), Wire::Bf16);
        assert_eq!(pull_wire(Compression::TopK { fraction: 0.1 }), Wire::F32);
        assert_eq!(element_bytes(Wire::Fp16), Some(2));
        assert_eq!(element_bytes(Wire::Topk), None);
        assert!(check_setting(Compression::PowerSgd { rank: 4 }).is_err());
        assert!(check_setting(Compression::TopK { fraction: 0.1 }).is_ok());
    }

    #[test]
    fn top_k_sends_the_largest_keeps_the_rest_and_reads_back_in_pieces() {
        let g = [0.1f32, -5.0, 0.2, 4.0, -0.3, 0.05, 3.0, 0.0];
        let mut acc = g;
        let (data, wire) = encode_top_k(&mut acc, 0.25);
        assert_eq!((wire, data.len()), (Wire::Topk, 16));
        // Sent: -5.0 (index 1) and 4.0 (index 3); the residual keeps everything else.
        assert_eq!(acc, [0.1, 0.0, 0.2, 0.0, -0.3, 0.05, 3.0, 0.0]);
        let pieces: Vec<(u64, Vec<f32>)> = SparsePieces::new(data, 8, 3)
            .expect("pairs")
            .collect::<Result<_, _>>()
            .expect("good pairs");
        assert_eq!(
            pieces,
            [
                (0, vec![0.0, -5.0, 0.0]),
                (12, vec![4.0, 0.0, 0.0]),
                (24, vec![0.0, 0.0])
            ]
        );
        // Half the elements or more: dense, nothing kept.
        let mut acc = g;
        let (data, wire) = encode_top_k(&mut acc, 0.5);
        assert_eq!((wire, f32s(&data)), (Wire::F32, g.to_vec()));
        assert!(acc.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn bad_top_k_pairs_are_refused_in_words() {
        let pair = |i: u32, v: f32| [i.to_le_bytes(), v.to_le_bytes()].concat();
        assert!(SparsePieces::new(Bytes::from(vec![0u8; 7]), 4, 2).is_err());
        let beyond = Bytes::from(pair(4, 1.0));
        let e: Vec<_> = SparsePieces::new(beyond, 4, 2).expect("whole").collect();
        assert!(
            e.iter()
                .any(|r| r.as_ref().is_err_and(|e| e.contains("beyond")))
        );
        let last_inside = Bytes::from(pair(3, 1.0));
        let ok: Result<Vec<_>, _> = SparsePieces::new(last_inside, 4, 2)
            .expect("whole")
            .collect();
        assert_eq!(
            ok.expect("inside").last().map(|p| p.1.clone()),
            Some(vec![0.0, 1.0])
        );
        let down = Bytes::from([pair(2, 1.0), pair(1, 1.0)].concat());
        let e: Vec<_> = SparsePieces::new(down, 4, 4).expect("whole").collect();
        assert!(
            e.iter()
                .any(|r| r.as_ref().is_err_and(|e| e.contains("ascend")))
        );
    }
}
