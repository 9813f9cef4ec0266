//! The checks of single fields of an experiment spec: its name, search and early-stopping
//! algorithms, parameters, resume policy, and the trial template's parameters and placeholders.
//!
//! Why one function per field: each check names exactly the field it reads, so an error points
//! at one line of the user's YAML.

use tandem_core::{Error, Result};

use super::raw::{RawAlgorithm, RawParam, RawTrialParam};
use super::{ALGORITHMS, AlgorithmSpec, Parameter, UNSUPPORTED, domain, parse_algorithm};

/// `trialTemplate.trialParameters`: (name, parameter) pairs, each naming a declared parameter.
pub(super) fn trial_parameters(
    raw: Vec<RawTrialParam>,
    params: &[Parameter],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, tp) in raw.into_iter().enumerate() {
        let _ = tp.description;
        if !params.iter().any(|p| p.name == tp.reference) {
            return Err(Error::config(
                format!("spec.trialTemplate.trialParameters[{i}].reference"),
                format!("{:?} is not a parameter of spec.parameters", tp.reference),
            ));
        }
        out.push((tp.name, tp.reference));
    }
    Ok(out)
}

/// Checks that every `${...}` of `arg` names a trial parameter, `trialName` or `experimentName`.
pub(super) fn check_placeholders(arg: &str, trial_parameters: &[(String, String)]) -> Result<()> {
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            Error::config(
                "spec.trialTemplate.command",
                format!("unclosed placeholder in {arg:?}"),
            )
        })?;
        let key = &after[..end];
        let ok = match key.strip_prefix("trialParameters.") {
            Some(n) => trial_parameters.iter().any(|(name, _)| name == n),
            None => key == "trialName" || key == "experimentName",
        };
        if !ok {
            return Err(Error::config(
                "spec.trialTemplate.command",
                format!(
                    "placeholder ${{{key}}} names no trial parameter (declare it in trialParameters)"
                ),
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// `metadata.name`, which names the experiment's folder (default `experiment`).
pub(super) fn experiment_name(name: Option<String>) -> Result<String> {
    let name = name.unwrap_or_else(|| "experiment".into());
    if name.is_empty() || name.contains('/') {
        return Err(Error::config(
            "metadata.name",
            format!("{name:?} cannot name a folder"),
        ));
    }
    Ok(name)
}

/// `spec.algorithm`: one of [`ALGORITHMS`]; Katib's others are named as unsupported.
pub(super) fn search_algorithm(raw: RawAlgorithm) -> Result<AlgorithmSpec> {
    let algorithm = parse_algorithm("spec.algorithm", raw)?;
    if let Some((_, what)) = UNSUPPORTED.iter().find(|(n, _)| *n == algorithm.name) {
        return Err(Error::config(
            "spec.algorithm.algorithmName",
            format!(
                "{:?} ({what}) is a Katib algorithm tandem tune does not implement; use one of {}",
                algorithm.name,
                ALGORITHMS.join(", ")
            ),
        ));
    }
    if !ALGORITHMS.contains(&algorithm.name.as_str()) {
        return Err(Error::config(
            "spec.algorithm.algorithmName",
            format!(
                "{:?} is not one of {}",
                algorithm.name,
                ALGORITHMS.join(", ")
            ),
        ));
    }
    Ok(algorithm)
}

/// `spec.earlyStopping`: medianstop only.
pub(super) fn early_stopping(raw: RawAlgorithm) -> Result<AlgorithmSpec> {
    let a = parse_algorithm("spec.earlyStopping", raw)?;
    if a.name != "medianstop" {
        return Err(Error::config(
            "spec.earlyStopping.algorithmName",
            format!("{:?} is not medianstop", a.name),
        ));
    }
    Ok(a)
}

/// `spec.parameters`: at least one, each named once, each with a valid space.
pub(super) fn parameters(raw: Vec<RawParam>) -> Result<Vec<Parameter>> {
    if raw.is_empty() {
        return Err(Error::config(
            "spec.parameters",
            "is empty: nothing to search",
        ));
    }
    let mut parameters = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let field = format!("spec.parameters[{i}]");
        if p.name.is_empty() {
            return Err(Error::config(format!("{field}.name"), "is empty"));
        }
        if parameters.iter().any(|q: &Parameter| q.name == p.name) {
            return Err(Error::config(
                format!("{field}.name"),
                format!("{:?} is declared twice", p.name),
            ));
        }
        let domain = domain(&field, &p.parameter_type, p.feasible_space)?;
        parameters.push(Parameter {
            name: p.name,
            domain,
        });
    }
    Ok(parameters)
}

/// `spec.resumePolicy`: whether it is `Never`.
pub(super) fn resume_never(policy: Option<&str>) -> Result<bool> {
    match policy {
        None | Some("LongRunning") | Some("FromVolume") => Ok(false),
        Some("Never") => Ok(true),
        Some(other) => Err(Error::config(
            "spec.resumePolicy",
            format!("{other:?} is not Never, LongRunning or FromVolume"),
        )),
    }
}
