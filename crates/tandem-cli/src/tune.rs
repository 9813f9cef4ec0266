//! `tandem tune experiment.yaml`: a Katib-style hyperparameter experiment on this machine, with a
//! live table of trials, `experiment.json`, and PNG plots of the objective per trial and of each
//! parameter against the objective. Running it again with the same folder resumes it.
//!
//! Why a live table: an experiment runs for minutes to hours; the table shows every trial's
//! parameters, status and objective as they change, and the record on disk is what a resumed run
//! reads.
//!
//! Interrupting it (Ctrl-C) stops every trial and records the experiment as interrupted; the same
//! command resumes it, rerunning only the trials that had not finished. The plots are PNG files
//! beside `experiment.json`: `objective.png` (each trial's objective, the best so far as a line,
//! failed trials as red crosses) and one `param-NAME.png` per parameter.

use crate::ExitCode;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use tandem::{Error, Result};
use tandem_tune::spec::Domain;
use tandem_tune::{Change, Experiment, Outcome, Record, Status, Value};

use crate::plot::{Scatter, scatter_png};

/// Arguments of `tandem tune`.
#[derive(Args, Debug)]
pub struct TuneArgs {
    /// The experiment spec (Katib's Experiment shape, YAML).
    spec: PathBuf,
    /// Folder for experiment.json, trial logs and plots (default: `tune-<experiment name>`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A trial's status as the table prints it.
fn status_name(s: Status) -> &'static str {
    match s {
        Status::Running => "running",
        Status::Succeeded => "succeeded",
        Status::Failed => "failed",
        Status::EarlyStopped => "early-stopped",
        Status::Killed => "killed",
    }
}

/// The trials as a table: index, status, parameters, objective.
fn table(e: &Experiment, r: &Record) -> Vec<String> {
    let mut head = format!("{:<6} {:<14}", "trial", "status");
    for p in &e.parameters {
        head.push_str(&format!(" {:>12}", p.name));
    }
    head.push_str(&format!(" {:>12}", e.objective.metric));
    let mut lines = vec![head];
    for t in &r.trials {
        let mut l = format!("{:<6} {:<14}", t.index, status_name(t.status));
        for p in &e.parameters {
            let v = t.parameters.get(&p.name).map(short).unwrap_or_default();
            l.push_str(&format!(" {v:>12}"));
        }
        let o = t
            .objective
            .map(|o| format!("{o:.4}"))
            .unwrap_or_else(|| "-".into());
        l.push_str(&format!(" {o:>12}"));
        if Some(t.index) == r.best().map(|b| b.index) {
            l.push_str("  best");
        }
        lines.push(l);
    }
    lines
}

/// A parameter's value, short enough for a table cell.
fn short(v: &Value) -> String {
    match v {
        Value::Float(x) => format!("{x:.4e}")
            .parse::<f64>()
            .map(|x| {
                format!("{x:.5}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            })
            .unwrap_or_else(|_| v.to_string()),
        other => other.to_string(),
    }
}

/// Runs (or resumes) the experiment.
pub fn tune(args: TuneArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.spec)
        .map_err(|e| Error::io(format!("reading {}", args.spec.display()), e))?;
    let e = Experiment::from_yaml(&text)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("tune-{}", e.name)));
    println!(
        "tandem tune: {} — {} {} with {}, {} at a time, at most {} trials; results in {}",
        e.name,
        match e.objective.goal {
            tandem_tune::Goal::Maximize => "maximize",
            tandem_tune::Goal::Minimize => "minimize",
        },
        e.objective.metric,
        e.algorithm.name,
        e.parallel,
        e.max_trials,
        out.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    crate::launch::watch_signals(stop.clone());
    let live = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let record = tandem_tune::run(
        &e,
        &text,
        &out,
        &|| stop.load(Ordering::Relaxed),
        &mut |r, change| {
            if live {
                drawn = redraw(&e, r, drawn);
            } else {
                print_change(&e, r, change);
            }
        },
    )?;
    if !live {
        println!();
        for l in table(&e, &record) {
            println!("{l}");
        }
    }
    let plots = plot(&e, &record, &out)?;
    summarize(&e, &record, &out, &plots);
    Ok(ExitCode::from(match record.outcome {
        Outcome::GoalReached | Outcome::MaxTrialsReached => 0,
        Outcome::Interrupted => 130,
        Outcome::Failed | Outcome::Running => 1,
    }))
}

/// Redraws the live table over the `drawn` lines printed before; returns how many it printed.
fn redraw(e: &Experiment, r: &Record, drawn: usize) -> usize {
    let lines = table(e, r);
    let mut o = std::io::stdout().lock();
    if drawn > 0 {
        let _ = write!(o, "\x1b[{drawn}A");
    }
    for l in &lines {
        let _ = writeln!(o, "\x1b[2K{l}");
    }
    let _ = o.flush();
    lines.len()
}

/// One line per started or ended trial (when stdout is not a terminal).
fn print_change(e: &Experiment, r: &Record, change: &Change) {
    let t = |i: u64| r.trials.iter().find(|t| t.index == i);
    match change {
        Change::Started(i) => {
            if let Some(t) = t(*i) {
                let p: Vec<String> = t
                    .parameters
                    .iter()
                    .map(|(k, v)| format!("{k}={}", short(v)))
                    .collect();
                println!("trial {i} started: {}", p.join(" "));
            }
        }
        Change::Ended(i) => {
            if let Some(t) = t(*i) {
                let o = t
                    .objective
                    .map(|o| format!(" {}={o}", e.objective.metric))
                    .unwrap_or_default();
                let why = t
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                println!("trial {i} {}{o}{why}", status_name(t.status));
            }
        }
        Change::Reported(_) | Change::Finished => {}
    }
}

/// The outcome, the best trial, and where the record and plots are.
fn summarize(e: &Experiment, record: &Record, out: &std::path::Path, plots: &[PathBuf]) {
    println!("\n{:?}: {}", record.outcome, record.reason);
    match record.best() {
        Some(b) => {
            let p: Vec<String> = b
                .parameters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "best: trial {} with {} = {} ({})",
                b.index,
                e.objective.metric,
                b.objective.unwrap_or(f64::NAN),
                p.join(", ")
            );
        }
        None => println!("best: none (no trial reported {})", e.objective.metric),
    }
    println!("record: {}", out.join("experiment.json").display());
    for p in plots {
        println!("plot: {}", p.display());
    }
}

