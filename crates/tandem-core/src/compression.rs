//! The compression settings of gradient transfers and their pure building blocks: half-precision
//! casts, top-k selection, and `auto`'s choice from measured times.
//!
//! Why here: the collectives (`tandem-collective`) and the parameter servers (`tandem-ps`) put the
//! same settings on their wires and must agree on what each name means; neither imports the other.
//! The error feedback of collectives (residuals, PowerSGD) lives with the collectives.
//!
//! ```
//! use tandem_core::compression::Compression;
//! assert_eq!("bf16".parse::<Compression>().unwrap(), Compression::Bf16);
//! assert_eq!("topk:0.01".parse::<Compression>().unwrap(), Compression::TopK { fraction: 0.01 });
//! assert_eq!("powersgd:4".parse::<Compression>().unwrap().to_string(), "powersgd:4");
//! assert!("topk:2".parse::<Compression>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use serde::{Deserialize, Serialize};

use crate::{DType, Error, Result};

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
    /// Chosen by the group from its links: `bf16` where a measured allreduce with it is faster
    /// than without, else none (see [``ProcessGroup::auto_compression` of tandem-collective`]). Never top-k or
    /// PowerSGD: they change what the optimiser sees, which a measurement of speed cannot judge.
    Auto,
}

impl Compression {
    /// The names this setting takes, as errors list them.
    pub const FORMS: &'static str = "none, fp16, bf16, topk:FRACTION, powersgd:RANK or auto";

    /// Whether it may change values (everything but `None`; `Auto` may choose a lossy setting).
    pub fn is_lossy(&self) -> bool {
        !matches!(self, Compression::None)
    }

