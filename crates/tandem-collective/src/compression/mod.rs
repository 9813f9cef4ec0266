//! Fewer bytes on the wire for gradient allreduces: half-precision casts, top-k sparsification
//! with error feedback, and PowerSGD (low rank, with error feedback and warm start).
//!
//! Why: across hosts Tandem already fills most of a link, so on slow links the only way to go
//! faster is to send fewer bytes. The same choices Horovod (`Compression.fp16`), PyTorch's DDP
//! communication hooks (fp16/bf16, PowerSGD) and Deep Gradient Compression (top-k) offer, with
//! results identical on every rank:
//!
//! - `fp16`, `bf16`: the buffer is rounded once to 16 bits and allreduced as such; the ring widens
//!   each received segment to `f32`, adds, and rounds once per hop, so sums accumulate in `f32`
//!   and half the bytes cross each link. No state.
//! - `topk:F`: each rank sends the fraction `F` of its elements largest in magnitude of
//!   (gradient + residual), as (index, value) pairs gathered by every rank and summed in rank order;
//!   what was not sent stays in the residual and is added to the next step's gradient.
//! - `powersgd:R`: a gradient seen as a matrix `M` (rows × columns) is sent as two thin factors
//!   `P = M Q` and `Q = Mᵀ P` of rank `R` (allreduced in turn, `P` orthonormalised between), `Q`
//!   kept as the next step's starting point; the error `M - P Qᵀ` stays in the residual.
//!
//! The residuals and warm starts belong to the caller: a [`Compressor`] per gradient tensor,
//! serialisable ([`Compressor::state`], [`Compressor::restore`]) so it is checkpointed with the
//! training state and kept across an elastic re-formation.
//!
//! ```
//! use tandem_collective::compression::Compression;
//! assert_eq!("bf16".parse::<Compression>().unwrap(), Compression::Bf16);
//! assert_eq!("topk:0.01".parse::<Compression>().unwrap(), Compression::TopK { fraction: 0.01 });
//! assert_eq!("powersgd:4".parse::<Compression>().unwrap().to_string(), "powersgd:4");
//! assert!("topk:2".parse::<Compression>().is_err());
//! ```

use serde::{Deserialize, Serialize};
use tandem_core::{Error, ReduceOp, Result};

pub use tandem_core::compression::{
    AUTO_MARGIN, AutoChoice, BadCompression, Compression, narrow, top_k, widen,
};

/// Sums gathered (index, value) pairs of every rank, in rank order, into `out` (zeroed first);
/// `AVG` divides by `world` at the end. An index beyond `out` is refused (a peer's bad data).
pub fn scatter_sum(
    pairs: &[(u32, f32)],
    out: &mut [f32],
    op: ReduceOp,
    world: usize,
) -> Result<()> {
    let n = out.len();
    out.fill(0.0);
    for &(i, v) in pairs {
        let slot = out
            .get_mut(i as usize)
            .ok_or_else(|| Error::invalid("topk", format!("index {i} beyond the {n} elements")))?;
        *slot += v;
    }
    if op == ReduceOp::Avg {
        let n = world as f32;
        out.iter_mut().for_each(|x| *x /= n);
    }
    Ok(())
}

/// Orthonormalises the columns of `p` (`rows` × `rank`, row-major) in place by modified
/// Gram-Schmidt, each column projected twice (once loses orthogonality to rounding when columns
/// are nearly dependent); a column that vanishes against the others is set to zero.
pub fn orthonormalise(p: &mut [f32], rows: usize, rank: usize) {
    let norm = |p: &[f32], c: usize| {
        (0..rows)
            .map(|r| p[r * rank + c] * p[r * rank + c])
            .sum::<f32>()
            .sqrt()
    };
    for c in 0..rank {
        let before = norm(p, c);
        for _ in 0..2 {
            for prev in 0..c {
                let dot: f32 = (0..rows)
                    .map(|r| p[r * rank + c] * p[r * rank + prev])
                    .sum();
                for r in 0..rows {
                    p[r * rank + c] -= dot * p[r * rank + prev];
                }
            }
        }
        let after = norm(p, c);
        let scale = if after > 1e-4 * before && after > 1e-12 {
            1.0 / after
        } else {
            0.0
        };
        for r in 0..rows {
            p[r * rank + c] *= scale;
        }
    }
}

/// The starting `Q` of PowerSGD (`len` values in [-0.5, 0.5)), the same on every rank: SplitMix64
/// of each index, so its columns are independent (a plain Weyl sequence made them nearly
/// dependent and the factors lost rank).
pub fn warm_start(len: usize) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Values per piece of a pipelined half-precision allreduce: 2M (8 MiB of `f32`, 4 MiB on the
/// wire), large enough that each piece's ring fills the link (a piece's start costs a round trip)
/// and small enough that the exposed first narrowing and last widening stay a few milliseconds.
pub const HALF_PIECE: usize = 2 << 20;

/// The state of one gradient tensor's compression: the residual of error feedback, PowerSGD's
/// warm start, and a reusable wire buffer. Keep one per tensor, across steps; save [`state`]
/// with the training state and [`restore`] it after a restart or an elastic re-formation.
///
/// [`state`]: Compressor::state
/// [`restore`]: Compressor::restore
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Compressor {
    /// How this tensor is compressed.
    pub compression: Compression,
    /// Columns of the tensor seen as a matrix (PowerSGD; 0: the square root of its length).
    pub columns: usize,
    /// What error feedback still owes the next steps (top-k, PowerSGD).
    pub(crate) residual: Vec<f32>,
    /// PowerSGD's `Q` of the last step (columns × rank), its next starting point.
    pub(crate) q: Vec<f32>,
    /// The bytes sent, reused between calls.
    #[serde(skip)]
    pub(crate) wire: Vec<u8>,
}

impl Compressor {
    /// A compressor for one tensor.
    pub fn new(compression: Compression) -> Compressor {
        Compressor {
            compression,
            ..Compressor::default()
        }
    }

    /// PowerSGD's view of a tensor of `len` elements: `columns` wide (0: about square).
    pub fn with_columns(mut self, columns: usize) -> Compressor {
        self.columns = columns;
        self
    }

    /// The residual and warm start, to be saved with the training state.
    pub fn state(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A compressor from what [`Compressor::state`] saved.
    pub fn restore(bytes: &[u8]) -> Result<Compressor> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid("compressor state", format!("not a saved state: {e}")))
    }

    /// The rows and columns of a tensor of `n` elements as PowerSGD sees it.
    pub fn shape(&self, n: usize) -> (usize, usize) {
        let cols = if self.columns > 0 {
            self.columns
        } else {
            ((n as f64).sqrt().ceil() as usize).max(1)
        };
        (n.div_ceil(cols), cols)
    }
}

#[cfg(test)]
mod tests;
