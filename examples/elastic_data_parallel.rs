//! Elastic data-parallel training: the allreduce example under `tandem::elastic`. A process that
//! dies does not end the job: the others re-form the group, return to the last commit and go on
//! (sharding the data over the processes left); a process that (re)starts joins at the next commit
//! with the others' state.
//!
//! ```text
//! tandem launch --nproc 4 --elastic 2:4 --restart on-failure -- \
//!     target/release/examples/elastic_data_parallel --steps 800 --commit-every 10
//! ```
//!
//! Outside `tandem launch` it needs a rendezvous that outlives the processes (`tandem rendezvous`,
//! `TANDEM_RENDEZVOUS_EXTERNAL=1`) and `TANDEM_ELASTIC=MIN[:MAX]`; see
//! `deploy/kubernetes/pytorchjob-elastic.yaml`. Prints the steps per second of the training loop
//! (from the first commit on) next to the test accuracy.

use std::time::Instant;

use tandem::ReduceOp;
use tandem::elastic::{Elastic, ElasticConfig, State};
use tandem_examples::{Mlp, batch, flag, spiral};

fn main() -> std::process::ExitCode {
    tandem_examples::report(run())
}

fn run() -> Result<(), tandem::Error> {
    let steps: usize = flag("--steps", 800);
    let commit_every: usize = flag("--commit-every", 10).max(1);
    let (x, y) = spiral(12_000, 1);
    let (test_x, test_y) = spiral(3_000, 2);
    // Every process builds the same initial weights; the first epoch's sync makes sure of it.
    let mut model = Mlp::new(2, 64, 3, 7);
    let mut state = State::new()
        .with_array("params", model.params.clone())
        .with_scalar("step", 0.0);
    let mut elastic = Elastic::from_env(ElasticConfig::from_env()?)?;
    let (batch_size, lr) = (32, 0.5);
    let mut timed: Option<(Instant, usize)> = None;
    let mut last = 0;
    elastic.run(
        &mut state,
        |ctx| {
            if ctx.rank() == 0 {
                println!("epoch {}: {} processes", ctx.epoch(), ctx.world_size());
            }
        },
        |ctx, s| {
            let (rank, world) = (ctx.rank(), ctx.world_size());
            let shard = x.nrows() / world;
            let (lo, hi) = (rank * shard, (rank + 1) * shard);
            // After a re-formation the state is the last commit: start from it.
            if let Some(p) = s.array("params") {
                model.params.copy_from_slice(p);
            }
            let mut step = s.scalar("step").unwrap_or(0.0) as usize;
            while step < steps {
                let at = lo + (step * batch_size) % (hi - lo - batch_size + 1);
                let (bx, by) = batch(&x, &y, at..at + batch_size);
                let (loss, mut grad) = model.loss_and_grad(&bx, &by);
                ctx.group().allreduce(&mut grad, ReduceOp::Avg)?;
                for (p, g) in model.params.iter_mut().zip(&grad) {
                    *p -= lr * g;
                }
                step += 1;
                if rank == 0 && step.is_multiple_of(200) {
                    println!("step {step:>4}: loss {loss:.4}");
                }
                if step.is_multiple_of(commit_every) || step == steps {
                    if let Some(p) = s.array_mut("params") {
                        p.copy_from_slice(&model.params);
                    }
                    s.set_scalar("step", step as f64);
                    ctx.commit(s)?;
                    timed.get_or_insert((Instant::now(), step));
                    last = step;
                }
            }
            Ok(())
        },
    )?;
    if let Some(p) = state.array("params") {
        model.params.copy_from_slice(p);
    }
    if elastic.membership().and_then(|m| m.rank_of(elastic.id())) == Some(0) {
        if let Some((t0, s0)) = timed.filter(|(_, s0)| last > *s0) {
            let rate = (last - s0) as f64 / t0.elapsed().as_secs_f64();
            println!("steps/s: {rate:.1}");
        }
        println!("test accuracy: {:.3}", model.accuracy(&test_x, &test_y));
    }
    Ok(())
}
