#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use super::*;
use crate::spec::Domain;

const BASE: &str = r#"
apiVersion: kubeflow.org/v1beta1
kind: Experiment
metadata: {name: demo}
spec:
  objective: {type: maximize, objectiveMetricName: accuracy, additionalMetricNames: [loss]}
  algorithm: {algorithmName: random, algorithmSettings: [{name: random_state, value: "3"}]}
  parallelTrialCount: 2
  maxTrialCount: 6
  maxFailedTrialCount: 1
  parameters:
    - {name: lr, parameterType: double, feasibleSpace: {min: "0.001", max: "0.1", distribution: logUniform}}
    - {name: batch, parameterType: int, feasibleSpace: {min: 32, max: 256, step: 32}}
    - {name: opt, parameterType: categorical, feasibleSpace: {list: [sgd, adam]}}
    - {name: drop, parameterType: discrete, feasibleSpace: {list: ["0.1", "0.3"]}}
  trialTemplate:
    trialParameters: [{name: learningRate, reference: lr}, {name: batchSize, reference: batch}]
    command: [sh, -c, "echo accuracy=${trialParameters.learningRate}"]
    timeoutSeconds: 60
"#;

fn spec(edit: &[(&str, &str)]) -> String {
    let mut s = BASE.to_string();
    for (from, to) in edit {
        assert!(s.contains(from), "{from}");
        s = s.replacen(from, to, 1);
    }
    s
}

#[test]
fn a_katib_spec_parses() {
    let e = Experiment::from_yaml(BASE).unwrap();
    assert_eq!(
        (e.name.as_str(), e.parallel, e.max_trials, e.max_failed),
        ("demo", 2, 6, 1)
    );
    assert_eq!(e.objective.additional, ["loss"]);
    assert!(matches!(
        e.parameters[0].domain,
        Domain::Double { log: true, .. }
    ));
    assert!(matches!(
        e.parameters[1].domain,
        Domain::Int {
            min: 32,
            max: 256,
            step: 32,
            log: false
        }
    ));
    assert_eq!(e.parameters[3].domain, Domain::Discrete(vec![0.1, 0.3]));
    assert_eq!(e.template.timeout_seconds, 60);
}

