//! The YAML as written: Katib's `Experiment` fields, read with unknown fields refused, before any
//! value is checked (that is [`super::Experiment::from_yaml`]'s job).
//!
//! Why two stages: serde gives precise errors for the YAML's shape (a misspelt key, a list where a
//! mapping belongs); the checks of values that need context (does a trial parameter name a declared
//! parameter?) come after, on these plain structs.

use std::collections::BTreeMap;

use serde::Deserialize;
use tandem_core::{Error, Result};

use super::format_number;

/// A number Katib writes as a string (`"0.01"`) or YAML writes as a number.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub(super) enum Scalar {
    /// A number.
    Num(f64),
    /// Text.
    Str(String),
}

impl Scalar {
    /// The scalar as text (numbers without a needless `.0`).
    pub(super) fn text(&self) -> String {
        match self {
            Scalar::Num(n) => format_number(*n),
            Scalar::Str(s) => s.clone(),
        }
    }
    /// The scalar as a number (a string is parsed), naming `field` when it is not one.
    pub(super) fn number(&self, field: &str) -> Result<f64> {
        match self {
            Scalar::Num(n) => Ok(*n),
            Scalar::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| Error::config(field, format!("{s:?} is not a number"))),
        }
    }
}

/// An Experiment document as YAML gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawDoc {
    /// `apiVersion` (not checked).
    pub(super) api_version: Option<String>,
    /// `kind`: Experiment.
    pub(super) kind: Option<String>,
    /// `metadata`.
    pub(super) metadata: Option<RawMeta>,
    /// `spec`.
    pub(super) spec: RawSpec,
}

/// `metadata`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMeta {
    /// `name`: the experiment's folder.
    pub(super) name: Option<String>,
    /// `namespace` (unused here).
    pub(super) namespace: Option<String>,
    /// `labels` (unused here).
    pub(super) labels: Option<BTreeMap<String, String>>,
}

/// `spec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSpec {
    /// `objective`.
    pub(super) objective: RawObjective,
    /// `algorithm`.
    pub(super) algorithm: RawAlgorithm,
    /// `parallelTrialCount`.
    pub(super) parallel_trial_count: Option<u32>,
    /// `maxTrialCount`.
    pub(super) max_trial_count: Option<u32>,
    /// `maxFailedTrialCount`.
    pub(super) max_failed_trial_count: Option<u32>,
    /// `earlyStopping`.
    pub(super) early_stopping: Option<RawAlgorithm>,
    /// `parameters`.
    pub(super) parameters: Vec<RawParam>,
    /// `trialTemplate`.
    pub(super) trial_template: RawTemplate,
    /// `metricsCollectorSpec`.
    pub(super) metrics_collector_spec: Option<RawCollectorSpec>,
    /// `resumePolicy`.
    pub(super) resume_policy: Option<String>,
    /// `nasConfig` (refused).
    pub(super) nas_config: Option<serde_norway::Value>,
}

/// `spec.metricsCollectorSpec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCollectorSpec {
    /// `collector`.
    pub(super) collector: Option<RawCollector>,
    /// `source`.
    pub(super) source: Option<RawSource>,
}

/// `metricsCollectorSpec.collector`: its kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCollector {
    /// `kind`: StdOut, File, ...
    pub(super) kind: String,
    /// `customCollector` (refused).
    pub(super) custom_collector: Option<serde_norway::Value>,
}

/// `metricsCollectorSpec.source`: where the metrics are read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSource {
    /// `fileSystemPath`.
    pub(super) file_system_path: Option<RawPath>,
    /// `filter`.
    pub(super) filter: Option<RawFilter>,
    /// `httpGet` (refused).
    pub(super) http_get: Option<serde_norway::Value>,
}

/// `source.fileSystemPath`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPath {
    /// `path`.
    pub(super) path: String,
    /// `kind`: File or Directory.
    pub(super) kind: Option<String>,
    /// `format`: TEXT or JSON.
    pub(super) format: Option<String>,
}

/// `source.filter`: the expressions a metric line matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFilter {
    /// `metricsFormat`: regular expressions.
    pub(super) metrics_format: Option<Vec<String>>,
}

/// `spec.objective`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawObjective {
    /// `type`: maximize or minimize.
    #[serde(rename = "type")]
    pub(super) kind: String,
    /// `goal`: stop once reached.
    pub(super) goal: Option<f64>,
    /// `objectiveMetricName`.
    pub(super) objective_metric_name: Option<String>,
    /// `additionalMetricNames`.
    pub(super) additional_metric_names: Option<Vec<String>>,
    /// `metricStrategies`.
    pub(super) metric_strategies: Option<Vec<RawStrategy>>,
}

/// One of `objective.metricStrategies`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStrategy {
    /// The metric.
    pub(super) name: String,
    /// min, max or latest.
    pub(super) value: String,
}

/// `spec.algorithm` or `spec.earlyStopping`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAlgorithm {
    /// `algorithmName`.
    pub(super) algorithm_name: String,
    /// `algorithmSettings`.
    pub(super) algorithm_settings: Option<Vec<RawSetting>>,
}

/// One of an algorithm's `algorithmSettings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSetting {
    /// The setting.
    pub(super) name: String,
    /// Its value.
    pub(super) value: Scalar,
}

/// One of `spec.parameters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawParam {
    /// `name`.
    pub(super) name: String,
    /// `parameterType`: double, int, categorical or discrete.
    pub(super) parameter_type: String,
    /// `feasibleSpace`.
    pub(super) feasible_space: RawSpace,
}

/// A parameter's `feasibleSpace`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpace {
    /// `min`.
    pub(super) min: Option<Scalar>,
    /// `max`.
    pub(super) max: Option<Scalar>,
    /// `step`.
    pub(super) step: Option<Scalar>,
    /// `list`.
    pub(super) list: Option<Vec<Scalar>>,
    /// `distribution`: uniform or logUniform.
    pub(super) distribution: Option<String>,
    /// `scale`: linear or log.
    pub(super) scale: Option<String>,
}

/// `spec.trialTemplate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTemplate {
    /// `trialParameters`.
    pub(super) trial_parameters: Option<Vec<RawTrialParam>>,
    /// Tandem's shorthand: the trial's command, run as it is.
    pub(super) command: Option<Vec<String>>,
    /// `timeoutSeconds` (Tandem's).
    pub(super) timeout_seconds: Option<u64>,
    /// `env` (Tandem's).
    pub(super) env: Option<BTreeMap<String, String>>,
    /// `workingDir` (Tandem's).
    pub(super) working_dir: Option<String>,
    /// Katib's forms: a Kubernetes object (batch/v1 Job, TFJob, PyTorchJob) whose primary
    /// container's command the trial runs, or a ConfigMap holding one.
    pub(super) primary_container_name: Option<String>,
    /// `primaryPodLabels` (unused here).
    pub(super) primary_pod_labels: Option<BTreeMap<String, String>>,
    /// `trialSpec`.
    pub(super) trial_spec: Option<serde_norway::Value>,
    /// `configMap` (refused).
    pub(super) config_map: Option<serde_norway::Value>,
    /// `retain` (unused here).
    pub(super) retain: Option<bool>,
    /// `successCondition` (unused here).
    pub(super) success_condition: Option<String>,
    /// `failureCondition` (unused here).
    pub(super) failure_condition: Option<String>,
}

/// One of `trialTemplate.trialParameters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrialParam {
    /// `name`: the placeholder's name.
    pub(super) name: String,
    /// `reference`: the parameter.
    pub(super) reference: String,
    /// `description`.
    pub(super) description: Option<String>,
}
