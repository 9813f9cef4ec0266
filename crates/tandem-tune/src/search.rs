//! Search algorithms: random and grid (reproducible from a seed), and TPE (tree-structured Parzen
//! estimator, Bergstra et al. 2011), which models good and bad regions of each parameter from the
//! finished trials and proposes where good is most likely relative to bad.
//!
//! Every suggestion depends only on the seed, the trial's index and the finished trials, so an
//! interrupted experiment resumes with the same trials it would have run.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tandem_core::{Error, Result};

use crate::spec::{Domain, Experiment, Goal, Parameter, format_number};

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

fn rng_for(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
}

/// Maps a unit-interval number to the parameter's value.
fn from_unit(p: &Parameter, u: f64) -> Value {
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
fn to_unit(p: &Parameter, v: &Value) -> Option<f64> {
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
fn grid_values(p: &Parameter) -> Result<Vec<Value>> {
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

/// Settings of TPE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeSettings {
    /// Random trials before the model is used.
    pub n_startup_trials: usize,
    /// Candidates drawn from the good model per suggestion.
    pub n_ei_candidates: usize,
    /// Fraction of finished trials counted as good.
    pub gamma: f64,
}

fn gaussian_mixture(points: &[f64], x: f64, bandwidth: f64) -> f64 {
    // A uniform prior component keeps the density positive everywhere in [0, 1].
    let prior = 1.0;
    let sum: f64 = points
        .iter()
        .map(|&m| {
            let z = (x - m) / bandwidth;
            (-0.5 * z * z).exp() / (bandwidth * (2.0 * std::f64::consts::PI).sqrt())
        })
        .sum();
    (sum + prior) / (points.len() as f64 + 1.0)
}

fn bandwidth(points: &[f64]) -> f64 {
    let n = points.len().max(1) as f64;
    let mean = points.iter().sum::<f64>() / n;
    let var = points.iter().map(|p| (p - mean) * (p - mean)).sum::<f64>() / n;
    (1.06 * var.sqrt() * n.powf(-0.2)).clamp(0.05, 0.5)
}

/// TPE: one suggestion for trial `index` from the finished trials.
pub fn tpe(
    params: &[Parameter],
    goal: Goal,
    history: &[Observation],
    settings: TpeSettings,
    seed: u64,
    index: u64,
) -> Assignment {
    if history.len() < settings.n_startup_trials.max(2) {
        return random(params, seed, index);
    }
    let mut sorted: Vec<&Observation> = history.iter().collect();
    sorted.sort_by(|a, b| {
        let (x, y) = (a.objective, b.objective);
        match goal {
            Goal::Maximize => y.total_cmp(&x),
            Goal::Minimize => x.total_cmp(&y),
        }
    });
    let n_good =
        ((settings.gamma * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len() - 1);
    let (good, bad) = sorted.split_at(n_good);
    let mut rng = rng_for(seed, index);
    let mut out = Assignment::new();
    for p in params {
        let value = match &p.domain {
            Domain::Categorical(_) | Domain::Discrete(_) => {
                let values = grid_values(p).unwrap_or_default();
                let count = |set: &[&Observation], v: &Value| {
                    set.iter()
                        .filter(|o| o.params.get(&p.name) == Some(v))
                        .count() as f64
                };
                let k = values.len() as f64;
                let weights: Vec<f64> = values
                    .iter()
                    .map(|v| (count(good, v) + 1.0) / (good.len() as f64 + k))
                    .collect();
                // Draw candidates from the good distribution; keep the best good/bad ratio.
                let mut best: Option<(f64, usize)> = None;
                for _ in 0..settings.n_ei_candidates.max(1) {
                    let mut r = rng.random::<f64>() * weights.iter().sum::<f64>();
                    let mut i = 0;
                    while i + 1 < weights.len() && r >= weights[i] {
                        r -= weights[i];
                        i += 1;
                    }
                    let l = weights[i];
                    let g = (count(bad, &values[i]) + 1.0) / (bad.len() as f64 + k);
                    if best.is_none_or(|(s, _)| l / g > s) {
                        best = Some((l / g, i));
                    }
                }
                values[best.map(|b| b.1).unwrap_or(0)].clone()
            }
            _ => {
                let unit = |set: &[&Observation]| -> Vec<f64> {
                    set.iter()
                        .filter_map(|o| o.params.get(&p.name).and_then(|v| to_unit(p, v)))
                        .collect()
                };
                let (lg, bg) = (unit(good), unit(bad));
                let (hl, hb) = (bandwidth(&lg), bandwidth(&bg));
                let mut best: Option<(f64, f64)> = None;
                for _ in 0..settings.n_ei_candidates.max(1) {
                    // Pick a good observation (or the prior) and jitter it.
                    let pick = rng.random_range(0..=lg.len());
                    let x = if pick == lg.len() {
                        rng.random::<f64>()
                    } else {
                        let (u1, u2) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
                        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        (lg[pick] + z * hl).clamp(0.0, 1.0)
                    };
                    let score = gaussian_mixture(&lg, x, hl) / gaussian_mixture(&bg, x, hb);
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, x));
                    }
                }
                from_unit(p, best.map(|b| b.1).unwrap_or(0.5))
            }
        };
        out.insert(p.name.clone(), value);
    }
    out
}

/// Suggests trials for an experiment's algorithm.
#[derive(Debug, Clone)]
pub struct Search {
    kind: Kind,
    seed: u64,
}

#[derive(Debug, Clone)]
enum Kind {
    Random,
    Grid,
    Tpe(TpeSettings),
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
                    "n_ei_candidates",
                    "gamma",
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
            _ => {
                let s = TpeSettings {
                    n_startup_trials: a.setting(
                        field,
                        "n_startup_trials",
                        (e.parallel as usize).max(5),
                    )?,
                    n_ei_candidates: a.setting(field, "n_ei_candidates", 24)?,
                    gamma: a.setting(field, "gamma", 0.25)?,
                };
                if !(s.gamma > 0.0 && s.gamma < 1.0) {
                    return Err(Error::config(
                        format!("{field}.algorithmSettings[gamma]"),
                        "must be between 0 and 1",
                    ));
                }
                Kind::Tpe(s)
            }
        };
        Ok(Search { kind, seed })
    }

    /// The parameters of trial `index`, or `None` when the search is exhausted (grid).
    pub fn suggest(
        &self,
        e: &Experiment,
        index: u64,
        history: &[Observation],
    ) -> Result<Option<Assignment>> {
        Ok(match &self.kind {
            Kind::Random => Some(random(&e.parameters, self.seed, index)),
            Kind::Grid => grid(&e.parameters, index)?,
            Kind::Tpe(s) => Some(tpe(
                &e.parameters,
                e.objective.goal,
                history,
                *s,
                self.seed,
                index,
            )),
        })
    }
}
