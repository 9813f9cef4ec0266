//! One size of a collective timed in one rank of `tandem bench`: the correctness check (every
//! element against the value the ranks' contributions imply), the warm-up, then the timed loop,
//! on host buffers over the ring or on GPU buffers through NCCL.
//!
//! Why check every element: a collective that is fast but wrong must not show a good figure; each
//! rank fills its buffer with a value derived from its rank, so the expected result is known exactly
//! and every element is compared with it.

use std::time::{Duration, Instant};

use tandem::{DType, ProcessGroup, ReduceOp, Result};

use clap::ValueEnum;

/// The collective to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Collective {
    /// Ring allreduce.
    Allreduce,
    /// Pipelined broadcast from rank 0.
    Broadcast,
    /// Ring allgather.
    Allgather,
    /// Ring reduce-scatter.
    ReduceScatter,
}

impl Collective {
    /// The collective's name, as the subcommand and the CSV spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Collective::Allreduce => "allreduce",
            Collective::Broadcast => "broadcast",
            Collective::Allgather => "allgather",
            Collective::ReduceScatter => "reduce-scatter",
        }
    }

    /// nccl-tests' bus bandwidth factor.
    pub(crate) fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Collective::Allreduce => 2.0 * (n - 1.0) / n,
            Collective::Broadcast => 1.0,
            Collective::Allgather | Collective::ReduceScatter => (n - 1.0) / n,
        }
    }
}

/// Sets every element of `buf` to `value` in `dtype` (what each rank contributes, so the
/// expected result is known without a reference run).
pub(crate) fn fill(buf: &mut [u8], dtype: DType, value: f64) {
    let one: Vec<u8> = match dtype {
        DType::F32 => (value as f32).to_le_bytes().to_vec(),
        DType::F64 => value.to_le_bytes().to_vec(),
        DType::F16 => tandem::half::f16::from_f64(value).to_le_bytes().to_vec(),
        DType::BF16 => tandem::half::bf16::from_f64(value).to_le_bytes().to_vec(),
        DType::I32 => (value as i32).to_le_bytes().to_vec(),
        DType::I64 => (value as i64).to_le_bytes().to_vec(),
        _ => vec![value as u8],
    };
    for c in buf.chunks_exact_mut(one.len()) {
        c.copy_from_slice(&one);
    }
}

/// How many elements of `buf` differ from `want` in `dtype`: a wrong result is counted, never
/// hidden behind a fast time.
pub(crate) fn wrong(buf: &[u8], dtype: DType, want: f64) -> usize {
    let mut expect = vec![0u8; dtype.size()];
    fill(&mut expect, dtype, want);
    buf.chunks_exact(dtype.size())
        .filter(|c| *c != expect.as_slice())
        .count()
}

/// Timed iterations for a buffer of `bytes`: `--iters`, else fewer for larger buffers so each
/// size takes about as long.
pub(crate) fn iterations(bytes: usize, iters: Option<usize>) -> usize {
    iters
        .unwrap_or(if bytes >= 16 << 20 {
            10
        } else if bytes >= 1 << 20 {
            30
        } else {
            200
        })
        .max(1)
}

/// What one timed size asks for: the reduction, the buffer's size in bytes, the timed iterations
/// (`None`: [`iterations`] chooses) and the untimed warm-up ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Size {
    /// The reduction the timed iterations apply.
    pub(crate) op: ReduceOp,
    /// The buffer's size in bytes.
    pub(crate) bytes: usize,
    /// `--iters`, if given.
    pub(crate) iters: Option<usize>,
    /// Untimed iterations first.
    pub(crate) warmup: usize,
}

impl Size {
    /// The reduction the correctness check uses: an average's exact value depends on rounding,
    /// so it is checked as the sum it divides.
    fn check_op(&self) -> ReduceOp {
        self.op.combining()
    }

    /// The timed iterations: `--iters` or [`iterations`]' choice.
    fn iterations(&self) -> usize {
        iterations(self.bytes, self.iters)
    }
}

/// One size's outcome: the elements found wrong, the time of the timed loop and its iterations.
pub(crate) type Timed = (usize, Duration, usize);

/// One size on GPU buffers (f32): a correctness check, warm-up, then timed iterations.
pub(crate) fn run_size_device(
    gpu: &tandem::collective::device::DeviceGroup,
    coll: Collective,
    size: Size,
) -> Result<Timed> {
    let (rank, n) = (gpu.rank(), gpu.world_size());
    let (op, bytes, iters, warmup) = (size.op, size.bytes, size.iterations(), size.warmup);
    let count = match coll {
        Collective::ReduceScatter => (bytes / 4) / n * n,
        _ => bytes / 4,
    };
    let mine = (rank + 1) as f32;
    let sum = (n * (n + 1) / 2) as f32;
    let check_op = size.check_op();
    let want_reduced = match check_op {
        ReduceOp::Sum => sum,
        ReduceOp::Prod => (1..=n).map(|r| r as f32).product(),
        ReduceOp::Min => 1.0,
        _ => n as f32,
    };
    let mut buf = gpu.to_device(&vec![mine; count])?;
    let wrong = match coll {
        Collective::Allreduce => {
            buf = gpu.allreduce(buf, check_op)?;
            gpu.to_host(&buf)?
                .iter()
                .filter(|v| **v != want_reduced)
                .count()
        }
        Collective::Broadcast => {
            buf = gpu.broadcast(buf, 0)?;
            gpu.to_host(&buf)?.iter().filter(|v| **v != 1.0).count()
        }
        Collective::Allgather => {
            let (b, out) = gpu.allgather(buf)?;
            buf = b;
            let host = gpu.to_host(&out)?;
            host.iter()
                .enumerate()
                .filter(|(i, v)| **v != (i / count.max(1) + 1) as f32)
                .count()
        }
        Collective::ReduceScatter => {
            let (b, out) = gpu.reduce_scatter(buf, check_op)?;
            buf = b;
            gpu.to_host(&out)?
                .iter()
                .filter(|v| **v != want_reduced)
                .count()
        }
    };
    let step = |buf: tandem::collective::device::DeviceBuffer<f32>| -> Result<_> {
        Ok(match coll {
            Collective::Allreduce => gpu.allreduce(buf, op)?,
            Collective::Broadcast => gpu.broadcast(buf, 0)?,
            Collective::Allgather => gpu.allgather(buf)?.0,
            Collective::ReduceScatter => gpu.reduce_scatter(buf, op)?.0,
        })
    };
    for _ in 0..warmup {
        buf = step(buf)?;
    }
    let start = Instant::now();
    for _ in 0..iters {
        buf = step(buf)?;
    }
    Ok((wrong, start.elapsed(), iters))
}

