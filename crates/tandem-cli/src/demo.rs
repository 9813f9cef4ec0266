//! `tandem demo`: the README's main job. Trains a small MLP on a generated 3-class spiral three
//! ways, one job after another on this machine: synchronous SGD on parameter servers, asynchronous
//! SGD with a staleness bound, and data-parallel allreduce. Each job is real: separate processes
//! started by the launcher, a rendezvous, gRPC to the servers, the TCP ring between ranks.
//!
//! Why three ways: users meet both shapes of distributed training (parameter servers and
//! allreduce); running all three on the same model and data shows they learn alike, and the report
//! compares their time and the bytes each moved.
//!
//! Each job's report gives its final loss and test accuracy, how long it took and the bytes it
//! moved; the three use the same model, data and seed, so the accuracies should agree and the times
//! say what each shape costs on this machine. `--mode` runs one of them; `--steps`, `--lr`,
//! `--batch` and `--workers` change the training; `--report` prints one line for `tandem tune` to
//! read.

use crate::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tandem::ps::blocking::BlockingClient;
use tandem::ps::client::TrainingMode;
use tandem::ps::job::PsJob;
use tandem::ps::optimizer::Optimizer;
use tandem::ps::placement::place;
use tandem::rendezvous::{JobToken, TOKEN_VAR};
use tandem::{Error, ProcessGroup, ReduceOp, Result};
use tandem_demo::{Mlp, batch, ps_params, spiral};
use tandem_launch::Layout;

use crate::local_job::run_local;

/// Which training jobs the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// All three, one after another.
    All,
    /// Synchronous SGD on parameter servers.
    Sync,
    /// Asynchronous SGD on parameter servers with a staleness bound.
    Async,
    /// Data-parallel SGD with allreduce.
    Allreduce,
}

impl Mode {
    /// The mode's name in the demo's output.
    fn name(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Allreduce => "allreduce",
        }
    }
}

/// Arguments of `tandem demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Which jobs to run.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    mode: Mode,
    /// Training processes per job.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Parameter servers of the PS jobs.
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Training steps per worker.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// Examples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Staleness bound of the async PS job.
    #[arg(long, default_value_t = 2)]
    staleness: u32,
    /// Training examples (split across workers).
    #[arg(long, default_value_t = 12_000)]
    examples: usize,
    /// Learning rate (default: 0.5 for allreduce, 0.1 for sync PS, 0.1 / workers for async PS).
    #[arg(long)]
    lr: Option<f32>,
    /// Also print `step=N accuracy=X` lines while each job trains (what `tandem tune` reads).
    #[arg(long)]
    report: bool,
    /// Seconds each job may take before it is stopped.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Arguments of one demo worker (hidden; started by `tandem demo`).
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The job this worker is part of (not `all`).
    #[arg(long, value_enum)]
    job: Mode,
    /// The demo's flags.
    #[command(flatten)]
    demo: DemoArgs,
}

/// What one job reported.
#[derive(Debug, Clone, Default)]
struct Report {
    /// Steps trained.
    steps: f64,
    /// Examples seen.
    samples: f64,
    /// Final loss.
    loss: f64,
    /// Final test accuracy.
    accuracy: f64,
    /// Seconds the job took.
    wall: f64,
    /// Bytes moved.
    bytes: f64,
}

/// The flags' bounds, checked before any process starts.
fn check(a: &DemoArgs) -> Result<()> {
    if a.workers == 0 || a.workers > 64 {
        return Err(Error::invalid(
            "--workers",
            format!("{} is not between 1 and 64", a.workers),
        ));
    }
    if a.servers == 0 || a.servers > 16 {
        return Err(Error::invalid(
            "--servers",
            format!("{} is not between 1 and 16", a.servers),
        ));
    }
    if a.steps == 0 || a.batch == 0 || a.hidden == 0 {
        return Err(Error::invalid(
            "--steps/--batch/--hidden",
            "must be positive",
        ));
    }
    if a.examples < a.workers * a.batch {
        return Err(Error::invalid(
            "--examples",
            format!(
                "{} examples cannot fill a batch of {} on {} workers",
                a.examples, a.batch, a.workers
            ),
        ));
    }
    Ok(())
}

