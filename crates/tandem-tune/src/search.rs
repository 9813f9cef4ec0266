//! Search algorithms: random and grid (reproducible from a seed), and TPE ([`crate::tpe`]), which
//! models good and bad regions of each parameter from the finished trials and proposes where good
//! is most likely relative to bad.
//!
//! Every suggestion depends only on the seed, the trial's index and the trials finished and
//! running, so an interrupted experiment resumes with the same trials it would have run.
//!
//! Why reproducible: a resumed experiment must propose what the interrupted one would have, and a
//! bug report must be replayable: each trial's random draws come from a generator seeded by the
//! experiment's seed and the trial's index alone (TPE also reads the finished trials, which the
//! record keeps).

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_core::{Error, Result};

use crate::spec::{Domain, Experiment, Parameter, format_number};

/// One parameter's value in a trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A real number.
    Float(f64),
    /// A category.
    Text(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => f.write_str(&format_number(*x)),
            Value::Text(s) => f.write_str(s),
        }
    }
}

impl Value {
    /// The value as a number (categories have none).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(x) => Some(*x),
            Value::Text(_) => None,
        }
    }
}

/// A trial's parameters, by name.
pub type Assignment = BTreeMap<String, Value>;

/// A finished trial as the algorithms see it.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Its parameters.
    pub params: Assignment,
    /// Its objective.
    pub objective: f64,
}

/// The random generator of trial `index` of a search seeded with `seed`: each trial's draw
/// depends on its index alone, so a resumed experiment draws what it would have.
pub(crate) fn rng_for(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
}

/// Maps a unit-interval number to the parameter's value.
pub(crate) fn from_unit(p: &Parameter, u: f64) -> Value {
    let u = u.clamp(0.0, 1.0);
    match &p.domain {
        Domain::Double {
            min,
            max,
            log,
            step,
        } => {
            let x = if *log {
                (min.ln() + u * (max.ln() - min.ln())).exp()
            } else {
                min + u * (max - min)
            };
            let x = match step {
                Some(s) => (min + ((x - min) / s).round() * s).min(*max),
                None => x,
            };
            Value::Float(x.clamp(*min, *max))
        }
        Domain::Int {
            min,
            max,
            log,
            step,
        } => {
            let (lo, hi) = (*min as f64, *max as f64);
            let x = if *log && lo > 0.0 {
                (lo.ln() + u * ((hi + 1.0).ln() - lo.ln())).exp()
            } else {
                lo + u * (hi + 1.0 - lo)
            };
            let k = ((x - lo) / *step as f64).floor() as i64;
            Value::Int((min + k * step).clamp(*min, *max))
        }
        Domain::Categorical(list) => {
            let i = ((u * list.len() as f64) as usize).min(list.len() - 1);
            Value::Text(list[i].clone())
        }
        Domain::Discrete(list) => {
            let i = ((u * list.len() as f64) as usize).min(list.len() - 1);
            Value::Float(list[i])
        }
    }
}

/// Maps a numeric value to the unit interval of its parameter (log-scaled when the parameter is).
pub(crate) fn to_unit(p: &Parameter, v: &Value) -> Option<f64> {
    let x = v.as_f64()?;
    Some(match &p.domain {
        Domain::Double {
            min,
            max,
            log: true,
            ..
        } => (x.ln() - min.ln()) / (max.ln() - min.ln()),
        Domain::Double { min, max, .. } => (x - min) / (max - min),
        Domain::Int { min, max, log, .. } => {
            let (lo, hi) = (*min as f64, *max as f64 + 1.0);
            if *log && lo > 0.0 {
                ((x + 0.5).ln() - lo.ln()) / (hi.ln() - lo.ln())
            } else {
                (x + 0.5 - lo) / (hi - lo)
            }
        }
        Domain::Discrete(_) | Domain::Categorical(_) => return None,
    })
}

/// Random search: each parameter drawn independently (log-uniform on a log scale).
pub fn random(params: &[Parameter], seed: u64, index: u64) -> Assignment {
    let mut rng = rng_for(seed, index);
    params
        .iter()
        .map(|p| (p.name.clone(), from_unit(p, rng.random::<f64>())))
        .collect()
}

/// The values a grid walks for one parameter.
pub(crate) fn grid_values(p: &Parameter) -> Result<Vec<Value>> {
    let field = format!("parameter {:?}", p.name);
    Ok(match &p.domain {
        Domain::Double { min, max, step, .. } => {
            let s = step.ok_or_else(|| {
                Error::config(
                    format!("{field}.feasibleSpace.step"),
                    "the grid algorithm needs a step for double parameters",
                )
            })?;
            let n = ((max - min) / s + 1e-9).floor() as u64 + 1;
            if n > 100_000 {
                return Err(Error::config(
                    format!("{field}.feasibleSpace.step"),
                    format!("{n} grid points are too many"),
                ));
            }
            (0..n).map(|k| Value::Float(min + k as f64 * s)).collect()
        }
        Domain::Int { min, max, step, .. } => {
            let n = ((max - min) / step) as u64 + 1;
            if n > 100_000 {
                return Err(Error::config(
                    format!("{field}.feasibleSpace"),
                    format!("{n} grid points are too many"),
                ));
            }
            (0..n as i64).map(|k| Value::Int(min + k * step)).collect()
        }
        Domain::Categorical(l) => l.iter().cloned().map(Value::Text).collect(),
        Domain::Discrete(l) => l.iter().copied().map(Value::Float).collect(),
    })
}

