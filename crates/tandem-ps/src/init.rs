//! Initializers that give the same values on every run and for every partitioning: element `i` of a
//! parameter is a function of the seed and `i` only.
//!
//! Why: a model declared by every worker must start identical on every server whatever the
//! partitioning, and a job restarted with more servers must be able to compare values. A function
//! of (seed, index) gives that with no coordination: each server fills only its own rows.

use tandem_core::{Error, Result};

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All `value`.
    Constant(f32),
    /// Uniform in `[low, high)`.
    Uniform {
        /// Lower bound.
        low: f32,
        /// Upper bound.
        high: f32,
        /// Seed.
        seed: u64,
    },
    /// Normal with `mean` and `std`.
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
        /// Seed.
        seed: u64,
    },
}

/// SplitMix64 of element `i` under `seed`: every element's draw depends on its index alone, so
/// any partition of a parameter initialises the same values wherever it lives.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed
        ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 24 bits of `bits` as a float in [0, 1).
fn unit(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 24) as f32
}

impl Init {
    /// Value of element `i`.
    pub fn value(&self, i: u64) -> f32 {
        match *self {
            Init::Zeros => 0.0,
            Init::Constant(v) => v,
            Init::Uniform { low, high, seed } => low + (high - low) * unit(mix(seed, i)),
            Init::Normal { mean, std, seed } => {
                let u = unit(mix(seed, 2 * i)).max(1e-7);
                let v = unit(mix(seed, 2 * i + 1));
                mean + std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            }
        }
    }

    /// Fills `out` with elements `start..start + out.len()`.
    pub fn fill(&self, start: usize, out: &mut [f32]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.value((start + k) as u64);
        }
    }

    /// Wire form: kind, a, b, seed.
    pub fn to_wire(&self) -> (&'static str, f64, f64, u64) {
        match *self {
            Init::Zeros => ("zeros", 0.0, 0.0, 0),
            Init::Constant(v) => ("constant", v as f64, 0.0, 0),
            Init::Uniform { low, high, seed } => ("uniform", low as f64, high as f64, seed),
            Init::Normal { mean, std, seed } => ("normal", mean as f64, std as f64, seed),
        }
    }

    /// Parses the wire form.
    pub fn from_wire(kind: &str, a: f64, b: f64, seed: u64) -> Result<Init> {
        Ok(match kind {
            "zeros" | "" => Init::Zeros,
            "constant" => Init::Constant(a as f32),
            "uniform" if a < b => Init::Uniform {
                low: a as f32,
                high: b as f32,
                seed,
            },
            "normal" if b >= 0.0 => Init::Normal {
                mean: a as f32,
                std: b as f32,
                seed,
            },
            other => {
                return Err(Error::invalid(
                    "init",
                    format!("bad initializer {other:?} ({a}, {b})"),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_whatever_the_split() {
        let init = Init::Normal {
            mean: 0.0,
            std: 1.0,
            seed: 9,
        };
        let mut whole = vec![0.0; 100];
        init.fill(0, &mut whole);
        let mut tail = vec![0.0; 40];
        init.fill(60, &mut tail);
        assert_eq!(&whole[60..], &tail[..]);
        let mean = whole.iter().sum::<f32>() / 100.0;
        assert!(mean.abs() < 0.4, "{mean}");
        let u = Init::Uniform {
            low: -1.0,
            high: 1.0,
            seed: 3,
        };
        assert!((0..1000).all(|i| (-1.0..1.0).contains(&u.value(i))));
        assert!(Init::from_wire("uniform", 1.0, 0.0, 0).is_err());
        assert_eq!(
            Init::from_wire("constant", 2.0, 0.0, 0).unwrap(),
            Init::Constant(2.0)
        );
    }
}
