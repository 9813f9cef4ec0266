//! The bodies of the TCP ring operations: async functions over the mesh's sockets that borrow the
//! caller's buffer, so sending and receiving overlap without copying the tensor.
//!
//! Why async functions driven by one current-thread runtime per ring (rather than threads per
//! socket): an operation must write to its right neighbour while it reads from its left one, or
//! two ranks that both send first would deadlock once the socket buffers fill; `tokio::join!`
//! gives that overlap on the calling thread, and borrowing the caller's buffer keeps a 1 GiB
//! allreduce at 1 GiB of memory.
//!
//! What is here, by size of the message:
//! - small messages (`B·(n−1)` ≤ `direct_bytes`) skip the ring: one hop to every peer
//!   (`allreduce_direct`) or recursive doubling in power-of-two groups (`allreduce_doubling`), both
//!   through `exchange`, which first polls the sockets with non-blocking calls (a park and wake-up
//!   costs more than a 4 KiB message takes) and then hands what is left to the event loop;
//! - large messages go around the ring: reduce-scatter then allgather in pipelined segments, each
//!   segment reduced as it lands, so the scratch buffer is one segment;
//! - on one machine the ring's large steps copy the left neighbour's chunk by address
//!   (`shared_reduce_scatter`, `shared_allgather`): a 32-byte descriptor on the socket, the bytes
//!   through `tandem_peer_memory`, an acknowledgement before the chunk may change.
//!
//! Every operation first exchanges its header with its neighbours, so ranks that called different
//! things fail with both calls named instead of mixing bytes of different operations. Any I/O error
//! names the peer at fault (`PeerLost`); deadlines and aborts are raced by the caller
//! (`TcpRing::run_op`), not here.

use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::time::Instant;

use tandem_core::{DType, Error, ReduceOp, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::algorithm::chunking::{bytes, partition, segments};
use crate::algorithm::reduce::{reduce_all, reduce_into};
use crate::algorithm::ring::{allgather_step, chain_position, left, reduce_scatter_step, right};
use crate::transport::frame::{HEADER_LEN, OpHeader};
use crate::transport::mesh::Mesh;
use crate::transport::peer_memory::PeerMemory;

/// What an operation is waiting for, so a timeout can name the rank at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The header of `rank` (it has not started the operation).
    Header(usize),
    /// Data from or to `rank`.
    Data(usize),
    /// Nothing yet.
    Nothing,
}

/// Everything an operation body needs.
pub struct Io<'a> {
    /// The connections.
    pub mesh: &'a mut Mesh,
    /// Reusable receive buffer of at least one segment.
    pub scratch: &'a mut [u8],
    /// This rank.
    pub rank: usize,
    /// Group size.
    pub world: usize,
    /// Pipeline segment in bytes.
    pub segment: usize,
    /// Updated before every wait.
    pub waiting: &'a Cell<Waiting>,
    /// This rank's header for the operation.
    pub header: OpHeader,
    /// The last peer whose header arrived and how long after this rank started (straggler stats).
    pub lateness: &'a Cell<Option<(usize, std::time::Duration)>>,
    /// The left neighbour's memory, when every rank of the ring can read its left neighbour's buffers
    /// directly (same machine); ring steps then move only descriptors over the sockets.
    pub memory: Option<PeerMemory>,
    /// Ring operations on smaller buffers (the same length on every rank) stay on the sockets even
    /// with `memory`: a copy by address costs a descriptor and an acknowledgement per step.
    pub shared_min_bytes: usize,
}

fn lost(peer: usize, header: &OpHeader, doing: &str, e: &std::io::Error) -> Error {
    let what = match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => "connection closed".to_string(),
        _ => e.to_string(),
    };
    Error::PeerLost {
        rank: peer,
        context: format!("op #{} {header} while {doing}: {what}", header.seq),
    }
}

fn halves(
    mesh: &mut Mesh,
    from: usize,
    to: usize,
) -> Result<(&mut OwnedReadHalf, &mut OwnedWriteHalf)> {
    let missing = |p: usize| Error::Unusable {
        what: "process group".into(),
        reason: format!("no connection to rank {p}"),
    };
    let r = mesh
        .readers
        .get_mut(from)
        .and_then(Option::as_mut)
        .ok_or_else(|| missing(from))?;
    let w = mesh
        .writers
        .get_mut(to)
        .and_then(Option::as_mut)
        .ok_or_else(|| missing(to))?;
    Ok((r, w))
}

