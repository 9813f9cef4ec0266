//! Running an experiment: trials in parallel as child processes, metrics read from their output,
//! median early stopping, the goal, failure accounting, resume, and Ctrl-C. Every trial has a
//! deadline, so the experiment always ends.
//!
//! Why child processes and a record on disk: a trial is whatever command the user gave (a script,
//! a `tandem launch` job), it may crash or hang, and an experiment outlives any one of them; the
//! record (`experiment.json`, replaced atomically after every change) lets an interrupted
//! experiment resume with the same trials, and killing a trial's whole process group stops what it
//! started too.

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

use crate::command::{launched, substitute};
use crate::metrics::{LineParser, Metrics, Source};
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

/// What a trial's output reader reports: a line, or its output closed.
enum Event {
    /// A line trial `n` printed.
    Line(u64, String),
    /// Trial `n`'s output closed.
    Closed(u64),
}

/// A trial running: its process, what it reported, and why it is being stopped, if it is.
struct Running {
    /// The trial's process.
    child: Child,
    /// Its process group.
    pgid: Option<i32>,
    /// When it started.
    started: Instant,
    /// What it reported.
    metrics: Metrics,
    /// Why it is being stopped, and as what.
    stop: Option<(Status, String)>,
    /// Whether its output is still open.
    open: bool,
    /// How and when it exited, once it did.
    exited: Option<(std::process::ExitStatus, Instant)>,
    /// Reads metrics off lines (the collector's expressions, or the default format).
    parser: LineParser,
}

/// FNV-1a of the spec text: a folder holding another experiment is not resumed by mistake.
pub fn spec_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The median of `v`; `None` when empty.
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
    let record = open_record(e, spec_text, out)?;
    let (tx, rx): (Sender<Event>, Receiver<Event>) = channel();
    let mut x = Experimenting {
        e,
        out,
        logs,
        search,
        tx,
        rx,
        stopping: finished_before(e, &record),
        record,
        running: BTreeMap::new(),
        exhausted: false,
    };
    x.record.save(out)?;
    loop {
        if interrupted() {
            return x.interrupt(on_change);
        }
        x.start_trials(on_change)?;
        if x.running.is_empty() {
            return x.finish(on_change);
        }
        if let Ok(ev) = x.rx.recv_timeout(Duration::from_millis(100)) {
            let mut events = vec![ev];
            events.extend(x.rx.try_iter());
            for ev in events {
                x.handle(ev, on_change)?;
            }
        }
        x.check_deadlines();
        x.conclude_ended(on_change)?;
    }
}

