//! TPE, the tree-structured Parzen estimator (Bergstra et al. 2011), as the maintained
//! implementations (hyperopt, which Katib runs, and Optuna) do it.
//!
//! The finished trials are split into a good group (the best `ceil(gamma * sqrt(n))`, hyperopt's
//! rule, so Katib's `gamma` means the same here) and the rest. For each parameter, each group is
//! modelled by a Parzen estimator on the parameter's unit interval (log-scaled where the parameter
//! is): one Gaussian kernel per observation, **truncated** to the interval (never clamped, which
//! piles samples on a boundary), plus a wide **prior** kernel at the centre with weight
//! `prior_weight`. A kernel's width is the larger gap to its neighbours, **floored** at
//! `1 / min(100, n + 1)` of the interval and capped at the interval (hyperopt's "magic clip"), so
//! a few identical good trials cannot collapse the model onto one point. Candidates are drawn from
//! the good model and the one with the largest good/bad density ratio is proposed. Categories are
//! counted with the prior spread over every category (smoothing). Trials still running count as
//! bad (a constant liar), so parallel trials spread out instead of all proposing the same point.
//!
//! Every suggestion depends only on the seed, the trial's index, the finished and running trials.

use rand::Rng;
use rand::rngs::StdRng;

use crate::search::{Assignment, Observation, Value, from_unit, grid_values, rng_for, to_unit};
use crate::spec::{Domain, Goal, Parameter};

/// Settings of TPE (the names Katib gives them in `algorithmSettings`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeSettings {
    /// Random trials before the model is used (`n_startup_trials`).
    pub n_startup_trials: usize,
    /// Candidates drawn from the good model per suggestion (`n_EI_candidates`).
    pub n_ei_candidates: usize,
    /// The good group holds the best `ceil(gamma * sqrt(n))` of `n` finished trials (`gamma`).
    pub gamma: f64,
    /// Weight of the prior kernel against one observation's (`prior_weight`).
    pub prior_weight: f64,
}

impl Default for TpeSettings {
    fn default() -> Self {
        TpeSettings {
            n_startup_trials: 10,
            n_ei_candidates: 24,
            gamma: 0.25,
            prior_weight: 1.0,
        }
    }
}

/// One Gaussian kernel truncated to `[0, 1]`.
#[derive(Debug, Clone, Copy)]
struct Kernel {
    /// Centre.
    mu: f64,
    /// Width.
    sigma: f64,
    /// Weight in the mixture.
    weight: f64,
    /// Its mass inside `[0, 1]`, so the truncated kernel integrates to one there.
    mass: f64,
}

/// A Parzen estimator on the unit interval.
#[derive(Debug, Clone)]
struct Parzen {
    /// The mixture's kernels.
    kernels: Vec<Kernel>,
}