    /// Bytes on the wire per element of `f32`, for one allreduce of `n` elements: what the choice
    /// between them weighs (top-k counts the index and value of each sent element; `Auto` counts
    /// as none until the group resolves it).
    pub fn wire_fraction(&self, n: usize, columns: usize) -> f64 {
        match *self {
            Compression::None | Compression::Auto => 1.0,
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
            Compression::Auto => f.write_str("auto"),
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
            ("auto", None) => Ok(Compression::Auto),
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

impl Compression {
    /// `TANDEM_COMPRESSION` from `vars` (none when unset); a bad value fails naming the variable.
    ///
    /// ```
    /// use tandem_core::compression::Compression;
    /// assert_eq!(Compression::from_vars(&[("TANDEM_COMPRESSION", "bf16")]).unwrap(), Compression::Bf16);
    /// assert_eq!(Compression::from_vars(&[("OTHER", "x")]).unwrap(), Compression::None);
    /// assert!(Compression::from_vars(&[("TANDEM_COMPRESSION", "zip")]).is_err());
    /// ```
    pub fn from_vars(vars: &(impl crate::vars::Vars + ?Sized)) -> Result<Compression> {
        let var = &crate::settings::COMPRESSION;
        match var.text(vars)? {
            Some(v) => Compression::parse(&v).map_err(|e| Error::config(var.name, e.to_string())),
            None => Ok(Compression::None),
        }
    }

    /// [`Compression::from_vars`] on this process's environment.
    pub fn from_env() -> Result<Compression> {
        Compression::from_vars(&crate::vars::ProcessEnv)
    }

    /// The wire's element type of a half-precision setting (`F16`, `BF16`), none for the others.
    pub fn half_dtype(&self) -> Option<DType> {
        match self {
            Compression::Fp16 => Some(DType::F16),
            Compression::Bf16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Compression> {
        Compression::parse(s).map_err(|e| Error::invalid("compression", e.to_string()))
    }
}

/// The half type `dtype` must be, and `half_len` the bytes of `n` elements of it, or an error.
fn check_half(dtype: DType, n: usize, half_len: usize) -> Result<()> {
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(Error::invalid(
            "dtype",
            format!("{dtype} is not a half type"),
        ));
    }
    if half_len != n * 2 {
        return Err(Error::invalid(
            "buffer",
            format!("{half_len} bytes of {dtype} for {n} f32 values (2 bytes each are needed)"),
        ));
    }
    Ok(())
}

/// Rounds `src` to `dtype` (F16 or BF16) into `dst` (its little-endian bytes, two per value),
/// once. `dst` may sit at any address (bytes received from a network are not aligned).
pub fn narrow(src: &[f32], dtype: DType, dst: &mut [u8]) -> Result<()> {
    check_half(dtype, src.len(), dst.len())?;
    match (dtype, bytemuck::try_cast_slice_mut::<u8, u16>(dst)) {
        (DType::F16, Ok(d)) => bytemuck::cast_slice_mut::<u16, f16>(d).convert_from_f32_slice(src),
        (_, Ok(d)) => narrow_bf16(src, bytemuck::cast_slice_mut::<u16, bf16>(d)),
        (DType::F16, Err(_)) => {
            for (x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
                out.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        (_, Err(_)) => {
            for (x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
                out.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Widens `src` (little-endian bytes of `dtype`, F16 or BF16, at any address) into `dst`.
pub fn widen(src: &[u8], dtype: DType, dst: &mut [f32]) -> Result<()> {
    check_half(dtype, dst.len(), src.len())?;
    match (dtype, bytemuck::try_cast_slice::<u8, u16>(src)) {
        (DType::F16, Ok(s)) => bytemuck::cast_slice::<u16, f16>(s).convert_to_f32_slice(dst),
        (_, Ok(s)) => widen_bf16(bytemuck::cast_slice::<u16, bf16>(s), dst),
        (DType::F16, Err(_)) => {
            for (b, out) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *out = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        (_, Err(_)) => {
            for (b, out) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *out = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
    }
    Ok(())
}

/// `src` rounded to bf16 (to nearest, ties to even) into `dst`, compiled for each SIMD level
/// and the best the CPU has chosen at run time (a wheel is built for any x86-64; the plain
/// build's loop was 2.7x slower than AVX-512's).
#[multiversion::multiversion(targets = "simd")]
pub fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s);
    }
}

/// `src` widened from bf16 into `dst` (exact), compiled as [`narrow_bf16`] is.
#[multiversion::multiversion(targets = "simd")]
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
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

/// What `auto` chose for a group, and what it measured: the probe allreduce's time uncompressed
/// and in bf16 (the slowest rank's, agreed by every rank), or nothing where the ranks share one
/// machine and no link is worth measuring.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AutoChoice {
    /// The setting chosen: `None` or `Bf16`.
    pub chosen: Compression,
    /// Seconds of the probe allreduce uncompressed (absent on one machine).
    pub none_secs: Option<f64>,
    /// Seconds of the probe allreduce in bf16 (absent on one machine).
    pub bf16_secs: Option<f64>,
    /// The probe's size in bytes (0 on one machine).
    pub probe_bytes: usize,
}

/// bf16 must make the probe at least this much faster (the saving must exceed the measurement's
/// noise: where it does not, full precision is kept).
pub const AUTO_MARGIN: f64 = 0.9;

impl AutoChoice {
    /// The choice for ranks on one machine: no link to save time on, nothing measured.
    pub fn one_machine() -> AutoChoice {
        AutoChoice {
            chosen: Compression::None,
            none_secs: None,
            bf16_secs: None,
            probe_bytes: 0,
        }
    }

    /// The choice from the probe's times: bf16 where its allreduce took at most [`AUTO_MARGIN`]
    /// of the uncompressed one's (the transfer time saved exceeds the casts added), else none.
    ///
    /// ```
    /// use tandem_core::compression::{AutoChoice, Compression};
    /// assert_eq!(AutoChoice::measured(4 << 20, 0.080, 0.045).chosen, Compression::Bf16);
    /// assert_eq!(AutoChoice::measured(4 << 20, 0.004, 0.005).chosen, Compression::None);
    /// ```
    pub fn measured(probe_bytes: usize, none_secs: f64, bf16_secs: f64) -> AutoChoice {
        let faster =
            none_secs.is_finite() && bf16_secs.is_finite() && bf16_secs <= AUTO_MARGIN * none_secs;
        AutoChoice {
            chosen: if faster {
                Compression::Bf16
            } else {
                Compression::None
            },
            none_secs: Some(none_secs),
            bf16_secs: Some(bf16_secs),
            probe_bytes,
        }
    }

    /// Why, in words (for the log and for users asking the group).
    pub fn reason(&self) -> String {
        match (self.none_secs, self.bf16_secs) {
            (Some(none), Some(bf16)) => format!(
                "a {} MiB probe allreduce took {:.2} ms uncompressed and {:.2} ms in bf16 (the slowest rank's): {}",
                self.probe_bytes >> 20,
                none * 1e3,
                bf16 * 1e3,
                if self.chosen == Compression::Bf16 {
                    "the transfer time saved exceeds the casts added"
                } else {
                    "the casts cost about what the transfer saves, so full precision is kept"
                }
            ),
            _ => "every rank is on one machine: no network link to save time on".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back_and_bad_ones_are_named() {
        for s in [
            "none",
            "fp16",
            "bf16",
            "topk:0.01",
            "topk:1",
            "powersgd:1",
            "powersgd:4",
            "auto",
        ] {
            let c: Compression = s.parse().expect(s);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!(" BF16 ".parse::<Compression>().unwrap(), Compression::Bf16);
        assert_eq!("".parse::<Compression>().unwrap(), Compression::None);
        for bad in [
            "topk:0",
            "topk:1.5",
            "topk:-0.1",
            "topk:x",
            "topk",
            "powersgd:0",
            "powersgd:1025",
            "powersgd",
            "fp8",
            "bf16:2",
        ] {
            let e = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(e.contains("compression"), "{bad}: {e}");
        }
    }

    #[test]
    fn half_casts_round_once_and_come_back() {
        let v = [1.0f32, -2.5, 3.0e-3, 65504.0, 1.0e30];
        for dtype in [DType::F16, DType::BF16] {
            let mut wire = vec![0u8; v.len() * 2];
            narrow(&v, dtype, &mut wire).unwrap();
            let mut back = [0f32; 5];
            widen(&wire, dtype, &mut back).unwrap();
            assert_eq!(back[0], 1.0);
            assert_eq!(back[1], -2.5);
            let tol = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
            assert!(
                (back[2] - 3.0e-3).abs() / 3.0e-3 < tol,
                "{dtype}: {}",
                back[2]
            );
        }
        let mut wire = vec![0u8; 2];
        assert!(narrow(&[1.0], DType::F32, &mut wire).is_err());
        assert!(widen(&wire, DType::I32, &mut [0.0]).is_err());
    }

    #[test]
    fn top_k_takes_the_largest_magnitudes_and_breaks_ties_by_index() {
        let v = [0.1f32, -5.0, 3.0, -3.0, 0.0, 4.0];
        assert_eq!(top_k(&v, 3), vec![1, 2, 5]);
        assert_eq!(top_k(&v, 2), vec![1, 5]);
        // 3.0 and -3.0 tie: the lower index wins.
        assert_eq!(top_k(&v, 4), vec![1, 2, 3, 5]);
        assert_eq!(top_k(&v, 10).len(), 6);
        assert!(top_k(&v, 0).is_empty());
        // Distinct magnitudes: the threshold is the k-th largest, whatever n / k would pick.
        let ramp = [1.0f32, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, -8.0];
        assert_eq!(top_k(&ramp, 2), vec![6, 7]);
        // One value above a three-way tie, two of the tie kept (the lowest indices).
        assert_eq!(top_k(&[5.0, 2.0, -2.0, 2.0, 1.0], 3), vec![0, 1, 2]);
    }

    #[test]
    fn only_none_leaves_values_as_they_are_and_wire_sizes_follow_the_setting() {
        assert!(!Compression::None.is_lossy());
        for lossy in [
            Compression::Bf16,
            Compression::Fp16,
            Compression::Auto,
            Compression::TopK { fraction: 0.5 },
            Compression::PowerSgd { rank: 2 },
        ] {
            assert!(lossy.is_lossy(), "{lossy}");
        }
        // PowerSGD sends (rows + columns) × rank values of a rows × columns matrix.
        assert_eq!(
            Compression::PowerSgd { rank: 2 }.wire_fraction(100, 10),
            0.4
        );
        assert_eq!(Compression::None.wire_fraction(100, 10), 1.0);
    }

    #[test]
    fn auto_chooses_bf16_only_where_the_probe_is_clearly_faster_with_it() {
        let mb = 4 << 20;
        // A slow link: bf16 near half the time.
        let slow = AutoChoice::measured(mb, 0.100, 0.055);
        assert_eq!(slow.chosen, Compression::Bf16);
        assert!(slow.reason().contains("saved exceeds"), "{}", slow.reason());
        // At the margin exactly, and just above it.
        assert_eq!(
            AutoChoice::measured(mb, 0.1, 0.09).chosen,
            Compression::Bf16
        );
        assert_eq!(
            AutoChoice::measured(mb, 0.1, 0.0901).chosen,
            Compression::None
        );
        // Fast links: the casts cost what the transfer saves.
        let fast = AutoChoice::measured(mb, 0.004, 0.0041);
        assert_eq!(fast.chosen, Compression::None);
        assert!(
            fast.reason().contains("full precision"),
            "{}",
            fast.reason()
        );
        // A failed measurement keeps full precision.
        assert_eq!(
            AutoChoice::measured(mb, f64::NAN, 0.01).chosen,
            Compression::None
        );
        let one = AutoChoice::one_machine();
        assert_eq!(one.chosen, Compression::None);
        assert!(one.reason().contains("one machine"));
        assert_eq!(Compression::Auto.wire_fraction(100, 10), 1.0);
        assert_eq!(Compression::Bf16.wire_fraction(100, 10), 0.5);
        assert_eq!(
            Compression::TopK { fraction: 0.01 }.wire_fraction(100, 10),
            0.02
        );
        assert_eq!(
            Compression::PowerSgd { rank: 1 }.wire_fraction(100, 10),
            0.2
        );
    }

    #[test]
    fn casts_work_at_any_address_and_refuse_wrong_lengths() {
        let v = [1.5f32, -2.0, 0.333];
        for dtype in [DType::F16, DType::BF16] {
            let mut aligned = vec![0u8; 6];
            narrow(&v, dtype, &mut aligned).expect("aligned");
            // One byte into u16-aligned memory: an odd address, so no u16 view is possible; the
            // bytes must still be right.
            let mut backing = [0u16; 4];
            let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut backing);
            narrow(&v, dtype, &mut buf[1..7]).expect("unaligned");
            assert_eq!(&buf[1..7], aligned.as_slice(), "{dtype}");
            let mut back = [0f32; 3];
            widen(&buf[1..7], dtype, &mut back).expect("unaligned");
            let mut want = [0f32; 3];
            widen(&aligned, dtype, &mut want).expect("aligned");
            assert_eq!(back, want);
            assert!(narrow(&v, dtype, &mut [0u8; 5]).is_err());
            assert!(narrow(&v, dtype, &mut [0u8; 7]).is_err());
            assert!(widen(&[0u8; 4], dtype, &mut [0f32; 3]).is_err());
        }
        assert_eq!(Compression::Bf16.half_dtype(), Some(DType::BF16));
        assert_eq!(Compression::Fp16.half_dtype(), Some(DType::F16));
        assert_eq!(Compression::None.half_dtype(), None);
    }
}