/// The best objective so far at each trial, `better(y, best)` saying which wins.
fn best_so_far(points: &[(f64, f64)], better: impl Fn(f64, f64) -> bool) -> Vec<(f64, f64)> {
    let mut cur: Option<f64> = None;
    points
        .iter()
        .map(|&(x, y)| {
            let c = match cur {
                Some(c) if !better(y, c) => c,
                _ => y,
            };
            cur = Some(c);
            (x, c)
        })
        .collect()
}

/// Where the scored trials stand on parameter `p`'s axis: whether it is logarithmic, the names of
/// its values when they are categories, and (value, objective) per trial.
fn parameter_points(
    scored: &[&tandem_tune::Trial],
    p: &tandem_tune::spec::Parameter,
) -> (bool, Vec<String>, Vec<(f64, f64)>) {
    let (log_x, names): (bool, Vec<String>) = match &p.domain {
        Domain::Double { log, .. } | Domain::Int { log, .. } => (*log, Vec::new()),
        Domain::Categorical(l) => (false, l.clone()),
        Domain::Discrete(l) => (false, l.iter().map(|v| v.to_string()).collect()),
    };
    let pts = scored
        .iter()
        .filter_map(|t| {
            let v = t.parameters.get(&p.name)?;
            let x = match v {
                Value::Text(s) => names.iter().position(|n| n == s)? as f64,
                other if !names.is_empty() => {
                    names.iter().position(|n| *n == other.to_string())? as f64
                }
                other => other.as_f64()?,
            };
            Some((x, t.objective?))
        })
        .collect();
    (log_x, names, pts)
}

/// Charts of the experiment in `out`: the objective per trial with the best so far, and the
/// objective against each parameter; returns the files written.
fn plot(e: &Experiment, r: &Record, out: &std::path::Path) -> Result<Vec<PathBuf>> {
    let scored: Vec<&tandem_tune::Trial> =
        r.trials.iter().filter(|t| t.objective.is_some()).collect();
    if scored.is_empty() {
        return Ok(Vec::new());
    }
    let colour = |s: Status| match s {
        Status::EarlyStopped => [230, 140, 20],
        Status::Succeeded => [30, 90, 200],
        _ => [200, 40, 40],
    };
    let points: Vec<(f64, f64)> = scored
        .iter()
        .map(|t| (t.index as f64, t.objective.unwrap_or(f64::NAN)))
        .collect();
    let colours: Vec<[u8; 3]> = scored.iter().map(|t| colour(t.status)).collect();
    let best = best_so_far(&points, |y, c| e.objective.goal.better(y, c));
    let mut written = Vec::new();
    let path = out.join("objective.png");
    let title = format!("{}: {} per trial", e.name, e.objective.metric);
    let failed: Vec<f64> = r
        .trials
        .iter()
        .filter(|t| t.objective.is_none() && t.status == Status::Failed)
        .map(|t| t.index as f64)
        .collect();
    let legend = [
        ("succeeded", colour(Status::Succeeded)),
        ("stopped early", colour(Status::EarlyStopped)),
        ("failed", colour(Status::Failed)),
        ("best so far", [40, 160, 60]),
    ];
    scatter_png(
        &path.to_string_lossy(),
        &Scatter {
            title: &title,
            x_label: "trial",
            y_label: &e.objective.metric,
            points: &points,
            colours: &colours,
            line: &best,
            log_x: false,
            x_names: &[],
            integer_x: true,
            failed_x: &failed,
            legend: &legend,
        },
    )?;
    written.push(path);
    for p in &e.parameters {
        let (log_x, names, pts) = parameter_points(&scored, p);
        let path = out.join(format!("param-{}.png", p.name));
        let title = format!("{} against {}", e.objective.metric, p.name);
        scatter_png(
            &path.to_string_lossy(),
            &Scatter {
                title: &title,
                x_label: &p.name,
                y_label: &e.objective.metric,
                points: &pts,
                colours: &colours,
                line: &[],
                log_x,
                x_names: &names,
                integer_x: false,
                failed_x: &[],
                legend: &legend[..3],
            },
        )?;
        written.push(path);
    }
    Ok(written)
}
