//! The YAML as written: Katib's `Experiment` fields, read with unknown fields refused, before any
//! value is checked (that is [`super::Experiment::from_yaml`]'s job).

use std::collections::BTreeMap;

use serde::Deserialize;
use tandem_core::{Error, Result};

use super::format_number;

/// A number Katib writes as a string (`"0.01"`) or YAML writes as a number.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub(super) enum Scalar {
    Num(f64),
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
    pub(super) api_version: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) metadata: Option<RawMeta>,
    pub(super) spec: RawSpec,
}

/// `metadata`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMeta {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) labels: Option<BTreeMap<String, String>>,
}

/// `spec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSpec {
    pub(super) objective: RawObjective,
    pub(super) algorithm: RawAlgorithm,
    pub(super) parallel_trial_count: Option<u32>,
    pub(super) max_trial_count: Option<u32>,
    pub(super) max_failed_trial_count: Option<u32>,
    pub(super) early_stopping: Option<RawAlgorithm>,
    pub(super) parameters: Vec<RawParam>,
    pub(super) trial_template: RawTemplate,
    pub(super) metrics_collector_spec: Option<RawCollectorSpec>,
    pub(super) resume_policy: Option<String>,
    pub(super) nas_config: Option<serde_norway::Value>,
}

/// `spec.metricsCollectorSpec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCollectorSpec {
    pub(super) collector: Option<RawCollector>,
    pub(super) source: Option<RawSource>,
}

/// `metricsCollectorSpec.collector`: its kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCollector {
    pub(super) kind: String,
    pub(super) custom_collector: Option<serde_norway::Value>,
}

/// `metricsCollectorSpec.source`: where the metrics are read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSource {
    pub(super) file_system_path: Option<RawPath>,
    pub(super) filter: Option<RawFilter>,
    pub(super) http_get: Option<serde_norway::Value>,
}

/// `source.fileSystemPath`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPath {
    pub(super) path: String,
    pub(super) kind: Option<String>,
    pub(super) format: Option<String>,
}

/// `source.filter`: the expressions a metric line matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFilter {
    pub(super) metrics_format: Option<Vec<String>>,
}

/// `spec.objective`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawObjective {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) goal: Option<f64>,
    pub(super) objective_metric_name: Option<String>,
    pub(super) additional_metric_names: Option<Vec<String>>,
    pub(super) metric_strategies: Option<Vec<RawStrategy>>,
}

/// One of `objective.metricStrategies`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStrategy {
    pub(super) name: String,
    pub(super) value: String,
}

/// `spec.algorithm` or `spec.earlyStopping`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAlgorithm {
    pub(super) algorithm_name: String,
    pub(super) algorithm_settings: Option<Vec<RawSetting>>,
}

/// One of an algorithm's `algorithmSettings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSetting {
    pub(super) name: String,
    pub(super) value: Scalar,
}

/// One of `spec.parameters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawParam {
    pub(super) name: String,
    pub(super) parameter_type: String,
    pub(super) feasible_space: RawSpace,
}

/// A parameter's `feasibleSpace`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpace {
    pub(super) min: Option<Scalar>,
    pub(super) max: Option<Scalar>,
    pub(super) step: Option<Scalar>,
    pub(super) list: Option<Vec<Scalar>>,
    pub(super) distribution: Option<String>,
    pub(super) scale: Option<String>,
}

/// `spec.trialTemplate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTemplate {
    pub(super) trial_parameters: Option<Vec<RawTrialParam>>,
    /// Tandem's shorthand: the trial's command, run as it is.
    pub(super) command: Option<Vec<String>>,
    pub(super) timeout_seconds: Option<u64>,
    pub(super) env: Option<BTreeMap<String, String>>,
    pub(super) working_dir: Option<String>,
    /// Katib's forms: a Kubernetes object (batch/v1 Job, TFJob, PyTorchJob) whose primary
    /// container's command the trial runs, or a ConfigMap holding one.
    pub(super) primary_container_name: Option<String>,
    pub(super) primary_pod_labels: Option<BTreeMap<String, String>>,
    pub(super) trial_spec: Option<serde_norway::Value>,
    pub(super) config_map: Option<serde_norway::Value>,
    pub(super) retain: Option<bool>,
    pub(super) success_condition: Option<String>,
    pub(super) failure_condition: Option<String>,
}

/// One of `trialTemplate.trialParameters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrialParam {
    pub(super) name: String,
    pub(super) reference: String,
    pub(super) description: Option<String>,
}
