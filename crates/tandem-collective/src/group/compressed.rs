//! Gradient allreduces with fewer bytes on the wire ([`crate::compression`]): the group's side,
//! which moves what a [`Compressor`] makes of a gradient and turns it back into the result,
//! identical on every rank.

use super::*;
use crate::compression::{
    Compression, Compressor, HALF_PIECE, narrow, orthonormalise, scatter_sum, top_k, warm_start,
    widen,
};

impl ProcessGroup {
    /// The group's default compression of gradient allreduces (`GroupConfig::compression`,
    /// `TANDEM_COMPRESSION`).
    pub fn compression(&self) -> Compression {
        self.shared.compression
    }

    /// A compressor for one gradient tensor, with the group's default compression.
    pub fn compressor(&self) -> Compressor {
        Compressor::new(self.shared.compression)
    }

    /// Allreduces `buf` (an `f32` gradient) as `c` compresses it: `fp16`/`bf16` on the wire with
    /// sums in `f32`; top-k and PowerSGD with error feedback kept in `c` (only `SUM` and `AVG`);
    /// `auto` as the group chose ([`ProcessGroup::auto_compression`]), except for gradients small
    /// enough to be latency-bound ([`ProcessGroup::resolve_compression_for`]).
    /// Every rank must pass a compressor of the same setting for a buffer of the same length.
    ///
    /// ```
    /// use tandem_collective::compression::{Compression, Compressor};
    /// use tandem_collective::{GroupConfig, ProcessGroup};
    /// use tandem_core::{ClusterSpec, ReduceOp};
    /// // A group of one (no launcher variables set).
    /// let pg = ProcessGroup::init(&ClusterSpec::from_vars(&[("UNSET", "")])?, None, GroupConfig::default())?;
    /// let mut c = Compressor::new(Compression::Bf16);
    /// let mut g = vec![1.0f32, 2.5, -3.0];
    /// pg.allreduce_compressed(&mut g, ReduceOp::Sum, &mut c)?;
    /// assert_eq!(g, [1.0, 2.5, -3.0]); // a group of one: values bf16 holds exactly
    /// # Ok::<(), tandem_core::Error>(())
    /// ```
    pub fn allreduce_compressed(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        c: &mut Compressor,
    ) -> Result<()> {
        match self.resolve_compression_for(c.compression, buf.len())? {
            Compression::None | Compression::Auto => self.allreduce(buf, op),
            Compression::Fp16 => self.allreduce_half(buf, op, DType::F16, c),
            Compression::Bf16 => self.allreduce_half(buf, op, DType::BF16, c),
            Compression::TopK { fraction } => {
                sum_or_avg(op, "topk")?;
                self.allreduce_top_k(buf, op, fraction, c)
            }
            Compression::PowerSgd { rank } => {
                sum_or_avg(op, "powersgd")?;
                self.allreduce_power_sgd(buf, op, rank, c)
            }
        }
    }

