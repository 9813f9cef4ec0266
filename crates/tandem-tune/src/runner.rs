//! Running an experiment: trials in parallel as child processes, metrics read from their output,
//! median early stopping, the goal, failure accounting, resume, and Ctrl-C. Every trial has a
//! deadline, so the experiment always ends.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tandem_core::{Error, Result};

use crate::metrics::Metrics;
use crate::search::{Assignment, Observation, Search};
use crate::spec::{Experiment, Goal};
use crate::state::{Outcome, Record, Status, Trial};

/// What changed, for live progress.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A trial started.
    Started(u64),
    /// A trial reported its objective.
    Reported(u64),
    /// A trial ended.
    Ended(u64),
    /// The experiment ended.
    Finished,
}

enum Event {
    Line(u64, String),
    Closed(u64),
}

struct Running {
    child: Child,
    pgid: Option<i32>,
    started: Instant,
    metrics: Metrics,
    stop: Option<(Status, String)>,
    open: bool,
    exited: Option<(std::process::ExitStatus, Instant)>,
}

/// FNV-1a of the spec text: a folder holding another experiment is not resumed by mistake.
pub fn spec_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

fn substitute(e: &Experiment, arg: &str, name: &str, params: &Assignment) -> String {
    let mut out = arg
        .replace("${trialName}", name)
        .replace("${experimentName}", &e.name);
    for (placeholder, reference) in &e.template.trial_parameters {
        if let Some(v) = params.get(reference) {
            out = out.replace(
                &format!("${{trialParameters.{placeholder}}}"),
                &v.to_string(),
            );
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Runs (or resumes) the experiment with its record in `out`. `interrupted` is polled (Ctrl-C);
/// `on_change` is told of every change, with the record as it stands.
pub fn run(
    e: &Experiment,
    spec_text: &str,
    out: &Path,
    interrupted: &dyn Fn() -> bool,
    on_change: &mut dyn FnMut(&Record, &Change),
) -> Result<Record> {
    let search = Search::new(e)?;
    let logs = out.join("trials");
    std::fs::create_dir_all(&logs)
        .map_err(|e| Error::io(format!("creating {}", logs.display()), e))?;
    let hash = spec_hash(spec_text);
    let mut record = match Record::load(out)? {
        Some(r) if r.spec_hash != hash => {
            return Err(Error::config(
                "--out",
                format!(
                    "{} holds experiment {:?} of a different spec; choose another folder or delete it",
                    out.display(),
                    r.experiment
                ),
            ));
        }
        Some(mut r) => {
            r.trials.retain(|t| t.status.is_final());
            r.outcome = Outcome::Running;
            r
        }
        None => Record {
            experiment: e.name.clone(),
            spec_hash: hash,
            objective_metric: e.objective.metric.clone(),
            maximize: e.objective.goal == Goal::Maximize,
            outcome: Outcome::Running,
            reason: String::new(),
            trials: Vec::new(),
            best_trial: None,
        },
    };
    // A finished experiment stays finished; resuming it only reports it.
    let done_before = record.trials.len() as u32 >= e.max_trials
        || record
            .best()
            .and_then(|t| t.objective)
            .is_some_and(|o| e.objective.reached(o));
    let (tx, rx): (Sender<Event>, Receiver<Event>) = channel();
    let mut running: BTreeMap<u64, Running> = BTreeMap::new();
    let mut stopping: Option<(Outcome, String)> = None;
    let mut exhausted = false;
    if done_before {
        let best = record.best().and_then(|t| t.objective);
        stopping = Some(if best.is_some_and(|o| e.objective.reached(o)) {
            (Outcome::GoalReached, "a trial had reached the goal".into())
        } else {
            (
                Outcome::MaxTrialsReached,
                format!("{} trials had run", record.trials.len()),
            )
        });
    }
    record.save(out)?;
    loop {
        if interrupted() {
            stop_all(
                &mut running,
                Status::Killed,
                "the experiment was interrupted",
            );
            finish_all(e, &mut record, &mut running, out, on_change)?;
            record.outcome = Outcome::Interrupted;
            record.reason = "interrupted; run the same command again to resume".into();
            record.save(out)?;
            on_change(&record, &Change::Finished);
            return Ok(record);
        }
        // Start trials while there is room.
        while stopping.is_none() && !exhausted && (running.len() as u32) < e.parallel {
            let counted = record.trials.len() as u32 + running.len() as u32;
            if counted >= e.max_trials {
                break;
            }
            let Some(index) = (0u64..)
                .find(|i| !running.contains_key(i) && !record.trials.iter().any(|t| t.index == *i))
            else {
                break;
            };
            let history: Vec<Observation> = record
                .trials
                .iter()
                .filter(|t| matches!(t.status, Status::Succeeded | Status::EarlyStopped))
                .filter_map(|t| {
                    t.objective.map(|o| Observation {
                        params: t.parameters.clone(),
                        objective: o,
                    })
                })
                .collect();
            let pending: Vec<crate::search::Assignment> = record
                .trials
                .iter()
                .filter(|t| t.status == Status::Running)
                .map(|t| t.parameters.clone())
                .collect();
            let Some(params) = search.suggest(e, index, &history, &pending)? else {
                exhausted = true;
                break;
            };
            let trial = start(e, index, params, &logs, &tx)?;
            let name = format!("{}-trial-{index}", e.name);
            record.trials.push(Trial {
                index,
                name,
                parameters: trial.1,
                status: Status::Running,
                reason: None,
                objective: None,
                metrics: BTreeMap::new(),
                intermediate: Vec::new(),
                seconds: 0.0,
            });
            record.trials.sort_by_key(|t| t.index);
            running.insert(index, trial.0);
            record.save(out)?;
            on_change(&record, &Change::Started(index));
        }
        if running.is_empty() {
            let finished = record.trials.len() as u32;
            let (outcome, reason) = stopping.take().unwrap_or_else(|| {
                if exhausted {
                    (
                        Outcome::MaxTrialsReached,
                        format!("the grid is exhausted after {finished} trials"),
                    )
                } else {
                    (
                        Outcome::MaxTrialsReached,
                        format!("{finished} trials ran (maxTrialCount)"),
                    )
                }
            });
            record.outcome = outcome;
            record.reason = reason;
            record.save(out)?;
            on_change(&record, &Change::Finished);
            return Ok(record);
        }
        // Output of the running trials.
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100)) {
            let mut pending = vec![ev];
            pending.extend(rx.try_iter());
            for ev in pending {
                match ev {
                    Event::Closed(i) => {
                        if let Some(r) = running.get_mut(&i) {
                            r.open = false;
                        }
                    }
                    Event::Line(i, line) => {
                        let Some(r) = running.get_mut(&i) else {
                            continue;
                        };
                        let added = r.metrics.add_line(&line);
                        let reported: Vec<(u64, f64)> = added
                            .iter()
                            .filter(|(n, _)| *n == e.objective.metric)
                            .map(|(_, rep)| (rep.step, rep.value))
                            .collect();
                        if reported.is_empty() {
                            continue;
                        }
                        if let Some(t) = record.trials.iter_mut().find(|t| t.index == i) {
                            t.intermediate.extend(&reported);
                            t.objective =
                                r.metrics.value(&e.objective.metric, e.objective.strategy);
                        }
                        if r.stop.is_none()
                            && let Some(why) = median_stop(e, &record, i, &reported)?
                        {
                            r.stop = Some((Status::EarlyStopped, why));
                            signal(r.pgid, Signal::SIGTERM);
                        }
                        on_change(&record, &Change::Reported(i));
                    }
                }
            }
        }
        // Deadlines and exits.
        let timeout = Duration::from_secs(e.template.timeout_seconds);
        for r in running.values_mut() {
            if r.exited.is_none() {
                if let Ok(Some(status)) = r.child.try_wait() {
                    r.exited = Some((status, Instant::now()));
                } else if r.started.elapsed() > timeout && r.stop.is_none() {
                    r.stop = Some((
                        Status::Failed,
                        format!("timed out after {} s", timeout.as_secs()),
                    ));
                    signal(r.pgid, Signal::SIGKILL);
                }
            }
        }
        let ended: Vec<u64> = running
            .iter()
            .filter(|(_, r)| {
                r.exited
                    .is_some_and(|(_, at)| !r.open || at.elapsed() > Duration::from_secs(2))
            })
            .map(|(i, _)| *i)
            .collect();
        for i in ended {
            if let Some(r) = running.remove(&i) {
                let status = conclude(e, &mut record, i, r);
                record.save(out)?;
                on_change(&record, &Change::Ended(i));
                if stopping.is_none() {
                    let t = record.trials.iter().find(|t| t.index == i);
                    if status == Status::Succeeded
                        && let Some(o) = t.and_then(|t| t.objective)
                        && e.objective.reached(o)
                    {
                        stopping = Some((
                            Outcome::GoalReached,
                            format!("trial {i} reached the goal: {} = {o}", e.objective.metric),
                        ));
                    }
                    let failed = record
                        .trials
                        .iter()
                        .filter(|t| t.status == Status::Failed)
                        .count() as u32;
                    if failed > e.max_failed {
                        stopping = Some((
                            Outcome::Failed,
                            format!(
                                "{failed} trials failed, more than maxFailedTrialCount {}",
                                e.max_failed
                            ),
                        ));
                    }
                    if let Some((_, why)) = &stopping {
                        stop_all(&mut running, Status::Killed, why);
                    }
                }
            }
        }
    }
}

fn median_stop(
    e: &Experiment,
    record: &Record,
    index: u64,
    reported: &[(u64, f64)],
) -> Result<Option<String>> {
    let Some(es) = &e.early_stopping else {
        return Ok(None);
    };
    let field = "spec.earlyStopping";
    let min_trials: usize = es.setting(field, "min_trials_required", 3)?;
    let start_step: u64 = es.setting(field, "start_step", 4)?;
    let Some(&(step, value)) = reported.last() else {
        return Ok(None);
    };
    if step < start_step {
        return Ok(None);
    }
    let others: Vec<f64> = record
        .trials
        .iter()
        .filter(|t| t.index != index && t.status == Status::Succeeded)
        .filter_map(|t| {
            t.intermediate
                .iter()
                .filter(|(s, _)| *s <= step)
                .max_by_key(|(s, _)| *s)
                .map(|(_, v)| *v)
        })
        .collect();
    if others.len() < min_trials {
        return Ok(None);
    }
    let m = median(others).unwrap_or(value);
    Ok(e.objective.goal.better(m, value).then(|| {
        format!("median stop at step {step}: {} = {value} is worse than the median {m} of finished trials", e.objective.metric)
    }))
}

fn signal(pgid: Option<i32>, s: Signal) {
    if let Some(p) = pgid {
        let _ = killpg(Pid::from_raw(p), s);
    }
}

fn stop_all(running: &mut BTreeMap<u64, Running>, status: Status, why: &str) {
    for r in running.values_mut() {
        if r.stop.is_none() {
            r.stop = Some((status, why.to_string()));
        }
        signal(r.pgid, Signal::SIGTERM);
    }
}

/// Waits (bounded) for every running trial to end and records it.
fn finish_all(
    e: &Experiment,
    record: &mut Record,
    running: &mut BTreeMap<u64, Running>,
    out: &Path,
    on_change: &mut dyn FnMut(&Record, &Change),
) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(5);
    for (i, mut r) in std::mem::take(running) {
        while r.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if r.child.try_wait().ok().flatten().is_none() {
            signal(r.pgid, Signal::SIGKILL);
            let _ = r.child.kill();
        }
        if let Ok(s) = r.child.wait() {
            r.exited = Some((s, Instant::now()));
        }
        conclude(e, record, i, r);
        on_change(record, &Change::Ended(i));
    }
    record.save(out)?;
    Ok(())
}

