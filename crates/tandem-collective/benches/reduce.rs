//! Criterion benches for the reduction kernels (every dtype, in cache and memory-bound) and the ring
//! schedule. Run with `cargo bench -p tandem-collective --bench reduce`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tandem_collective::algorithm::chunking::partition;
use tandem_collective::algorithm::reduce::reduce_into;
use tandem_collective::algorithm::ring::{allgather_step, reduce_scatter_step};
use tandem_core::{DType, ReduceOp};

fn kernels(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce_into");
    for bytes in [256usize << 10, 64 << 20] {
        for dtype in DType::ALL {
            let mut dst = vec![1u8; bytes];
            let src = vec![1u8; bytes];
            g.throughput(Throughput::Bytes(bytes as u64));
            g.bench_function(format!("{dtype}/sum/{}KiB", bytes >> 10), |b| {
                b.iter(|| {
                    reduce_into(
                        dtype,
                        ReduceOp::Sum,
                        black_box(&mut dst),
                        black_box(&src),
                        None,
                    )
                })
            });
        }
        let mut dst = vec![1u8; bytes];
        let src = vec![1u8; bytes];
        g.bench_function(format!("f32/max/{}KiB", bytes >> 10), |b| {
            b.iter(|| {
                reduce_into(
                    DType::F32,
                    ReduceOp::Max,
                    black_box(&mut dst),
                    black_box(&src),
                    None,
                )
            })
        });
    }
    g.finish();
}

fn schedule(c: &mut Criterion) {
    c.bench_function("ring_schedule/world_64", |b| {
        b.iter(|| {
            let n = black_box(64usize);
            let chunks = partition(black_box(1 << 24), n);
            let mut acc = 0usize;
            for r in 0..n {
                for s in 0..n - 1 {
                    let (a, bb) = reduce_scatter_step(r, n, s);
                    let (c2, d) = allgather_step(r, n, s);
                    acc += chunks[a].len() + chunks[bb].start + c2 + d;
                }
            }
            acc
        })
    });
}

criterion_group!(benches, kernels, schedule);
criterion_main!(benches);