fn reader(mesh: &mut Mesh, from: usize) -> Result<&mut OwnedReadHalf> {
    mesh.readers
        .get_mut(from)
        .and_then(Option::as_mut)
        .ok_or_else(|| Error::Unusable {
            what: "process group".into(),
            reason: format!("no connection to rank {from}"),
        })
}

fn writer(mesh: &mut Mesh, to: usize) -> Result<&mut OwnedWriteHalf> {
    mesh.writers
        .get_mut(to)
        .and_then(Option::as_mut)
        .ok_or_else(|| Error::Unusable {
            what: "process group".into(),
            reason: format!("no connection to rank {to}"),
        })
}

fn mismatch(header: &OpHeader, me: usize, theirs: &OpHeader, them: usize) -> Error {
    if theirs.seq == header.seq {
        Error::OpMismatch(format!(
            "op #{}: rank {them} called {theirs} but rank {me} called {header}",
            header.seq
        ))
    } else {
        Error::OpMismatch(format!(
            "rank {them} is at op #{} {theirs} but rank {me} is at op #{} {header}",
            theirs.seq, header.seq
        ))
    }
}

/// Sends this rank's header right and checks the left neighbour's; every collective starts here.
pub async fn exchange_headers(io: &mut Io<'_>) -> Result<()> {
    let (me, l, r) = (io.rank, left(io.rank, io.world), right(io.rank, io.world));
    let header = io.header;
    let start = Instant::now();
    io.waiting.set(Waiting::Header(l));
    let (rd, wr) = halves(io.mesh, l, r)?;
    let mine = header.encode();
    let mut theirs = [0u8; HEADER_LEN];
    let (sent, got) = tokio::join!(wr.write_all(&mine), rd.read_exact(&mut theirs));
    sent.map_err(|e| lost(r, &header, "sending the header", &e))?;
    got.map_err(|e| lost(l, &header, "receiving the header", &e))?;
    io.lateness.set(Some((l, start.elapsed())));
    let theirs = OpHeader::decode(&theirs).map_err(|m| {
        Error::OpMismatch(format!("op #{}: rank {l} sent garbage: {m}", header.seq))
    })?;
    if !theirs.same_call(&header) {
        return Err(mismatch(&header, me, &theirs, l));
    }
    Ok(())
}

/// Splits `buf` into a shared `send` range and a mutable `recv` range, which must not overlap.
fn split_pair(buf: &mut [u8], send: Range<usize>, recv: Range<usize>) -> (&[u8], &mut [u8]) {
    if send.start >= recv.end {
        let (a, b) = buf.split_at_mut(send.start);
        (&b[..send.len()], &mut a[recv])
    } else {
        let (a, b) = buf.split_at_mut(recv.start);
        (&a[send], &mut b[..recv.len()])
    }
}

