//! `tandem bench allreduce --observe-cost`: what the flight recorder and the metrics cost, measured
//! inside one run (separate runs on a busy machine differ by more than the cost).
//!
//! `--elastic-cost` measures what elastic training costs when nothing fails: allreduces with and
//! without committing a state as large as the tensor after each, alternated in one run.

use tandem::{DType, ProcessGroup, ReduceOp, Result};

use crate::bench::{BenchArgs, Collective};
use crate::bench_size::{Size, iterations, run_size};

/// Batches per size in `--observe-cost`: half with the recorder and metrics on, half off,
/// alternating.
const COST_BATCHES: usize = 20;

/// `--observe-cost`: per size, batches of operations with the recorder and metrics on and off in
/// turn (every rank switches at the same operation), each batch timed; prints the median time per
/// operation of each kind of batch (the slowest rank's) and their ratio.
pub(crate) fn observe_cost(
    pg: &ProcessGroup,
    collective: Collective,
    dtype: DType,
    op: ReduceOp,
    min: usize,
    max: usize,
    a: &BenchArgs,
) -> Result<()> {
    let rank = pg.rank();
    if rank == 0 {
        println!(
            "# tandem bench {} --observe-cost: {} ranks, {dtype}, {COST_BATCHES} alternating batches per size",
            collective.name(),
            pg.world_size()
        );
        println!(
            "#{:>12} {:>8} {:>12} {:>12} {:>8}",
            "size(B)", "ops", "on(us)", "off(us)", "on/off"
        );
    }
    let mut size = min;
    while size <= max {
        let bytes = size / dtype.size() * dtype.size();
        let per_batch = (iterations(bytes, a.iters) / COST_BATCHES).max(1);
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for b in 0..COST_BATCHES {
            let recording = b % 2 == 0;
            tandem::observe::set_active(recording);
            let one = Size {
                op,
                bytes,
                iters: Some(per_batch),
                warmup: a.warmup,
            };
            let (_, elapsed, n) = run_size(pg, collective, dtype, one)?;
            let mut t = [elapsed.as_secs_f64() / n as f64];
            pg.allreduce(&mut t, ReduceOp::Max)?;
            if recording { &mut on } else { &mut off }.push(t[0]);
        }
        tandem::observe::set_active(true);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (on, off) = (median(&mut on), median(&mut off));
        if rank == 0 {
            println!(
                "{:>13} {:>8} {:>12.2} {:>12.2} {:>8.4}",
                bytes,
                per_batch * COST_BATCHES,
                on * 1e6,
                off * 1e6,
                on / off
            );
        }
        size *= 2;
    }
    Ok(())
}

/// `--elastic-cost`: what elastic training costs when nothing fails. The ranks form an elastic
/// group (`tandem::elastic`, the launcher hosting the rendezvous) and, per size, alternate batches
/// of f32 allreduces with and without a [`Context::commit`](tandem::elastic::Context::commit) of
/// a state as large as the tensor after every one (the most a training loop would commit: every
/// step); prints the median time per operation of each kind of batch (the slowest rank's) and
/// their ratio.
pub(crate) fn elastic_cost(collective: Collective, a: &BenchArgs) -> Result<()> {
    use tandem::elastic::{Elastic, ElasticConfig, State};
    if collective != Collective::Allreduce {
        return Err(tandem::Error::invalid(
            "--elastic-cost",
            "is measured on allreduce (tandem bench allreduce --elastic-cost)",
        ));
    }
    let (min, max) = (
        crate::local_job::parse_size("--min", &a.min)?.max(4),
        crate::local_job::parse_size("--max", &a.max)?,
    );
    let mut elastic = Elastic::from_env(ElasticConfig::from_env()?)?;
    let mut outer = State::new();
    elastic.run(
        &mut outer,
        |_| {},
        |ctx, _| {
            let pg = ctx.group();
            if pg.rank() == 0 {
                println!(
                    "# tandem bench allreduce --elastic-cost: {} ranks, f32 sum, {COST_BATCHES} alternating batches per size, a commit every {} allreduces",
                    pg.world_size(),
                    a.commit_every
                );
                println!(
                    "#{:>12} {:>8} {:>12} {:>12} {:>8}",
                    "size(B)", "ops", "commit(us)", "plain(us)", "ratio"
                );
            }
            let mut size = min;
            while size <= max {
                let n = size / 4;
                let mut buf = vec![0.0f32; n];
                let mut state = State::new().with_array("w", vec![0.0; n]);
                let per_batch = (iterations(n * 4, a.iters) / COST_BATCHES)
                    .max(1)
                    .max(a.commit_every as usize);
                for _ in 0..a.warmup {
                    pg.allreduce(&mut buf, ReduceOp::Sum)?;
                    ctx.commit(&mut state)?;
                }
                let (mut with, mut without) = (Vec::new(), Vec::new());
                for b in 0..COST_BATCHES {
                    let committing = b % 2 == 0;
                    let start = std::time::Instant::now();
                    for i in 0..per_batch {
                        pg.allreduce(&mut buf, ReduceOp::Sum)?;
                        if committing && (i as u64 + 1).is_multiple_of(a.commit_every) {
                            ctx.commit(&mut state)?;
                        }
                    }
                    let mut t = [start.elapsed().as_secs_f64() / per_batch as f64];
                    pg.allreduce(&mut t, ReduceOp::Max)?;
                    if committing { &mut with } else { &mut without }.push(t[0]);
                }
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let (with, without) = (median(&mut with), median(&mut without));
                if pg.rank() == 0 {
                    println!(
                        "{:>13} {:>8} {:>12.2} {:>12.2} {:>8.4}",
                        n * 4,
                        per_batch * COST_BATCHES,
                        with * 1e6,
                        without * 1e6,
                        with / without
                    );
                }
                size *= 2;
            }
            Ok(())
        },
    )
}