#[test]
fn katib_collectors_policies_and_template_forms_are_checked_naming_the_field() {
    const CMD: &str = "    command: [sh, -c, \"echo accuracy=${trialParameters.learningRate}\"]\n";
    let job = "    primaryContainerName: main\n    trialSpec: {kind: Job, spec: {template: {spec: {containers: [{name: main, command: [python3, t.py]}]}}}}\n";
    let ok = |edit: &[(&str, &str)]| Experiment::from_yaml(&spec(edit)).unwrap();
    let err = |edit: &[(&str, &str)]| Experiment::from_yaml(&spec(edit)).unwrap_err().to_string();
    // A File collector, JSON lines.
    let e = ok(&[(
        "  parallelTrialCount: 2\n",
        "  parallelTrialCount: 2\n  metricsCollectorSpec: {collector: {kind: File}, source: {fileSystemPath: {path: m.json, kind: File, format: JSON}}}\n",
    )]);
    assert_eq!(
        e.collector.source,
        crate::metrics::Source::File {
            path: "m.json".into(),
            json: true
        }
    );
    for (edit, field) in [
        (
            "  metricsCollectorSpec: {collector: {kind: File}}\n",
            "fileSystemPath",
        ),
        (
            "  metricsCollectorSpec: {collector: {kind: File}, source: {fileSystemPath: {path: d, kind: Directory}}}\n",
            "fileSystemPath.kind",
        ),
        (
            "  metricsCollectorSpec: {collector: {kind: File}, source: {fileSystemPath: {path: f, format: XML}}}\n",
            "fileSystemPath.format",
        ),
        (
            "  metricsCollectorSpec: {collector: {kind: PrometheusMetric}}\n",
            "collector.kind",
        ),
        (
            "  metricsCollectorSpec: {source: {httpGet: {port: 8080}}}\n",
            "httpGet",
        ),
        (
            "  metricsCollectorSpec: {source: {filter: {metricsFormat: [\"(x\"]}}}\n",
            "metricsFormat[0]",
        ),
        ("  resumePolicy: Sometimes\n", "spec.resumePolicy"),
        ("  nasConfig: {}\n", "spec.nasConfig"),
    ] {
        let e = err(&[(
            "  parallelTrialCount: 2\n",
            &format!("  parallelTrialCount: 2\n{edit}"),
        )]);
        assert!(e.contains(field), "{edit}: {e}");
    }
    assert!(
        ok(&[(
            "  parallelTrialCount: 2\n",
            "  parallelTrialCount: 2\n  resumePolicy: Never\n"
        )])
        .resume_never
    );
    assert!(
        !ok(&[(
            "  parallelTrialCount: 2\n",
            "  parallelTrialCount: 2\n  resumePolicy: LongRunning\n"
        )])
        .resume_never
    );
    // The trial: a Job's primary container, or the command shorthand, never both or neither.
    let e = ok(&[(CMD, job)]);
    assert_eq!(e.template.command, ["python3", "t.py"]);
    assert_eq!(e.template.launch, crate::spec::Launch::Plain);
    assert!(err(&[(CMD, &format!("{CMD}{job}"))]).contains("both trialSpec and command"));
    assert!(err(&[(CMD, "")]).contains("needs a trialSpec"));
    assert!(
        err(&[(
            CMD,
            "    configMap: {configMapName: t, templatePath: x.yaml}\n"
        )])
        .contains("spec.trialTemplate.configMap")
    );
    for (name, what) in [
        ("bayesianoptimization", "Gaussian-process"),
        ("cmaes", "CMA-ES"),
        ("multivariate-tpe", "multivariate"),
    ] {
        let e = err(&[("algorithmName: random", &format!("algorithmName: {name}"))]);
        assert!(e.contains(what) && e.contains("random, grid, tpe"), "{e}");
    }
}

#[test]
fn bad_specs_are_refused_naming_the_field() {
    for (edit, field) in [
        (
            (
                "maxFailedTrialCount: 1",
                "maxFailedTrialCount: 1\n  colour: blue",
            ),
            "colour",
        ),
        (
            ("min: \"0.001\", max: \"0.1\"", "min: \"0.5\", max: \"0.1\""),
            "spec.parameters[0].feasibleSpace.min",
        ),
        (("min: 32, max: 256", "min: 32, max: 32"), "is empty"),
        (
            (
                "min: \"0.001\", max: \"0.1\", distribution: logUniform",
                "min: \"0\", max: \"0.1\", distribution: logUniform",
            ),
            "log scale needs positive",
        ),
        (
            ("objectiveMetricName: accuracy, ", ""),
            "objectiveMetricName",
        ),
        (
            ("list: [sgd, adam]", "list: []"),
            "spec.parameters[2].feasibleSpace.list",
        ),
        (
            ("parameterType: int", "parameterType: float"),
            "spec.parameters[1].parameterType",
        ),
        (
            ("algorithmName: random", "algorithmName: hyperband"),
            "algorithmName",
        ),
        (("type: maximize", "type: best"), "spec.objective.type"),
        (
            ("reference: lr", "reference: learning_rate"),
            "trialParameters[0].reference",
        ),
        (
            (
                "${trialParameters.learningRate}",
                "${trialParameters.momentum}",
            ),
            "${trialParameters.momentum}",
        ),
        (
            ("maxTrialCount: 6", "maxTrialCount: 0"),
            "spec.maxTrialCount",
        ),
        (
            (
                "distribution: logUniform",
                "distribution: logUniform, scale: linear",
            ),
            "disagree",
        ),
    ] {
        let err = Experiment::from_yaml(&spec(&[edit]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{edit:?}: {err}");
    }
    let err = Experiment::from_yaml(&spec(&[(
        "algorithmSettings: [{name: random_state, value: \"3\"}]",
        "algorithmSettings: [{name: seed, value: \"3\"}]",
    )]))
    .and_then(|e| Search::new(&e))
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"seed\" is not a setting"), "{err}");
}

