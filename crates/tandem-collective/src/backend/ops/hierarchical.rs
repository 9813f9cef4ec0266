//! Allreduce across hosts with several ranks each: reduce-scatter within each host, allreduce of
//! each rank's part across hosts, allgather within each host.
//!
//! Why: a flat ring over H hosts of R ranks sends 2(n−1)/n of the buffer over every host's link,
//! n = H·R; here only the cross-host stage uses the links, and each host's ranks split the buffer
//! among themselves first, so a host's link carries 2(H−1)/H of it (R parallel rings, one per local
//! index, each on its own slice). With 2 hosts of 2 ranks that is 1 buffer per direction instead
//! of 1.5. The stages inside a host go over the host's loopback.
//!
//! Every rank computes the same layout from the ranks' advertised addresses, so all agree on the
//! stages without a message; the operation's header is still checked around the global ring
//! first, so a rank calling something else is named as usual. The sum is the same on every rank
//! (each value of a slice is reduced by one cross-host ring, then copied), though its order of
//! additions differs from the flat ring's.

use super::*;

/// The hosts of a group and the ranks on each, when a hierarchical allreduce applies: more than
/// one host, the same number (more than one) of ranks on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayout {
    /// Each host's ranks, in order.
    hosts: Vec<Vec<usize>>,
}

