//! Data-parallel training with allreduce: every process trains the same MLP on its own shard of the
//! data and averages gradients with one allreduce per step.
//!
//! Run it under any launcher Tandem understands, for example by hand with two shells:
//!
//! ```text
//! export TANDEM_JOB_TOKEN=my-secret-token TANDEM_RENDEZVOUS_ADDR=127.0.0.1:29500 TANDEM_WORLD_SIZE=2
//! TANDEM_RANK=0 cargo run --release --example allreduce_data_parallel
//! TANDEM_RANK=1 cargo run --release --example allreduce_data_parallel
//! ```
//!
//! or under torchrun / a PyTorchJob (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), Slurm
//! (`srun`), or mpirun with `MASTER_ADDR`/`MASTER_PORT` exported. With no launcher it trains alone.
//! It reaches about 0.98 test accuracy (`--steps N`: 800 by default) and prints its steps per second.

use tandem::{ProcessGroup, ReduceOp};
use tandem_examples::{Mlp, batch, flag, spiral};

fn main() -> std::process::ExitCode {
    tandem_examples::report(run())
}

/// The example itself; `main` prints its error, if any, as a message.
fn run() -> Result<(), tandem::Error> {
    let pg = ProcessGroup::from_env()?;
    let (rank, world) = (pg.rank(), pg.world_size());
    let (x, y) = spiral(12_000, 1);
    let (test_x, test_y) = spiral(3_000, 2);

    // Start every replica from rank 0's weights.
    let mut model = Mlp::new(2, 64, 3, 7);
    pg.broadcast(&mut model.params, 0)?;

    let (batch_size, lr, steps) = (32, 0.5, flag("--steps", 800usize));
    // Steps per second of the loop, from step 10 on (the first ones warm the connections up).
    let mut timed: Option<std::time::Instant> = None;
    let shard = x.nrows() / world;
    let (lo, hi) = (rank * shard, (rank + 1) * shard);
    for step in 0..steps {
        let at = lo + (step * batch_size) % (hi - lo - batch_size + 1);
        let (bx, by) = batch(&x, &y, at..at + batch_size);
        let (loss, mut grad) = model.loss_and_grad(&bx, &by);
        pg.allreduce(&mut grad, ReduceOp::Avg)?;
        for (p, g) in model.params.iter_mut().zip(&grad) {
            *p -= lr * g;
        }
        if rank == 0 && (step + 1) % 200 == 0 {
            println!("step {:>4}: loss {loss:.4}", step + 1);
        }
        if step + 1 == 10 {
            timed = Some(std::time::Instant::now());
        }
    }
    if rank == 0 {
        if let Some(t0) = timed.filter(|_| steps > 10) {
            println!(
                "steps/s: {:.1}",
                (steps - 10) as f64 / t0.elapsed().as_secs_f64()
            );
        }
        println!("test accuracy: {:.3}", model.accuracy(&test_x, &test_y));
    }
    pg.shutdown()
}