#[test]
fn random_search_stays_in_bounds_uses_the_log_scale_and_repeats_with_its_seed() {
    let e = Experiment::from_yaml(BASE).unwrap();
    let draws: Vec<Assignment> = (0..400)
        .map(|i| search::random(&e.parameters, 3, i))
        .collect();
    let again: Vec<Assignment> = (0..400)
        .map(|i| search::random(&e.parameters, 3, i))
        .collect();
    assert_eq!(draws, again, "same seed, same trials");
    assert_ne!(
        draws,
        (0..400)
            .map(|i| search::random(&e.parameters, 4, i))
            .collect::<Vec<_>>()
    );
    let lrs: Vec<f64> = draws.iter().map(|d| d["lr"].as_f64().unwrap()).collect();
    assert!(lrs.iter().all(|&x| (0.001..=0.1).contains(&x)));
    // Log-uniform: about half the draws fall below the geometric midpoint 0.01.
    let below = lrs.iter().filter(|&&x| x < 0.01).count();
    assert!((150..250).contains(&below), "{below} of 400 below 0.01");
    for d in &draws {
        let b = d["batch"].as_f64().unwrap() as i64;
        assert!((32..=256).contains(&b) && b % 32 == 0, "{b}");
        assert!(matches!(&d["opt"], Value::Text(s) if s == "sgd" || s == "adam"));
    }
    let batches: std::collections::BTreeSet<i64> = draws
        .iter()
        .map(|d| d["batch"].as_f64().unwrap() as i64)
        .collect();
    assert_eq!(batches.len(), 8, "every batch size is drawn: {batches:?}");
}