/// The record in `out` to resume (its unfinished trials dropped), or a new one; a folder holding
/// another experiment is refused.
fn open_record(e: &Experiment, spec_text: &str, out: &Path) -> Result<Record> {
    let hash = spec_hash(spec_text);
    Ok(match Record::load(out)? {
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
        Some(r)
            if e.resume_never
                && r.outcome != Outcome::Running
                && r.outcome != Outcome::Interrupted =>
        {
            return Err(Error::config(
                "spec.resumePolicy",
                format!(
                    "is Never and {} holds the finished experiment {:?}; choose another folder or delete it",
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
    })
}

/// A finished experiment stays finished; resuming it only reports it.
fn finished_before(e: &Experiment, record: &Record) -> Option<(Outcome, String)> {
    let best = record.best().and_then(|t| t.objective);
    if best.is_some_and(|o| e.objective.reached(o)) {
        Some((Outcome::GoalReached, "a trial had reached the goal".into()))
    } else if record.trials.len() as u32 >= e.max_trials {
        Some((
            Outcome::MaxTrialsReached,
            format!("{} trials had run", record.trials.len()),
        ))
    } else {
        None
    }
}

/// An experiment while it runs.
struct Experimenting<'a> {
    /// The experiment.
    e: &'a Experiment,
    /// Its folder.
    out: &'a Path,
    /// Where the trials' logs go.
    logs: std::path::PathBuf,
    /// What suggests the next trials.
    search: Search,
    /// Where the trials' readers report.
    tx: Sender<Event>,
    /// The reports.
    rx: Receiver<Event>,
    /// Every trial so far.
    record: Record,
    /// The trials running.
    running: BTreeMap<u64, Running>,
    /// Why no more trials start (goal, failures), once decided.
    stopping: Option<(Outcome, String)>,
    /// The search has nothing more to suggest (grid).
    exhausted: bool,
}

/// Called on every change of the record (a trial started, reported, ended).
type OnChange<'f> = &'f mut dyn FnMut(&Record, &Change);

impl Experimenting<'_> {
    /// Stops every trial (killed), records them and the experiment as interrupted, resumable.
    fn interrupt(mut self, on_change: OnChange<'_>) -> Result<Record> {
        stop_all(
            &mut self.running,
            Status::Killed,
            "the experiment was interrupted",
        );
        finish_all(
            self.e,
            &mut self.record,
            &mut self.running,
            self.out,
            on_change,
        )?;
        self.record.outcome = Outcome::Interrupted;
        self.record.reason = "interrupted; run the same command again to resume".into();
        self.record.save(self.out)?;
        on_change(&self.record, &Change::Finished);
        Ok(self.record)
    }

    /// Waits for the running trials and records the experiment's outcome and why it ended.
    fn finish(mut self, on_change: OnChange<'_>) -> Result<Record> {
        let finished = self.record.trials.len() as u32;
        let exhausted = self.exhausted;
        let (outcome, reason) = self.stopping.take().unwrap_or_else(|| {
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
        self.record.outcome = outcome;
        self.record.reason = reason;
        self.record.save(self.out)?;
        on_change(&self.record, &Change::Finished);
        Ok(self.record)
    }

    /// Starts trials while there is room and nothing says stop.
    fn start_trials(&mut self, on_change: OnChange<'_>) -> Result<()> {
        let e = self.e;
        while self.stopping.is_none() && !self.exhausted && (self.running.len() as u32) < e.parallel
        {
            let counted = self.record.trials.len() as u32 + self.running.len() as u32;
            if counted >= e.max_trials {
                break;
            }
            let Some(index) = (0u64..).find(|i| {
                !self.running.contains_key(i) && !self.record.trials.iter().any(|t| t.index == *i)
            }) else {
                break;
            };
            let (history, pending) = self.observations();
            let Some(params) = self.search.suggest(e, index, &history, &pending)? else {
                self.exhausted = true;
                break;
            };
            let trial = start(e, index, params, &self.logs, &self.tx)?;
            self.record.trials.push(Trial {
                index,
                name: format!("{}-trial-{index}", e.name),
                parameters: trial.1,
                status: Status::Running,
                reason: None,
                objective: None,
                metrics: BTreeMap::new(),
                intermediate: Vec::new(),
                seconds: 0.0,
            });
            self.record.trials.sort_by_key(|t| t.index);
            self.running.insert(index, trial.0);
            self.record.save(self.out)?;
            on_change(&self.record, &Change::Started(index));
        }
        Ok(())
    }

    /// The finished trials the search learns from, and the parameters of those still running.
    fn observations(&self) -> (Vec<Observation>, Vec<Assignment>) {
        let history = self
            .record
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
        let pending = self
            .record
            .trials
            .iter()
            .filter(|t| t.status == Status::Running)
            .map(|t| t.parameters.clone())
            .collect();
        (history, pending)
    }

    /// A line of a trial's output (its metrics, and maybe median stopping), or its output closing.
    fn handle(&mut self, ev: Event, on_change: OnChange<'_>) -> Result<()> {
        let e = self.e;
        let (i, line) = match ev {
            Event::Closed(i) => {
                if let Some(r) = self.running.get_mut(&i) {
                    r.open = false;
                }
                return Ok(());
            }
            Event::Line(i, line) => (i, line),
        };
        let Some(r) = self.running.get_mut(&i) else {
            return Ok(());
        };
        // A File collector reads the trial's file when it ends, not its output.
        if e.collector.source != Source::StdOut {
            return Ok(());
        }
        let pairs = r.parser.parse(&line);
        let reported: Vec<(u64, f64)> = r
            .metrics
            .add_pairs(pairs)
            .iter()
            .filter(|(n, _)| *n == e.objective.metric)
            .map(|(_, rep)| (rep.step, rep.value))
            .collect();
        if reported.is_empty() {
            return Ok(());
        }
        if let Some(t) = self.record.trials.iter_mut().find(|t| t.index == i) {
            t.intermediate.extend(&reported);
            t.objective = r.metrics.value(&e.objective.metric, e.objective.strategy);
        }
        if r.stop.is_none()
            && let Some(why) = median_stop(e, &self.record, i, &reported)?
        {
            r.stop = Some((Status::EarlyStopped, why));
            signal(r.pgid, Signal::SIGTERM);
        }
        on_change(&self.record, &Change::Reported(i));
        Ok(())
    }

    /// Notes exited trials; kills those past their deadline.
    fn check_deadlines(&mut self) {
        let timeout = Duration::from_secs(self.e.template.timeout_seconds);
        for r in self.running.values_mut() {
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
    }

    /// Records the trials that exited (and whose output is read), then decides whether the goal
    /// or the failures stop the experiment.
    fn conclude_ended(&mut self, on_change: OnChange<'_>) -> Result<()> {
        let ended: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, r)| {
                r.exited
                    .is_some_and(|(_, at)| !r.open || at.elapsed() > Duration::from_secs(2))
            })
            .map(|(i, _)| *i)
            .collect();
        for i in ended {
            let Some(r) = self.running.remove(&i) else {
                continue;
            };
            let status = conclude(self.e, &mut self.record, i, r);
            self.record.save(self.out)?;
            on_change(&self.record, &Change::Ended(i));
            if self.stopping.is_none() {
                self.stopping = self.stop_reason(i, status);
                if let Some((_, why)) = &self.stopping {
                    stop_all(&mut self.running, Status::Killed, why);
                }
            }
        }
        Ok(())
    }

    /// Whether trial `i` ending with `status` stops the experiment: the goal reached, or more
    /// failures than allowed.
    fn stop_reason(&self, i: u64, status: Status) -> Option<(Outcome, String)> {
        let e = self.e;
        let failed = self
            .record
            .trials
            .iter()
            .filter(|t| t.status == Status::Failed)
            .count() as u32;
        if failed > e.max_failed {
            return Some((
                Outcome::Failed,
                format!(
                    "{failed} trials failed, more than maxFailedTrialCount {}",
                    e.max_failed
                ),
            ));
        }
        let t = self.record.trials.iter().find(|t| t.index == i);
        match t.and_then(|t| t.objective) {
            Some(o) if status == Status::Succeeded && e.objective.reached(o) => Some((
                Outcome::GoalReached,
                format!("trial {i} reached the goal: {} = {o}", e.objective.metric),
            )),
            _ => None,
        }
    }
}

/// Katib's median stopping rule: why trial `index` should stop (its latest report, from
/// `start_step` on, is worse than the median of the succeeded trials at that step, once
/// `min_trials_required` have), or `None`.
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

mod trials;
use trials::{conclude, finish_all, signal, start, stop_all};