fn conclude(e: &Experiment, record: &mut Record, index: u64, mut r: Running) -> Status {
    let exit = r.exited.map(|x| x.0).or_else(|| r.child.wait().ok());
    // Whatever the trial left behind in its process group goes too.
    signal(r.pgid, Signal::SIGKILL);
    let objective = r.metrics.value(&e.objective.metric, e.objective.strategy);
    let (status, reason) = match (r.stop.take(), exit) {
        (Some((s, why)), _) => (s, Some(why)),
        (None, Some(x)) if x.success() => match objective {
            Some(_) => (Status::Succeeded, None),
            None => (
                Status::Failed,
                Some(format!(
                    "exited 0 but reported no {m}; print a line such as `{m}=0.93`",
                    m = e.objective.metric
                )),
            ),
        },
        (None, Some(x)) => (
            Status::Failed,
            Some(match (x.code(), x.signal()) {
                (Some(c), _) => format!(
                    "exited with code {c} (see trials/{}-trial-{index}.log)",
                    e.name
                ),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "ended abnormally".into(),
            }),
        ),
        (None, None) => (Status::Failed, Some("could not be waited for".into())),
    };
    if let Some(t) = record.trials.iter_mut().find(|t| t.index == index) {
        t.status = status;
        t.reason = reason;
        t.objective = objective;
        t.seconds = r.started.elapsed().as_secs_f64();
        for m in &e.objective.additional {
            if let Some(v) = r.metrics.value(m, crate::spec::Strategy::Latest) {
                t.metrics.insert(m.clone(), v);
            }
        }
    }
    status
}

