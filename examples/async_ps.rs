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

use tandem::Result;
use tandem::ps::{client::TrainingMode, optimizer::Optimizer};
use tandem_examples::{batch, flag, ps_worker, spiral};

fn main() -> std::process::ExitCode {
    // Servers serve; each worker trains at its own pace with `run`.
    tandem_examples::ps_main(run)
}

/// A worker of the job; `main` prints its error, if any, as a message.
fn run() -> Result<()> {
    let steps: u64 = flag("--steps", 600);
    let staleness: u32 = flag("--staleness", 2);
    let batch_size: usize = flag("--batch", 32);
    // Every worker's gradient is applied on its own, so the step is a quarter of the sync one.
    let (job, mut model, client) = ps_worker(Optimizer::momentum(0.025, 0.9), |workers| {
        TrainingMode::asynchronous(workers, Some(staleness))
    })?;

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