/// Runs the demo's jobs and prints a table per mode.
pub fn demo(args: DemoArgs) -> Result<ExitCode> {
    check(&args)?;
    let modes: Vec<Mode> = match args.mode {
        Mode::All => vec![Mode::Sync, Mode::Async, Mode::Allreduce],
        m => vec![m],
    };
    println!(
        "tandem demo: an MLP (2-{}-3) learns a 3-class spiral ({} examples, not linearly separable)",
        args.hidden, args.examples
    );
    let mut rows = Vec::new();
    for mode in modes {
        let label = match mode {
            Mode::Sync => format!(
                "sync PS ({} servers, {} workers)",
                args.servers, args.workers
            ),
            Mode::Async => format!(
                "async PS (staleness {}, {} servers, {} workers)",
                args.staleness, args.servers, args.workers
            ),
            _ => format!("allreduce ({} ranks)", args.workers),
        };
        println!("\n== {label}");
        let report = run_job(mode, &args)?;
        rows.push((label, report));
    }
    println!();
    println!(
        "{:<48} {:>8} {:>10} {:>10} {:>9} {:>7} {:>10}",
        "mode", "steps/s", "samples/s", "final loss", "test acc", "wall s", "MB moved"
    );
    for (label, r) in &rows {
        println!(
            "{:<48} {:>8.0} {:>10.0} {:>10.4} {:>9.3} {:>7.2} {:>10.1}",
            label,
            r.steps / r.wall,
            r.samples / r.wall,
            r.loss,
            r.accuracy,
            r.wall,
            r.bytes / 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Launches the demo's processes in `mode` and follows their progress lines to a report
/// (accuracy, time, bytes).
fn run_job(mode: Mode, a: &DemoArgs) -> Result<Report> {
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("  [{bar:40.cyan/blue}] {pos:>5}/{len} steps  {msg}")
            .map_err(|e| Error::invalid("progress bar", e.to_string()))?
            .progress_chars("=> "),
    );
    let report: Arc<Mutex<Option<Report>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let layout = match mode {
        Mode::Allreduce | Mode::All => Layout::Allreduce { nproc: a.workers },
        Mode::Sync | Mode::Async => Layout::Ps {
            ps: a.servers,
            workers: a.workers,
            chief: false,
        },
    };
    let server_args: Vec<String> = vec!["ps".into(), "--log-every=3600".into()];
    let sink = output_sink(bar.clone(), report.clone(), errors.clone(), a.report);
    let failed = run_local(
        layout,
        &worker_args(mode, a),
        matches!(layout, Layout::Ps { .. }).then_some(server_args.as_slice()),
        vec![],
        Vec::new(),
        Duration::from_secs(a.timeout),
        None,
        sink,
    )?;
    bar.finish_and_clear();
    let got = report.lock().unwrap_or_else(|e| e.into_inner()).take();
    match (failed.is_empty(), got) {
        (true, Some(r)) => {
            println!(
                "  {} steps: loss={:.4} accuracy={:.4} seconds={:.2}",
                a.steps, r.loss, r.accuracy, r.wall
            );
            Ok(r)
        }
        (_, _) => {
            for line in errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                eprintln!("{line}");
            }
            Err(Error::transport(
                format!("the {} job", mode.name()),
                if failed.is_empty() {
                    "worker 0 reported no result".into()
                } else {
                    failed
                },
            ))
        }
    }
}

/// The command line of each worker of a demo job.
fn worker_args(mode: Mode, a: &DemoArgs) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "demo-worker".into(),
        format!("--job={}", mode.name()),
        format!("--workers={}", a.workers),
        format!("--servers={}", a.servers),
        format!("--steps={}", a.steps),
        format!("--batch={}", a.batch),
        format!("--hidden={}", a.hidden),
        format!("--staleness={}", a.staleness),
        format!("--examples={}", a.examples),
    ];
    if let Some(lr) = a.lr {
        args.push(format!("--lr={lr}"));
    }
    args
}

