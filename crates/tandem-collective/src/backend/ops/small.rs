//! Small messages (a buffer times `world − 1` of at most `direct_bytes`): one hop to every peer
//! (`allreduce_direct`) or recursive doubling in power-of-two groups (`allreduce_doubling`),
//! instead of 2(n−1) ring steps. Both exchange whole frames (header + data) through `exchange`,
//! which first polls the sockets with non-blocking calls for a short spin (a park and wake-up
//! costs more than a 4 KiB message takes) and then hands what is left to the event loop.

use super::*;

/// How long a small allreduce polls its sockets (yielding the CPU between polls) before parking in
/// the event loop: peers' messages usually arrive within microseconds, and a park and wake-up costs
/// more than that.
pub(super) const DIRECT_SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// One peer's frame (header and payload) as it arrives.
pub(super) struct Incoming {
    /// The peer.
    peer: usize,
    /// Bytes received so far.
    got: usize,
    /// Whether its header was checked.
    checked: bool,
    /// When its first byte arrived (for lateness).
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
pub(super) async fn exchange(
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
pub(super) fn write_now(
    writers: &mut [Option<WriteHalf>],
    peers: &[usize],
    msg: &[u8],
    header: &OpHeader,
) -> Result<Vec<usize>> {
    let frame_len = msg.len();
    let mut sent: Vec<usize> = (0..writers.len())
        .map(|p| if peers.contains(&p) { 0 } else { frame_len })
        .collect();
    for (p, w) in writers.iter_mut().enumerate() {
        // Under TLS the bytes must go through the encrypting half: the event loop sends them.
        if let Some((half, w)) = w
            .as_ref()
            .and_then(|h| Some((h, h.socket()?)))
            .filter(|_| sent[p] < frame_len)
        {
            while sent[p] < frame_len {
                match (&*socket2::SockRef::from(&w)).write(&msg[sent[p]..]) {
                    Ok(k) => {
                        half.note(k);
                        sent[p] += k;
                    }
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
pub(super) fn poll_frames(
    readers: &[Option<ReadHalf>],
    incoming: &mut [Incoming],
    slots: &mut [&mut [u8]],
    frame_len: usize,
    header: &OpHeader,
    me: usize,
    start: Instant,
) -> Result<()> {
    // Encrypted links are read through their TLS halves, in the event loop.
    let plain = incoming.iter().all(|i| {
        readers[i.peer]
            .as_ref()
            .is_some_and(|r| r.socket().is_some())
    });
    while plain && start.elapsed() < DIRECT_SPIN {
        let mut pending = false;
        for inc in incoming.iter_mut().filter(|i| i.got < frame_len) {
            let (p, slot) = (inc.peer, &mut slots[inc.peer]);
            if let Some(half) = readers[p].as_ref()
                && let Some(r) = half.socket()
            {
                match (&*socket2::SockRef::from(&r)).read(&mut slot[inc.got..frame_len]) {
                    Ok(0) => {
                        let eof = std::io::Error::from(ErrorKind::UnexpectedEof);
                        return Err(lost(p, header, "receiving", &eof));
                    }
                    Ok(k) => {
                        half.note(k);
                        inc.advance(k, slot, header, me, start)?
                    }
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
pub(super) async fn finish_in_event_loop(
    readers: &mut [Option<ReadHalf>],
    writers: &mut [Option<WriteHalf>],
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
    let mut reader_of: Vec<Option<&mut ReadHalf>> =
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
    let combine = op.combining();
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
        timed(|| reduce_into(dtype, combine, buf, high, divisor))?;
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
    let (me, n, header) = (io.rank, io.world, io.header);
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
    timed(|| reduce_all(dtype, op, &parts, buf))
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