impl HostLayout {
    /// The layout of ranks advertising `addrs` (`host:port`, by rank): ranks are on one host when
    /// their host parts are equal. `None` when it does not fit (one host, or hosts of unequal or
    /// single ranks).
    pub fn from_addrs(addrs: &[String]) -> Option<HostLayout> {
        let mut hosts: Vec<(String, Vec<usize>)> = Vec::new();
        for (rank, addr) in addrs.iter().enumerate() {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            match hosts.iter_mut().find(|(h, _)| h == host) {
                Some((_, ranks)) => ranks.push(rank),
                None => hosts.push((host.to_string(), vec![rank])),
            }
        }
        let per_host = hosts.first().map_or(0, |(_, r)| r.len());
        let uniform = hosts.iter().all(|(_, r)| r.len() == per_host);
        (hosts.len() > 1 && per_host > 1 && uniform).then(|| HostLayout {
            hosts: hosts.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Ranks on each host.
    pub fn per_host(&self) -> usize {
        self.hosts.first().map_or(0, Vec::len)
    }

    /// `rank`'s host and its index among the host's ranks.
    fn place(&self, rank: usize) -> Option<(usize, usize)> {
        self.hosts
            .iter()
            .enumerate()
            .find_map(|(h, ranks)| ranks.iter().position(|r| *r == rank).map(|i| (h, i)))
    }
}

/// A ring over some of the group's ranks (`members` in ring order, this rank at `me`) with its
/// two connections taken out of the mesh, so two rings on disjoint peers can run at once.
struct Lane<'a> {
    /// This rank's place in the sub-ring.
    me: usize,
    /// The sub-ring's group ranks.
    members: &'a [usize],
    /// The read half from the left neighbour, lent by the mesh.
    rd: ReadHalf,
    /// The write half to the right neighbour, lent by the mesh.
    wr: WriteHalf,
    /// Its reduction buffer.
    scratch: Vec<u8>,
}

impl<'a> Lane<'a> {
    /// Takes the connections of `members`' ring (this rank at `me`) out of the mesh.
    fn take(mesh: &mut Mesh, me: usize, members: &'a [usize], segment: usize) -> Result<Self> {
        let n = members.len();
        let (l, r) = (members[left(me, n)], members[right(me, n)]);
        let rd = mesh
            .readers
            .get_mut(l)
            .and_then(Option::take)
            .ok_or_else(|| no_connection(l))?;
        let wr = match mesh.writers.get_mut(r).and_then(Option::take) {
            Some(w) => w,
            None => {
                mesh.readers[l] = Some(rd);
                return Err(no_connection(r));
            }
        };
        Ok(Lane {
            me,
            members,
            rd,
            wr,
            scratch: vec![0u8; segment.max(8)],
        })
    }

    /// Puts the connections back.
    fn restore(self, mesh: &mut Mesh) {
        let n = self.members.len();
        let (l, r) = (self.left_rank(), self.members[right(self.me, n)]);
        mesh.readers[l] = Some(self.rd);
        mesh.writers[r] = Some(self.wr);
    }

    /// The group rank to this rank's left in the sub-ring.
    fn left_rank(&self) -> usize {
        self.members[left(self.me, self.members.len())]
    }

    /// The group rank to this rank's right in the sub-ring.
    fn right_rank(&self) -> usize {
        self.members[right(self.me, self.members.len())]
    }

    /// Reduce-scatter of `buf` (element `chunks`, one per member); afterwards chunk `me` holds
    /// the reduction over the lane. An average divides by `divisor` at the last step (else sums).
    async fn reduce_scatter(
        &mut self,
        header: &OpHeader,
        buf: &mut [u8],
        chunks: &[Range<usize>],
        dtype: DType,
        op: ReduceOp,
        divisor: Option<usize>,
    ) -> Result<()> {
        let n = self.members.len();
        let (l, r) = (self.left_rank(), self.right_rank());
        let size = dtype.size();
        let segment = self.scratch.len();
        for step in 0..n.saturating_sub(1) {
            let (s, rc) = reduce_scatter_step(self.me, n, step);
            let last = (step + 2 == n).then_some(divisor).flatten();
            let (send, recv) = split_pair(buf, bytes(&chunks[s], size), bytes(&chunks[rc], size));
            let (sent, got) = tokio::join!(
                self.wr.write_all(send),
                recv_reduce(
                    &mut self.rd,
                    recv,
                    &mut self.scratch,
                    segment,
                    dtype,
                    op,
                    last
                )
            );
            sent.map_err(|e| lost(r, header, "sending", &e))?;
            got.map_err(|e| lost(l, header, "receiving", &e))?;
        }
        Ok(())
    }

    /// Allgather of `buf` (byte `chunks`, one per member), each member starting with chunk `me`.
    async fn allgather(
        &mut self,
        header: &OpHeader,
        buf: &mut [u8],
        chunks: &[Range<usize>],
    ) -> Result<()> {
        let n = self.members.len();
        let (l, r) = (self.left_rank(), self.right_rank());
        for step in 0..n.saturating_sub(1) {
            let (s, rc) = allgather_step(self.me, n, step);
            let (send, recv) = split_pair(buf, chunks[s].clone(), chunks[rc].clone());
            let (sent, got) = tokio::join!(self.wr.write_all(send), self.rd.read_exact(recv));
            sent.map_err(|e| lost(r, header, "sending", &e))?;
            got.map_err(|e| lost(l, header, "receiving", &e))?;
        }
        Ok(())
    }
}

/// One piece of the buffer going through the stages: its chunks within a host (one per local
/// rank) and this rank's chunk's slices across hosts (one per host).
struct Piece {
    /// The host's chunks, in elements.
    chunks: Vec<Range<usize>>,
    /// The same chunks, in bytes.
    chunk_bytes: Vec<Range<usize>>,
    /// This rank's chunk cut across the hosts, in elements.
    slices: Vec<Range<usize>>,
    /// The same slices, in bytes.
    slice_bytes: Vec<Range<usize>>,
}

impl Piece {
    /// Rank `i` of a host's part of a buffer of `len` bytes of `size`-byte elements: its chunk
    /// within the host, and that chunk's slices across the `hosts`.
    fn new(len: usize, size: usize, per_host: usize, hosts: usize, i: usize) -> Piece {
        let chunks = partition(len / size, per_host);
        let chunk_bytes: Vec<Range<usize>> = chunks.iter().map(|c| bytes(c, size)).collect();
        let slices = partition(chunks[i].len(), hosts);
        let slice_bytes = slices.iter().map(|s| bytes(s, size)).collect();
        Piece {
            chunks,
            chunk_bytes,
            slices,
            slice_bytes,
        }
    }
}

/// Bytes per piece of the pipeline: large enough that a piece's steps are not dominated by their
/// fixed costs, small enough that the stages of neighbouring pieces overlap.
const PIECE_BYTES: usize = 4 << 20;

/// Allreduce in place in three stages (see the module docs), pipelined over pieces of the buffer:
/// while piece k crosses the hosts (one lane), piece k+1 is reduced within the host and piece k−1
/// gathered within it (the other lane), so the links rarely wait for the host's own work.
pub async fn allreduce_hierarchical(
    io: &mut Io<'_>,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    layout: &HostLayout,
) -> Result<()> {
    exchange_headers(io).await?;
    let (h, i) = layout.place(io.rank).ok_or_else(|| Error::Unusable {
        what: "process group".into(),
        reason: format!("rank {} is in no host of the layout", io.rank),
    })?;
    let local = layout.hosts[h].clone();
    let cross: Vec<usize> = layout.hosts.iter().map(|ranks| ranks[i]).collect();
    let size = dtype.size();
    let header = io.header;
    let divisor = (op == ReduceOp::Avg).then_some(io.world);
    // Pieces: whole elements, each at least PIECE_BYTES (the last may be shorter).
    let per_piece = (PIECE_BYTES / size).max(1) * size;
    let mut pieces: Vec<&mut [u8]> = buf.chunks_mut(per_piece).collect();
    let plans: Vec<Piece> = pieces
        .iter()
        .map(|p| Piece::new(p.len(), size, local.len(), cross.len(), i))
        .collect();
    let mut inner = Lane::take(io.mesh, i, &local, io.segment)?;
    let mut outer = match Lane::take(io.mesh, h, &cross, io.segment) {
        Ok(l) => l,
        Err(e) => {
            inner.restore(io.mesh);
            return Err(e);
        }
    };
    io.waiting.set(Waiting::Data(outer.left_rank()));
    let result = pipeline(
        &mut inner,
        &mut outer,
        &mut pieces,
        &plans,
        i,
        &header,
        dtype,
        op,
        divisor,
    )
    .await;
    inner.restore(io.mesh);
    outer.restore(io.mesh);
    result
}

/// The pipeline over the pieces: stage 1 of piece 0; then, for each piece k, stage 2 of piece k on
/// the outer lane while the inner lane does stage 1 of piece k+1 and stage 3 of piece k−1; then
/// stage 3 of the last piece.
#[allow(clippy::too_many_arguments)]
async fn pipeline(
    inner: &mut Lane<'_>,
    outer: &mut Lane<'_>,
    pieces: &mut [&mut [u8]],
    plans: &[Piece],
    i: usize,
    header: &OpHeader,
    dtype: DType,
    op: ReduceOp,
    divisor: Option<usize>,
) -> Result<()> {
    let n = pieces.len();
    if n == 0 {
        return Ok(());
    }
    let size = dtype.size();
    inner
        .reduce_scatter(header, pieces[0], &plans[0].chunks, dtype, op, None)
        .await?;
    for k in 0..n {
        let (before, rest) = pieces.split_at_mut(k);
        let (current, after) = rest.split_at_mut(1);
        let plan = &plans[k];
        let mine = &mut current[0][bytes(&plan.chunks[i], size)];
        let across = async {
            outer
                .reduce_scatter(header, mine, &plan.slices, dtype, op, divisor)
                .await?;
            outer.allgather(header, mine, &plan.slice_bytes).await
        };
        let within = async {
            if let Some(next) = after.first_mut() {
                inner
                    .reduce_scatter(header, next, &plans[k + 1].chunks, dtype, op, None)
                    .await?;
            }
            if let Some(prev) = before.last_mut() {
                inner
                    .allgather(header, prev, &plans[k - 1].chunk_bytes)
                    .await?;
            }
            Ok::<(), Error>(())
        };
        let (a, w) = tokio::join!(across, within);
        a?;
        w?;
    }
    inner
        .allgather(header, pieces[n - 1], &plans[n - 1].chunk_bytes)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(hosts: &[&str]) -> Vec<String> {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("{h}:{}", 40000 + i))
            .collect()
    }

    #[test]
    fn the_layout_groups_ranks_by_host_and_applies_only_when_uniform() {
        let l = HostLayout::from_addrs(&addrs(&["a", "a", "b", "b"])).expect("2 x 2");
        assert_eq!((l.hosts(), l.per_host()), (2, 2));
        assert_eq!(l.place(2), Some((1, 0)));
        assert_eq!(l.place(1), Some((0, 1)));
        assert_eq!(l.place(9), None);
        // Interleaved placement works too: the views follow the addresses.
        let l = HostLayout::from_addrs(&addrs(&["a", "b", "a", "b"])).expect("interleaved");
        assert_eq!(l.place(2), Some((0, 1)));
        for flat in [
            vec!["a", "a", "a", "a"],
            vec!["a", "b", "c", "d"],
            vec!["a", "a", "b"],
            vec!["a", "a", "a", "b"],
        ] {
            assert_eq!(HostLayout::from_addrs(&addrs(&flat)), None, "{flat:?}");
        }
        assert_eq!(HostLayout::from_addrs(&[]), None);
        // IPv6 hosts keep their colons.
        let v6 = vec![
            "[::1]:1".to_string(),
            "[::1]:2".to_string(),
            "[::2]:1".to_string(),
            "[::2]:2".to_string(),
        ];
        assert!(HostLayout::from_addrs(&v6).is_some());
    }
}
