//! Collectives on GPU memory that another library owns: a torch tensor, a CuPy array, anything that
//! hands out a device address. Tandem neither allocates nor frees it; each call reads and writes it
//! in place and returns once the collective has finished on the GPU.
//!
//! Why a separate door: [`DeviceBuffer`](super::DeviceBuffer) owns its memory, so Rust's borrow
//! rules guard it. A foreign address carries no such guarantee, so [`ForeignBuffer::new`] is
//! `unsafe` (the caller vouches for the memory) and every call checks what can be checked before
//! any byte moves: lengths, types, roots and peers, overlap, and (with CUDA) that the address lies
//! inside one allocation on the group's GPU.
//!
//! ```no_run
//! use tandem_collective::ProcessGroup;
//! use tandem_collective::device::{DeviceGroup, ForeignBuffer};
//! use tandem_core::{DType, ReduceOp};
//! let pg = ProcessGroup::from_env()?;
//! let gpu = DeviceGroup::new(&pg, 0)?;
//! # let (addr, numel) = (0u64, 0usize);
//! // `addr` is the address of `numel` f32 values on GPU 0 (e.g. torch's `t.data_ptr()`), with the
//! // work that writes them finished (torch: `torch.cuda.current_stream().synchronize()`).
//! let grads = unsafe { ForeignBuffer::new(addr, numel, DType::F32) };
//! gpu.allreduce_foreign(grads, ReduceOp::Avg)?;
//! # Ok::<(), tandem_core::Error>(())
//! ```

use tandem_core::{DType, Error, ReduceOp, Result};

use super::DeviceGroup;

/// `len` elements of `dtype` at a device address that something else allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignBuffer {
    /// The device address of the first element.
    addr: u64,
    /// Elements.
    len: usize,
    /// Their type.
    dtype: DType,
}

impl ForeignBuffer {
    /// Describes `len` elements of `dtype` at device address `addr`.
    ///
    /// # Safety
    /// `addr` must be the start of `len` elements of `dtype` in memory of the GPU the
    /// [`DeviceGroup`] was made for, allocated until the call that takes the buffer returns, and
    /// neither read nor written by other GPU work meanwhile: work queued on it before (on any
    /// stream) must have finished, e.g. by synchronizing the stream that wrote it.
    #[allow(unsafe_code)]
    pub unsafe fn new(addr: u64, len: usize, dtype: DType) -> ForeignBuffer {
        ForeignBuffer { addr, len, dtype }
    }

    /// The device address of the first element.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Its size in bytes, or an error naming `what` when that overflows the address space.
    pub(crate) fn bytes(&self, what: &str) -> Result<usize> {
        self.len
            .checked_mul(self.dtype.size())
            .filter(|&n| self.addr.checked_add(n as u64).is_some())
            .ok_or_else(|| {
                Error::invalid(
                    what,
                    format!(
                        "{} elements of {} at {:#x} run past the end of the address space",
                        self.len,
                        self.dtype.name(),
                        self.addr
                    ),
                )
            })
    }
    /// The byte range it covers.
    fn span(&self) -> std::ops::Range<u64> {
        self.addr..self.addr + (self.len * self.dtype.size()) as u64
    }
}

/// Checks `buf` alone: a non-null address when it holds anything, and a size that fits.
pub(crate) fn check_one(what: &str, buf: &ForeignBuffer) -> Result<()> {
    buf.bytes(what)?;
    if buf.addr == 0 && !buf.is_empty() {
        return Err(Error::invalid(what, "a null device address"));
    }
    Ok(())
}

/// Checks that `root` (or a peer, named by `what`) is a rank of a group of `world`, and not `me`
/// when `me` is given.
pub(crate) fn check_rank(what: &str, rank: usize, world: usize, me: Option<usize>) -> Result<()> {
    if rank >= world {
        return Err(Error::invalid(
            what,
            format!("rank {rank} is not below the world size {world}"),
        ));
    }
    if me == Some(rank) {
        return Err(Error::invalid(
            what,
            format!("rank {rank} is this rank; a rank cannot message itself"),
        ));
    }
    Ok(())
}

