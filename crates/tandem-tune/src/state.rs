//! The experiment's record: every trial with its parameters, status and metrics, kept in
//! `experiment.json` (written atomically after every change) so an interrupted experiment resumes.
//!
//! Why a file rewritten whole after every change: an experiment can be interrupted at any moment
//! (Ctrl-C, a machine reboot); a record written through a temporary file and renamed is always
//! complete, and a rerun reads it and resumes where it stopped. The spec's hash is kept beside it, so
//! a folder of another experiment is never resumed by mistake.
//!
//! Each trial keeps its parameters, status, reason, objective, additional metrics and the
//! intermediate reports median stopping compares; `Outcome` says how the experiment ended (its goal
//! reached, trials exhausted, too many failures, interrupted).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_core::{Error, Result};

use crate::search::Assignment;
use crate::spec::Goal;

/// Where a trial stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Not finished.
    Running,
    /// Exited 0 and reported the objective.
    Succeeded,
    /// Exited non-zero, timed out, or reported no objective.
    Failed,
    /// Stopped by the median rule; its last value still counts.
    EarlyStopped,
    /// Stopped because the experiment ended (goal reached, too many failures, interrupted).
    Killed,
}

impl Status {
    /// Whether a finished trial keeps this status on resume.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::EarlyStopped
        )
    }
}

/// One trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Its index (parameters are a function of the index and the finished trials).
    pub index: u64,
    /// `<experiment>-trial-<index>`.
    pub name: String,
    /// Its parameters.
    pub parameters: Assignment,
    /// Where it stands.
    pub status: Status,
    /// Why it failed or stopped.
    pub reason: Option<String>,
    /// The objective (by the metric strategy), once reported.
    pub objective: Option<f64>,
    /// Final values of the additional metrics.
    pub metrics: BTreeMap<String, f64>,
    /// The objective's intermediate values: (step, value).
    pub intermediate: Vec<(u64, f64)>,
    /// Seconds it ran.
    pub seconds: f64,
}

/// How the experiment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Still running (or interrupted: resume it).
    Running,
    /// A trial reached the goal.
    GoalReached,
    /// `maxTrialCount` trials ran (or the grid is exhausted).
    MaxTrialsReached,
    /// More than `maxFailedTrialCount` trials failed.
    Failed,
    /// Ctrl-C: resume by running it again with the same folder.
    Interrupted,
}

/// The whole record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The experiment's name.
    pub experiment: String,
    /// A hash of the spec; a folder of another spec is not resumed.
    pub spec_hash: String,
    /// The objective metric.
    pub objective_metric: String,
    /// Maximise or minimise.
    pub maximize: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, in words.
    pub reason: String,
    /// Every trial, by index.
    pub trials: Vec<Trial>,
    /// The best trial's index.
    pub best_trial: Option<u64>,
}

impl Record {
    /// The best finished trial with an objective.
    pub fn best(&self) -> Option<&Trial> {
        let goal = if self.maximize {
            Goal::Maximize
        } else {
            Goal::Minimize
        };
        self.trials
            .iter()
            .filter(|t| matches!(t.status, Status::Succeeded | Status::EarlyStopped))
            .filter_map(|t| t.objective.map(|o| (t, o)))
            .fold(None, |best: Option<(&Trial, f64)>, (t, o)| match best {
                Some((_, b)) if !goal.better(o, b) => best,
                _ => Some((t, o)),
            })
            .map(|b| b.0)
    }

    /// Reads `experiment.json` from `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Record>> {
        let path = dir.join("experiment.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                Error::config(
                    path.display().to_string(),
                    format!("cannot be resumed: {e}"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Writes `experiment.json` atomically (temp file, then rename).
    pub fn save(&mut self, dir: &Path) -> Result<PathBuf> {
        self.best_trial = self.best().map(|t| t.index);
        let path = dir.join("experiment.json");
        let tmp = dir.join(".experiment.json.tmp");
        let text = serde_json::to_string_pretty(&self.to_json())
            .map_err(|e| Error::invalid("experiment record", e.to_string()))?;
        std::fs::write(&tmp, text)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))?;
        Ok(path)
    }

    /// The record as written, with the best trial's parameters spelled out.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let (Some(best), Some(obj)) = (self.best(), v.as_object_mut()) {
            obj.insert(
                "best".into(),
                serde_json::json!({"trial": best.name, "parameters": best.parameters, "objective": best.objective}),
            );
        }
        v
    }
}
