//! `tandem tune`: hyperparameter tuning experiments in the spirit of Katib, on one machine.
//!
//! The spec is a Katib `Experiment` in YAML ([`Experiment::from_yaml`]): parameters (double, int,
//! categorical, discrete; linear or log scale), an algorithm (`random`, `grid`, `tpe`), parallel,
//! maximum and failed trial counts, an objective with a goal, median early stopping, and a trial
//! template whose command gets `${trialParameters.<name>}` substituted (a trial may itself be a
//! `tandem launch` job). Trials report metrics as `name=value` lines on stdout ([`metrics`]).
//! [`runner::run`] runs it, keeping `experiment.json` so an interrupted experiment resumes.

mod command;
pub mod metrics;
pub mod runner;
pub mod search;
pub mod spec;
pub mod state;
pub mod tpe;

pub use runner::{Change, run};
pub use search::{Assignment, Search, Value};
pub use spec::{Experiment, Goal};
pub use state::{Outcome, Record, Status, Trial};

#[cfg(test)]
mod tests;
