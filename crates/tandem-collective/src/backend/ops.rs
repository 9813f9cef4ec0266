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
use tandem_tls::stream::{ReadHalf, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::algorithm::chunking::{bytes, partition, segments};
use crate::algorithm::reduce::{reduce_all, reduce_into};
use crate::algorithm::ring::{allgather_step, chain_position, left, reduce_scatter_step, right};
use crate::transport::frame::{HEADER_LEN, OpHeader};
use crate::transport::mesh::Mesh;
use crate::transport::peer_memory::PeerMemory;

mod hierarchical;
mod same_host;
mod small;

pub use hierarchical::{HostLayout, allreduce_hierarchical};

use same_host::{shared_allgather, shared_reduce_scatter};
pub use small::{allreduce_direct, allreduce_doubling, doubling_fits};

/// What an operation is waiting for, so a timeout can name the rank at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    pub waiting: &'a crate::stall::WaitCell,
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

impl Io<'_> {
    /// This rank's place in the ring: `(rank, world, left neighbour, right neighbour)`.
    pub fn ring(&self) -> (usize, usize, usize, usize) {
        let (me, n) = (self.rank, self.world);
        (me, n, left(me, n), right(me, n))
    }
}

/// A connection lost while `doing` something in an operation, naming the peer and the operation.
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

/// Runs a reduction, its time kept as a reduce span of the operation on the timeline (the
/// arithmetic of [`crate::algorithm::reduce`] knows nothing of observation).
fn timed<T>(reduce: impl FnOnce() -> T) -> T {
    let _timer = crate::observe::ReduceTimer::start();
    reduce()
}

/// The mesh has no connection to rank `p` (it was never made, or is lent out).
fn no_connection(p: usize) -> Error {
    Error::Unusable {
        what: "process group".into(),
        reason: format!("no connection to rank {p}"),
    }
}

/// The read half from `from` and the write half to `to`, borrowed together.
fn halves(mesh: &mut Mesh, from: usize, to: usize) -> Result<(&mut ReadHalf, &mut WriteHalf)> {
    let r = mesh
        .readers
        .get_mut(from)
        .and_then(Option::as_mut)
        .ok_or_else(|| no_connection(from))?;
    let w = mesh
        .writers
        .get_mut(to)
        .and_then(Option::as_mut)
        .ok_or_else(|| no_connection(to))?;
    Ok((r, w))
}

/// The read half from rank `from`.
fn reader(mesh: &mut Mesh, from: usize) -> Result<&mut ReadHalf> {
    mesh.readers
        .get_mut(from)
        .and_then(Option::as_mut)
        .ok_or_else(|| no_connection(from))
}

/// The write half to rank `to`.
fn writer(mesh: &mut Mesh, to: usize) -> Result<&mut WriteHalf> {
    mesh.writers
        .get_mut(to)
        .and_then(Option::as_mut)
        .ok_or_else(|| no_connection(to))
}

/// A peer's header that does not match this rank's call: both calls named.
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

/// Receives `dst.len()` bytes from a peer a segment at a time, reducing each into `dst` as it
/// arrives.
async fn recv_reduce(
    rd: &mut ReadHalf,
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
        timed(|| reduce_into(dtype, op, part, tmp, divisor))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Splits `buf` into the disjoint byte ranges `chunks` (given in any order), in that order.
fn carve<'b>(buf: &'b mut [u8], chunks: &[Range<usize>]) -> Vec<&'b mut [u8]> {
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by_key(|&i| chunks[i].start);
    let mut out: Vec<&'b mut [u8]> = (0..chunks.len()).map(|_| Default::default()).collect();
    let (mut rest, mut offset) = (buf, 0);
    for i in order {
        let c = &chunks[i];
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut(c.start.saturating_sub(offset).min(tail.len()));
        let (mine, tail) = tail.split_at_mut(c.len().min(tail.len()));
        out[i] = mine;
        rest = tail;
        offset = c.end;
    }
    out
}

/// Sends every segment handed over through `segments` to the right neighbour, in order, until the
/// sender side is dropped: the sending half of a streamed ring phase.
async fn send_segments(
    wr: &mut WriteHalf,
    mut segments: tokio::sync::mpsc::UnboundedReceiver<&[u8]>,
    r: usize,
    header: &OpHeader,
) -> Result<()> {
    while let Some(seg) = segments.recv().await {
        wr.write_all(seg)
            .await
            .map_err(|e| lost(r, header, "sending", &e))?;
    }
    Ok(())
}