/// Checks a gather's or a scatter's pair: the same dtype, `big` holding `world` times `small`'s
/// elements, and no overlap except the in-place layout NCCL allows (`small` is this rank's block
/// of `big`).
pub(crate) fn check_pair(
    what: &str,
    small: &ForeignBuffer,
    big: &ForeignBuffer,
    world: usize,
    rank: usize,
) -> Result<()> {
    check_one(what, small)?;
    check_one(what, big)?;
    if small.dtype != big.dtype {
        return Err(Error::invalid(
            what,
            format!(
                "the input holds {} and the output {}; they must match",
                small.dtype.name(),
                big.dtype.name()
            ),
        ));
    }
    let want = small.len.checked_mul(world);
    if want != Some(big.len) {
        return Err(Error::invalid(
            what,
            format!(
                "{} elements do not make {world} blocks of {} (one per rank)",
                big.len, small.len
            ),
        ));
    }
    let (s, b) = (small.span(), big.span());
    let overlap = s.start < b.end && b.start < s.end && !small.is_empty();
    let in_place = s.start == b.start + (rank * small.len * small.dtype.size()) as u64;
    if overlap && !in_place {
        return Err(Error::invalid(
            what,
            "the input overlaps the output other than as this rank's own block",
        ));
    }
    Ok(())
}