/// The standard normal CDF (Abramowitz and Stegun 7.1.26 for erf, error below 1.5e-7).
fn phi(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

impl Parzen {
    /// The estimator of `points` (each in `[0, 1]`) with the prior kernel.
    fn new(points: &[f64], prior_weight: f64) -> Parzen {
        let prior_mu = 0.5;
        let mut mus: Vec<(f64, bool)> =
            points.iter().map(|&p| (p.clamp(0.0, 1.0), false)).collect();
        mus.push((prior_mu, true));
        mus.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = points.len();
        let min_sigma = 1.0 / (n as f64 + 1.0).min(100.0);
        let kernels = (0..mus.len())
            .map(|i| {
                let (mu, is_prior) = mus[i];
                let left = if i == 0 { mu } else { mu - mus[i - 1].0 };
                let right = if i + 1 == mus.len() {
                    1.0 - mu
                } else {
                    mus[i + 1].0 - mu
                };
                let sigma = if is_prior {
                    1.0
                } else {
                    left.max(right).clamp(min_sigma, 1.0)
                };
                let mass = (phi((1.0 - mu) / sigma) - phi((0.0 - mu) / sigma)).max(1e-12);
                let weight = if is_prior { prior_weight } else { 1.0 };
                Kernel {
                    mu,
                    sigma,
                    weight,
                    mass,
                }
            })
            .collect();
        Parzen { kernels }
    }

    /// The weight of every kernel together.
    fn total_weight(&self) -> f64 {
        self.kernels.iter().map(|k| k.weight).sum()
    }

    /// The density at `x` in `[0, 1]`.
    fn pdf(&self, x: f64) -> f64 {
        let norm = (2.0 * std::f64::consts::PI).sqrt();
        let sum: f64 = self
            .kernels
            .iter()
            .map(|k| {
                let z = (x - k.mu) / k.sigma;
                k.weight * (-0.5 * z * z).exp() / (k.sigma * norm * k.mass)
            })
            .sum();
        sum / self.total_weight()
    }

    /// A draw: a kernel by weight, then a normal draw inside `[0, 1]` (rejection: a kernel's mean
    /// lies in the interval and its width is at most the interval, so at least a third of its
    /// draws land inside).
    fn sample(&self, rng: &mut StdRng) -> f64 {
        let weights: Vec<f64> = self.kernels.iter().map(|k| k.weight).collect();
        let k = self.kernels[weighted_index(&weights, rng.random::<f64>())];
        for _ in 0..64 {
            let (u1, u2) = (rng.random::<f64>().max(1e-300), rng.random::<f64>());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let x = k.mu + z * k.sigma;
            if (0.0..=1.0).contains(&x) {
                return x;
            }
        }
        rng.random::<f64>()
    }
}

/// The index a uniform draw `u` in `[0, 1)` picks when each index is as likely as its weight.
fn weighted_index(weights: &[f64], u: f64) -> usize {
    let mut r = u * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i;
        }
        r -= w;
    }
    weights.len().saturating_sub(1)
}

/// How many of `n` finished trials are good (hyperopt's rule, at least one, never all).
fn n_good(gamma: f64, n: usize) -> usize {
    ((gamma * (n as f64).sqrt()).ceil() as usize).clamp(1, n.saturating_sub(1).max(1))
}

/// TPE: the parameters of trial `index` from the finished trials (`history`) and the ones still
/// running (`pending`, counted as bad).
pub fn suggest(
    params: &[Parameter],
    goal: Goal,
    history: &[Observation],
    pending: &[Assignment],
    settings: TpeSettings,
    seed: u64,
    index: u64,
) -> Assignment {
    if history.len() < settings.n_startup_trials.max(2) {
        return crate::search::random(params, seed, index);
    }
    let mut sorted: Vec<&Assignment> = Vec::with_capacity(history.len());
    let mut ranked: Vec<&Observation> = history.iter().collect();
    ranked.sort_by(|a, b| {
        let (x, y) = (a.objective, b.objective);
        match goal {
            Goal::Maximize => y.total_cmp(&x),
            Goal::Minimize => x.total_cmp(&y),
        }
    });
    sorted.extend(ranked.iter().map(|o| &o.params));
    let (good, bad_done) = sorted.split_at(n_good(settings.gamma, sorted.len()));
    let bad: Vec<&Assignment> = bad_done.iter().copied().chain(pending.iter()).collect();
    let mut rng = rng_for(seed, index);
    let split = Split { good, bad: &bad };
    params
        .iter()
        .map(|p| {
            let v = match &p.domain {
                Domain::Categorical(_) | Domain::Discrete(_) => {
                    categorical(p, split, settings, &mut rng)
                }
                _ => numeric(p, split, settings, &mut rng),
            };
            (p.name.clone(), v)
        })
        .collect()
}

/// The trials TPE learns from, split at the `gamma` quantile: the best ones, and the rest with the
/// trials still running (counted as bad, so parallel suggestions spread out).
#[derive(Debug, Clone, Copy)]
struct Split<'a> {
    /// The best trials.
    good: &'a [&'a Assignment],
    /// The others, and the pending ones.
    bad: &'a [&'a Assignment],
}

/// TPE for a numeric parameter: candidates drawn from the good trials' Parzen estimator, the one
/// with the best ratio of good to bad density kept.
fn numeric(p: &Parameter, split: Split<'_>, s: TpeSettings, rng: &mut StdRng) -> Value {
    let Split { good, bad } = split;
    let unit = |set: &[&Assignment]| -> Vec<f64> {
        set.iter()
            .filter_map(|a| a.get(&p.name).and_then(|v| to_unit(p, v)))
            .collect()
    };
    let (l, g) = (
        Parzen::new(&unit(good), s.prior_weight),
        Parzen::new(&unit(bad), s.prior_weight),
    );
    let mut best: Option<(f64, f64)> = None;
    for _ in 0..s.n_ei_candidates.max(1) {
        let x = l.sample(rng);
        let score = l.pdf(x).ln() - g.pdf(x).max(1e-300).ln();
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, x));
        }
    }
    from_unit(p, best.map_or(0.5, |b| b.1))
}

