//! Element types of tensors and the reduction operators applied to them.
//!
//! Why a closed set: every byte that crosses the wire is interpreted by its receiver, so sender and
//! receiver must agree on the type exactly; [`DType`] has a wire code each side checks in the
//! operation header. [`Element`] ties a Rust type to its `DType` so typed slices can be moved as
//! bytes without copying. Half types (f16, bf16) are reduced in f32 and rounded once, which the
//! kernels in `tandem-collective` do.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The element type of a tensor.
///
/// ```
/// use tandem_core::DType;
/// assert_eq!("bf16".parse::<DType>().unwrap(), DType::BF16);
/// assert_eq!(DType::F16.size(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned byte.
    U8,
}

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// The short name used in errors, flags and tables (`f32`, `bf16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    /// A stable numeric code used on the wire.
    pub const fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::I32 => 4,
            DType::I64 => 5,
            DType::U8 => 6,
        }
    }

    /// The dtype with the given wire code, if any.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Whether the dtype is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_ascii_lowercase();
        let found = match lower.as_str() {
            "float32" => Some(DType::F32),
            "float64" => Some(DType::F64),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            "int32" => Some(DType::I32),
            "int64" => Some(DType::I64),
            "uint8" => Some(DType::U8),
            other => DType::ALL.into_iter().find(|d| d.name() == other),
        };
        found.ok_or_else(|| {
            Error::invalid(
                "dtype",
                format!("unknown dtype {s:?}; expected one of f32, f64, f16, bf16, i32, i64, u8"),
            )
        })
    }
}

/// A Rust type that can be an element of a Tensor.
///
/// Implemented for `f32`, `f64`, [`half::f16`], [`half::bf16`], `i32`, `i64` and `u8`.
pub trait Element: bytemuck::Pod + Send + Sync + PartialEq + fmt::Debug + 'static {
    /// The dtype that describes this type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {
        $(impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}
element!(f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16, i32 => I32, i64 => I64, u8 => U8);

/// How values from several ranks are combined.
///
/// `Avg` divides the sum by the number of contributors (integer types round toward zero).
///
/// ```
/// use tandem_core::ReduceOp;
/// assert_eq!("avg".parse::<ReduceOp>().unwrap(), ReduceOp::Avg);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean over contributors.
    Avg,
    /// Element-wise minimum.
    Min,
    /// Element-wise maximum.
    Max,
    /// Element-wise product.
    Prod,
}

impl ReduceOp {
    /// Every operator, in a stable order.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Prod,
    ];

    /// The lower-case name (`sum`, `avg`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Prod => "prod",
        }
    }

    /// The operator that combines partial results: an average sums them and divides once at the
    /// end, every other operator combines as itself.
    ///
    /// ```
    /// use tandem_core::ReduceOp;
    /// assert_eq!(ReduceOp::Avg.combining(), ReduceOp::Sum);
    /// assert_eq!(ReduceOp::Max.combining(), ReduceOp::Max);
    /// ```
    pub const fn combining(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            other => other,
        }
    }

    /// A stable numeric code used on the wire.
    pub const fn code(self) -> u8 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Min => 2,
            ReduceOp::Max => 3,
            ReduceOp::Prod => 4,
        }
    }

    /// The operator with the given wire code, if any.
    pub fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|o| o.code() == code)
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_ascii_lowercase();
        let lower = if lower == "mean" {
            "avg".to_string()
        } else {
            lower
        };
        ReduceOp::ALL
            .into_iter()
            .find(|o| o.name() == lower)
            .ok_or_else(|| {
                Error::invalid(
                    "op",
                    format!("unknown reduce op {s:?}; expected sum, avg, min, max or prod"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        for o in ReduceOp::ALL {
            assert_eq!(ReduceOp::from_code(o.code()), Some(o));
            assert_eq!(o.name().parse::<ReduceOp>().unwrap(), o);
        }
        assert_eq!(DType::from_code(200), None);
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = "f128".parse::<DType>().unwrap_err().to_string();
        assert!(e.contains("f128"), "{e}");
        let e = "median".parse::<ReduceOp>().unwrap_err().to_string();
        assert!(e.contains("median"), "{e}");
    }
}
