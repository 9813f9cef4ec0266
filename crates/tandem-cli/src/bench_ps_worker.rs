//! One worker process of `tandem bench ps`: connects to the servers, then pulls, computes a
//! trivial gradient and pushes, step after step, and prints its step times and peak memory as one
//! JSON line the bench collects. A process of its own, as a worker of a real job is, so the bench
//! measures the same connections, copies and scheduling. With `--observe-cost` it alternates
//! batches of steps with the recorder and metrics on and off, and reports both.

use std::time::{Duration, Instant};

use clap::Args;
use tandem::ps::client::{Client, TrainingMode};
use tandem::ps::init::Init;
use tandem::ps::optimizer::Optimizer;
use tandem::ps::placement::{ParamDecl, place_split};
use tandem::rendezvous::{JobToken, TOKEN_VAR};
use tandem::{Error, Result};

use crate::ExitCode;
use crate::memory::peak_rss;

/// Arguments of one bench worker (hidden).
#[derive(Args, Debug, Clone)]
pub struct BenchPsWorkerArgs {
    /// The servers' addresses, comma-separated.
    #[arg(long)]
    servers: String,
    /// This worker's index.
    #[arg(long)]
    worker: u32,
    /// Workers in the job.
    #[arg(long)]
    workers: u32,
    /// f32 parameters.
    #[arg(long)]
    params: usize,
    /// Synchronous training.
    #[arg(long)]
    sync: bool,
    /// Steps to run.
    #[arg(long)]
    steps: usize,
    /// Alternate batches with observation on and off.
    #[arg(long)]
    observe_cost: bool,
    /// Largest partition, bytes (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_partition_bytes: usize,
    /// Push then pull instead of overlapping them.
    #[arg(long)]
    sequential: bool,
}

/// One worker: pull, compute a trivial gradient, push; reports step times.
pub fn bench_ps_worker(a: BenchPsWorkerArgs) -> Result<ExitCode> {
    let token = JobToken::from_env()?.ok_or_else(|| Error::config(TOKEN_VAR, "is not set"))?;
    let addrs: Vec<String> = a.servers.split(',').map(str::to_string).collect();
    let map = place_split(
        &[ParamDecl::new("w", &[a.params], Init::Zeros)],
        addrs.len(),
        1 << 20,
        a.max_partition_bytes,
    )?;
    let mode = if a.sync {
        TrainingMode::sync(a.workers)
    } else {
        TrainingMode::asynchronous(a.workers, None)
    };
    crate::runtime()?.block_on(async move {
        let client = Client::connect(
            &addrs,
            &token,
            a.worker,
            map,
            Optimizer::sgd(0.01),
            mode,
            Duration::from_secs(120),
        )
        .await?;
        let mut times = Vec::new();
        let mut step = 0u64;
        // The parameters land in the same buffers every step.
        let mut p = std::collections::HashMap::new();
        let (mut on_ms, mut off_ms) = (Vec::new(), Vec::new());
        let start = since_epoch();
        if !a.sequential {
            let v = client.pull_into(0, &mut p).await?;
            if a.sync {
                step = v;
            }
        }
        for i in 0..a.steps {
            if a.observe_cost {
                tandem::observe::set_active(i % 2 == 0);
            }
            let t = Instant::now();
            if a.sequential {
                let v = client
                    .pull_into(if a.sync { step } else { 0 }, &mut p)
                    .await?;
                if a.sync {
                    step = v;
                }
            }
            let grad: Vec<f32> = p["w"].iter().map(|x| x * 0.001 + 0.001).collect();
            let grad = vec![("w".to_string(), grad)];
            if a.sequential {
                client.push_owned(step, grad).await?;
                step += 1;
            } else {
                let (_, v) = client.push_owned_pull_into(step, grad, &mut p).await?;
                step = if a.sync { v } else { step + 1 };
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            times.push(ms);
            if a.observe_cost {
                if i % 2 == 0 { &mut on_ms } else { &mut off_ms }.push(ms);
            }
        }
        let end = since_epoch();
        tandem::observe::set_active(true);
        client.done().await?;
        println!(
            "RESULT {}",
            serde_json::json!({ "step_ms": times, "on_ms": on_ms, "off_ms": off_ms, "rss": peak_rss(), "start": start, "end": end })
        );
        Ok::<_, Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Seconds since the epoch: one clock for every worker of the bench (all on this machine).
fn since_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