#[test]
fn grid_search_covers_every_point_once() {
    let text = spec(&[
        (
            "algorithmName: random, algorithmSettings: [{name: random_state, value: \"3\"}]",
            "algorithmName: grid",
        ),
        (
            "min: \"0.001\", max: \"0.1\", distribution: logUniform",
            "min: \"0.1\", max: \"0.3\", step: \"0.1\"",
        ),
    ]);
    let e = Experiment::from_yaml(&text).unwrap();
    let n = search::grid_size(&e.parameters).unwrap();
    assert_eq!(n, 3 * 8 * 2 * 2);
    let points: Vec<Assignment> = (0..n)
        .map(|i| search::grid(&e.parameters, i).unwrap().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<String> =
        points.iter().map(|p| format!("{p:?}")).collect();
    assert_eq!(unique.len() as u64, n);
    assert!(search::grid(&e.parameters, n).unwrap().is_none());
    // A double without a step cannot be gridded.
    let e = Experiment::from_yaml(&spec(&[(
        "algorithmName: random, algorithmSettings: [{name: random_state, value: \"3\"}]",
        "algorithmName: grid",
    )]))
    .unwrap();
    assert!(
        Search::new(&e)
            .unwrap_err()
            .to_string()
            .contains("needs a step")
    );
}

#[test]
fn tpe_concentrates_near_the_optimum() {
    // Objective peaks at lr = 0.01 (log scale); TPE's later proposals should be closer than random's.
    let e =
        Experiment::from_yaml(&spec(&[("algorithmName: random", "algorithmName: tpe")])).unwrap();
    let f = |a: &Assignment| -(a["lr"].as_f64().unwrap().log10() + 2.0).powi(2);
    let mut history = Vec::new();
    let settings = crate::tpe::TpeSettings {
        n_startup_trials: 8,
        ..Default::default()
    };
    for i in 0..40 {
        let a = crate::tpe::suggest(&e.parameters, Goal::Maximize, &history, &[], settings, 1, i);
        history.push(search::Observation {
            objective: f(&a),
            params: a,
        });
    }
    let late: f64 = history[20..].iter().map(|o| o.objective).sum::<f64>() / 20.0;
    let random: f64 = (1000..1100)
        .map(|i| f(&search::random(&e.parameters, 1, i)))
        .sum::<f64>()
        / 100.0;
    assert!(late > random, "tpe {late} vs random {random}");
    // Same seed and history, same proposal.
    let a = crate::tpe::suggest(
        &e.parameters,
        Goal::Maximize,
        &history,
        &[],
        settings,
        1,
        99,
    );
    assert_eq!(
        a,
        crate::tpe::suggest(
            &e.parameters,
            Goal::Maximize,
            &history,
            &[],
            settings,
            1,
            99
        )
    );
    // A trial still running counts as bad: many running at that point push the next one away.
    let running = vec![a.clone(); 20];
    let b = crate::tpe::suggest(
        &e.parameters,
        Goal::Maximize,
        &history,
        &running,
        settings,
        1,
        99,
    );
    assert_ne!(a, b, "parallel trials spread out");
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run_to_end(text: &str, out: &std::path::Path) -> Record {
    let e = Experiment::from_yaml(text).unwrap();
    runner::run(&e, text, out, &|| false, &mut |_, _| {}).unwrap()
}

#[test]
fn an_experiment_runs_every_trial_and_records_the_best() {
    let out = out_dir("all");
    let r = run_to_end(BASE, &out);
    assert_eq!(r.outcome, Outcome::MaxTrialsReached);
    assert_eq!(r.trials.len(), 6);
    assert!(r.trials.iter().all(|t| t.status == Status::Succeeded));
    // Each trial reported its own learning rate as the accuracy.
    for t in &r.trials {
        assert_eq!(t.objective, t.parameters["lr"].as_f64());
    }
    let best = r.best().unwrap();
    let max = r
        .trials
        .iter()
        .filter_map(|t| t.objective)
        .fold(f64::MIN, f64::max);
    assert_eq!(best.objective, Some(max));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("experiment.json")).unwrap())
            .unwrap();
    assert_eq!(json["best"]["trial"], best.name.as_str());
    assert!(
        out.join("trials")
            .join(format!("{}.log", best.name))
            .exists()
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn the_goal_stops_the_experiment() {
    let text = spec(&[
        (
            "objectiveMetricName: accuracy,",
            "objectiveMetricName: accuracy, goal: 0.0005,",
        ),
        ("maxTrialCount: 6", "maxTrialCount: 50"),
    ]);
    let out = out_dir("goal");
    let r = run_to_end(&text, &out);
    assert_eq!(r.outcome, Outcome::GoalReached);
    assert!(r.trials.len() < 50);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn failures_are_counted_with_their_reason_and_end_the_experiment() {
    let text = spec(&[(
        "echo accuracy=${trialParameters.learningRate}",
        "echo no metrics here; exit 0",
    )]);
    let out = out_dir("fail");
    let r = run_to_end(&text, &out);
    assert_eq!(r.outcome, Outcome::Failed);
    let failed: Vec<&Trial> = r
        .trials
        .iter()
        .filter(|t| t.status == Status::Failed)
        .collect();
    assert!(failed.len() >= 2, "{r:?}");
    assert!(
        failed[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("reported no accuracy"),
        "{:?}",
        failed[0].reason
    );
    let text = spec(&[
        ("echo accuracy=${trialParameters.learningRate}", "exit 3"),
        ("maxFailedTrialCount: 1", "maxFailedTrialCount: 10"),
    ]);
    let out2 = out_dir("fail2");
    let r = run_to_end(&text, &out2);
    assert_eq!(r.outcome, Outcome::MaxTrialsReached);
    assert!(
        r.trials
            .iter()
            .all(|t| t.reason.as_deref().unwrap().contains("exited with code 3"))
    );
    let text = spec(&[
        ("echo accuracy=${trialParameters.learningRate}", "sleep 30"),
        ("timeoutSeconds: 60", "timeoutSeconds: 1"),
        ("maxTrialCount: 6", "maxTrialCount: 2"),
    ]);
    let out3 = out_dir("fail3");
    let r = run_to_end(&text, &out3);
    assert!(
        r.trials
            .iter()
            .all(|t| t.reason.as_deref().unwrap().contains("timed out after 1 s")),
        "{r:?}"
    );
    for d in [out, out2, out3] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn an_interrupted_experiment_resumes_without_repeating_finished_trials() {
    let text = spec(&[
        ("maxTrialCount: 6", "maxTrialCount: 5"),
        ("parallelTrialCount: 2", "parallelTrialCount: 1"),
    ]);
    let e = Experiment::from_yaml(&text).unwrap();
    let out = out_dir("resume");
    let done = std::cell::Cell::new(0);
    let r = runner::run(&e, &text, &out, &|| done.get() >= 2, &mut |_, c| {
        if matches!(c, Change::Ended(_)) {
            done.set(done.get() + 1);
        }
    })
    .unwrap();
    assert_eq!(r.outcome, Outcome::Interrupted);
    let first: Vec<Trial> = r
        .trials
        .iter()
        .filter(|t| t.status == Status::Succeeded)
        .cloned()
        .collect();
    assert_eq!(first.len(), 2);
    // Mark the first log so a re-run of that trial would be visible.
    let log = out.join("trials").join(format!("{}.log", first[0].name));
    std::fs::write(&log, "kept\n").unwrap();
    let r = run_to_end(&text, &out);
    assert_eq!(r.outcome, Outcome::MaxTrialsReached);
    assert_eq!(r.trials.len(), 5);
    assert_eq!(
        r.trials[0], first[0],
        "finished trials are kept as they were"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "kept\n",
        "and not run again"
    );
    // A different spec in the same folder is refused.
    let other = spec(&[("maxTrialCount: 6", "maxTrialCount: 7")]);
    let e = Experiment::from_yaml(&other).unwrap();
    let err = runner::run(&e, &other, &out, &|| false, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("different spec"));
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn median_stopping_ends_trials_worse_than_the_median() {
    // Trials 0-2 (sequential) report 1..=6 and succeed; later trials report 0 at every step and
    // would sleep, but are stopped at step 4 because 0 is below the median.
    let text = spec(&[
        (
            "echo accuracy=${trialParameters.learningRate}",
            "if [ ${trialName} = demo-trial-0 ] || [ ${trialName} = demo-trial-1 ] || [ ${trialName} = demo-trial-2 ]; then for s in 1 2 3 4 5 6; do echo step=$s accuracy=$s; done; else for s in 1 2 3 4 5 6; do echo step=$s accuracy=0; sleep 1; done; fi",
        ),
        (
            "parallelTrialCount: 2",
            "parallelTrialCount: 1\n  earlyStopping: {algorithmName: medianstop, algorithmSettings: [{name: min_trials_required, value: \"3\"}, {name: start_step, value: \"2\"}]}",
        ),
        ("maxTrialCount: 6", "maxTrialCount: 4"),
    ]);
    let out = out_dir("median");
    let r = run_to_end(&text, &out);
    assert_eq!(
        r.trials[3].status,
        Status::EarlyStopped,
        "{:?}",
        r.trials[3]
    );
    assert!(r.trials[3].reason.as_deref().unwrap().contains("median"));
    assert!(r.trials[3].seconds < 5.0);
    assert!(r.trials[..3].iter().all(|t| t.status == Status::Succeeded));
    std::fs::remove_dir_all(out).unwrap();
}
