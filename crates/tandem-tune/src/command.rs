//! The command line of one trial: placeholders substituted, and a distributed trial spec (TFJob,
//! PyTorchJob) wrapped in `tandem launch` with its replicas.

use crate::search::Assignment;
use crate::spec::{Experiment, Launch};

/// The command a trial runs: its own, or (a TFJob or PyTorchJob trial spec) `tandem launch` with
/// the job's replicas and its command. `TANDEM_CLI` names the `tandem` executable; else this
/// process when it is `tandem` (`tandem tune`), else `tandem` from PATH.
pub(crate) fn launched(
    e: &Experiment,
    command: Vec<String>,
    sub: impl Fn(&str) -> String,
) -> Vec<String> {
    let layout: Vec<String> = match &e.template.launch {
        Launch::Plain => return command,
        Launch::Allreduce { nproc } => vec!["--nproc".into(), nproc.to_string()],
        Launch::Ps {
            ps,
            workers,
            chief,
            ps_command,
        } => {
            let mut l = vec![
                "--ps".into(),
                ps.to_string(),
                "--workers".into(),
                workers.to_string(),
            ];
            if *chief {
                l.push("--chief".into());
            }
            if let Some(c) = ps_command {
                let c: Vec<String> = c.iter().map(|a| sub(a)).collect();
                l.extend(["--ps-cmd".into(), c.join(" ")]);
            }
            l
        }
    };
    let tandem = std::env::var("TANDEM_CLI")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .filter(|p| p.file_stem().is_some_and(|s| s == "tandem"))
                .map_or_else(|| "tandem".into(), |p| p.to_string_lossy().into_owned())
        });
    let mut args = vec![tandem, "launch".into()];
    args.extend(layout);
    args.extend(["--no-log-files".into(), "--".into()]);
    args.extend(command);
    args
}

pub(crate) fn substitute(e: &Experiment, arg: &str, name: &str, params: &Assignment) -> String {
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