    /// Allreduces several `f32` gradients as one fused gradient compressed by `c` (its residual
    /// that of the fusion, the same tensors in the same order every step), with no packed copy
    /// for `fp16`/`bf16`: each gradient is rounded straight into its place in one wire buffer
    /// and widened back from it, so fusing costs no extra pass over the gradients. A fused
    /// gradient large enough to go in pieces, and the other settings, are packed into one
    /// `f32` buffer and unpacked after. Every rank must pass the same lengths.
    ///
    /// ```
    /// use tandem_collective::compression::{Compression, Compressor};
    /// use tandem_collective::{GroupConfig, ProcessGroup};
    /// use tandem_core::{ClusterSpec, ReduceOp};
    /// let pg = ProcessGroup::init(&ClusterSpec::from_vars(&[("UNSET", "")])?, None, GroupConfig::default())?;
    /// let (mut w, mut b) = (vec![1.0f32, 2.5], vec![-3.0f32]);
    /// let mut c = Compressor::new(Compression::Bf16);
    /// pg.allreduce_compressed_many(vec![&mut w[..], &mut b[..]], ReduceOp::Avg, &mut c)?;
    /// assert_eq!((w, b), (vec![1.0, 2.5], vec![-3.0]));
    /// # Ok::<(), tandem_core::Error>(())
    /// ```
    pub fn allreduce_compressed_many(
        &self,
        mut bufs: Vec<&mut [f32]>,
        op: ReduceOp,
        c: &mut Compressor,
    ) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let half = match self.resolve_compression_for(c.compression, total)? {
            Compression::Fp16 => Some(DType::F16),
            Compression::Bf16 => Some(DType::BF16),
            _ => None,
        };
        match half {
            Some(dtype) if self.world_size() == 1 || total < 2 * HALF_PIECE => {
                c.wire.resize(total * dtype.size(), 0);
                let mut wire = &mut c.wire[..];
                for b in &bufs {
                    let (head, tail) = wire.split_at_mut(b.len() * dtype.size());
                    narrow(b, dtype, head)?;
                    wire = tail;
                }
                self.allreduce_bytes(&mut c.wire, dtype, op)?;
                let mut wire = &c.wire[..];
                for b in bufs.iter_mut() {
                    let (head, tail) = wire.split_at(b.len() * dtype.size());
                    widen(head, dtype, b)?;
                    wire = tail;
                }
                Ok(())
            }
            _ => {
                let mut flat = Vec::with_capacity(total);
                bufs.iter().for_each(|b| flat.extend_from_slice(b));
                self.allreduce_compressed(&mut flat, op, c)?;
                let mut at = 0;
                for b in bufs.iter_mut() {
                    b.copy_from_slice(&flat[at..at + b.len()]);
                    at += b.len();
                }
                Ok(())
            }
        }
    }

    /// Rounded once to `dtype`, allreduced as such (the ring widens, sums in `f32` and rounds
    /// once per hop), widened back. A gradient of at least two [`HALF_PIECE`]s goes in pieces
    /// ([`ProcessGroup::allreduce_half_pieces`]).
    fn allreduce_half(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        dtype: DType,
        c: &mut Compressor,
    ) -> Result<()> {
        if self.world_size() > 1 && buf.len() >= 2 * HALF_PIECE {
            return self.allreduce_half_pieces(buf, op, dtype);
        }
        c.wire.resize(buf.len() * dtype.size(), 0);
        narrow(buf, dtype, &mut c.wire)?;
        self.allreduce_bytes(&mut c.wire, dtype, op)?;
        widen(&c.wire, dtype, buf)
    }

    /// The half-precision allreduce of a large gradient as a pipeline: each piece of
    /// [`HALF_PIECE`] values is narrowed and handed to the worker thread, so the casts of the
    /// next pieces (and the widening of finished ones) run while the ring moves the earlier
    /// ones; only the first narrowing and the last widening are not hidden behind the network.
    /// Every piece is waited for, even after a failure, so no operation of this call outlives it.
    fn allreduce_half_pieces(&self, buf: &mut [f32], op: ReduceOp, dtype: DType) -> Result<()> {
        let mut wire = bytes::BytesMut::zeroed(buf.len() * dtype.size());
        let mut works = Vec::with_capacity(buf.len().div_ceil(HALF_PIECE));
        let mut failed = None;
        for piece in buf.chunks(HALF_PIECE) {
            let mut part = wire.split_to(piece.len() * dtype.size());
            let started = narrow(piece, dtype, &mut part)
                .and_then(|()| TensorMut::from_bytes_mut(part, dtype, &[piece.len()]));
            match started {
                Ok(t) => works.push(self.allreduce_async(t, op)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for (piece, work) in buf.chunks_mut(HALF_PIECE).zip(works) {
            let done = work
                .wait()
                .and_then(|mut t| widen(t.bytes_mut(), dtype, piece));
            if let (Err(e), None) = (done, &failed) {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Each rank's largest `fraction` of (gradient + residual), gathered by all and summed in
    /// rank order; the rest stays in the residual.
    fn allreduce_top_k(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        fraction: f64,
        c: &mut Compressor,
    ) -> Result<()> {
        let n = buf.len();
        check_residual(c, n)?;
        for (g, r) in buf.iter_mut().zip(&c.residual) {
            *g += r;
        }
        let k = ((n as f64 * fraction).ceil() as usize)
            .clamp(1, n.max(1))
            .min(n);
        let idx = top_k(buf, k);
        c.residual.copy_from_slice(buf);
        let mut sent = Vec::with_capacity(2 * k);
        for &i in &idx {
            sent.push(f32::from_bits(i));
            sent.push(buf[i as usize]);
            c.residual[i as usize] = 0.0;
        }
        let world = self.world_size();
        let mut all = vec![0f32; sent.len() * world];
        self.allgather(&sent, &mut all)?;
        let pairs: Vec<(u32, f32)> = all
            .chunks_exact(2)
            .map(|p| (p[0].to_bits(), p[1]))
            .collect();
        scatter_sum(&pairs, buf, op, world)
    }

    /// PowerSGD of one gradient: [`ProcessGroup::allreduce_power_sgd_batch`] with it alone.
    fn allreduce_power_sgd(
        &self,
        buf: &mut [f32],
        op: ReduceOp,
        rank: usize,
        c: &mut Compressor,
    ) -> Result<()> {
        let m = LowRank::start(buf, c, rank)?;
        self.low_rank_rounds(vec![m], Vec::new(), op)
    }

    /// PowerSGD of several gradients at once, each a matrix with its own [`Compressor`] (its
    /// setting `powersgd:R`), and `exact` tensors (biases) averaged or summed exactly, in two
    /// allreduces in all, as torch's PowerSGD hook batches a bucket: every matrix's `P = M Q`
    /// and the exact tensors in one, each `P` orthonormalised, every `Qᵀ = Pᵀ M` in the other.
    /// A model of many small matrices then pays two round trips a step rather than two per
    /// matrix. Every rank must pass the same shapes in the same order; only `SUM` and `AVG`.
    /// Everything is checked before anything is sent.
    ///
    /// ```
    /// use tandem_collective::compression::{Compression, Compressor};
    /// use tandem_collective::{GroupConfig, ProcessGroup};
    /// use tandem_core::{ClusterSpec, ReduceOp};
    /// let pg = ProcessGroup::init(&ClusterSpec::from_vars(&[("UNSET", "")])?, None, GroupConfig::default())?;
    /// // A 2 × 2 matrix of rank 1 (rank 1 holds it whole) and a bias.
    /// let (mut w, mut b) = (vec![1.0f32, 2.0, 2.0, 4.0], vec![0.5f32, -1.0]);
    /// let mut c = Compressor::new(Compression::PowerSgd { rank: 1 }).with_columns(2);
    /// pg.allreduce_power_sgd_batch(vec![(&mut w[..], &mut c)], vec![&mut b[..]], ReduceOp::Avg)?;
    /// assert!(w.iter().zip([1.0, 2.0, 2.0, 4.0]).all(|(x, y)| (x - y).abs() < 1e-5));
    /// assert_eq!(b, [0.5, -1.0]);
    /// # Ok::<(), tandem_core::Error>(())
    /// ```
    pub fn allreduce_power_sgd_batch(
        &self,
        matrices: Vec<(&mut [f32], &mut Compressor)>,
        exact: Vec<&mut [f32]>,
        op: ReduceOp,
    ) -> Result<()> {
        sum_or_avg(op, "powersgd")?;
        let mut started = Vec::with_capacity(matrices.len());
        for (i, (buf, c)) in matrices.into_iter().enumerate() {
            let Compression::PowerSgd { rank } = c.compression else {
                return Err(Error::invalid(
                    "compressor",
                    format!(
                        "matrix {i}: a batched PowerSGD allreduce takes powersgd:RANK compressors, not {}",
                        c.compression
                    ),
                ));
            };
            started.push(LowRank::start(buf, c, rank)?);
        }
        self.low_rank_rounds(started, exact, op)
    }

    /// The two rounds of a PowerSGD allreduce over matrices already started.
    fn low_rank_rounds(
        &self,
        mut matrices: Vec<LowRank<'_>>,
        mut exact: Vec<&mut [f32]>,
        op: ReduceOp,
    ) -> Result<()> {
        let p_len: usize = matrices.iter().map(|m| m.rows * m.rank).sum();
        let exact_len: usize = exact.iter().map(|e| e.len()).sum();
        if p_len + exact_len == 0 {
            return Ok(());
        }
        // Round 1: every P = M Q, then the exact tensors, summed in one allreduce.
        let mut p = vec![0f32; p_len + exact_len];
        let (ps, rest) = p.split_at_mut(p_len);
        let lens: Vec<usize> = matrices.iter().map(|m| m.rows * m.rank).collect();
        for (m, pm) in matrices.iter_mut().zip(split_lens(ps, lens)) {
            m.p_into(pm);
        }
        for (e, slot) in exact
            .iter()
            .zip(split_lens(rest, exact.iter().map(|e| e.len())))
        {
            slot.copy_from_slice(e);
        }
        self.allreduce(&mut p, ReduceOp::Sum)?;
        let world = self.world_size() as f32;
        let (ps, rest) = p.split_at_mut(p_len);
        let lens: Vec<usize> = exact.iter().map(|e| e.len()).collect();
        for (e, slot) in exact.iter_mut().zip(split_lens(rest, lens)) {
            for (x, &s) in e.iter_mut().zip(slot.iter()) {
                *x = if op == ReduceOp::Avg { s / world } else { s };
            }
        }
        if matrices.is_empty() {
            return Ok(());
        }
        // Round 2: each P orthonormalised, every Qᵀ = Pᵀ M summed in one allreduce.
        let mut pms = split_lens(ps, matrices.iter().map(|m| m.rows * m.rank));
        let q_len: usize = matrices.iter().map(|m| m.rank * m.cols).sum();
        let mut qt = vec![0f32; q_len];
        let qts = split_lens(&mut qt, matrices.iter().map(|m| m.rank * m.cols));
        for ((m, pm), qm) in matrices.iter().zip(pms.iter_mut()).zip(qts) {
            orthonormalise(pm, m.rows, m.rank);
            m.q_into(pm, qm);
        }
        self.allreduce(&mut qt, ReduceOp::Sum)?;
        let mut at = 0;
        for (m, pm) in matrices.iter_mut().zip(pms) {
            let len = m.rank * m.cols;
            m.finish(pm, &qt[at..at + len], world, op);
            at += len;
        }
        Ok(())
    }
}

/// Cuts `buf` into consecutive pieces of the lengths `lens`.
fn split_lens(mut buf: &mut [f32], lens: impl IntoIterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for len in lens {
        let (head, tail) = buf.split_at_mut(len);
        out.push(head);
        buf = tail;
    }
    out
}

/// One gradient of a PowerSGD allreduce between its rounds: `P = M Q` allreduced and
/// orthonormalised, `Qᵀ = Pᵀ M` allreduced, the result `P Qᵀ` (averaged over the ranks, or
/// their sum); the error stays in the residual and `Q` starts the next step. `Q` is kept
/// transposed (rank × columns), so every product runs along contiguous rows of length
/// `columns`: dot products for `M Q`, scaled additions for `Pᵀ M` and `P Qᵀ`, loops the compiler
/// vectorises (the rank is small, so loops over it are not).
///
/// `M` (gradient + residual) is built in the gradient's own buffer, a row at a time while `P`'s
/// row is computed from it in cache: the products are bound by memory bandwidth (ranks sharing
/// a machine share it), so the matrix is read or written in 7 passes (no scratch copy). The
/// residual is written only when the result is, so a failed allreduce leaves it as it was.
/// The last row may be short (a length that is not a multiple of the columns): the missing
/// elements count as zeros.
struct LowRank<'a> {
    /// The gradient, then `M`, then the result.
    out: &'a mut [f32],
    /// Its residual and warm start.
    c: &'a mut Compressor,
    rows: usize,
    cols: usize,
    rank: usize,
}

impl<'a> LowRank<'a> {
    /// Checks the residual's length, shapes the matrix, takes the warm start.
    fn start(out: &'a mut [f32], c: &'a mut Compressor, rank: usize) -> Result<LowRank<'a>> {
        let n = out.len();
        check_residual(c, n)?;
        let (rows, cols) = c.shape(n);
        let rank = rank.min(rows).min(cols).max(1);
        if c.q.len() != cols * rank {
            c.q = warm_start(cols * rank);
        }
        Ok(LowRank {
            out,
            c,
            rows,
            cols,
            rank,
        })
    }

    /// `M = gradient + residual` and `P = M Q`: one dot product of a row of M with a row of Qᵀ
    /// per element.
    fn p_into(&mut self, p: &mut [f32]) {
        let rows = self
            .out
            .chunks_mut(self.cols)
            .zip(self.c.residual.chunks(self.cols));
        for ((m_row, r_row), p_row) in rows.zip(p.chunks_exact_mut(self.rank)) {
            for (x, r) in m_row.iter_mut().zip(r_row) {
                *x += r;
            }
            for (pk, qt_k) in p_row.iter_mut().zip(self.c.q.chunks_exact(self.cols)) {
                *pk = dot(m_row, qt_k);
            }
        }
    }

    /// `Qᵀ = Pᵀ M`: each row of M added, scaled, into every row of Qᵀ.
    fn q_into(&self, p: &[f32], qt: &mut [f32]) {
        for (m_row, p_row) in self.out.chunks(self.cols).zip(p.chunks_exact(self.rank)) {
            for (qt_k, &pk) in qt.chunks_exact_mut(self.cols).zip(p_row) {
                axpy(pk, m_row, qt_k);
            }
        }
    }

    /// `P Qᵀ` a row at a time into the gradient; the residual keeps what the average misses of
    /// this rank's M; `Qᵀ` becomes the next step's start.
    fn finish(&mut self, p: &[f32], qt: &[f32], world: f32, op: ReduceOp) {
        let cols = self.cols;
        let mut approx = vec![0f32; cols];
        let rows = self
            .out
            .chunks_mut(cols)
            .zip(self.c.residual.chunks_mut(cols));
        for ((m_row, r_row), p_row) in rows.zip(p.chunks_exact(self.rank)) {
            approx.fill(0.0);
            for (qt_k, &pk) in qt.chunks_exact(cols).zip(p_row) {
                axpy(pk, qt_k, &mut approx);
            }
            for ((x, r), &a) in m_row.iter_mut().zip(r_row).zip(&approx) {
                let mean = a / world;
                *r = *x - mean;
                *x = if op == ReduceOp::Avg { mean } else { a };
            }
        }
        self.c.q.clear();
        self.c.q.extend_from_slice(qt);
    }
}

/// `a · b` with eight running sums (a dependency chain the compiler can vectorise), compiled for
/// each SIMD level and the best the CPU has chosen at run time.
#[multiversion::multiversion(targets = "simd")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len().min(b.len()));
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum::<f32>()
}

/// `y += s · x`, compiled as [`dot`] is.
#[multiversion::multiversion(targets = "simd")]
fn axpy(s: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += s * xi;
    }
}

/// Top-k and PowerSGD add gradients: other operators are refused, naming the compression.
fn sum_or_avg(op: ReduceOp, what: &str) -> Result<()> {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => Ok(()),
        other => Err(Error::invalid(
            "op",
            format!("{what} compression sums gradients; {other:?} cannot be computed from it"),
        )),
    }
}