/// TPE for a categorical or discrete parameter: candidates drawn by their probability among the
/// good trials (counts plus a prior), the one with the best ratio to the bad trials' kept.
fn categorical(p: &Parameter, split: Split<'_>, s: TpeSettings, rng: &mut StdRng) -> Value {
    let Split { good, bad } = split;
    let values = grid_values(p).unwrap_or_default();
    if values.is_empty() {
        return from_unit(p, 0.5);
    }
    let (l, g) = (
        category_probs(p, &values, good, s.prior_weight),
        category_probs(p, &values, bad, s.prior_weight),
    );
    let mut best: Option<(f64, usize)> = None;
    for _ in 0..s.n_ei_candidates.max(1) {
        let i = weighted_index(&l, rng.random::<f64>());
        let score = l[i].ln() - g[i].max(1e-300).ln();
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, i));
        }
    }
    values[best.map_or(0, |b| b.1)].clone()
}

/// Each category's probability among `set`: its count plus an equal share of the prior's weight,
/// normalised (so a category never seen keeps some probability).
fn category_probs(
    p: &Parameter,
    values: &[Value],
    set: &[&Assignment],
    prior_weight: f64,
) -> Vec<f64> {
    let k = values.len() as f64;
    let total = set.len() as f64 + prior_weight;
    values
        .iter()
        .map(|v| {
            let c = set.iter().filter(|a| a.get(&p.name) == Some(v)).count() as f64;
            (c + prior_weight / k) / total
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_normal_cdf_is_accurate() {
        for (z, want) in [
            (0.0, 0.5),
            (1.0, 0.841_344_746),
            (-1.96, 0.024_997_895),
            (3.0, 0.998_650_102),
        ] {
            assert!((phi(z) - want).abs() < 1e-6, "{z}: {}", phi(z));
        }
    }

    #[test]
    fn truncated_kernels_integrate_to_one_inside_the_interval() {
        for points in [
            vec![],
            vec![0.0],
            vec![1.0, 1.0, 1.0],
            vec![0.1, 0.5, 0.52, 0.9],
        ] {
            let est = Parzen::new(&points, 1.0);
            let n = 20_000;
            let integral: f64 = (0..n)
                .map(|i| est.pdf((i as f64 + 0.5) / n as f64) / n as f64)
                .sum();
            assert!((integral - 1.0).abs() < 1e-3, "{points:?}: {integral}");
        }
    }

    #[test]
    fn kernel_widths_have_a_floor_so_repeated_points_do_not_collapse() {
        // Ten identical observations on a boundary: widths stay at least 1/11 of the interval,
        // and draws are spread inside the interval, not piled on the boundary.
        let est = Parzen::new(&[1.0; 10], 1.0);
        assert!(est.kernels.iter().all(|k| k.sigma >= 1.0 / 11.0 - 1e-12));
        let mut rng = StdRng::seed_from_u64(3);
        let draws: Vec<f64> = (0..1000).map(|_| est.sample(&mut rng)).collect();
        assert!(draws.iter().all(|x| (0.0..=1.0).contains(x)));
        let at_edge = draws.iter().filter(|x| **x == 1.0).count();
        assert_eq!(at_edge, 0, "truncated, never clamped");
        let distinct: std::collections::BTreeSet<u64> = draws.iter().map(|x| x.to_bits()).collect();
        assert!(distinct.len() > 990);
    }

    #[test]
    fn the_good_group_follows_hyperopt() {
        assert_eq!(n_good(0.25, 2), 1);
        assert_eq!(n_good(0.25, 16), 1);
        assert_eq!(n_good(0.25, 17), 2);
        assert_eq!(n_good(0.25, 64), 2);
        assert_eq!(n_good(0.25, 65), 3);
        assert_eq!(n_good(0.9, 4), 2);
        assert_eq!(n_good(5.0, 4), 3, "never all of them");
    }

    #[test]
    fn the_density_peaks_where_the_points_are() {
        let est = Parzen::new(&[0.1; 20], 1.0);
        assert!(
            est.pdf(0.1) > 3.0 * est.pdf(0.9),
            "{} {}",
            est.pdf(0.1),
            est.pdf(0.9)
        );
        assert!(est.pdf(0.1) > 1.0);
    }

    #[test]
    fn draws_follow_the_density() {
        // Two clusters and the prior: the histogram of many draws matches the density's mass per bin.
        let mut points = vec![0.15; 12];
        points.extend([0.8; 6]);
        let est = Parzen::new(&points, 1.0);
        let mut rng = StdRng::seed_from_u64(11);
        let n = 40_000;
        let mut hist = [0usize; 10];
        for _ in 0..n {
            let x = est.sample(&mut rng);
            hist[((x * 10.0) as usize).min(9)] += 1;
        }
        for (b, count) in hist.iter().enumerate() {
            let steps = 200;
            let mass: f64 = (0..steps)
                .map(|j| {
                    est.pdf((b as f64 + (j as f64 + 0.5) / steps as f64) / 10.0)
                        / 10.0
                        / steps as f64
                })
                .sum();
            let got = *count as f64 / n as f64;
            assert!(
                (got - mass).abs() < 0.015,
                "bin {b}: drawn {got:.4}, density {mass:.4}"
            );
        }
    }

    fn categorical_param() -> Parameter {
        Parameter {
            name: "opt".into(),
            domain: Domain::Categorical(vec!["a".into(), "b".into(), "c".into()]),
        }
    }

    fn pick(v: &str) -> Assignment {
        Assignment::from([("opt".to_string(), Value::Text(v.into()))])
    }

    #[test]
    fn category_probabilities_count_and_smooth() {
        let p = categorical_param();
        let values = crate::search::grid_values(&p).expect("values");
        let set = [pick("a"), pick("a"), pick("b")];
        let refs: Vec<&Assignment> = set.iter().collect();
        let probs = category_probs(&p, &values, &refs, 1.0);
        let third = 1.0 / 3.0;
        let want = [(2.0 + third) / 4.0, (1.0 + third) / 4.0, third / 4.0];
        for (got, want) in probs.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{probs:?}");
        }
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn categories_that_did_well_are_proposed_and_start_up_is_random() {
        let p = vec![categorical_param()];
        // "a" always scores best (minimised), "b" and "c" badly.
        let history: Vec<Observation> = (0..30)
            .map(|i| {
                let v = ["a", "b", "c"][i % 3];
                Observation {
                    params: pick(v),
                    objective: if v == "a" { 0.0 } else { 10.0 + i as f64 },
                }
            })
            .collect();
        let settings = TpeSettings {
            n_startup_trials: 5,
            ..Default::default()
        };
        let chose_a = (100..140)
            .filter(|i| {
                suggest(&p, Goal::Minimize, &history, &[], settings, 3, *i)["opt"]
                    == Value::Text("a".into())
            })
            .count();
        assert!(chose_a >= 30, "the good category {chose_a} times of 40");
        // Below n_startup_trials finished trials, the suggestion is random search's.
        for i in 0..20 {
            assert_eq!(
                suggest(&p, Goal::Minimize, &history[..4], &[], settings, 3, i),
                crate::search::random(&p, 3, i)
            );
        }
        assert!(
            (0..20).any(
                |i| suggest(&p, Goal::Minimize, &history[..5], &[], settings, 3, i)
                    != crate::search::random(&p, 3, i)
            ),
            "from n_startup_trials on, the model is used"
        );
    }

    #[test]
    fn a_draw_picks_an_index_as_often_as_its_weight() {
        let w = [1.0, 2.0, 1.0];
        for (u, want) in [
            (0.0, 0),
            (0.24, 0),
            (0.25, 1),
            (0.74, 1),
            (0.75, 2),
            (0.999, 2),
        ] {
            assert_eq!(weighted_index(&w, u), want, "u {u}");
        }
        assert_eq!(
            weighted_index(&[0.0, 5.0], 0.0),
            1,
            "a zero weight is never picked"
        );
        assert_eq!(weighted_index(&[], 0.5), 0);
    }
}
