//! The experiment spec, in the shape of a Katib `Experiment` (v1beta1), read from YAML and checked
//! before any trial starts: every problem names the field at fault.
//!
//! Why check everything up front: an experiment runs for hours, and a typo found at trial 40 (a
//! `min` larger than `max`, a placeholder that names no parameter, a log scale over zero) wastes
//! them. So the YAML is read with unknown fields refused (Katib's own field names are the
//! vocabulary), and every value is turned into a typed [`Experiment`] whose parameters, objective,
//! algorithm and trial template can no longer be wrong. The search algorithms and the runner only
//! ever see that typed form.

use std::collections::BTreeMap;

use tandem_core::{Error, Result};

mod domain;
mod fields;
mod katib;
mod raw;

pub use katib::{Launch, TrialRun};

use domain::domain;
use fields::*;
use raw::*;

/// Formats a number the way a user would write it (no trailing `.0` for integers).
pub fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Maximise or minimise the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Bigger is better.
    Maximize,
    /// Smaller is better.
    Minimize,
}

impl Goal {
    /// Whether `a` is better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Goal::Maximize => a > b,
            Goal::Minimize => a < b,
        }
    }
}

/// Which of a trial's reported values becomes its result for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The largest value reported.
    Max,
    /// The smallest value reported.
    Min,
    /// The last value reported.
    Latest,
}

/// The objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// Maximise or minimise.
    pub goal: Goal,
    /// Stop the experiment once a trial reaches this.
    pub target: Option<f64>,
    /// The metric trials report (`name=value` lines).
    pub metric: String,
    /// Other metrics to record.
    pub additional: Vec<String>,
    /// How the objective's values of one trial reduce to one (default: max for maximise, min for minimise).
    pub strategy: Strategy,
}

impl Objective {
    /// Whether `value` reaches the target.
    pub fn reached(&self, value: f64) -> bool {
        match (self.target, self.goal) {
            (Some(t), Goal::Maximize) => value >= t,
            (Some(t), Goal::Minimize) => value <= t,
            (None, _) => false,
        }
    }
}

/// Where a parameter's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// Real numbers in `[min, max]`, optionally on a log scale or a grid of `step`.
    Double {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
        /// Sample on a log scale.
        log: bool,
        /// Grid step (needed by the grid algorithm).
        step: Option<f64>,
    },
    /// Integers in `[min, max]`.
    Int {
        /// Lower bound.
        min: i64,
        /// Upper bound.
        max: i64,
        /// Sample on a log scale.
        log: bool,
        /// Grid step (default 1).
        step: i64,
    },
    /// One of the strings.
    Categorical(Vec<String>),
    /// One of the numbers.
    Discrete(Vec<f64>),
}

/// One searched parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    /// Its name (what `trialParameters[].reference` points at).
    pub name: String,
    /// Its values.
    pub domain: Domain,
}

/// A search or early-stopping algorithm and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AlgorithmSpec {
    /// Its name (`random`, `grid`, `tpe`; `medianstop`).
    pub name: String,
    /// Its settings, by name.
    pub settings: BTreeMap<String, String>,
}

impl AlgorithmSpec {
    /// A setting parsed as `T`, or `default`; an unparsable value is an error naming it.
    pub fn setting<T: std::str::FromStr>(&self, field: &str, name: &str, default: T) -> Result<T> {
        match self.settings.get(name) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| {
                Error::config(
                    format!("{field}.algorithmSettings[{name}]"),
                    format!("{v:?} is not valid here"),
                )
            }),
        }
    }
}

/// What each trial runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// `${trialParameters.<name>}` → the parameter it references.
    pub trial_parameters: Vec<(String, String)>,
    /// The command, with placeholders.
    pub command: Vec<String>,
    /// Each trial's deadline.
    pub timeout_seconds: u64,
    /// Extra variables for the trial.
    pub env: BTreeMap<String, String>,
    /// Working directory of the trial.
    pub working_dir: Option<String>,
    /// How the command starts: as it is, or as a local distributed job (a TFJob or PyTorchJob
    /// trial spec's replicas, through `tandem launch`).
    pub launch: Launch,
}