fn start(
    e: &Experiment,
    index: u64,
    params: Assignment,
    logs: &Path,
    tx: &Sender<Event>,
) -> Result<(Running, Assignment)> {
    let name = format!("{}-trial-{index}", e.name);
    let args: Vec<String> = e
        .template
        .command
        .iter()
        .map(|a| substitute(e, a, &name, &params))
        .collect();
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .env("TANDEM_TRIAL_NAME", &name)
        .env("TANDEM_EXPERIMENT", &e.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in &e.template.env {
        cmd.env(k, substitute(e, v, &name, &params));
    }
    if let Some(dir) = &e.template.working_dir {
        cmd.current_dir(dir);
    }
    let log_path = logs.join(format!("{name}.log"));
    let log = File::create(&log_path)
        .map_err(|err| Error::io(format!("creating {}", log_path.display()), err))?;
    let log = Arc::new(Mutex::new(log));
    if let Ok(mut l) = log.lock() {
        let _ = writeln!(l, "$ {}", args.join(" "));
    }
    let mut child = cmd
        .spawn()
        .map_err(|err| Error::io(format!("starting trial {name} ({:?})", args[0]), err))?;
    let pgid = i32::try_from(child.id()).ok();
    if let Some(out) = child.stdout.take() {
        let (tx, log) = (tx.clone(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Ok(mut l) = log.lock() {
                    let _ = writeln!(l, "{line}");
                }
                if tx.send(Event::Line(index, line)).is_err() {
                    break;
                }
            }
            let _ = tx.send(Event::Closed(index));
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                if let Ok(mut l) = log.lock() {
                    let _ = writeln!(l, "stderr: {line}");
                }
            }
        });
    }
    Ok((
        Running {
            child,
            pgid,
            started: Instant::now(),
            metrics: Metrics::default(),
            stop: None,
            open: true,
            exited: None,
        },
        params,
    ))
}