async fn recv_reduce(
    rd: &mut OwnedReadHalf,
    dst: &mut [u8],
    scratch: &mut [u8],
    segment: usize,
    dtype: DType,
    op: ReduceOp,
    divisor: Option<usize>,
) -> std::io::Result<()> {
    for part in dst.chunks_mut(segment) {
        let tmp = &mut scratch[..part.len()];
        rd.read_exact(tmp).await?;
        reduce_into(dtype, op, part, tmp, divisor)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Ring reduce-scatter over `chunks` (element ranges); afterwards this rank's chunk holds the result.
async fn ring_reduce_scatter(
    io: &mut Io<'_>,
    buf: &mut [u8],
    chunks: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let (me, n) = (io.rank, io.world);
    let (l, r) = (left(me, n), right(me, n));
    let size = dtype.size();
    let header = io.header;
    if let Some(mem) = io.memory.filter(|_| buf.len() >= io.shared_min_bytes) {
        return shared_reduce_scatter(io, mem, buf, chunks, dtype, op).await;
    }
    for step in 0..n - 1 {
        let (s, rc) = reduce_scatter_step(me, n, step);
        let divisor = (op == ReduceOp::Avg && step == n - 2).then_some(n);
        let (send, recv) = split_pair(buf, bytes(&chunks[s], size), bytes(&chunks[rc], size));
        io.waiting.set(Waiting::Data(l));
        let (rd, wr) = halves(io.mesh, l, r)?;
        let (sent, got) = tokio::join!(
            wr.write_all(send),
            recv_reduce(rd, recv, io.scratch, io.segment, dtype, op, divisor)
        );
        sent.map_err(|e| lost(r, &header, "sending", &e))?;
        got.map_err(|e| lost(l, &header, "receiving", &e))?;
    }
    Ok(())
}

/// Ring allgather over `chunks` (byte ranges), each rank starting with its own chunk in place.
async fn ring_allgather(io: &mut Io<'_>, buf: &mut [u8], chunks: &[Range<usize>]) -> Result<()> {
    let (me, n) = (io.rank, io.world);
    let (l, r) = (left(me, n), right(me, n));
    let header = io.header;
    if let Some(mem) = io.memory.filter(|_| buf.len() >= io.shared_min_bytes) {
        return shared_allgather(io, mem, buf, chunks).await;
    }
    for step in 0..n - 1 {
        let (s, rc) = allgather_step(me, n, step);
        let (send, recv) = split_pair(buf, chunks[s].clone(), chunks[rc].clone());
        io.waiting.set(Waiting::Data(l));
        let (rd, wr) = halves(io.mesh, l, r)?;
        let (sent, got) = tokio::join!(wr.write_all(send), rd.read_exact(recv));
        sent.map_err(|e| lost(r, &header, "sending", &e))?;
        got.map_err(|e| lost(l, &header, "receiving", &e))?;
    }
    Ok(())
}

/// Length of the control frames of same-host ring steps.
const CONTROL_LEN: usize = 32;
/// "The chunk of this step is ready at this address."
const READY: u8 = 1;
/// "I have finished reading the chunk of this step."
const DONE: u8 = 2;

/// A control frame of a same-host ring step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    kind: u8,
    step: u32,
    seq: u64,
    addr: u64,
    len: u64,
}

impl Control {
    fn encode(&self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[0] = self.kind;
        b[4..8].copy_from_slice(&self.step.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

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

async fn put_control(io: &mut Io<'_>, to: usize, c: Control) -> Result<()> {
    let header = io.header;
    io.waiting.set(Waiting::Data(to));
    writer(io.mesh, to)?
        .write_all(&c.encode())
        .await
        .map_err(|e| lost(to, &header, "sending a step descriptor", &e))
}

/// Reads the next control frame from `from` and checks it is `kind` for this operation and step.
async fn take_control(io: &mut Io<'_>, from: usize, kind: u8, step: usize) -> Result<Control> {
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
async fn offer(io: &mut Io<'_>, buf: &[u8], range: Range<usize>, step: usize) -> Result<()> {
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
async fn offered(io: &mut Io<'_>, len: usize, step: usize) -> Result<usize> {
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
async fn finish_read(io: &mut Io<'_>, mem: &PeerMemory, step: usize) -> Result<()> {
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
async fn shared_reduce_scatter(
    io: &mut Io<'_>,
    mem: PeerMemory,
    buf: &mut [u8],
    chunks: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let (me, n) = (io.rank, io.world);
    let (l, r) = (left(me, n), right(me, n));
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
            reduce_into(dtype, op, part, tmp, divisor)?;
        }
        finish_read(io, &mem, step).await?;
        take_control(io, r, DONE, step).await?;
    }
    Ok(())
}

/// Ring allgather between ranks that read each other's memory: each step copies the left
/// neighbour's offered chunk straight into place.
async fn shared_allgather(
    io: &mut Io<'_>,
    mem: PeerMemory,
    buf: &mut [u8],
    chunks: &[Range<usize>],
) -> Result<()> {
    let (me, n) = (io.rank, io.world);
    let (l, r) = (left(me, n), right(me, n));
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

/// Allreduce in place: reduce-scatter then allgather around the ring.
pub async fn allreduce(io: &mut Io<'_>, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    exchange_headers(io).await?;
    let chunks = partition(buf.len() / dtype.size(), io.world);
    ring_reduce_scatter(io, buf, &chunks, dtype, op).await?;
    let byte_chunks: Vec<Range<usize>> = chunks.iter().map(|c| bytes(c, dtype.size())).collect();
    ring_allgather(io, buf, &byte_chunks).await
}

/// Reduce-scatter in place; returns the element range of this rank's reduced chunk.
pub async fn reduce_scatter(
    io: &mut Io<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<Range<usize>> {
    exchange_headers(io).await?;
    let chunks = partition(buf.len() / dtype.size(), io.world);
    ring_reduce_scatter(io, buf, &chunks, dtype, op).await?;
    Ok(chunks[io.rank].clone())
}

/// Allgather: `output` is `world` blocks of `input.len()` bytes, block `r` from rank `r`.
pub async fn allgather(io: &mut Io<'_>, input: &[u8], output: &mut [u8]) -> Result<()> {
    exchange_headers(io).await?;
    let m = input.len();
    output[io.rank * m..(io.rank + 1) * m].copy_from_slice(input);
    let chunks: Vec<Range<usize>> = (0..io.world).map(|r| r * m..(r + 1) * m).collect();
    ring_allgather(io, output, &chunks).await
}

/// Broadcast from `root` along the ring, pipelined in segments.
pub async fn broadcast(io: &mut Io<'_>, buf: &mut [u8], root: usize) -> Result<()> {
    exchange_headers(io).await?;
    let (me, n) = (io.rank, io.world);
    let (l, r) = (left(me, n), right(me, n));
    let pos = chain_position(me, root, n);
    let header = io.header;
    let segs = segments(0..buf.len(), io.segment);
    if pos == 0 {
        io.waiting.set(Waiting::Data(r));
        let wr = writer(io.mesh, r)?;
        return wr
            .write_all(buf)
            .await
            .map_err(|e| lost(r, &header, "sending", &e));
    }
    io.waiting.set(Waiting::Data(l));
    if pos == n - 1 {
        let rd = reader(io.mesh, l)?;
        return rd
            .read_exact(buf)
            .await
            .map(|_| ())
            .map_err(|e| lost(l, &header, "receiving", &e));
    }
    let (rd, wr) = halves(io.mesh, l, r)?;
    let mut prev: Option<Range<usize>> = None;
    for seg in &segs {
        let (head, tail) = buf.split_at_mut(seg.start);
        let recv = &mut tail[..seg.len()];
        let send = prev.as_ref().map(|p| &head[p.clone()]).unwrap_or(&[]);
        let (sent, got) = tokio::join!(wr.write_all(send), rd.read_exact(recv));
        sent.map_err(|e| lost(r, &header, "forwarding", &e))?;
        got.map_err(|e| lost(l, &header, "receiving", &e))?;
        prev = Some(seg.clone());
    }
    if let Some(p) = prev {
        wr.write_all(&buf[p])
            .await
            .map_err(|e| lost(r, &header, "forwarding", &e))?;
    }
    Ok(())
}

/// Reduce to `root`: reduce-scatter around the ring, then every rank sends its chunk to the root.
/// Buffers of other ranks serve as scratch and hold partial results afterwards.
pub async fn reduce(
    io: &mut Io<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    root: usize,
) -> Result<()> {
    exchange_headers(io).await?;
    let size = dtype.size();
    let chunks = partition(buf.len() / size, io.world);
    ring_reduce_scatter(io, buf, &chunks, dtype, op).await?;
    let header = io.header;
    let mine = bytes(&chunks[io.rank], size);
    if io.rank != root {
        io.waiting.set(Waiting::Data(root));
        let wr = writer(io.mesh, root)?;
        return wr
            .write_all(&buf[mine])
            .await
            .map_err(|e| lost(root, &header, "sending to the root", &e));
    }
    for (peer, chunk) in chunks.iter().enumerate() {
        if peer == root || chunk.is_empty() {
            continue;
        }
        io.waiting.set(Waiting::Data(peer));
        let rd = reader(io.mesh, peer)?;
        rd.read_exact(&mut buf[bytes(chunk, size)])
            .await
            .map_err(|e| lost(peer, &header, "gathering", &e))?;
    }
    Ok(())
}

/// Point-to-point send: the header, then the bytes.
pub async fn send(io: &mut Io<'_>, buf: &[u8], to: usize) -> Result<()> {
    let header = io.header;
    io.waiting.set(Waiting::Data(to));
    let wr = writer(io.mesh, to)?;
    let enc = header.encode();
    wr.write_all(&enc)
        .await
        .map_err(|e| lost(to, &header, "sending", &e))?;
    wr.write_all(buf)
        .await
        .map_err(|e| lost(to, &header, "sending", &e))
}

/// Point-to-point receive: checks the sender's header against `expected`, then reads the bytes.
pub async fn recv(io: &mut Io<'_>, buf: &mut [u8], from: usize) -> Result<()> {
    let header = io.header;
    io.waiting.set(Waiting::Header(from));
    let rd = reader(io.mesh, from)?;
    let mut theirs = [0u8; HEADER_LEN];
    rd.read_exact(&mut theirs)
        .await
        .map_err(|e| lost(from, &header, "receiving", &e))?;
    let theirs = OpHeader::decode(&theirs)
        .map_err(|m| Error::OpMismatch(format!("message #{} from rank {from}: {m}", header.seq)))?;
    if !theirs.same_call(&header) {
        return Err(Error::OpMismatch(format!(
            "message #{}: rank {from} called {theirs} but rank {} called recv({} x {} from rank {from})",
            header.seq, io.rank, header.dtype, header.count
        )));
    }
    io.waiting.set(Waiting::Data(from));
    rd.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| lost(from, &header, "receiving", &e))
}

/// How long a small allreduce polls its sockets (yielding the CPU between polls) before parking in
/// the event loop: peers' messages usually arrive within microseconds, and a park and wake-up costs
/// more than that.
const DIRECT_SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// One peer's frame (header and payload) as it arrives.
struct Incoming {
    peer: usize,
    got: usize,
    checked: bool,
    arrived: Option<std::time::Duration>,
}

impl Incoming {
    /// Accounts for `n` new bytes; checks the header as soon as it is complete.
    fn advance(
        &mut self,
        n: usize,
        frame: &[u8],
        header: &OpHeader,
        me: usize,
        start: Instant,
    ) -> Result<()> {
        self.got += n;
        if !self.checked && self.got >= HEADER_LEN {
            self.checked = true;
            self.arrived = Some(start.elapsed());
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&frame[..HEADER_LEN]);
            let theirs = OpHeader::decode(&h).map_err(|m| {
                Error::OpMismatch(format!(
                    "op #{}: rank {} sent garbage: {m}",
                    header.seq, self.peer
                ))
            })?;
            if !theirs.same_call(header) {
                return Err(mismatch(header, me, &theirs, self.peer));
            }
        }
        Ok(())
    }
}

/// Sends `msg` (header and data) to each of `peers` and receives each one's frame of the same length
/// into its slot of `inbox` (slot r for rank r, `msg.len()` bytes each), checking every header as it
/// arrives: first polling the sockets for up to [`DIRECT_SPIN`], then in the event loop. Returns the
/// peer whose header came last and when, measured from `start`.
async fn exchange(
    io: &mut Io<'_>,
    peers: &[usize],
    msg: &[u8],
    inbox: &mut [u8],
    start: Instant,
) -> Result<Option<(usize, std::time::Duration)>> {
    let (me, n) = (io.rank, io.world);
    let header = io.header;
    let frame_len = msg.len();
    let left = (me + n - 1) % n;
    let first = if peers.contains(&left) {
        left
    } else {
        peers.first().copied().unwrap_or(left)
    };
    io.waiting.set(Waiting::Header(first));
    let Mesh { readers, writers } = &mut *io.mesh;
    // Fast path: write what the sockets take at once, then poll for the peers' frames.
    let sent = write_now(writers, peers, msg, &header)?;
    let mut incoming: Vec<Incoming> = peers
        .iter()
        .copied()
        .filter(|&p| readers.get(p).is_some_and(Option::is_some))
        .map(|peer| Incoming {
            peer,
            got: 0,
            checked: false,
            arrived: None,
        })
        .collect();
    let mut slots: Vec<&mut [u8]> = inbox.chunks_mut(frame_len.max(1)).collect();
    poll_frames(
        readers,
        &mut incoming,
        &mut slots,
        frame_len,
        &header,
        me,
        start,
    )?;
    // Whatever did not arrive (or go out) by now continues in the event loop.
    finish_in_event_loop(
        readers,
        writers,
        &sent,
        msg,
        &mut incoming,
        slots,
        &header,
        me,
        start,
    )
    .await?;
    Ok(incoming
        .iter()
        .filter_map(|i| i.arrived.map(|t| (i.peer, t)))
        .max_by_key(|(_, t)| *t))
}

/// Writes `msg` to each of `peers` as far as its socket takes it without blocking; returns how
/// much went to each rank (the whole frame counts as sent for ranks that are not peers).
fn write_now(
    writers: &mut [Option<OwnedWriteHalf>],
    peers: &[usize],
    msg: &[u8],
    header: &OpHeader,
) -> Result<Vec<usize>> {
    let frame_len = msg.len();
    let mut sent: Vec<usize> = (0..writers.len())
        .map(|p| if peers.contains(&p) { 0 } else { frame_len })
        .collect();
    for (p, w) in writers.iter_mut().enumerate() {
        if let Some(w) = w.as_mut().filter(|_| sent[p] < frame_len) {
            while sent[p] < frame_len {
                match (&*socket2::SockRef::from(w.as_ref())).write(&msg[sent[p]..]) {
                    Ok(k) => sent[p] += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(lost(p, header, "sending", &e)),
                }
            }
        }
    }
    Ok(sent)
}

/// Reads the peers' frames with non-blocking calls for up to [`DIRECT_SPIN`], yielding the CPU
/// between rounds (a park and wake-up costs more than a small frame takes to arrive).
fn poll_frames(
    readers: &[Option<OwnedReadHalf>],
    incoming: &mut [Incoming],
    slots: &mut [&mut [u8]],
    frame_len: usize,
    header: &OpHeader,
    me: usize,
    start: Instant,
) -> Result<()> {
    while start.elapsed() < DIRECT_SPIN {
        let mut pending = false;
        for inc in incoming.iter_mut().filter(|i| i.got < frame_len) {
            let (p, slot) = (inc.peer, &mut slots[inc.peer]);
            if let Some(r) = &readers[p] {
                match (&*socket2::SockRef::from(r.as_ref())).read(&mut slot[inc.got..frame_len]) {
                    Ok(0) => {
                        let eof = std::io::Error::from(ErrorKind::UnexpectedEof);
                        return Err(lost(p, header, "receiving", &eof));
                    }
                    Ok(k) => inc.advance(k, slot, header, me, start)?,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(lost(p, header, "receiving", &e)),
                }
            }
            pending |= inc.got < frame_len;
        }
        if !pending {
            break;
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// Sends the rest of `msg` and receives the rest of each frame through tokio's event loop.
#[allow(clippy::too_many_arguments)]
async fn finish_in_event_loop(
    readers: &mut [Option<OwnedReadHalf>],
    writers: &mut [Option<OwnedWriteHalf>],
    sent: &[usize],
    msg: &[u8],
    incoming: &mut [Incoming],
    slots: Vec<&mut [u8]>,
    header: &OpHeader,
    me: usize,
    start: Instant,
) -> Result<()> {
    let frame_len = msg.len();
    let header = *header;
    let sends = writers
        .iter_mut()
        .enumerate()
        .filter_map(|(p, w)| w.as_mut().map(|w| (p, w)))
        .filter(|(p, _)| sent[*p] < frame_len)
        .map(|(p, w)| {
            let rest = &msg[sent[p]..];
            async move {
                w.write_all(rest)
                    .await
                    .map_err(|e| lost(p, &header, "sending", &e))
            }
        });
    let mut slot_of: Vec<Option<&mut [u8]>> = slots.into_iter().map(Some).collect();
    let mut reader_of: Vec<Option<&mut OwnedReadHalf>> =
        readers.iter_mut().map(Option::as_mut).collect();
    let recvs = incoming
        .iter_mut()
        .filter(|i| i.got < frame_len)
        .filter_map(|inc| {
            let p = inc.peer;
            let slot = slot_of[p].take()?;
            let r = reader_of[p].take()?;
            Some(async move {
                if !inc.checked {
                    r.read_exact(&mut slot[inc.got..HEADER_LEN])
                        .await
                        .map_err(|e| lost(p, &header, "receiving the header", &e))?;
                    let k = HEADER_LEN - inc.got;
                    inc.advance(k, slot, &header, me, start)?;
                }
                r.read_exact(&mut slot[inc.got..frame_len])
                    .await
                    .map_err(|e| lost(p, &header, "receiving", &e))?;
                inc.got = frame_len;
                Ok::<(), Error>(())
            })
        });
    let (sent_all, got_all) = tokio::join!(
        futures::future::join_all(sends),
        futures::future::join_all(recvs)
    );
    for r in sent_all.into_iter().chain(got_all) {
        r?;
    }
    Ok(())
}

/// Whether [`allreduce_doubling`] serves this call: a power-of-two group of 4 or more (with 2 it is
/// the one-hop exchange), and an element type whose partial results are exact to combine in pairs
/// (half types must reduce in `f32` and round once, so they take the one hop).
pub fn doubling_fits(world: usize, dtype: DType) -> bool {
    world >= 4 && world.is_power_of_two() && !matches!(dtype, DType::F16 | DType::BF16)
}

/// Allreduce for small buffers by recursive doubling: in round k each rank swaps its partial result
/// with rank `me ^ 2^k` and both combine the pair in block order (lower ranks' block first), so after
/// log2(n) rounds of one send and one receive every rank holds the same bits. Fewer messages than the
/// one-hop exchange (log2(n) instead of n−1 per rank) at the price of sequential rounds. Each round
/// checks the partner's header; an average divides once, after the last round. Callers check
/// [`doubling_fits`].
pub async fn allreduce_doubling(
    io: &mut Io<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let (me, n) = (io.rank, io.world);
    let frame_len = HEADER_LEN + buf.len();
    let mut msg = vec![0u8; frame_len];
    msg[..HEADER_LEN].copy_from_slice(&io.header.encode());
    let mut inbox = vec![0u8; frame_len * n];
    let start = Instant::now();
    let mut last = None;
    let combine = if op == ReduceOp::Avg {
        ReduceOp::Sum
    } else {
        op
    };
    let mut bit = 1;
    while bit < n {
        let partner = me ^ bit;
        msg[HEADER_LEN..].copy_from_slice(buf);
        let arrived = exchange(io, &[partner], &msg, &mut inbox, start).await?;
        // Only the first round says who started late: later partners may only be passing on a
        // wait of their own (as on the ring, where the right neighbour notices).
        if bit == 1 {
            last = arrived;
        }
        let theirs = &inbox[partner * frame_len + HEADER_LEN..(partner + 1) * frame_len];
        let mine = &msg[HEADER_LEN..];
        let (low, high) = if me < partner {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        buf.copy_from_slice(low);
        let divisor = (op == ReduceOp::Avg && bit * 2 == n).then_some(n);
        reduce_into(dtype, combine, buf, high, divisor)?;
        bit <<= 1;
    }
    io.lateness.set(last);
    Ok(())
}

/// Allreduce for small buffers in one hop: every rank sends its header and data to every other rank,
/// then each reduces all contributions in rank order, so every rank computes bit-identical results.
/// Also checks every peer's header, not only the left neighbour's.
pub async fn allreduce_direct(
    io: &mut Io<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let (me, n) = (io.rank, io.world);
    let header = io.header;
    let len = buf.len();
    let frame_len = HEADER_LEN + len;
    let mut msg = Vec::with_capacity(frame_len);
    msg.extend_from_slice(&header.encode());
    msg.extend_from_slice(buf);
    // Every peer's whole frame lands in its own slot: one read per message when it is all there.
    let mut inbox = vec![0u8; frame_len * n];
    let peers: Vec<usize> = (0..n).filter(|&p| p != me).collect();
    let last = exchange(io, &peers, &msg, &mut inbox, Instant::now()).await?;
    io.lateness.set(last);
    // Reduce in rank order on every rank, so every rank computes the same bits.
    inbox[me * frame_len + HEADER_LEN..(me + 1) * frame_len].copy_from_slice(buf);
    let parts: Vec<&[u8]> = (0..n)
        .map(|r| &inbox[r * frame_len + HEADER_LEN..(r + 1) * frame_len])
        .collect();
    reduce_all(dtype, op, &parts, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recursive_doubling_serves_power_of_two_groups_of_four_and_more_without_half_types() {
        for (world, dtype, fits) in [
            (2, DType::F32, false),
            (3, DType::F32, false),
            (4, DType::F32, true),
            (4, DType::I64, true),
            (4, DType::F16, false),
            (4, DType::BF16, false),
            (6, DType::F64, false),
            (8, DType::U8, true),
            (16, DType::I32, true),
        ] {
            assert_eq!(doubling_fits(world, dtype), fits, "{world} {dtype}");
        }
    }
}