/// What to do with each line a process of the job prints: progress to the bar, the result to
/// `report`, stderr kept (the first 20 lines) for the error message.
fn output_sink(
    bar: ProgressBar,
    report: Arc<Mutex<Option<Report>>>,
    errors: Arc<Mutex<Vec<String>>>,
    report_steps: bool,
) -> impl Fn(&tandem_launch::Planned, &str, bool) + Send + Sync + 'static {
    move |p: &tandem_launch::Planned, line: &str, stderr: bool| {
        if let Some(eval) = line.strip_prefix("EVAL ") {
            if report_steps {
                bar.suspend(|| println!("  {eval}"));
            }
        } else if let Some(step) = line.strip_prefix("PROGRESS ") {
            let mut it = step.split_whitespace();
            if let Some(s) = it.next().and_then(|s| s.parse().ok()) {
                bar.set_position(s);
            }
            if let Some(loss) = it.next() {
                bar.set_message(format!("loss {loss}"));
            }
        } else if let Some(json) = line.strip_prefix("RESULT ") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                *report.lock().unwrap_or_else(|e| e.into_inner()) = Some(Report {
                    steps: f("steps"),
                    samples: f("samples"),
                    loss: f("loss"),
                    accuracy: f("accuracy"),
                    wall: f("wall"),
                    bytes: f("bytes"),
                });
            }
        } else if stderr {
            let mut e = errors.lock().unwrap_or_else(|e| e.into_inner());
            if e.len() < 20 {
                e.push(format!("[{}] {line}", p.name()));
            }
        }
    }
}

