//! `tandem bench allreduce --observe-cost`: what the flight recorder and the metrics cost, measured
//! inside one run (separate runs on a busy machine differ by more than the cost).

use tandem::{DType, ProcessGroup, ReduceOp, Result};

use crate::bench::{BenchArgs, Collective, iterations, run_size};

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
            let (_, elapsed, n) =
                run_size(pg, collective, dtype, op, bytes, Some(per_batch), a.warmup)?;
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
