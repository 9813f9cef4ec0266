//! Ring steps between ranks on one machine: instead of streaming a chunk through the sockets, a
//! rank offers it by address (a 32-byte descriptor on the socket) and its right neighbour copies it
//! straight out of its memory (`tandem_peer_memory`), checks the owner still holds its lease for
//! the operation, and acknowledges; the owner waits for the acknowledgement before the chunk may
//! change. Only the descriptors and acknowledgements cross the sockets.

use super::*;

/// Length of the control frames of same-host ring steps.
pub(super) const CONTROL_LEN: usize = 32;
/// "The chunk of this step is ready at this address."
pub(super) const READY: u8 = 1;
/// "I have finished reading the chunk of this step."
pub(super) const DONE: u8 = 2;

/// A control frame of a same-host ring step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Control {
    /// What the message says (a chunk is ready, or taken).
    kind: u8,
    /// The ring step.
    step: u32,
    /// The operation's sequence number.
    seq: u64,
    /// The chunk's address in the sender's memory.
    addr: u64,
    /// Its length in bytes.
    len: u64,
}

impl Control {
    /// The message's bytes.
    fn encode(&self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[0] = self.kind;
        b[4..8].copy_from_slice(&self.step.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// A message from its bytes.
    fn decode(b: &[u8; CONTROL_LEN]) -> Control {
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[r]);
            u64::from_le_bytes(w)
        };
        let mut step = [0u8; 4];
        step.copy_from_slice(&b[4..8]);
        Control {
            kind: b[0],
            step: u32::from_le_bytes(step),
            seq: word(8..16),
            addr: word(16..24),
            len: word(24..32),
        }
    }
}

/// Sends a control message to rank `to` over the socket.
pub(super) async fn put_control(io: &mut Io<'_>, to: usize, c: Control) -> Result<()> {
    let header = io.header;
    io.waiting.set(Waiting::Data(to));
    writer(io.mesh, to)?
        .write_all(&c.encode())
        .await
        .map_err(|e| lost(to, &header, "sending a step descriptor", &e))
}

/// Reads the next control frame from `from` and checks it is `kind` for this operation and step.
pub(super) async fn take_control(
    io: &mut Io<'_>,
    from: usize,
    kind: u8,
    step: usize,
) -> Result<Control> {
    let header = io.header;
    io.waiting.set(Waiting::Data(from));
    let mut b = [0u8; CONTROL_LEN];
    reader(io.mesh, from)?
        .read_exact(&mut b)
        .await
        .map_err(|e| lost(from, &header, "receiving a step descriptor", &e))?;
    let c = Control::decode(&b);
    if c.kind != kind || c.seq != header.seq || c.step as usize != step {
        return Err(Error::transport(
            format!("op #{} {header}", header.seq),
            format!(
                "rank {from} sent frame kind {} for op #{} step {}; expected kind {kind} for step {step}",
                c.kind, c.seq, c.step
            ),
        ));
    }
    Ok(c)
}

/// Announces to the right neighbour that `buf[range]` is ready to be read.
pub(super) async fn offer(
    io: &mut Io<'_>,
    buf: &[u8],
    range: Range<usize>,
    step: usize,
) -> Result<()> {
    let r = right(io.rank, io.world);
    let addr = buf[range.clone()].as_ptr() as usize;
    let c = Control {
        kind: READY,
        step: step as u32,
        seq: io.header.seq,
        addr: addr as u64,
        len: range.len() as u64,
    };
    put_control(io, r, c).await
}

/// Waits for the left neighbour's offer of `len` bytes for `step`; returns the address.
pub(super) async fn offered(io: &mut Io<'_>, len: usize, step: usize) -> Result<usize> {
    let l = left(io.rank, io.world);
    let header = io.header;
    let c = take_control(io, l, READY, step).await?;
    if c.len != len as u64 {
        return Err(Error::OpMismatch(format!(
            "op #{} {header}: rank {l} offered {} bytes at step {step} but rank {} expected {len}",
            header.seq, c.len, io.rank
        )));
    }
    tandem_peer_memory::check_region(c.addr, len as u64).map_err(|why| {
        Error::transport(
            format!("op #{} {header}", header.seq),
            format!("rank {l} offered a chunk that cannot be read: {why}"),
        )
    })
}

/// After reading the left neighbour's chunk: checks it was still inside this operation (so the
/// bytes are what it offered) and tells it the chunk may be reused.
pub(super) async fn finish_read(io: &mut Io<'_>, mem: &PeerMemory, step: usize) -> Result<()> {
    let l = left(io.rank, io.world);
    let header = io.header;
    match mem.still_in(header.seq) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::PeerLost {
                rank: l,
                context: format!(
                    "op #{} {header}: it left the operation while its chunk was being read",
                    header.seq
                ),
            });
        }
        Err(e) => return Err(lost(l, &header, "reading its memory", &e)),
    }
    let done = Control {
        kind: DONE,
        step: step as u32,
        seq: header.seq,
        addr: 0,
        len: 0,
    };
    put_control(io, l, done).await
}

/// Ring reduce-scatter between ranks that read each other's memory: at each step a rank offers its
/// send chunk to the right, reads the left neighbour's offered chunk segment by segment straight
/// into the reduction, acknowledges it, and waits for the right neighbour's acknowledgement before
/// the next step (so no chunk changes while someone reads it).
pub(super) async fn shared_reduce_scatter(
    io: &mut Io<'_>,
    mem: PeerMemory,
    buf: &mut [u8],
    chunks: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let (me, n, l, r) = io.ring();
    let size = dtype.size();
    let header = io.header;
    for step in 0..n - 1 {
        let (s, rc) = reduce_scatter_step(me, n, step);
        let divisor = (op == ReduceOp::Avg && step == n - 2).then_some(n);
        let (send, recv) = (bytes(&chunks[s], size), bytes(&chunks[rc], size));
        offer(io, buf, send, step).await?;
        let addr = offered(io, recv.len(), step).await?;
        io.waiting.set(Waiting::Data(l));
        let segment = io.segment.min(io.scratch.len()) / size * size;
        let segment = segment.max(size);
        for (i, part) in buf[recv].chunks_mut(segment).enumerate() {
            let tmp = &mut io.scratch[..part.len()];
            mem.read(addr + i * segment, tmp)
                .map_err(|e| lost(l, &header, "reading its memory", &e))?;
            timed(|| reduce_into(dtype, op, part, tmp, divisor))?;
        }
        finish_read(io, &mem, step).await?;
        take_control(io, r, DONE, step).await?;
    }
    Ok(())
}

/// Ring allgather between ranks that read each other's memory: each step copies the left
/// neighbour's offered chunk straight into place.
pub(super) async fn shared_allgather(
    io: &mut Io<'_>,
    mem: PeerMemory,
    buf: &mut [u8],
    chunks: &[Range<usize>],
) -> Result<()> {
    let (me, n, l, r) = io.ring();
    let header = io.header;
    for step in 0..n - 1 {
        let (s, rc) = allgather_step(me, n, step);
        offer(io, buf, chunks[s].clone(), step).await?;
        let addr = offered(io, chunks[rc].len(), step).await?;
        io.waiting.set(Waiting::Data(l));
        mem.read(addr, &mut buf[chunks[rc].clone()])
            .map_err(|e| lost(l, &header, "reading its memory", &e))?;
        finish_read(io, &mem, step).await?;
        take_control(io, r, DONE, step).await?;
    }
    Ok(())
}