/// A checked experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    /// Its name.
    pub name: String,
    /// The objective.
    pub objective: Objective,
    /// The search algorithm.
    pub algorithm: AlgorithmSpec,
    /// The early-stopping algorithm, if any.
    pub early_stopping: Option<AlgorithmSpec>,
    /// Trials run at once.
    pub parallel: u32,
    /// Trials run at most.
    pub max_trials: u32,
    /// Failed trials tolerated before the experiment fails.
    pub max_failed: u32,
    /// The searched parameters.
    pub parameters: Vec<Parameter>,
    /// What a trial runs.
    pub template: Template,
    /// Where trials' metrics come from.
    pub collector: crate::metrics::Collector,
    /// Katib's `resumePolicy` (`Never`, `LongRunning`, `FromVolume`): with `Never` a finished
    /// experiment's folder is not run again.
    pub resume_never: bool,
}

/// Default trial deadline when the spec sets none: every trial ends.
pub const DEFAULT_TRIAL_TIMEOUT: u64 = 3600;

/// Search algorithms this version knows.
pub const ALGORITHMS: [&str; 3] = ["random", "grid", "tpe"];

/// Katib's other algorithm names, and why `tandem tune` refuses them.
const UNSUPPORTED: [(&str, &str); 9] = [
    (
        "bayesianoptimization",
        "Gaussian-process Bayesian optimization",
    ),
    (
        "multivariate-tpe",
        "multivariate TPE (tpe samples each parameter on its own)",
    ),
    ("cmaes", "CMA-ES"),
    ("sobol", "Sobol quasi-random search"),
    ("hyperband", "Hyperband"),
    ("pbt", "population-based training"),
    ("enas", "ENAS neural architecture search"),
    ("darts", "DARTS neural architecture search"),
    ("skopt-bayes-opt", "scikit-optimize's Bayesian optimization"),
];

impl Experiment {
    /// Parses and checks a YAML spec.
    ///
    /// ```
    /// let yaml = r#"
    /// metadata: {name: lr-search}
    /// spec:
    ///   objective: {type: maximize, objectiveMetricName: accuracy, goal: 0.99}
    ///   algorithm: {algorithmName: random, algorithmSettings: [{name: random_state, value: "7"}]}
    ///   maxTrialCount: 6
    ///   parameters:
    ///     - name: lr
    ///       parameterType: double
    ///       feasibleSpace: {min: "0.001", max: "0.1", distribution: logUniform}
    ///   trialTemplate:
    ///     trialParameters: [{name: learningRate, reference: lr}]
    ///     command: [python, train.py, "--lr=${trialParameters.learningRate}"]
    /// "#;
    /// let e = tandem_tune::Experiment::from_yaml(yaml).unwrap();
    /// assert_eq!(e.name, "lr-search");
    /// assert_eq!(e.max_trials, 6);
    /// ```
    pub fn from_yaml(text: &str) -> Result<Experiment> {
        let raw: RawDoc = serde_norway::from_str(text)
            .map_err(|e| Error::config("experiment spec", e.to_string()))?;
        if let Some(k) = &raw.kind
            && k != "Experiment"
        {
            return Err(Error::config("kind", format!("{k:?} is not Experiment")));
        }
        let _ = (
            &raw.api_version,
            raw.metadata.as_ref().map(|m| (&m.namespace, &m.labels)),
        );
        let name = experiment_name(raw.metadata.and_then(|m| m.name))?;
        let s = raw.spec;
        if s.nas_config.is_some() {
            return Err(Error::config(
                "spec.nasConfig",
                "neural architecture search is not supported by tandem tune (hyperparameter search only)",
            ));
        }
        let objective = objective(s.objective)?;
        let algorithm = search_algorithm(s.algorithm)?;
        let early_stopping = s.early_stopping.map(early_stopping).transpose()?;
        let parameters = parameters(s.parameters)?;
        let template = template(s.trial_template, &parameters)?;
        let collector = collector(s.metrics_collector_spec)?;
        let resume_never = resume_never(s.resume_policy.as_deref())?;
        let count = |field: &str, v: Option<u32>, default: u32| -> Result<u32> {
            match v {
                Some(0) => Err(Error::config(field, "must be at least 1")),
                Some(n) => Ok(n),
                None => Ok(default),
            }
        };
        let max_trials = count("spec.maxTrialCount", s.max_trial_count, 12)?;
        let parallel = count("spec.parallelTrialCount", s.parallel_trial_count, 3)?.min(max_trials);
        let max_failed = s.max_failed_trial_count.unwrap_or(3);
        Ok(Experiment {
            name,
            objective,
            algorithm,
            early_stopping,
            parallel,
            max_trials,
            max_failed,
            parameters,
            template,
            collector,
            resume_never,
        })
    }
}

