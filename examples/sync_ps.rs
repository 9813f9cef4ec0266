//! Synchronous SGD on parameter servers: every step each server waits for the gradients of all
//! workers, averages them, applies momentum SGD, and only then serves the next step's parameters.
//! The same program runs as every replica: parameter servers serve, workers train.
//!
//! ```text
//! cargo build --release --example sync_ps
//! tandem launch --ps 2 --workers 4 -- target/release/examples/sync_ps --steps 600
//! ```
//!
//! Under a Kubeflow TFJob the same binary reads `TF_CONFIG`. It reaches about 0.97 test accuracy.

use tandem::Result;
use tandem::ps::client::TrainingMode;
use tandem::ps::optimizer::Optimizer;
use tandem_examples::{batch, flag, ps_worker, spiral};

fn main() -> std::process::ExitCode {
    // Servers serve; workers train in lockstep with `run`.
    tandem_examples::ps_main(run)
}

/// A worker of the job; `main` prints its error, if any, as a message.
fn run() -> Result<()> {
    let steps: u64 = flag("--steps", 600);
    let batch_size: usize = flag("--batch", 32);
    let (job, mut model, client) = ps_worker(Optimizer::momentum(0.1, 0.9), TrainingMode::sync)?;

    let (x, y) = spiral(12_000, 1);
    let shard = x.nrows() / job.workers as usize;
    let lo = job.worker as usize * shard;
    let mut loss = f32::NAN;
    for step in 0..steps {
        // Sync: the parameters of `step` exist once every worker pushed step - 1.
        let (version, params) = client.pull(step)?;
        model.load_pulled(&params)?;
        let at = lo + (step as usize * batch_size) % (shard - batch_size + 1);
        let (bx, by) = batch(&x, &y, at..at + batch_size);
        let (l, grad) = model.loss_and_grad(&bx, &by);
        loss = l;
        client.push(version, &model.named(&grad))?;
    }
    let (_, params) = client.pull(steps)?;
    model.load_pulled(&params)?;
    if job.worker == 0 {
        let (tx, ty) = spiral(3_000, 2);
        println!(
            "sync PS: loss {loss:.4}, test accuracy {:.3}",
            model.accuracy(&tx, &ty)
        );
    }
    client.done()
}