/// Makes the residual as long as the gradient on first use; a later gradient of another length
/// is refused (the compressor belongs to one tensor).
fn check_residual(c: &mut Compressor, n: usize) -> Result<()> {
    if c.residual.is_empty() {
        c.residual = vec![0.0; n];
    }
    if c.residual.len() != n {
        return Err(Error::invalid(
            "buffer",
            format!(
                "this compressor holds the residual of a tensor of {} elements, not {n}: keep one compressor per tensor",
                c.residual.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::ClusterSpec;

    fn one() -> ProcessGroup {
        let spec = ClusterSpec::from_vars(&[("UNSET", "")]).expect("a group of one");
        ProcessGroup::init(&spec, None, GroupConfig::default()).expect("a group of one")
    }

    fn grad(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 37 + seed * 101) % 97) as f32 / 97.0 - 0.5) * (1.0 + (i % 5) as f32))
            .collect()
    }

    fn power(rank: usize, columns: usize) -> Compressor {
        Compressor::new(Compression::PowerSgd { rank }).with_columns(columns)
    }

    /// Error feedback loses nothing: over several steps, what was sent plus what is still owed
    /// is what came in (a group of one, so the average is this rank's own). A length that is not
    /// a multiple of the columns (a short last row) included.
    #[test]
    fn what_powersgd_sends_plus_its_residual_adds_up_to_its_inputs() {
        let pg = one();
        for (len, cols) in [(35, 7), (33, 7), (12, 4)] {
            let mut c = power(1, cols);
            let (mut sent, mut came) = (vec![0f64; len], vec![0f64; len]);
            for step in 0..4 {
                let mut g = grad(len, step);
                came.iter_mut().zip(&g).for_each(|(a, x)| *a += *x as f64);
                pg.allreduce_compressed(&mut g, ReduceOp::Avg, &mut c)
                    .unwrap();
                sent.iter_mut().zip(&g).for_each(|(a, x)| *a += *x as f64);
            }
            let rank_one = grad(len, 0) != {
                let mut g = grad(len, 0);
                pg.allreduce_compressed(&mut g, ReduceOp::Avg, &mut power(1, cols))
                    .unwrap();
                g
            };
            assert!(rank_one, "{len}: rank 1 keeps the matrix whole?");
            for i in 0..len {
                let total = sent[i] + c.residual[i] as f64;
                assert!(
                    (total - came[i]).abs() < 1e-4,
                    "{len}/{cols} [{i}]: {total} vs {}",
                    came[i]
                );
            }
        }
    }

    /// With as many factors as columns (fewer than rows), `P` spans M's columns and `P Qᵀ` is M
    /// itself: the products are right (rows of 8 values and more take the vector loops).
    #[test]
    fn powersgd_with_as_many_factors_as_columns_returns_the_matrix() {
        let pg = one();
        for (rows, cols) in [(40usize, 10usize), (24, 17), (9, 3)] {
            let mut g = grad(rows * cols, 4);
            pg.allreduce_compressed(&mut g, ReduceOp::Avg, &mut power(cols, cols))
                .unwrap();
            for (i, (x, want)) in g.iter().zip(grad(rows * cols, 4)).enumerate() {
                assert!(
                    (x - want).abs() < 1e-4,
                    "{rows}x{cols} [{i}]: {x} vs {want}"
                );
            }
        }
    }

    /// Rank 2 of wider matrices against a float64 reference written here (plain loops, QR by
    /// Gram-Schmidt): what every product computes, not only what it spans.
    #[test]
    fn powersgd_of_rank_two_matches_a_float64_reference() {
        let pg = one();
        for (rows, cols) in [(12usize, 10usize), (9, 17)] {
            let m: Vec<f64> = grad(rows * cols, 5).iter().map(|x| *x as f64).collect();
            let qt: Vec<f64> = crate::compression::warm_start(2 * cols)
                .iter()
                .map(|x| *x as f64)
                .collect();
            // P = M Q, columns orthonormalised in order.
            let mut p = vec![[0f64; 2]; rows];
            for (r, pr) in p.iter_mut().enumerate() {
                for (k, pk) in pr.iter_mut().enumerate() {
                    *pk = (0..cols).map(|c| m[r * cols + c] * qt[k * cols + c]).sum();
                }
            }
            for k in 0..2 {
                for prev in 0..k {
                    let d: f64 = p.iter().map(|row| row[k] * row[prev]).sum();
                    p.iter_mut().for_each(|row| row[k] -= d * row[prev]);
                }
                let n = p.iter().map(|row| row[k] * row[k]).sum::<f64>().sqrt();
                p.iter_mut().for_each(|row| row[k] /= n);
            }
            let mut g = grad(rows * cols, 5);
            pg.allreduce_compressed(&mut g, ReduceOp::Sum, &mut power(2, cols))
                .unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    // (P Pᵀ M)[r][c]
                    let want: f64 = (0..2)
                        .map(|k| {
                            p[r][k] * (0..rows).map(|i| p[i][k] * m[i * cols + c]).sum::<f64>()
                        })
                        .sum();
                    let got = g[r * cols + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{rows}x{cols} [{r}][{c}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A batch of exact tensors only: one allreduce, their values kept (a group of one).
    #[test]
    fn a_batch_of_exact_tensors_only_keeps_them() {
        let pg = one();
        let (mut a, mut b) = (grad(6, 1), grad(2, 2));
        pg.allreduce_power_sgd_batch(Vec::new(), vec![&mut a[..], &mut b[..]], ReduceOp::Avg)
            .unwrap();
        assert_eq!((a, b), (grad(6, 1), grad(2, 2)));
    }

    /// A batch gives each matrix what it alone would get, and the exact tensors their values.
    #[test]
    fn a_batch_gives_each_matrix_what_it_alone_gets_and_leaves_the_exact_ones_exact() {
        let pg = one();
        let shapes = [(6usize, 5usize), (4, 3), (9, 2)];
        let alone: Vec<(Vec<f32>, Compressor)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, cols))| {
                let (mut g, mut c) = (grad(r * cols, i), power(2, cols));
                for _ in 0..2 {
                    g = grad(r * cols, i);
                    pg.allreduce_compressed(&mut g, ReduceOp::Sum, &mut c)
                        .unwrap();
                }
                (g, c)
            })
            .collect();
        let mut comps: Vec<Compressor> = shapes.iter().map(|&(_, cols)| power(2, cols)).collect();
        let mut bias = grad(5, 9);
        let mut gs = Vec::new();
        for _ in 0..2 {
            gs = shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| grad(r * c, i))
                .collect::<Vec<_>>();
            bias = grad(5, 9);
            let matrices = gs
                .iter_mut()
                .map(|g| &mut g[..])
                .zip(comps.iter_mut())
                .collect();
            pg.allreduce_power_sgd_batch(matrices, vec![&mut bias[..]], ReduceOp::Sum)
                .unwrap();
        }
        for ((g, c), (want, want_c)) in gs.iter().zip(&comps).zip(&alone) {
            assert_eq!(g, want);
            assert_eq!((&c.residual, &c.q), (&want_c.residual, &want_c.q));
        }
        assert_eq!(bias, grad(5, 9));
        // Nothing to send: nothing sent, no error.
        pg.allreduce_power_sgd_batch(Vec::new(), Vec::new(), ReduceOp::Avg)
            .unwrap();
    }

    /// Several gradients fused: bf16 rounds each once in place (a group of one: each value
    /// becomes its bf16 rounding), top-k treats them as one gradient with one residual.
    #[test]
    fn fused_gradients_are_compressed_as_one() {
        let pg = one();
        let (mut a, mut b) = (grad(10, 1), grad(3, 2));
        let mut c = Compressor::new(Compression::Bf16);
        pg.allreduce_compressed_many(vec![&mut a[..], &mut b[..]], ReduceOp::Sum, &mut c)
            .unwrap();
        let round = |v: Vec<f32>| -> Vec<f32> {
            v.iter()
                .map(|x| half::bf16::from_f32(*x).to_f32())
                .collect()
        };
        assert_eq!(
            (a.clone(), b.clone()),
            (round(grad(10, 1)), round(grad(3, 2)))
        );
        assert_ne!(a, grad(10, 1));
        let mut flat: Vec<f32> = grad(10, 1).into_iter().chain(grad(3, 2)).collect();
        let mut alone = Compressor::new(Compression::TopK { fraction: 0.25 });
        pg.allreduce_compressed(&mut flat, ReduceOp::Sum, &mut alone)
            .unwrap();
        let (mut a, mut b) = (grad(10, 1), grad(3, 2));
        let mut c = Compressor::new(Compression::TopK { fraction: 0.25 });
        pg.allreduce_compressed_many(vec![&mut a[..], &mut b[..]], ReduceOp::Sum, &mut c)
            .unwrap();
        assert_eq!([a, b].concat(), flat);
        assert_eq!(c.residual, alone.residual);
    }

    /// Refusals come before anything changes: a compressor of another setting (named by its
    /// place), an operator PowerSGD cannot compute, a residual of another length further down
    /// the batch (the first matrix then keeps its gradient and its state).
    #[test]
    fn a_bad_batch_is_refused_before_any_matrix_changes() {
        let pg = one();
        let (mut a, mut b) = (grad(12, 1), grad(12, 2));
        let mut ca = power(2, 4);
        let mut bf = Compressor::new(Compression::Bf16);
        let e = pg
            .allreduce_power_sgd_batch(
                vec![(&mut a[..], &mut ca), (&mut b[..], &mut bf)],
                vec![],
                ReduceOp::Avg,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("matrix 1") && e.to_string().contains("not bf16"),
            "{e}"
        );
        let e = pg
            .allreduce_power_sgd_batch(vec![(&mut a[..], &mut ca)], vec![], ReduceOp::Max)
            .unwrap_err();
        assert!(e.to_string().contains("powersgd"), "{e}");
        // A compressor that served a tensor of 8 elements, given one of 12.
        let mut cb = power(2, 4);
        pg.allreduce_compressed(&mut grad(8, 3), ReduceOp::Avg, &mut cb)
            .unwrap();
        pg.allreduce_compressed(&mut grad(12, 3), ReduceOp::Avg, &mut ca)
            .unwrap();
        let state = ca.state();
        let e = pg
            .allreduce_power_sgd_batch(
                vec![(&mut a[..], &mut ca), (&mut b[..], &mut cb)],
                vec![],
                ReduceOp::Avg,
            )
            .unwrap_err();
        assert!(e.to_string().contains("8 elements, not 12"), "{e}");
        assert_eq!((a, ca.state()), (grad(12, 1), state));
        // The same batch with a right compressor goes through.
        let mut cb = power(2, 4);
        let (mut a, mut b) = (grad(12, 1), grad(12, 2));
        pg.allreduce_power_sgd_batch(
            vec![(&mut a[..], &mut ca), (&mut b[..], &mut cb)],
            vec![],
            ReduceOp::Avg,
        )
        .unwrap();
    }
}
