//! TPE against random search on standard functions with known optima, at equal budgets, with
//! three trials in flight at a time (as `parallelTrialCount: 3` runs them: each suggestion sees
//! the finished trials and the two still running).
//!
//! `cargo bench -p tandem-tune --bench tpe` prints, per function, the median over the seeds of the
//! best objective found (its gap to the known optimum), for TPE and random, and in how many seeds
//! TPE's best beat random's. Under `cargo test --benches` it runs one seed of each, as a smoke test.

use tandem_tune::search::{Assignment, Observation, Value, random};
use tandem_tune::spec::{Domain, Goal, Parameter};
use tandem_tune::tpe::{TpeSettings, suggest};

fn double(name: &str, min: f64, max: f64, log: bool) -> Parameter {
    Parameter {
        name: name.into(),
        domain: Domain::Double {
            min,
            max,
            log,
            step: None,
        },
    }
}

fn num(a: &Assignment, k: &str) -> f64 {
    a[k].as_f64().unwrap_or(f64::NAN)
}

/// Branin on [-5, 10] x [0, 15]; minimum 0.397887.
fn branin(a: &Assignment) -> f64 {
    let (x1, x2) = (num(a, "x1"), num(a, "x2"));
    let pi = std::f64::consts::PI;
    let b = 5.1 / (4.0 * pi * pi);
    let c = 5.0 / pi;
    let t = 1.0 / (8.0 * pi);
    (x2 - b * x1 * x1 + c * x1 - 6.0).powi(2) + 10.0 * (1.0 - t) * x1.cos() + 10.0
}

/// Hartmann-6 on [0, 1]^6; minimum -3.32237.
fn hartmann6(a: &Assignment) -> f64 {
    const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
    const A: [[f64; 6]; 4] = [
        [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
        [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
        [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
        [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
    ];
    const P: [[f64; 6]; 4] = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ];
    let x: Vec<f64> = (0..6).map(|i| num(a, &format!("x{i}"))).collect();
    -(0..4)
        .map(|i| {
            let inner: f64 = (0..6).map(|j| A[i][j] * (x[j] - P[i][j]).powi(2)).sum();
            ALPHA[i] * (-inner).exp()
        })
        .sum::<f64>()
}

/// A mixed space like a training job's: a log-scaled learning rate, a linear dropout, an integer
/// width and a categorical optimizer; minimum 0 at lr 10^-2.5, dropout 0.3, width 96, "adam".
fn mixed(a: &Assignment) -> f64 {
    let lr = num(a, "lr").log10() + 2.5;
    let dropout = num(a, "dropout") - 0.3;
    let width = (num(a, "width") - 96.0) / 64.0;
    let opt = match &a["optimizer"] {
        Value::Text(t) if t == "adam" => 0.0,
        Value::Text(t) if t == "momentum" => 0.2,
        _ => 0.5,
    };
    lr * lr + 4.0 * dropout * dropout + width * width + opt
}

struct Problem {
    name: &'static str,
    params: Vec<Parameter>,
    f: fn(&Assignment) -> f64,
    optimum: f64,
}

fn problems() -> Vec<Problem> {
    vec![
        Problem {
            name: "Branin (2 doubles)",
            params: vec![
                double("x1", -5.0, 10.0, false),
                double("x2", 0.0, 15.0, false),
            ],
            f: branin,
            optimum: 0.397_887,
        },
        Problem {
            name: "Hartmann-6 (6 doubles)",
            params: (0..6)
                .map(|i| double(&format!("x{i}"), 0.0, 1.0, false))
                .collect(),
            f: hartmann6,
            optimum: -3.322_37,
        },
        Problem {
            name: "mixed (log double, double, int, categorical)",
            params: vec![
                double("lr", 1e-5, 1.0, true),
                double("dropout", 0.0, 0.8, false),
                Parameter {
                    name: "width".into(),
                    domain: Domain::Int {
                        min: 16,
                        max: 512,
                        log: false,
                        step: 1,
                    },
                },
                Parameter {
                    name: "optimizer".into(),
                    domain: Domain::Categorical(vec![
                        "sgd".into(),
                        "momentum".into(),
                        "adam".into(),
                        "adagrad".into(),
                    ]),
                },
            ],
            f: mixed,
            optimum: 0.0,
        },
    ]
}

/// The best objective of one run of `budget` trials, `parallel` in flight at a time.
fn best_of(p: &Problem, tpe: bool, seed: u64, budget: u64, parallel: u64) -> f64 {
    let settings = TpeSettings::default();
    let mut tried: Vec<Assignment> = Vec::new();
    let mut done: Vec<Observation> = Vec::new();
    for i in 0..budget {
        // Trials i-parallel+1 .. i-1 are still running; the ones before have finished.
        let finished = (i + 1).saturating_sub(parallel) as usize;
        while done.len() < finished {
            let a = tried[done.len()].clone();
            done.push(Observation {
                objective: (p.f)(&a),
                params: a,
            });
        }
        let a = if tpe {
            suggest(
                &p.params,
                Goal::Minimize,
                &done,
                &tried[finished..],
                settings,
                seed,
                i,
            )
        } else {
            random(&p.params, seed, i)
        };
        tried.push(a);
    }
    tried.iter().map(|a| (p.f)(a)).fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (seeds, budgets): (u64, &[u64]) = if full {
        (21, &[30, 60, 100])
    } else {
        (1, &[30])
    };
    println!(
        "# TPE vs random search: median over {seeds} seeds of the best objective's gap to the optimum; 3 trials in flight"
    );
    println!("| function | trials | TPE gap | random gap | TPE better in |");
    println!("|---|---|---|---|---|");
    for p in problems() {
        for &budget in budgets {
            let (mut t, mut r, mut wins) = (Vec::new(), Vec::new(), 0);
            for seed in 0..seeds {
                let bt = best_of(&p, true, seed, budget, 3) - p.optimum;
                let br = best_of(&p, false, seed, budget, 3) - p.optimum;
                wins += u32::from(bt < br);
                t.push(bt);
                r.push(br);
            }
            println!(
                "| {} | {budget} | {:.4} | {:.4} | {wins} of {seeds} |",
                p.name,
                median(t),
                median(r)
            );
        }
    }
}
