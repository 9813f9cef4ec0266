//! Criterion benches for what compression costs a rank's cores: PowerSGD's products and error
//! feedback on the MLP of `benches/compression_accuracy.py` (three weight matrices and their
//! biases), and the bf16 casts of its 1.1M values, on a group of one (no network, so only the
//! compute is timed). Run with `cargo bench -p tandem-collective --bench compression`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tandem_collective::compression::{Compression, Compressor, narrow, widen};
use tandem_collective::{GroupConfig, ProcessGroup};
use tandem_core::{ClusterSpec, DType, ReduceOp};

/// The MLP's weights (rows × columns): 64 → 1024 → 1024 → 10.
const SHAPES: [(usize, usize); 3] = [(64, 1024), (1024, 1024), (1024, 10)];

fn gradient(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 37 + seed * 101) % 997) as f32 / 997.0 - 0.5)
        .collect()
}

fn power_sgd(c: &mut Criterion) {
    let Ok(spec) = ClusterSpec::from_vars(&[("UNSET", "")]) else {
        return;
    };
    let Ok(pg) = ProcessGroup::init(&spec, None, GroupConfig::default()) else {
        return;
    };
    let mut grads: Vec<Vec<f32>> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, (r, c))| gradient(r * c, i))
        .collect();
    let mut biases: Vec<Vec<f32>> = SHAPES.iter().map(|(_, c)| gradient(*c, 9)).collect();
    let mut comps: Vec<Compressor> = SHAPES
        .iter()
        .map(|(_, c)| Compressor::new(Compression::PowerSgd { rank: 4 }).with_columns(*c))
        .collect();
    let values: usize = SHAPES.iter().map(|(r, c)| r * c + c).sum();
    let mut g = c.benchmark_group("compression");
    g.throughput(Throughput::Elements(values as u64));
    g.bench_function("powersgd:4/mlp", |b| {
        b.iter(|| {
            let matrices = grads
                .iter_mut()
                .zip(comps.iter_mut())
                .map(|(g, c)| (&mut g[..], c))
                .collect();
            let exact = biases.iter_mut().map(|b| &mut b[..]).collect();
            pg.allreduce_power_sgd_batch(matrices, exact, ReduceOp::Avg)
                .map(black_box)
        })
    });
    let flat = gradient(values, 7);
    let mut wire = vec![0u8; values * 2];
    let mut back = vec![0f32; values];
    g.bench_function("bf16/narrow+widen/mlp", |b| {
        b.iter(|| {
            narrow(black_box(&flat), DType::BF16, &mut wire)
                .and_then(|()| widen(&wire, DType::BF16, &mut back))
        })
    });
    g.finish();
}

criterion_group!(benches, power_sgd);
criterion_main!(benches);
