//! `tandem demo`: the README's main job. Trains a small MLP on a 3-class spiral with data-parallel
//! SGD on N local processes that meet through a rendezvous and average their gradients with allreduce.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use tandem::{Error, ProcessGroup, ReduceOp, Result};

use crate::local_job::LocalJob;
use tandem_examples::{Mlp, batch, spiral};

/// Arguments of `tandem demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Number of processes.
    #[arg(long, default_value_t = 4)]
    nproc: usize,
    /// Training steps.
    #[arg(long, default_value_t = 800)]
    steps: usize,
    /// Examples per process per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.5)]
    lr: f32,
    /// Training examples (split across processes).
    #[arg(long, default_value_t = 12_000)]
    examples: usize,
    /// Seconds the whole job may take before it is stopped.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Arguments of one demo rank (hidden).
#[derive(Args, Debug, Clone)]
pub struct RankArgs {
    #[command(flatten)]
    demo: DemoArgs,
}

/// Runs the demo job: a rendezvous in this process and `nproc` child processes.
pub fn demo(args: DemoArgs) -> Result<ExitCode> {
    if args.nproc == 0 || args.nproc > 64 {
        return Err(Error::invalid(
            "--nproc",
            format!("{} is not between 1 and 64", args.nproc),
        ));
    }
    if args.examples < args.nproc * args.batch {
        return Err(Error::invalid(
            "--examples",
            format!(
                "{} examples cannot fill a batch of {} on {} processes",
                args.examples, args.batch, args.nproc
            ),
        ));
    }
    println!(
        "tandem demo: data-parallel training of an MLP (2-{}-3) on a 3-class spiral, {} processes, allreduce over TCP",
        args.hidden, args.nproc
    );
    let rank_args: Vec<String> = [
        "demo-rank".to_string(),
        format!("--nproc={}", args.nproc),
        format!("--steps={}", args.steps),
        format!("--batch={}", args.batch),
        format!("--hidden={}", args.hidden),
        format!("--lr={}", args.lr),
        format!("--examples={}", args.examples),
        format!("--timeout={}", args.timeout),
    ]
    .into();
    let job = LocalJob::start(args.nproc, &rank_args, &[], |rank, line| {
        if rank == 0 || line.starts_with("ERROR") {
            println!("[rank {rank}] {line}");
        }
    })?;
    let failed = job.wait(Duration::from_secs(args.timeout))?;
    if failed.is_empty() {
        println!("tandem demo: done");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tandem demo: failed ranks: {}", failed.join(", "));
        Ok(ExitCode::from(1))
    }
}

/// One rank: same data and model everywhere, its own shard of the examples, averaged gradients.
pub fn rank(args: RankArgs) -> Result<ExitCode> {
    let a = args.demo;
    let pg = ProcessGroup::from_env()?;
    let (rank, n) = (pg.rank(), pg.world_size());
    let (x, y) = spiral(a.examples, 1);
    let (tx, ty) = spiral(3000, 2);
    // Each rank starts from different weights on purpose; the broadcast makes them one model.
    let mut model = Mlp::new(2, a.hidden, 3, 100 + rank as u64);
    pg.broadcast(&mut model.params, 0)?;
    let shard = a.examples / n;
    let (lo, hi) = (rank * shard, (rank + 1) * shard);
    let start = Instant::now();
    let mut loss_sum = 0.0f32;
    for step in 0..a.steps {
        let at = lo + (step * a.batch) % (hi - lo - a.batch + 1);
        let (bx, by) = batch(&x, &y, at..at + a.batch);
        let (loss, mut grad) = model.loss_and_grad(&bx, &by);
        pg.allreduce(&mut grad, ReduceOp::Avg)?;
        model
            .params
            .iter_mut()
            .zip(&grad)
            .for_each(|(p, g)| *p -= a.lr * g);
        loss_sum += loss;
        if (step + 1) % 200 == 0 || step + 1 == a.steps {
            let mut mean = [loss_sum / 200f32.min((step % 200 + 1) as f32)];
            pg.allreduce(&mut mean, ReduceOp::Avg)?;
            loss_sum = 0.0;
            if rank == 0 {
                println!("step {:>5}  loss {:.4}", step + 1, mean[0]);
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    // Every rank must hold exactly the same model.
    let mut reference = model.params.clone();
    pg.broadcast(&mut reference, 0)?;
    let mut diff = [reference
        .iter()
        .zip(&model.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)];
    pg.allreduce(&mut diff, ReduceOp::Max)?;
    if rank == 0 {
        let acc = model.accuracy(&tx, &ty);
        let bytes =
            a.steps as f64 * model.params.len() as f64 * 4.0 * 2.0 * (n as f64 - 1.0) / n as f64;
        println!("mode       steps/s  samples/s  test acc  wall s  MB moved/rank");
        println!(
            "allreduce  {:>7.0}  {:>9.0}  {:>8.3}  {:>6.2}  {:>13.1}",
            a.steps as f64 / wall,
            (a.steps * a.batch * n) as f64 / wall,
            acc,
            wall,
            bytes / 1e6
        );
        println!(
            "replicas identical: {}",
            if diff[0] == 0.0 { "yes" } else { "NO" }
        );
    }
    pg.shutdown()?;
    if diff[0] != 0.0 {
        return Err(Error::transport(
            "checking the replicas",
            format!("models differ by up to {}", diff[0]),
        ));
    }
    Ok(ExitCode::SUCCESS)
}
