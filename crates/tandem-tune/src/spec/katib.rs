//! Katib's trial templates, run locally: a `trialSpec` (a batch/v1 Job, or a Kubeflow TFJob or
//! PyTorchJob for a distributed trial) or a `configMap`. What a trial runs is the primary
//! container's `command` and `args`, with its `env` and `workingDir`; a distributed trial's
//! replica counts become a local `tandem launch` layout ([`Launch`]). Everything that only a
//! cluster can do is refused, naming the field: an image with no command (its entrypoint is in the
//! image), values read from Secrets or ConfigMaps, other kinds of jobs.

use std::collections::BTreeMap;

use serde_norway::Value;
use tandem_core::{Error, Result};
use tandem_launch::Layout;

/// How a trial's command is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// As it is (a batch/v1 Job, or the `command` shorthand).
    Plain,
    /// Under `tandem launch` with the replicas of a PyTorchJob or TFJob.
    Job {
        /// The job's shape (`--nproc N`, or `--ps P --workers W [--chief]`).
        layout: Layout,
        /// The servers' command, when it is not the workers' (`--ps-cmd`).
        ps_command: Option<Vec<String>>,
    },
}

impl Launch {
    /// `tandem launch --nproc n`.
    pub fn allreduce(nproc: usize) -> Launch {
        Launch::Job {
            layout: Layout::Allreduce { nproc },
            ps_command: None,
        }
    }
}

/// What one trial runs, read off a trial spec.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialRun {
    /// Command and arguments (with `${trialParameters.*}` placeholders).
    pub command: Vec<String>,
    /// The container's environment.
    pub env: BTreeMap<String, String>,
    /// The container's working directory.
    pub working_dir: Option<String>,
    /// Local or distributed.
    pub launch: Launch,
}

/// The field every error about a trial spec names.
const FIELD: &str = "spec.trialTemplate.trialSpec";

/// Field `key` of a YAML mapping.
fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping()?.get(Value::String(key.into()))
}

/// The value at `keys`, one mapping after another.
fn path<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(v, |v, k| get(v, k))
}

/// A list of strings (a container's `command` or `args`), naming `field` when it is not one.
fn strings(v: Option<&Value>, field: &str) -> Result<Vec<String>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let seq = v
        .as_sequence()
        .ok_or_else(|| Error::config(field, "is not a list"))?;
    seq.iter()
        .map(|x| match x {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(Error::config(field, format!("{x:?} is not a string"))),
        })
        .collect()
}

/// Reads the primary container of `pod` (a pod template's `spec`) at `field`.
fn container(pod: &Value, primary: Option<&str>, field: &str) -> Result<TrialRun> {
    let containers = get(pod, "containers")
        .and_then(Value::as_sequence)
        .ok_or_else(|| Error::config(format!("{field}.containers"), "is missing"))?;
    let named = |c: &Value| get(c, "name").and_then(Value::as_str).map(str::to_string);
    let (i, c) = match primary {
        Some(p) => containers
            .iter()
            .enumerate()
            .find(|(_, c)| named(c).as_deref() == Some(p))
            .ok_or_else(|| {
                let names: Vec<String> = containers.iter().filter_map(named).collect();
                Error::config(
                    "spec.trialTemplate.primaryContainerName",
                    format!("{p:?} names no container of {field} (it has {names:?})"),
                )
            })?,
        None if containers.len() == 1 => (0, &containers[0]),
        None => {
            return Err(Error::config(
                "spec.trialTemplate.primaryContainerName",
                format!("is missing and {field} has {} containers", containers.len()),
            ));
        }
    };
    let field = format!("{field}.containers[{i}]");
    let mut command = strings(get(c, "command"), &format!("{field}.command"))?;
    if command.is_empty() {
        return Err(Error::config(
            format!("{field}.command"),
            "is missing: the image's own entrypoint cannot run outside a container; give the command the trial runs",
        ));
    }
    command.extend(strings(get(c, "args"), &format!("{field}.args"))?);
    let mut env = BTreeMap::new();
    if let Some(list) = get(c, "env").and_then(Value::as_sequence) {
        for (j, e) in list.iter().enumerate() {
            let name = get(e, "name")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::config(format!("{field}.env[{j}].name"), "is missing"))?;
            if get(e, "valueFrom").is_some() {
                return Err(Error::config(
                    format!("{field}.env[{j}].valueFrom"),
                    format!(
                        "{name} is read from the cluster (a Secret, a ConfigMap or a field), which a local trial cannot do; give it a value"
                    ),
                ));
            }
            let value = match get(e, "value") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                None | Some(Value::Null) => String::new(),
                Some(other) => {
                    return Err(Error::config(
                        format!("{field}.env[{j}].value"),
                        format!("{other:?} is not a string"),
                    ));
                }
            };
            env.insert(name.to_string(), value);
        }
    }
    if get(c, "envFrom").is_some() {
        return Err(Error::config(
            format!("{field}.envFrom"),
            "reads variables from the cluster, which a local trial cannot do",
        ));
    }
    let working_dir = get(c, "workingDir")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(TrialRun {
        command,
        env,
        working_dir,
        launch: Launch::Plain,
    })
}