/// Katib's `metricsCollectorSpec`: `StdOut` (the default) or `File` (text or JSON lines), with
/// optional `filter.metricsFormat`; collectors that need a cluster are refused, naming the kind.
fn collector(c: Option<RawCollectorSpec>) -> Result<crate::metrics::Collector> {
    use crate::metrics::{Collector, Source};
    let Some(c) = c else {
        return Ok(Collector::default());
    };
    let source = c.source.unwrap_or(RawSource {
        file_system_path: None,
        filter: None,
        http_get: None,
    });
    if source.http_get.is_some() {
        return Err(Error::config(
            "spec.metricsCollectorSpec.source.httpGet",
            "is collected by Katib's sidecar in a cluster; use StdOut or File",
        ));
    }
    let formats = source
        .filter
        .and_then(|f| f.metrics_format)
        .unwrap_or_default();
    let kind = c.collector.map_or_else(
        || "StdOut".to_string(),
        |k| {
            let _ = k.custom_collector;
            k.kind
        },
    );
    let source = match kind.as_str() {
        "StdOut" => Source::StdOut,
        "File" => {
            let p = source.file_system_path.ok_or_else(|| {
                Error::config(
                    "spec.metricsCollectorSpec.source.fileSystemPath",
                    "is missing: the File collector reads the file it names",
                )
            })?;
            if p.kind.as_deref().is_some_and(|k| k != "File") {
                return Err(Error::config(
                    "spec.metricsCollectorSpec.source.fileSystemPath.kind",
                    format!("{:?}: the File collector reads one file", p.kind),
                ));
            }
            let json = match p.format.as_deref() {
                None | Some("TEXT") => false,
                Some("JSON") => true,
                Some(other) => {
                    return Err(Error::config(
                        "spec.metricsCollectorSpec.source.fileSystemPath.format",
                        format!("{other:?} is not TEXT or JSON"),
                    ));
                }
            };
            Source::File { path: p.path, json }
        }
        other => {
            return Err(Error::config(
                "spec.metricsCollectorSpec.collector.kind",
                format!(
                    "{other:?} cannot be collected by a local trial (it needs Katib's sidecar or TensorFlow's event files); use StdOut or File"
                ),
            ));
        }
    };
    let c = Collector { source, formats };
    crate::metrics::LineParser::new(&c)?;
    Ok(c)
}

/// `spec.objective`: the goal, the metric (required), an optional target and how reports reduce.
fn objective(o: RawObjective) -> Result<Objective> {
    let goal = match o.kind.as_str() {
        "maximize" => Goal::Maximize,
        "minimize" => Goal::Minimize,
        other => {
            return Err(Error::config(
                "spec.objective.type",
                format!("{other:?} is not maximize or minimize"),
            ));
        }
    };
    let metric = o
        .objective_metric_name
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| {
            Error::config(
                "spec.objective.objectiveMetricName",
                "is missing: which metric do trials report?",
            )
        })?;
    if let Some(g) = o.goal
        && !g.is_finite()
    {
        return Err(Error::config(
            "spec.objective.goal",
            format!("{g} is not a finite number"),
        ));
    }
    let strategy = strategy(goal, &metric, o.metric_strategies.unwrap_or_default())?;
    Ok(Objective {
        goal,
        target: o.goal,
        metric,
        additional: o.additional_metric_names.unwrap_or_default(),
        strategy,
    })
}

