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

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use serde::{Deserialize, Serialize};
use tandem_core::{DType, Error, ReduceOp, Result};

/// How a gradient allreduce reduces its bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Compression {
    /// Every value at full precision.
    #[default]
    None,
    /// IEEE half precision on the wire, sums in `f32`.
    Fp16,
    /// bfloat16 on the wire (f32's range, 8 bits of mantissa), sums in `f32`.
    Bf16,
    /// The largest `fraction` of the elements (by magnitude), with error feedback.
    TopK {
        /// Share of the elements sent, above 0 up to 1.
        fraction: f64,
    },
    /// Rank-`rank` factors of the gradient seen as a matrix, with error feedback and warm start.
    PowerSgd {
        /// The factors' rank, at least 1.
        rank: usize,
    },
}

impl Compression {
    /// The names this setting takes, as errors list them.
    pub const FORMS: &'static str = "none, fp16, bf16, topk:FRACTION or powersgd:RANK";

    /// Whether it changes values (everything but `None`).
    pub fn is_lossy(&self) -> bool {
        !matches!(self, Compression::None)
    }

    /// Bytes on the wire per element of `f32`, for one allreduce of `n` elements: what the choice
    /// between them weighs (top-k counts the index and value of each sent element).
    pub fn wire_fraction(&self, n: usize, columns: usize) -> f64 {
        match *self {
            Compression::None => 1.0,
            Compression::Fp16 | Compression::Bf16 => 0.5,
            Compression::TopK { fraction } => 2.0 * fraction,
            Compression::PowerSgd { rank } => {
                let cols = columns.max(1);
                let rows = n.div_ceil(cols);
                ((rows + cols) * rank) as f64 / n.max(1) as f64
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Fp16 => f.write_str("fp16"),
            Compression::Bf16 => f.write_str("bf16"),
            Compression::TopK { fraction } => write!(f, "topk:{fraction}"),
            Compression::PowerSgd { rank } => write!(f, "powersgd:{rank}"),
        }
    }
}

/// A compression setting that cannot be read: what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadCompression(String);

impl Compression {
    /// Reads a setting (`bf16`, `topk:0.01`, ...), saying what is wrong with a bad one.
    pub fn parse(s: &str) -> std::result::Result<Compression, BadCompression> {
        let bad = |why: String| BadCompression(why);
        let s = s.trim().to_ascii_lowercase();
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s.as_str(), None),
        };
        match (name, arg) {
            ("none" | "", None) => Ok(Compression::None),
            ("fp16", None) => Ok(Compression::Fp16),
            ("bf16", None) => Ok(Compression::Bf16),
            ("auto", None) => Err(bad(
                "auto (chosen from the links measured when the group forms) is not available yet; name one of none, fp16, bf16, topk:FRACTION or powersgd:RANK".into(),
            )),
            ("topk", Some(a)) => match a.parse::<f64>() {
                Ok(fraction) if fraction > 0.0 && fraction <= 1.0 => {
                    Ok(Compression::TopK { fraction })
                }
                _ => Err(bad(format!(
                    "topk:{a}: the fraction sent must be above 0 and at most 1 (topk:0.01 sends 1%)"
                ))),
            },
            ("powersgd", Some(a)) => match a.parse::<usize>() {
                Ok(rank) if (1..=1024).contains(&rank) => Ok(Compression::PowerSgd { rank }),
                _ => Err(bad(format!(
                    "powersgd:{a}: the rank must be a whole number from 1 to 1024"
                ))),
            },
            _ => Err(bad(format!("{s:?} is not one of {}", Compression::FORMS))),
        }
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Compression> {
        Compression::parse(s).map_err(|e| Error::invalid("compression", e.to_string()))
    }
}

/// Rounds `src` to `dtype` (F16 or BF16) into `dst` (its bytes), once.
pub fn narrow(src: &[f32], dtype: DType, dst: &mut [u8]) -> Result<()> {
    match dtype {
        DType::F16 => bytemuck::cast_slice_mut::<u8, f16>(dst).convert_from_f32_slice(src),
        DType::BF16 => bytemuck::cast_slice_mut::<u8, bf16>(dst).convert_from_f32_slice(src),
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other} is not a half type"),
            ));
        }
    }
    Ok(())
}

/// Widens `src` (bytes of `dtype`, F16 or BF16) into `dst`.
pub fn widen(src: &[u8], dtype: DType, dst: &mut [f32]) -> Result<()> {
    match dtype {
        DType::F16 => bytemuck::cast_slice::<u8, f16>(src).convert_to_f32_slice(dst),
        DType::BF16 => bytemuck::cast_slice::<u8, bf16>(src).convert_to_f32_slice(dst),
        other => {
            return Err(Error::invalid(
                "dtype",
                format!("{other} is not a half type"),
            ));
        }
    }
    Ok(())
}

/// The `k` indices of `v` largest in magnitude, ascending (ties to the lower index, so every
/// rank given the same values picks the same). Finds the k-th largest magnitude by selection on a
/// contiguous copy of the magnitudes, then keeps one pass's indices: linear time, no sort.
pub fn top_k(v: &[f32], k: usize) -> Vec<u32> {
    let n = v.len();
    if k == 0 {
        return Vec::new();
    }
    if k >= n {
        return (0..n as u32).collect();
    }
    let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let (_, kth, _) = mags.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
    let t = *kth;
    let above = v
        .iter()
        .filter(|x| x.abs().total_cmp(&t) == std::cmp::Ordering::Greater)
        .count();
    let mut ties = k - above;
    let mut out = Vec::with_capacity(k);
    for (i, x) in v.iter().enumerate() {
        match x.abs().total_cmp(&t) {
            std::cmp::Ordering::Greater => out.push(i as u32),
            std::cmp::Ordering::Equal if ties > 0 => {
                ties -= 1;
                out.push(i as u32);
            }
            _ => {}
        }
    }
    out
}

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

/// Which compression to use for an allreduce of `bytes` over links measured at `link_bytes_per_s`
/// (the slowest, as the ring goes at its pace), when the cast costs `cast_bytes_per_s` of this
/// process's compute: half precision only where the transfer time it saves exceeds the time the
/// two casts add, never on links faster than the casts.
pub fn choose(bytes: usize, link_bytes_per_s: f64, cast_bytes_per_s: f64) -> Compression {
    if !(link_bytes_per_s > 0.0 && cast_bytes_per_s > 0.0) {
        return Compression::None;
    }
    // An allreduce moves about twice its buffer over each link; half precision halves that.
    let saved = bytes as f64 / link_bytes_per_s;
    // Narrowing and widening read and write every element once each.
    let added = 2.0 * bytes as f64 / cast_bytes_per_s;
    if saved > added {
        Compression::Bf16
    } else {
        Compression::None
    }
}

#[cfg(test)]
mod tests;
