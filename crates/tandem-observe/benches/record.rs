//! What the always-on parts cost per operation: recording one operation in the flight recorder
//! (begin and end) and one latency observation in the metrics, against a clock read for scale.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tandem_observe::{Identity, identify, metrics, recorder};

fn record(c: &mut Criterion) {
    identify(Identity::new("rank", 0, 2));
    let mut seq = 0u64;
    c.bench_function("recorder begin+end", |b| {
        b.iter(|| {
            seq += 1;
            let mut r = recorder::Record::new(seq, "allreduce", "f32", 1024, seq);
            r.peers = recorder::Peers::Two(1, 3);
            r.bytes = 4096;
            let t = recorder::begin(r);
            let ending = recorder::Ending {
                late: Some((1, 3)),
                ..Default::default()
            };
            recorder::end_at(t, seq + 1, ending);
        })
    });
    c.bench_function("metrics op", |b| {
        b.iter(|| metrics::op(black_box("allreduce"), black_box(4096), black_box(1e-5)))
    });
    c.bench_function("clock read (Instant::now)", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
}

criterion_group!(benches, record);
criterion_main!(benches);