/// Ring reduce-scatter over `chunks` (element ranges); afterwards this rank's chunk holds the result.
///
/// Streamed across steps: what a step sends is what the previous step received and reduced, so a
/// segment is handed to the sending half as soon as it is reduced, and the next step's bytes follow
/// the previous step's on the wire with no gap (a link never idles at a step boundary).
async fn ring_reduce_scatter(
    io: &mut Io<'_>,
    buf: &mut [u8],
    chunks: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    if let Some(mem) = io.memory.filter(|_| buf.len() >= io.shared_min_bytes) {
        return shared_reduce_scatter(io, mem, buf, chunks, dtype, op).await;
    }
    let (me, n, l, r) = io.ring();
    let size = dtype.size();
    let header = io.header;
    if n < 2 {
        return Ok(());
    }
    let byte_chunks: Vec<Range<usize>> = chunks.iter().map(|c| bytes(c, size)).collect();
    let mut parts = carve(buf, &byte_chunks);
    let segment = (io.segment / size).max(1) * size;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<&[u8]>();
    let first: &[u8] = std::mem::take(&mut parts[reduce_scatter_step(me, n, 0).0]) as &[u8];
    for seg in first.chunks(segment) {
        let _ = tx.send(seg);
    }
    io.waiting.set(Waiting::Data(l));
    let (rd, wr) = halves(io.mesh, l, r)?;
    let scratch = &mut *io.scratch;
    let receiving = async move {
        for step in 0..n - 1 {
            let rc = reduce_scatter_step(me, n, step).1;
            let divisor = (op == ReduceOp::Avg && step == n - 2).then_some(n);
            let dst = std::mem::take(&mut parts[rc]);
            for seg in dst.chunks_mut(segment) {
                let tmp = &mut scratch[..seg.len()];
                rd.read_exact(tmp)
                    .await
                    .map_err(|e| lost(l, &header, "receiving", &e))?;
                timed(|| reduce_into(dtype, op, seg, tmp, divisor))?;
                if step + 2 < n {
                    // The next step sends this very segment on.
                    let _ = tx.send(seg);
                }
            }
        }
        // Closing the channel ends the sending half once it has sent everything.
        drop(tx);
        Ok::<(), Error>(())
    };
    tokio::try_join!(send_segments(wr, rx, r, &header), receiving).map(|_| ())
}

/// Ring allgather over `chunks` (byte ranges), each rank starting with its own chunk in place.
/// Streamed across steps like [`ring_reduce_scatter`]: a received segment is forwarded at once.
async fn ring_allgather(io: &mut Io<'_>, buf: &mut [u8], chunks: &[Range<usize>]) -> Result<()> {
    let (me, n, l, r) = io.ring();
    let header = io.header;
    if let Some(mem) = io.memory.filter(|_| buf.len() >= io.shared_min_bytes) {
        return shared_allgather(io, mem, buf, chunks).await;
    }
    if n < 2 {
        return Ok(());
    }
    let mut parts = carve(buf, chunks);
    let segment = io.segment.max(1);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<&[u8]>();
    let first: &[u8] = std::mem::take(&mut parts[allgather_step(me, n, 0).0]) as &[u8];
    for seg in first.chunks(segment) {
        let _ = tx.send(seg);
    }
    io.waiting.set(Waiting::Data(l));
    let (rd, wr) = halves(io.mesh, l, r)?;
    let receiving = async move {
        for step in 0..n - 1 {
            let rc = allgather_step(me, n, step).1;
            let dst = std::mem::take(&mut parts[rc]);
            for seg in dst.chunks_mut(segment) {
                rd.read_exact(seg)
                    .await
                    .map_err(|e| lost(l, &header, "receiving", &e))?;
                if step + 2 < n {
                    let _ = tx.send(seg);
                }
            }
        }
        drop(tx);
        Ok::<(), Error>(())
    };
    tokio::try_join!(send_segments(wr, rx, r, &header), receiving).map(|_| ())
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
    let (me, n, l, r) = io.ring();
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

/// Drives `fut` to completion, first by polling it and yielding to the runtime between polls for
/// up to `spin` (tokio checks the sockets with a zero-timeout `epoll_wait` before it comes back
/// to a task that yielded, so nothing parks the thread), then by awaiting it. A small message's
/// answer usually arrives within microseconds, and a park and wake-up costs more than that; unlike
/// `poll_frames`' direct socket reads, this also serves TLS links and ring steps.
pub async fn spin_then_park<F: std::future::Future>(
    fut: F,
    spin: std::time::Duration,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let start = Instant::now();
    loop {
        if let std::task::Poll::Ready(out) = futures::poll!(fut.as_mut()) {
            return out;
        }
        if start.elapsed() >= spin {
            return fut.await;
        }
        // Give the CPU to the peers first (ranks of one machine share its cores), then let the
        // runtime look at the sockets.
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}
