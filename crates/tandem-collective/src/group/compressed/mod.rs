//! Gradient allreduces with fewer bytes on the wire ([`crate::compression`]): the group's side,
//! which moves what a [`Compressor`] makes of a gradient and turns it back into the result,
//! identical on every rank.

use super::*;
use crate::compression::{Compression, Compressor, HALF_PIECE, narrow, scatter_sum, top_k, widen};

mod power_sgd;

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
mod tests;