/// The replicas of a distributed job: (role, count, its primary container).
fn replicas(
    specs: &Value,
    field: &str,
    primary: Option<&str>,
) -> Result<Vec<(String, usize, TrialRun)>> {
    let map = specs
        .as_mapping()
        .ok_or_else(|| Error::config(field, "is not a map of replica types"))?;
    let mut out = Vec::new();
    for (role, spec) in map {
        let role = role
            .as_str()
            .ok_or_else(|| Error::config(field, "a replica type is not a string"))?;
        let f = format!("{field}.{role}");
        let count = match get(spec, "replicas") {
            None => 1,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n <= 64)
                .ok_or_else(|| {
                    Error::config(
                        format!("{f}.replicas"),
                        format!("{v:?} is not a count from 0 to 64"),
                    )
                })?,
        };
        let pod = path(spec, &["template", "spec"])
            .ok_or_else(|| Error::config(format!("{f}.template.spec"), "is missing"))?;
        let run = container(pod, primary, &format!("{f}.template.spec"))?;
        out.push((role.to_string(), count, run));
    }
    Ok(out)
}

/// What a trial of `trial_spec` runs locally.
pub fn trial_run(trial_spec: &Value, primary: Option<&str>) -> Result<TrialRun> {
    let kind = get(trial_spec, "kind")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::config(format!("{FIELD}.kind"), "is missing"))?;
    match kind {
        "Job" => {
            let pod = path(trial_spec, &["spec", "template", "spec"]).ok_or_else(|| {
                Error::config(format!("{FIELD}.spec.template.spec"), "is missing")
            })?;
            container(pod, primary, &format!("{FIELD}.spec.template.spec"))
        }
        "PyTorchJob" => {
            let field = format!("{FIELD}.spec.pytorchReplicaSpecs");
            let specs = path(trial_spec, &["spec", "pytorchReplicaSpecs"])
                .ok_or_else(|| Error::config(&field, "is missing"))?;
            let reps = replicas(specs, &field, primary)?;
            let nproc: usize = reps.iter().map(|(_, n, _)| n).sum();
            let mut run = one_command(&reps, &field)?;
            run.launch = Launch::allreduce(nproc.max(1));
            Ok(run)
        }
        "TFJob" => {
            let field = format!("{FIELD}.spec.tfReplicaSpecs");
            let specs = path(trial_spec, &["spec", "tfReplicaSpecs"])
                .ok_or_else(|| Error::config(&field, "is missing"))?;
            tf_job(replicas(specs, &field, primary)?, &field)
        }
        other => Err(Error::config(
            format!("{FIELD}.kind"),
            format!(
                "{other:?} cannot run as a local trial: tandem tune runs a batch/v1 Job, a TFJob or a PyTorchJob"
            ),
        )),
    }
}