/// Times `iters` operations of `collective` on `bytes` through the TCP ring after `warmup`
/// untimed ones; returns the elements found wrong, the elapsed time and the iterations timed.
pub(crate) fn run_size(
    pg: &ProcessGroup,
    coll: Collective,
    dtype: DType,
    size: Size,
) -> Result<Timed> {
    let (rank, n) = (pg.rank(), pg.world_size());
    let (op, bytes, iters, warmup) = (size.op, size.bytes, size.iterations(), size.warmup);
    let mut buf = vec![0u8; bytes];
    let mut out = Vec::new();
    let check_op = size.check_op();
    // Correctness: rank r contributes r + 1.
    fill(&mut buf, dtype, (rank + 1) as f64);
    let wrong_count = match coll {
        Collective::Allreduce => {
            pg.allreduce_bytes(&mut buf, dtype, check_op)?;
            let want = match check_op {
                ReduceOp::Sum => (n * (n + 1) / 2) as f64,
                ReduceOp::Max => n as f64,
                ReduceOp::Min => 1.0,
                _ => (1..=n).map(|x| x as f64).product(),
            };
            wrong(&buf, dtype, want)
        }
        Collective::Broadcast => {
            pg.broadcast_bytes(&mut buf, dtype, 0)?;
            wrong(&buf, dtype, 1.0)
        }
        Collective::Allgather => {
            let per = bytes / n / dtype.size() * dtype.size();
            out = vec![0u8; per * n];
            pg.allgather_bytes(&buf[..per], &mut out, dtype)?;
            (0..n)
                .map(|r| wrong(&out[r * per..(r + 1) * per], dtype, (r + 1) as f64))
                .sum()
        }
        Collective::ReduceScatter => {
            let r = pg.reduce_scatter_bytes(&mut buf, dtype, ReduceOp::Sum)?;
            wrong(
                &buf[r.start * dtype.size()..r.end * dtype.size()],
                dtype,
                (n * (n + 1) / 2) as f64,
            )
        }
    };
    let once = |buf: &mut [u8], out: &mut [u8]| -> Result<()> {
        match coll {
            Collective::Allreduce => pg.allreduce_bytes(buf, dtype, op),
            Collective::Broadcast => pg.broadcast_bytes(buf, dtype, 0),
            Collective::Allgather => {
                let per = out.len() / n;
                pg.allgather_bytes(&buf[..per], out, dtype)
            }
            Collective::ReduceScatter => pg.reduce_scatter_bytes(buf, dtype, op).map(|_| ()),
        }
    };
    for _ in 0..warmup {
        once(&mut buf, &mut out)?;
    }
    pg.barrier()?;
    let start = Instant::now();
    for _ in 0..iters {
        once(&mut buf, &mut out)?;
    }
    Ok((wrong_count, start.elapsed(), iters))
}

/// [`run_size`] for a compressed f32 allreduce (one [`Compressor`] across the iterations, as a
/// training loop keeps one per tensor). The check: with the half types, rank r contributes r + 1
/// (exact in 16 bits), so every element must be the exact sum; top-k and PowerSGD change values by
/// design, so only elements that are not finite count as wrong.
pub(crate) fn run_size_compressed(
    pg: &ProcessGroup,
    compression: tandem::collective::compression::Compression,
    size: Size,
) -> Result<Timed> {
    use tandem::collective::compression::{Compression, Compressor};
    let (rank, n) = (pg.rank(), pg.world_size());
    let (op, bytes, iters, warmup) = (size.op, size.bytes, size.iterations(), size.warmup);
    let mut c = Compressor::new(compression);
    let mut buf = vec![(rank + 1) as f32; bytes / 4];
    let check_op = size.check_op();
    pg.allreduce_compressed(&mut buf, check_op, &mut c)?;
    let wrong_count = match compression {
        Compression::Fp16 | Compression::Bf16 if check_op == ReduceOp::Sum => {
            let want = (n * (n + 1) / 2) as f32;
            buf.iter().filter(|v| **v != want).count()
        }
        _ => buf.iter().filter(|v| !v.is_finite()).count(),
    };
    for _ in 0..warmup {
        pg.allreduce_compressed(&mut buf, op, &mut c)?;
    }
    pg.barrier()?;
    let start = Instant::now();
    for _ in 0..iters {
        pg.allreduce_compressed(&mut buf, op, &mut c)?;
    }
    Ok((wrong_count, start.elapsed(), iters))
}
