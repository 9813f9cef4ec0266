//! `tandem tune`: the repository's example experiment finds settings that beat the demo's
//! defaults, a bad spec is refused before any trial, and Katib's own experiment files (copies in
//! tests/katib/, the trial command pointed at the stand-in trainer `mnist.py`) run: the random, grid and TPE searches with a batch/v1 Job
//! trial spec, median stopping, a TFJob trial spec run as a local two-process job, Katib's File
//! collector with JSON lines and a metric strategy; Bayesian optimization and TensorFlow event
//! files are refused, naming the field.

use std::path::{Path, PathBuf};
use std::process::Output;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/katib");

/// A Katib example with its trainer pointed at the local stand-in.
fn example(name: &str) -> String {
    let trainer = format!("{DIR}/mnist.py");
    std::fs::read_to_string(Path::new(DIR).join(name))
        .expect("fixture")
        .replace("/opt/mxnet-mnist/mnist.py", &trainer)
        .replace("/opt/tf-mnist-with-summaries/mnist.py", &trainer)
        .replace("- \"python\"\n", "- \"python3\"\n")
}

/// Runs `tandem tune` on `spec` in a fresh folder; returns its output and, if written, the record.
fn tune(label: &str, spec: &str) -> (Output, Option<serde_json::Value>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("tandem-katib-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("experiment.yaml"), spec).expect("spec");
    let (out, record) = tune_in(&dir);
    (out, record, dir)
}

/// Runs `tandem tune` on `dir/experiment.yaml`, writing to `dir/out`.
fn tune_in(dir: &Path) -> (Output, Option<serde_json::Value>) {
    let out_dir = dir.join("out");
    let out = std::process::Command::new(TANDEM)
        .args([
            "tune",
            &dir.join("experiment.yaml").to_string_lossy(),
            "--out",
            &out_dir.to_string_lossy(),
        ])
        .current_dir(dir)
        .env("TANDEM_CLI", TANDEM)
        .output()
        .expect("tandem tune");
    let record = std::fs::read_to_string(out_dir.join("experiment.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    (out, record)
}

#[test]
fn tune_example_finds_settings_that_beat_the_defaults() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/tune/experiment.yaml"
    ))
    .expect("the example")
    .replace("target/release/tandem", TANDEM);
    let (out, record, dir) = tune("example", &yaml);
    let record = finished("example", &out, record);
    let best = record["best"]["objective"].as_f64().expect("a best trial");
    for png in ["objective.png", "param-lr.png", "param-batch_size.png"] {
        let bytes = std::fs::read(dir.join("out").join(png)).expect("png");
        assert_eq!(&bytes[1..4], b"PNG");
    }
    // The demo's default settings, trained the same way.
    let default = std::process::Command::new(TANDEM)
        .args([
            "demo",
            "--mode",
            "allreduce",
            "--workers",
            "2",
            "--steps",
            "300",
        ])
        .output()
        .expect("tandem demo");
    let text = String::from_utf8_lossy(&default.stdout);
    let acc: f64 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("accuracy=")?.parse().ok())
        .expect("default accuracy");
    assert!(
        best > acc,
        "best trial {best} does not beat the defaults' {acc}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tune_rejects_a_bad_spec_before_any_trial() {
    let spec = "spec:\n  objective: {type: maximize}\n  algorithm: {algorithmName: random}\n  parameters: []\n  trialTemplate: {command: [\"true\"]}\n";
    let (out, record, dir) = tune("bad", spec);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("objectiveMetricName"));
    assert!(record.is_none() && !dir.join("out").exists(), "nothing ran");
    let _ = std::fs::remove_dir_all(dir);
}

fn trials(record: &serde_json::Value) -> &Vec<serde_json::Value> {
    record["trials"].as_array().expect("trials")
}

fn status_count(record: &serde_json::Value, status: &str) -> usize {
    trials(record)
        .iter()
        .filter(|t| t["status"].as_str() == Some(status))
        .count()
}

/// Every trial's parameters lie in the Katib example's feasible space.
fn check_space(record: &serde_json::Value, lr: (f64, f64)) {
    for t in trials(record) {
        let p = &t["parameters"];
        let v = p["lr"]
            .as_f64()
            .or_else(|| p["lr"].as_str().and_then(|s| s.parse().ok()));
        let v = v.unwrap_or_else(|| panic!("lr of {t}"));
        assert!((lr.0..=lr.1).contains(&v), "lr {v} outside {lr:?}");
        let layers = p["num-layers"]
            .as_f64()
            .or_else(|| p["num-layers"].as_str().and_then(|s| s.parse().ok()));
        let layers = layers.unwrap_or_else(|| panic!("num-layers of {t}"));
        assert!(
            layers.fract() == 0.0 && (2.0..=5.0).contains(&layers),
            "{layers}"
        );
        let opt = p["optimizer"].as_str().unwrap_or_default();
        assert!(["sgd", "adam", "ftrl"].contains(&opt), "{opt}");
    }
}

