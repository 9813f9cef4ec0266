//! A parameter's feasible space (`min`/`max`/`step`, a `list`, a log or linear scale) checked
//! into a [`Domain`]: every problem names the field (`spec.parameters[1].feasibleSpace.min`).
//!
//! Why checked here: a search draws from the domain thousands of times; an empty range, a step
//! larger than the range or a log scale over non-positive numbers would fail late or draw nonsense,
//! so each is refused up front with the field named.

use tandem_core::{Error, Result};

use super::format_number;
use super::raw::{RawSpace, Scalar};
use crate::spec::Domain;

/// Whether a parameter's space is logarithmic: `distribution: logUniform` or `scale: log` (both
/// given must agree).
fn log_scale(field: &str, sp: &RawSpace) -> Result<bool> {
    let from_distribution = match sp.distribution.as_deref() {
        None => None,
        Some("uniform") => Some(false),
        Some("logUniform") => Some(true),
        Some(other) => {
            return Err(Error::config(
                format!("{field}.feasibleSpace.distribution"),
                format!("{other:?} is not uniform or logUniform"),
            ));
        }
    };
    let from_scale = match sp.scale.as_deref() {
        None => None,
        Some("linear") => Some(false),
        Some("log") => Some(true),
        Some(other) => {
            return Err(Error::config(
                format!("{field}.feasibleSpace.scale"),
                format!("{other:?} is not linear or log"),
            ));
        }
    };
    match (from_distribution, from_scale) {
        (Some(a), Some(b)) if a != b => Err(Error::config(
            format!("{field}.feasibleSpace"),
            "distribution and scale disagree",
        )),
        (a, b) => Ok(a.or(b).unwrap_or(false)),
    }
}

/// The domain of a parameter of `kind` (`double`, `int`, `categorical`, `discrete`), checked.
pub(super) fn domain(field: &str, kind: &str, sp: RawSpace) -> Result<Domain> {
    let fs = format!("{field}.feasibleSpace");
    let log = log_scale(field, &sp)?;
    let no_list = |sp: &RawSpace| -> Result<()> {
        if sp.list.is_some() {
            return Err(Error::config(
                format!("{fs}.list"),
                format!("a {kind} parameter takes min and max, not a list"),
            ));
        }
        Ok(())
    };
    match kind {
        "double" => {
            no_list(&sp)?;
            let (min, max) = bounds(&fs, &sp, log)?;
            Ok(Domain::Double {
                min,
                max,
                log,
                step: double_step(&fs, &sp)?,
            })
        }
        "int" => {
            no_list(&sp)?;
            let (min, max) = bounds(&fs, &sp, log)?;
            if min.fract() != 0.0 || max.fract() != 0.0 {
                return Err(Error::config(
                    fs,
                    "an int parameter needs whole-number bounds",
                ));
            }
            Ok(Domain::Int {
                min: min as i64,
                max: max as i64,
                log,
                step: int_step(&fs, &sp)?,
            })
        }
        "categorical" | "discrete" => listed(&fs, kind, sp),
        other => Err(Error::config(
            format!("{field}.parameterType"),
            format!("{other:?} is not double, int, categorical or discrete"),
        )),
    }
}

/// A numeric parameter's `[min, max]`: both present, finite, a non-empty range, positive on a log
/// scale.
fn bounds(fs: &str, sp: &RawSpace, log: bool) -> Result<(f64, f64)> {
    let bound = |v: &Option<Scalar>, name: &str| -> Result<f64> {
        v.as_ref()
            .ok_or_else(|| Error::config(format!("{fs}.{name}"), "is missing"))?
            .number(&format!("{fs}.{name}"))
    };
    let (min, max) = (bound(&sp.min, "min")?, bound(&sp.max, "max")?);
    if !min.is_finite() || !max.is_finite() {
        return Err(Error::config(fs, "min and max must be finite"));
    }
    let (lo, hi) = (format_number(min), format_number(max));
    if min > max {
        return Err(Error::config(
            format!("{fs}.min"),
            format!("min {lo} is larger than max {hi}"),
        ));
    }
    if min == max {
        return Err(Error::config(
            fs,
            format!("the range [{lo}, {hi}] is empty"),
        ));
    }
    if log && min <= 0.0 {
        return Err(Error::config(
            format!("{fs}.min"),
            format!("a log scale needs positive bounds, min is {lo}"),
        ));
    }
    Ok((min, max))
}

/// A double parameter's grid step, if any: positive and finite.
fn double_step(fs: &str, sp: &RawSpace) -> Result<Option<f64>> {
    let Some(s) = &sp.step else {
        return Ok(None);
    };
    let st = s.number(&format!("{fs}.step"))?;
    if !(st > 0.0 && st.is_finite()) {
        return Err(Error::config(
            format!("{fs}.step"),
            format!("{st} is not positive"),
        ));
    }
    Ok(Some(st))
}

/// An int parameter's step (default 1): a positive whole number.
fn int_step(fs: &str, sp: &RawSpace) -> Result<i64> {
    let Some(s) = &sp.step else {
        return Ok(1);
    };
    let st = s.number(&format!("{fs}.step"))?;
    if st < 1.0 || st.fract() != 0.0 {
        return Err(Error::config(
            format!("{fs}.step"),
            format!("{st} is not a positive whole number"),
        ));
    }
    Ok(st as i64)
}

/// A categorical or discrete parameter: a non-empty list and no bounds.
fn listed(fs: &str, kind: &str, sp: RawSpace) -> Result<Domain> {
    if sp.min.is_some() || sp.max.is_some() {
        return Err(Error::config(
            fs,
            format!("a {kind} parameter takes a list, not min and max"),
        ));
    }
    let list = sp
        .list
        .filter(|l| !l.is_empty())
        .ok_or_else(|| Error::config(format!("{fs}.list"), "is missing or empty"))?;
    if kind == "categorical" {
        return Ok(Domain::Categorical(list.iter().map(Scalar::text).collect()));
    }
    let values = list
        .iter()
        .enumerate()
        .map(|(i, v)| v.number(&format!("{fs}.list[{i}]")))
        .collect::<Result<Vec<f64>>>()?;
    Ok(Domain::Discrete(values))
}