/// A TFJob's replicas as one local launch: an allreduce job without parameter servers, else a
/// parameter-server job of its PS, Worker and Chief/Master replicas.
fn tf_job(reps: Vec<(String, usize, TrialRun)>, field: &str) -> Result<TrialRun> {
    let count = |roles: &[&str]| -> usize {
        reps.iter()
            .filter(|(r, _, _)| roles.iter().any(|x| r.eq_ignore_ascii_case(x)))
            .map(|(_, n, _)| n)
            .sum()
    };
    for (role, _, _) in &reps {
        if !["ps", "worker", "chief", "master"]
            .iter()
            .any(|x| role.eq_ignore_ascii_case(x))
        {
            return Err(Error::config(
                format!("{field}.{role}"),
                "is not a replica type tandem launch can start (PS, Worker, Chief, Master)",
            ));
        }
    }
    let (ps, workers, chief) = (
        count(&["ps"]),
        count(&["worker"]),
        count(&["chief", "master"]),
    );
    if chief > 1 {
        return Err(Error::config(field, "has more than one Chief/Master"));
    }
    let trainers: Vec<_> = reps
        .iter()
        .filter(|(r, _, _)| !r.eq_ignore_ascii_case("ps"))
        .cloned()
        .collect();
    let mut run = one_command(&trainers, field)?;
    if ps == 0 {
        run.launch = Launch::allreduce((workers + chief).max(1));
        return Ok(run);
    }
    if workers == 0 {
        return Err(Error::config(
            format!("{field}.Worker"),
            "is missing: a job with parameter servers needs workers",
        ));
    }
    let ps_run = reps
        .iter()
        .find(|(r, _, _)| r.eq_ignore_ascii_case("ps"))
        .map(|(_, _, run)| run.command.clone());
    let ps_command = ps_run.filter(|c| *c != run.command);
    run.launch = Launch::Job {
        layout: Layout::Ps {
            ps,
            workers,
            chief: chief == 1,
        },
        ps_command,
    };
    Ok(run)
}