/// Number of points of the full grid (saturating).
pub fn grid_size(params: &[Parameter]) -> Result<u64> {
    let mut n = 1u64;
    for p in params {
        n = n.saturating_mul(grid_values(p)?.len() as u64);
    }
    Ok(n)
}

/// The `index`-th point of the grid (the last parameter varies fastest); `None` past its end.
pub fn grid(params: &[Parameter], index: u64) -> Result<Option<Assignment>> {
    let values: Vec<Vec<Value>> = params.iter().map(grid_values).collect::<Result<_>>()?;
    if index >= grid_size(params)? {
        return Ok(None);
    }
    let mut rest = index;
    let mut out = Assignment::new();
    for (p, vals) in params.iter().zip(&values).rev() {
        let n = vals.len() as u64;
        out.insert(p.name.clone(), vals[(rest % n) as usize].clone());
        rest /= n;
    }
    Ok(Some(out))
}

/// Suggests trials for an experiment's algorithm.
#[derive(Debug, Clone)]
pub struct Search {
    /// Which search.
    kind: Kind,
    /// Its seed (each trial's draw depends on it and the trial's index).
    seed: u64,
}

/// Which search suggests the next trials.
#[derive(Debug, Clone)]
enum Kind {
    /// Random draws.
    Random,
    /// Every combination of the grid, in order.
    Grid,
    /// Tree-structured Parzen estimators, with their settings.
    Tpe(crate::tpe::TpeSettings),
}

impl Search {
    /// The search the experiment asks for (settings checked here).
    pub fn new(e: &Experiment) -> Result<Search> {
        let a = &e.algorithm;
        let field = "spec.algorithm";
        let seed = a.setting(field, "random_state", 0u64)?;
        for name in a.settings.keys() {
            let known: &[&str] = match a.name.as_str() {
                "tpe" => &[
                    "random_state",
                    "n_startup_trials",
                    "n_EI_candidates",
                    "n_ei_candidates",
                    "gamma",
                    "prior_weight",
                ],
                _ => &["random_state"],
            };
            if !known.contains(&name.as_str()) {
                return Err(Error::config(
                    format!("{field}.algorithmSettings"),
                    format!(
                        "{name:?} is not a setting of {} (known: {})",
                        a.name,
                        known.join(", ")
                    ),
                ));
            }
        }
        let kind = match a.name.as_str() {
            "random" => Kind::Random,
            "grid" => {
                grid_size(&e.parameters)?;
                Kind::Grid
            }
            _ => Kind::Tpe(tpe_settings(e)?),
        };
        Ok(Search { kind, seed })
    }

    /// The parameters of trial `index`, or `None` when the search is exhausted (grid). `history`
    /// holds the finished trials, `pending` the parameters of the trials still running.
    pub fn suggest(
        &self,
        e: &Experiment,
        index: u64,
        history: &[Observation],
        pending: &[Assignment],
    ) -> Result<Option<Assignment>> {
        Ok(match &self.kind {
            Kind::Random => Some(random(&e.parameters, self.seed, index)),
            Kind::Grid => grid(&e.parameters, index)?,
            Kind::Tpe(s) => Some(crate::tpe::suggest(
                &e.parameters,
                e.objective.goal,
                history,
                pending,
                *s,
                self.seed,
                index,
            )),
        })
    }
}

/// TPE's settings from the experiment, checked (Katib's names; `n_ei_candidates` also accepted).
fn tpe_settings(e: &Experiment) -> Result<crate::tpe::TpeSettings> {
    let a = &e.algorithm;
    let field = "spec.algorithm";
    let d = crate::tpe::TpeSettings::default();
    let candidates = a.setting(field, "n_ei_candidates", d.n_ei_candidates)?;
    let s = crate::tpe::TpeSettings {
        n_startup_trials: a.setting(
            field,
            "n_startup_trials",
            d.n_startup_trials.max(e.parallel as usize),
        )?,
        n_ei_candidates: a.setting(field, "n_EI_candidates", candidates)?,
        gamma: a.setting(field, "gamma", d.gamma)?,
        prior_weight: a.setting(field, "prior_weight", d.prior_weight)?,
    };
    if !(s.gamma > 0.0 && s.gamma.is_finite()) {
        return Err(Error::config(
            format!("{field}.algorithmSettings[gamma]"),
            "must be a positive number (the good group is the best ceil(gamma * sqrt(n)) trials)",
        ));
    }
    if !(s.prior_weight > 0.0 && s.prior_weight.is_finite()) {
        return Err(Error::config(
            format!("{field}.algorithmSettings[prior_weight]"),
            "must be a positive number",
        ));
    }
    if s.n_ei_candidates == 0 {
        return Err(Error::config(
            format!("{field}.algorithmSettings[n_EI_candidates]"),
            "must be at least 1",
        ));
    }
    Ok(s)
}