/// The record of an experiment `tandem tune` finished (exit 0) with at least one trial succeeded.
fn finished(name: &str, out: &Output, record: Option<serde_json::Value>) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{name}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let record = record.expect("experiment.json");
    assert!(status_count(&record, "Succeeded") >= 1, "{record}");
    record
}

fn ran(label: &str, name: &str) -> (serde_json::Value, PathBuf) {
    let (out, record, dir) = tune(label, &example(name));
    let record = finished(name, &out, record);
    let best = record["best"]["objective"].as_f64().expect("a best trial");
    assert!(best > 0.3, "{record}");
    (record, dir)
}

#[test]
fn katibs_random_grid_and_tpe_examples_run_unchanged() {
    let (r, dir) = ran("random", "random.yaml");
    check_space(&r, (0.01, 0.03));
    assert_eq!(trials(&r).len(), 12);
    let _ = std::fs::remove_dir_all(dir);
    let (r, dir) = ran("tpe", "tpe.yaml");
    check_space(&r, (0.01, 0.03));
    let _ = std::fs::remove_dir_all(dir);
    let (r, dir) = ran("grid", "grid.yaml");
    check_space(&r, (0.001, 0.01));
    for t in trials(&r) {
        let lr = t["parameters"]["lr"].as_f64().expect("lr");
        let steps = lr / 0.001;
        assert!(
            (steps - steps.round()).abs() < 1e-6,
            "{lr} is not on the 0.001 grid"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn katibs_median_stop_example_stops_trials_early() {
    let (r, dir) = ran("median", "median-stop.yaml");
    assert!(
        status_count(&r, "EarlyStopped") >= 1,
        "no trial was stopped early: {r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn katibs_bayesian_optimization_example_is_refused_naming_the_algorithm() {
    let (out, record, dir) = tune("bayes", &example("bayesian-optimization.yaml"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("spec.algorithm.algorithmName")
            && err.contains("bayesianoptimization")
            && err.contains("random, grid, tpe"),
        "{err}"
    );
    assert!(record.is_none(), "nothing ran");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn katibs_tfjob_example_runs_as_a_local_two_process_job() {
    let original = example("tfjob-mnist-with-summaries.yaml");
    let (out, _, dir) = tune("tfjob-events", &original);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("spec.metricsCollectorSpec.collector.kind") && err.contains("TensorFlowEvent"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
    // Without the TensorFlow event collector (metrics from the output), as a StdOut experiment.
    let start = original.find("  metricsCollectorSpec:").expect("collector");
    let end = original.find("  parameters:").expect("parameters");
    let stdout = format!("{}{}", &original[..start], &original[end..]);
    let (out, record, dir) = tune("tfjob", &stdout);
    finished("tfjob", &out, record);
    // Each trial ran two processes through tandem launch.
    let log =
        std::fs::read_to_string(dir.join("out/trials/tfjob-mnist-with-summaries-trial-0.log"))
            .expect("trial log");
    assert!(
        log.contains(" launch ") && log.contains("--nproc 2"),
        "{log}"
    );
    assert!(
        log.contains("[worker 0]") && log.contains("[worker 1]"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_file_collector_reads_json_lines_with_the_latest_value_as_objective() {
    // Katib's File collector (JSON lines), a metric strategy and a resume policy, on random.yaml.
    let spec = example("random.yaml")
        .replace(
            "    objectiveMetricName: Validation-accuracy\n",
            "    objectiveMetricName: File-accuracy\n    metricStrategies:\n      - {name: File-accuracy, value: latest}\n",
        )
        .replace(
            "  parallelTrialCount: 3\n",
            "  resumePolicy: Never\n  metricsCollectorSpec:\n    collector: {kind: File}\n    source:\n      fileSystemPath: {path: \"metrics-${trialName}.json\", kind: File, format: JSON}\n  parallelTrialCount: 3\n",
        )
        .replace(
            "            restartPolicy: Never\n",
            "                env: [{name: METRICS_FILE, value: \"metrics-${trialName}.json\"}]\n            restartPolicy: Never\n",
        )
        .replace("maxTrialCount: 12", "maxTrialCount: 3");
    let (out, record, dir) = tune("file", &spec);
    let record = finished("file", &out, record);
    assert_eq!(status_count(&record, "Succeeded"), 3, "{record}");
    for t in trials(&record) {
        // Latest: the last epoch's (the highest: the stand-in's accuracy rises with the epochs).
        let file = dir.join(format!("metrics-random-trial-{}.json", t["index"]));
        let text = std::fs::read_to_string(&file).expect("metrics file");
        let last: serde_json::Value =
            serde_json::from_str(text.lines().last().expect("a line")).expect("json");
        let want: f64 = last["File-accuracy"]
            .as_str()
            .expect("value")
            .parse()
            .expect("number");
        assert_eq!(t["objective"].as_f64(), Some(want), "{t}");
    }
    // resumePolicy Never: the finished experiment is not run again in its folder.
    let (again, _) = tune_in(&dir);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(
        err.contains("resumePolicy") && err.contains("Never"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