/// How the objective metric's reports become a trial's value: `metricStrategies`' entry for it,
/// else the best by the goal.
fn strategy(goal: Goal, metric: &str, raw: Vec<RawStrategy>) -> Result<Strategy> {
    let mut strategy = match goal {
        Goal::Maximize => Strategy::Max,
        Goal::Minimize => Strategy::Min,
    };
    for (i, st) in raw.into_iter().enumerate() {
        let v = match st.value.as_str() {
            "max" => Strategy::Max,
            "min" => Strategy::Min,
            "latest" => Strategy::Latest,
            other => {
                return Err(Error::config(
                    format!("spec.objective.metricStrategies[{i}].value"),
                    format!("{other:?} is not min, max or latest"),
                ));
            }
        };
        if st.name == metric {
            strategy = v;
        }
    }
    Ok(strategy)
}

/// An `algorithm` block: its name (lower case) and settings, naming `field` in errors.
fn parse_algorithm(field: &str, a: RawAlgorithm) -> Result<AlgorithmSpec> {
    let name = a.algorithm_name.trim().to_ascii_lowercase();
    if name.is_empty() {
        return Err(Error::config(format!("{field}.algorithmName"), "is empty"));
    }
    let settings = a
        .algorithm_settings
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.name, s.value.text()))
        .collect();
    Ok(AlgorithmSpec { name, settings })
}

/// `spec.trialTemplate`: what a trial runs (a command, or a Job, TFJob or PyTorchJob trial spec),
/// its parameters, environment, folder and deadline, every placeholder checked.
fn template(t: RawTemplate, params: &[Parameter]) -> Result<Template> {
    let _ = (
        &t.primary_pod_labels,
        t.retain,
        &t.success_condition,
        &t.failure_condition,
    );
    if t.config_map.is_some() {
        return Err(Error::config(
            "spec.trialTemplate.configMap",
            "names a Kubernetes ConfigMap, which tandem tune cannot read; put the trial spec inline (trialSpec)",
        ));
    }
    let run = match (t.trial_spec, t.command) {
        (Some(_), Some(_)) => {
            return Err(Error::config(
                "spec.trialTemplate",
                "has both trialSpec and command: give one",
            ));
        }
        (Some(spec), None) => katib::trial_run(&spec, t.primary_container_name.as_deref())?,
        (None, Some(command)) => TrialRun {
            command,
            env: BTreeMap::new(),
            working_dir: None,
            launch: Launch::Plain,
        },
        (None, None) => {
            return Err(Error::config(
                "spec.trialTemplate",
                "needs a trialSpec (a Job, TFJob or PyTorchJob) or a command",
            ));
        }
    };
    if run.command.is_empty() || run.command[0].trim().is_empty() {
        return Err(Error::config("spec.trialTemplate.command", "is empty"));
    }
    let mut env = run.env;
    env.extend(t.env.unwrap_or_default());
    let working_dir = t.working_dir.or(run.working_dir);
    let ps_command = match &run.launch {
        Launch::Job {
            ps_command: Some(c),
            ..
        } => c.clone(),
        _ => Vec::new(),
    };
    let trial_parameters = trial_parameters(t.trial_parameters.unwrap_or_default(), params)?;
    // Every placeholder must resolve, or a trial would run with a literal "${...}".
    for arg in run
        .command
        .iter()
        .chain(&ps_command)
        .chain(env.values())
        .chain(working_dir.iter())
    {
        check_placeholders(arg, &trial_parameters)?;
    }
    let timeout_seconds = match t.timeout_seconds {
        Some(0) => {
            return Err(Error::config(
                "spec.trialTemplate.timeoutSeconds",
                "must be at least 1",
            ));
        }
        Some(n) => n,
        None => DEFAULT_TRIAL_TIMEOUT,
    };
    Ok(Template {
        trial_parameters,
        command: run.command,
        timeout_seconds,
        env,
        working_dir,
        launch: run.launch,
    })
}
