//! PowerSGD through the group: each gradient a matrix sent as two thin factors, several
//! matrices (and exact tensors) batched into two allreduces in all.

use super::*;
use crate::compression::{orthonormalise, warm_start};

impl ProcessGroup {
    /// PowerSGD of one gradient: [`ProcessGroup::allreduce_power_sgd_batch`] with it alone.
    pub(super) fn allreduce_power_sgd(
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