/// One worker of a demo job.
pub fn worker(args: WorkerArgs) -> Result<ExitCode> {
    let a = &args.demo;
    check(a)?;
    match args.job {
        Mode::Allreduce | Mode::All => allreduce_worker(a),
        Mode::Sync => ps_worker(a, true),
        Mode::Async => ps_worker(a, false),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a `PROGRESS step loss` line every 10 steps and at the last, for the launcher's bar.
fn progress(step: usize, steps: usize, loss: f32) {
    if (step + 1).is_multiple_of(10) || step + 1 == steps {
        println!("PROGRESS {} {loss:.4}", step + 1);
    }
}

/// Test accuracy every 100 steps, for `--report` (and `tandem tune`'s early stopping).
fn evaluate(step: usize, steps: usize, model: &Mlp, tx: &ndarray::Array2<f32>, ty: &[usize]) {
    if (step + 1).is_multiple_of(100) && step + 1 < steps {
        println!(
            "EVAL step={} accuracy={:.4}",
            step + 1,
            model.accuracy(tx, ty)
        );
    }
}

/// One rank of the allreduce demo: trains the model on its shard, averaging gradients with the
/// other ranks every step.
fn allreduce_worker(a: &DemoArgs) -> Result<()> {
    let pg = ProcessGroup::from_env()?;
    let (rank, n) = (pg.rank(), pg.world_size());
    let (x, y) = spiral(a.examples, 1);
    // Each rank starts from different weights on purpose; the broadcast makes them one model.
    let mut model = Mlp::new(2, a.hidden, 3, 100 + rank as u64);
    pg.broadcast(&mut model.params, 0)?;
    let shard = a.examples / n;
    let lo = rank * shard;
    let lr = a.lr.unwrap_or(0.5);
    let (tx, ty) = spiral(3000, 2);
    // The group's compression of gradients (`TANDEM_COMPRESSION`; none unless set), its state
    // kept across steps.
    let mut compressor = pg.compressor();
    let start = Instant::now();
    let mut recent = Vec::new();
    for step in 0..a.steps {
        let at = lo + (step * a.batch) % (shard - a.batch + 1);
        let (bx, by) = batch(&x, &y, at..at + a.batch);
        let (loss, mut grad) = model.loss_and_grad(&bx, &by);
        pg.allreduce_compressed(&mut grad, ReduceOp::Avg, &mut compressor)?;
        model
            .params
            .iter_mut()
            .zip(&grad)
            .for_each(|(p, g)| *p -= lr * g);
        recent.push(loss);
        if rank == 0 {
            progress(step, a.steps, loss);
            evaluate(step, a.steps, &model, &tx, &ty);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let tail = &recent[recent.len().saturating_sub(20)..];
    let mut loss = [tail.iter().sum::<f32>() / tail.len().max(1) as f32];
    pg.allreduce(&mut loss, ReduceOp::Avg)?;
    // Every rank must hold exactly the same model.
    let mut reference = model.params.clone();
    pg.broadcast(&mut reference, 0)?;
    let mut diff = [reference
        .iter()
        .zip(&model.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)];
    pg.allreduce(&mut diff, ReduceOp::Max)?;
    if diff[0] != 0.0 {
        return Err(Error::transport(
            "checking the replicas",
            format!("models differ by up to {}", diff[0]),
        ));
    }
    if rank == 0 {
        // Ring allreduce: each rank sends and receives 2(n-1)/n of the gradient per step.
        let bytes = a.steps as f64 * (model.params.len() * 4) as f64 * 2.0 * (n as f64 - 1.0)
            / n as f64
            * n as f64;
        let compression = pg
            .resolve_compression_for(compressor.compression, model.params.len())?
            .to_string();
        let r = json!({"steps": a.steps, "samples": a.steps * a.batch * n, "loss": loss[0],
            "accuracy": model.accuracy(&tx, &ty), "wall": wall, "bytes": bytes,
            "compression": compression});
        println!("RESULT {r}");
    }
    pg.shutdown()
}

/// One worker of the parameter-server demo: pulls the model, computes its shard's gradient and
/// pushes it, synchronously or not.
fn ps_worker(a: &DemoArgs, sync: bool) -> Result<()> {
    let job = PsJob::from_env()?;
    let token = JobToken::from_env()?.ok_or_else(|| Error::config(TOKEN_VAR, "is not set"))?;
    let mut model = Mlp::new(2, a.hidden, 3, 0);
    let map = place(&ps_params(&model, 7), job.servers.len(), 1 << 10)?;
    let (optimizer, mode) = if sync {
        (
            Optimizer::momentum(0.1, 0.9),
            TrainingMode::sync(job.workers),
        )
    } else {
        // Every gradient is applied on its own: a step a `workers`-th of the sync one.
        (
            Optimizer::momentum(0.1 / job.workers as f32, 0.9),
            TrainingMode::asynchronous(job.workers, Some(a.staleness)),
        )
    };
    let client = BlockingClient::connect(
        &job.servers,
        &token,
        job.worker,
        map,
        optimizer,
        mode,
        Duration::from_secs(60),
    )?;
    let (x, y) = spiral(a.examples, 1);
    let (tx, ty) = spiral(3000, 2);
    let shard = a.examples / job.workers as usize;
    let lo = job.worker as usize * shard;
    let start = Instant::now();
    let mut recent = Vec::new();
    for step in 0..a.steps {
        let (version, params) = client.pull(if sync { step as u64 } else { 0 })?;
        model.load_pulled(&params)?;
        let at = lo + (step * a.batch) % (shard - a.batch + 1);
        let (bx, by) = batch(&x, &y, at..at + a.batch);
        let (loss, grad) = model.loss_and_grad(&bx, &by);
        client.push(
            if sync { version } else { step as u64 },
            &model.named(&grad),
        )?;
        recent.push(loss);
        if job.worker == 0 {
            progress(step, a.steps, loss);
            evaluate(step, a.steps, &model, &tx, &ty);
        }
    }
    let (_, params) = client.pull(if sync { a.steps as u64 } else { 0 })?;
    let wall = start.elapsed().as_secs_f64();
    model.load_pulled(&params)?;
    if job.worker == 0 {
        let stats = client.stats()?;
        let bytes: u64 = stats.iter().map(|s| s.bytes_in + s.bytes_out).sum();
        let applied = stats.iter().map(|s| s.applied).max().unwrap_or(0);
        // Sync: global steps; async: gradients applied (each push reaches every server).
        let steps = if sync { a.steps as f64 } else { applied as f64 };
        let tail = &recent[recent.len().saturating_sub(20)..];
        let r = json!({"steps": steps, "samples": a.steps * a.batch * job.workers as usize,
            "loss": tail.iter().sum::<f32>() / tail.len().max(1) as f32,
            "accuracy": model.accuracy(&tx, &ty), "wall": wall, "bytes": bytes});
        println!("RESULT {r}");
    }
    client.done()
}
