//! The command line of one trial: placeholders substituted, and a distributed trial spec (TFJob,
//! PyTorchJob) wrapped in `tandem launch` with its replicas.
//!
//! Why wrap distributed trials in `tandem launch`: a Katib TFJob or PyTorchJob trial spec names
//! replicas that a cluster would start; on one machine the launcher starts the same processes with
//! the same environment (TF_CONFIG, or RANK and MASTER_ADDR), so the trial's own program runs
//! unchanged. Placeholders are filled before the launcher sees the command, in the servers'
//! command too.

use crate::search::Assignment;
use crate::spec::{Experiment, Launch};
use tandem_launch::Layout;

/// The command a trial runs: its own (a leading `tandem` or `script.py` resolved as
/// [`tandem_launch::resolve_command`] does), or (a TFJob or PyTorchJob trial spec) `tandem launch` with
/// the job's replicas and its command, `tandem` being [`tandem_launch::cli_command`].
pub(crate) fn launched(
    e: &Experiment,
    command: Vec<String>,
    sub: impl Fn(&str) -> String,
) -> Vec<String> {
    let (layout, ps_command) = match &e.template.launch {
        Launch::Plain => return tandem_launch::resolve_command(command),
        Launch::Job { layout, ps_command } => (layout, ps_command),
    };
    let mut layout: Vec<String> = match *layout {
        Layout::Allreduce { nproc } => vec!["--nproc".into(), nproc.to_string()],
        Layout::Ps { ps, workers, chief } => {
            let mut l = vec![
                "--ps".into(),
                ps.to_string(),
                "--workers".into(),
                workers.to_string(),
            ];
            if chief {
                l.push("--chief".into());
            }
            l
        }
    };
    if let Some(c) = ps_command {
        let c: Vec<String> = c.iter().map(|a| sub(a)).collect();
        layout.extend(["--ps-cmd".into(), c.join(" ")]);
    }
    // TANDEM_CLI, this `tandem` binary, or `tandem` from PATH (tandem_launch::cli_command).
    let mut args = tandem_launch::cli_command();
    args.push("launch".into());
    args.extend(layout);
    args.extend(["--no-log-files".into(), "--".into()]);
    args.extend(command);
    args
}

/// `arg` with `${trialName}`, `${experimentName}` and `${trialParameters.X}` filled in for trial
/// `name` with `params`.
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
