//! Asynchronous SGD on parameter servers with a staleness bound: each gradient is applied the moment
//! it arrives, and a worker more than `--staleness` steps ahead of the slowest one waits
//! (stale-synchronous parallel). The same program runs as every replica.
//!
//! ```text
//! cargo build --release --example async_ps
//! tandem launch --ps 2 --workers 4 -- target/release/examples/async_ps --steps 600 --staleness 2
//! ```
//!
//! It reaches about 0.97 test accuracy.

use std::time::Duration;

use tandem::ps::blocking::BlockingClient;
use tandem::ps::client::TrainingMode;
use tandem::ps::job::PsJob;
use tandem::ps::optimizer::Optimizer;
use tandem::ps::placement::place;
use tandem::rendezvous::{JobToken, TOKEN_VAR};
use tandem::{Error, Result};
use tandem_examples::{Mlp, batch, flag, ps_params, serve_if_parameter_server, spiral};

fn main() -> std::process::ExitCode {
    tandem_examples::report(run())
}

/// The example itself; `main` prints its error, if any, as a message.
fn run() -> Result<()> {
    if serve_if_parameter_server()? {
        return Ok(());
    }
    let steps: u64 = flag("--steps", 600);
    let staleness: u32 = flag("--staleness", 2);
    let batch_size: usize = flag("--batch", 32);
    let job = PsJob::from_env()?;
    let token = JobToken::from_env()?.ok_or_else(|| Error::config(TOKEN_VAR, "is not set"))?;

    let mut model = Mlp::new(2, 64, 3, 0);
    let map = place(&ps_params(&model, 7), job.servers.len(), 1 << 10)?;
    // Every worker's gradient is applied on its own, so the step is a quarter of the sync one.
    let client = BlockingClient::connect(
        &job.servers,
        &token,
        job.worker,
        map,
        Optimizer::momentum(0.025, 0.9),
        TrainingMode::asynchronous(job.workers, Some(staleness)),
        Duration::from_secs(60),
    )?;

    let (x, y) = spiral(12_000, 1);
    let shard = x.nrows() / job.workers as usize;
    let lo = job.worker as usize * shard;
    let mut loss = f32::NAN;
    for step in 0..steps {
        // Async: whatever the servers hold now (push blocks while this worker is too far ahead).
        let (_, params) = client.pull(0)?;
        model.load_pulled(&params)?;
        let at = lo + (step as usize * batch_size) % (shard - batch_size + 1);
        let (bx, by) = batch(&x, &y, at..at + batch_size);
        let (l, grad) = model.loss_and_grad(&bx, &by);
        loss = l;
        client.push(step, &model.named(&grad))?;
    }
    let (_, params) = client.pull(0)?;
    model.load_pulled(&params)?;
    if job.worker == 0 {
        let (tx, ty) = spiral(3_000, 2);
        println!(
            "async PS (staleness {staleness}): loss {loss:.4}, test accuracy {:.3}",
            model.accuracy(&tx, &ty)
        );
    }
    client.done()
}