impl DeviceGroup {
    /// Allreduce of foreign device memory, in place.
    pub fn allreduce_foreign(&self, buf: ForeignBuffer, op: ReduceOp) -> Result<()> {
        check_one("buffer", &buf)?;
        if buf.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "nccl")]
        {
            self.inner.allreduce_foreign(buf, op)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = op;
            Err(super::not_built())
        }
    }

    /// Broadcast of foreign device memory from `root`, in place.
    pub fn broadcast_foreign(&self, buf: ForeignBuffer, root: usize) -> Result<()> {
        check_one("buffer", &buf)?;
        check_rank("root", root, self.world, None)?;
        if buf.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "nccl")]
        {
            self.inner.broadcast_foreign(buf, root)
        }
        #[cfg(not(feature = "nccl"))]
        {
            Err(super::not_built())
        }
    }

    /// Reduce of foreign device memory into `root`'s (the others' are left as they were).
    pub fn reduce_foreign(&self, buf: ForeignBuffer, op: ReduceOp, root: usize) -> Result<()> {
        check_one("buffer", &buf)?;
        check_rank("root", root, self.world, None)?;
        if buf.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "nccl")]
        {
            self.inner.reduce_foreign(buf, op, root)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = op;
            Err(super::not_built())
        }
    }

    /// Every rank's `input` written into `output` in rank order (`output` holds world × input's
    /// elements; it may hold `input` as this rank's block).
    pub fn allgather_foreign(&self, input: ForeignBuffer, output: ForeignBuffer) -> Result<()> {
        check_pair("allgather", &input, &output, self.world, self.rank)?;
        if input.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "nccl")]
        {
            self.inner.allgather_foreign(input, output)
        }
        #[cfg(not(feature = "nccl"))]
        {
            Err(super::not_built())
        }
    }

    /// Reduces every rank's `input` and writes this rank's block of the result into `output`
    /// (`input` holds world × output's elements).
    pub fn reduce_scatter_foreign(
        &self,
        input: ForeignBuffer,
        output: ForeignBuffer,
        op: ReduceOp,
    ) -> Result<()> {
        check_pair("reduce-scatter", &output, &input, self.world, self.rank)?;
        if output.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "nccl")]
        {
            self.inner.reduce_scatter_foreign(input, output, op)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = op;
            Err(super::not_built())
        }
    }

    /// Sends foreign device memory to rank `to`, which must receive as many elements of the type.
    pub fn send_foreign(&self, buf: ForeignBuffer, to: usize) -> Result<()> {
        check_one("buffer", &buf)?;
        check_rank("to", to, self.world, Some(self.rank))?;
        #[cfg(feature = "nccl")]
        {
            self.inner.send_foreign(buf, to)
        }
        #[cfg(not(feature = "nccl"))]
        {
            Err(super::not_built())
        }
    }

    /// Receives into foreign device memory from rank `from`.
    pub fn recv_foreign(&self, buf: ForeignBuffer, from: usize) -> Result<()> {
        check_one("buffer", &buf)?;
        check_rank("from", from, self.world, Some(self.rank))?;
        #[cfg(feature = "nccl")]
        {
            self.inner.recv_foreign(buf, from)
        }
        #[cfg(not(feature = "nccl"))]
        {
            Err(super::not_built())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn buf(addr: u64, len: usize, dtype: DType) -> ForeignBuffer {
        // SAFETY: these buffers only go through the checks, which read no memory.
        unsafe { ForeignBuffer::new(addr, len, dtype) }
    }

    #[test]
    fn one_buffer_needs_an_address_and_a_size_that_fits() {
        assert!(check_one("b", &buf(0x1000, 4, DType::F32)).is_ok());
        assert!(check_one("b", &buf(0, 0, DType::F32)).is_ok());
        let e = check_one("b", &buf(0, 1, DType::F32)).unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
        // The last byte fits at the very end of the address space; one more does not.
        let last = u64::MAX - 8;
        assert!(check_one("b", &buf(last, 2, DType::F32)).is_ok());
        let e = check_one("b", &buf(last, 3, DType::F32)).unwrap_err();
        assert!(e.to_string().contains("address space"), "{e}");
        assert!(check_one("b", &buf(1, usize::MAX, DType::F64)).is_err());
    }

    #[test]
    fn ranks_are_checked_against_the_world_and_this_rank() {
        assert!(check_rank("root", 3, 4, None).is_ok());
        let e = check_rank("root", 4, 4, None).unwrap_err();
        assert!(e.to_string().contains("world size 4"), "{e}");
        assert!(check_rank("to", 1, 4, Some(2)).is_ok());
        let e = check_rank("to", 2, 4, Some(2)).unwrap_err();
        assert!(e.to_string().contains("this rank"), "{e}");
    }

    #[test]
    fn a_gathers_pair_must_match_in_type_and_world_times_size() {
        let small = buf(0x1000, 4, DType::F32);
        assert!(check_pair("g", &small, &buf(0x2000, 12, DType::F32), 3, 0).is_ok());
        let e = check_pair("g", &small, &buf(0x2000, 11, DType::F32), 3, 0).unwrap_err();
        assert!(e.to_string().contains("3 blocks of 4"), "{e}");
        let e = check_pair("g", &small, &buf(0x2000, 13, DType::F32), 3, 0).unwrap_err();
        assert!(e.to_string().contains("3 blocks of 4"), "{e}");
        let e = check_pair("g", &small, &buf(0x2000, 12, DType::I32), 3, 0).unwrap_err();
        assert!(e.to_string().contains("i32"), "{e}");
    }

    #[test]
    fn only_this_ranks_own_block_may_overlap() {
        // 3 ranks, 4 f32 each: the output spans 0x2000..0x2030; rank 1's block starts at 0x2010.
        let out = buf(0x2000, 12, DType::F32);
        assert!(check_pair("g", &buf(0x2010, 4, DType::F32), &out, 3, 1).is_ok());
        let e = check_pair("g", &buf(0x2010, 4, DType::F32), &out, 3, 2).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        let e = check_pair("g", &buf(0x2004, 4, DType::F32), &out, 3, 0).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        // Touching but not overlapping, on either side.
        assert!(check_pair("g", &buf(0x2030, 4, DType::F32), &out, 3, 0).is_ok());
        assert!(check_pair("g", &buf(0x1ff0, 4, DType::F32), &out, 3, 0).is_ok());
        assert!(check_pair("g", &buf(0x1ff4, 4, DType::F32), &out, 3, 0).is_err());
    }
}