/// The command every trainer replica runs (they must agree: one command for the whole job).
fn one_command(reps: &[(String, usize, TrialRun)], field: &str) -> Result<TrialRun> {
    let mut it = reps.iter().filter(|(_, n, _)| *n > 0);
    let (_, _, first) = it
        .next()
        .ok_or_else(|| Error::config(field, "has no replica to run"))?;
    for (role, _, run) in it {
        if run.command != first.command {
            return Err(Error::config(
                format!("{field}.{role}"),
                "runs another command than the other replicas; a local trial runs one command in every process",
            ));
        }
    }
    Ok(first.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_norway::from_str(s).expect("yaml")
    }

    #[test]
    fn a_job_runs_its_primary_container_with_its_env_and_working_dir() {
        let spec = yaml(
            r#"
apiVersion: batch/v1
kind: Job
spec:
  template:
    spec:
      containers:
        - name: sidecar
          image: x
          command: [sleep, "1"]
        - name: training-container
          image: y
          command: [python3, train.py]
          args: ["--lr=${trialParameters.learningRate}"]
          env: [{name: SEED, value: "7"}, {name: N, value: 3}]
          workingDir: /work
      restartPolicy: Never
"#,
        );
        let run = trial_run(&spec, Some("training-container")).expect("job");
        assert_eq!(
            run.command,
            [
                "python3",
                "train.py",
                "--lr=${trialParameters.learningRate}"
            ]
        );
        assert_eq!(run.env.get("SEED").map(String::as_str), Some("7"));
        assert_eq!(run.env.get("N").map(String::as_str), Some("3"));
        assert_eq!(run.working_dir.as_deref(), Some("/work"));
        assert_eq!(run.launch, Launch::Plain);
        let e = trial_run(&spec, Some("nope")).expect_err("no such container");
        assert!(e.to_string().contains("primaryContainerName"), "{e}");
        let e = trial_run(&spec, None).expect_err("two containers, none named");
        assert!(e.to_string().contains("2 containers"), "{e}");
    }

    #[test]
    fn what_only_a_cluster_can_do_is_refused_naming_the_field() {
        let no_command = yaml(
            "kind: Job\nspec: {template: {spec: {containers: [{name: c, image: mnist:latest}]}}}",
        );
        let e = trial_run(&no_command, Some("c")).expect_err("image only");
        assert!(e.to_string().contains("containers[0].command"), "{e}");
        let secret = yaml(
            "kind: Job\nspec: {template: {spec: {containers: [{name: c, command: [x], env: [{name: K, valueFrom: {secretKeyRef: {name: s, key: k}}}]}]}}}",
        );
        let e = trial_run(&secret, Some("c")).expect_err("secret");
        assert!(e.to_string().contains("env[0].valueFrom"), "{e}");
        let mpi = yaml("kind: MPIJob\nspec: {}");
        let e = trial_run(&mpi, None).expect_err("mpijob");
        assert!(
            e.to_string().contains("MPIJob") && e.to_string().contains("kind"),
            "{e}"
        );
    }

    #[test]
    fn distributed_jobs_become_local_launch_layouts() {
        let tf = yaml(
            r#"
kind: TFJob
spec:
  tfReplicaSpecs:
    Worker:
      replicas: 2
      template: {spec: {containers: [{name: tensorflow, command: [python, mnist.py, "--lr=${trialParameters.learningRate}"]}]}}
"#,
        );
        let run = trial_run(&tf, Some("tensorflow")).expect("tfjob");
        assert_eq!(run.launch, Launch::allreduce(2));
        let ps = yaml(
            r#"
kind: TFJob
spec:
  tfReplicaSpecs:
    PS: {replicas: 1, template: {spec: {containers: [{name: tensorflow, command: [tandem, ps]}]}}}
    Worker: {replicas: 3, template: {spec: {containers: [{name: tensorflow, command: [python, w.py]}]}}}
    Chief: {replicas: 1, template: {spec: {containers: [{name: tensorflow, command: [python, w.py]}]}}}
"#,
        );
        let run = trial_run(&ps, Some("tensorflow")).expect("ps tfjob");
        assert_eq!(
            run.launch,
            Launch::Job {
                layout: Layout::Ps {
                    ps: 1,
                    workers: 3,
                    chief: true,
                },
                ps_command: Some(vec!["tandem".into(), "ps".into()])
            }
        );
        assert_eq!(run.command, ["python", "w.py"]);
        let torch = yaml(
            r#"
kind: PyTorchJob
spec:
  pytorchReplicaSpecs:
    Master: {replicas: 1, template: {spec: {containers: [{name: pytorch, command: [python, m.py]}]}}}
    Worker: {replicas: 2, template: {spec: {containers: [{name: pytorch, command: [python, m.py]}]}}}
"#,
        );
        let run = trial_run(&torch, Some("pytorch")).expect("pytorchjob");
        assert_eq!(run.launch, Launch::allreduce(3));
        let split = yaml(
            r#"
kind: PyTorchJob
spec:
  pytorchReplicaSpecs:
    Master: {replicas: 1, template: {spec: {containers: [{name: pytorch, command: [python, a.py]}]}}}
    Worker: {replicas: 2, template: {spec: {containers: [{name: pytorch, command: [python, b.py]}]}}}
"#,
        );
        let e = trial_run(&split, Some("pytorch")).expect_err("two commands");
        assert!(e.to_string().contains("another command"), "{e}");
        let big = yaml(
            "kind: PyTorchJob\nspec: {pytorchReplicaSpecs: {Worker: {replicas: 65, template: {spec: {containers: [{name: p, command: [x]}]}}}}}",
        );
        assert!(trial_run(&big, Some("p")).is_err());
    }
}
