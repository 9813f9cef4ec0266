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

/// A ring over some of the group's ranks: `members` in ring order, this rank at `me`.
struct View<'a> {
    me: usize,
    members: &'a [usize],
}

impl View<'_> {
    fn n(&self) -> usize {
        self.members.len()
    }
    fn left(&self) -> usize {
        self.members[left(self.me, self.n())]
    }
    fn right(&self) -> usize {
        self.members[right(self.me, self.n())]
    }
}

/// Reduce-scatter of `buf` (element `chunks`, one per member) around `view`; afterwards this
/// rank's chunk (`view.me`) holds the reduction over the view. An average divides by `divisor` at
/// the last step (else it sums).
async fn view_reduce_scatter(
    io: &mut Io<'_>,
    view: &View<'_>,
    buf: &mut [u8],
    chunks: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
    divisor: Option<usize>,
) -> Result<()> {
    let n = view.n();
    let (l, r) = (view.left(), view.right());
    let size = dtype.size();
    let header = io.header;
    for step in 0..n.saturating_sub(1) {
        let (s, rc) = reduce_scatter_step(view.me, n, step);
        let last = (step + 2 == n).then_some(divisor).flatten();
        let (send, recv) = split_pair(buf, bytes(&chunks[s], size), bytes(&chunks[rc], size));
        io.waiting.set(Waiting::Data(l));
        let (rd, wr) = halves(io.mesh, l, r)?;
        let (sent, got) = tokio::join!(
            wr.write_all(send),
            recv_reduce(rd, recv, io.scratch, io.segment, dtype, op, last)
        );
        sent.map_err(|e| lost(r, &header, "sending", &e))?;
        got.map_err(|e| lost(l, &header, "receiving", &e))?;
    }
    Ok(())
}

/// Allgather of `buf` (byte `chunks`, one per member) around `view`, each member starting with
/// its own chunk in place.
async fn view_allgather(
    io: &mut Io<'_>,
    view: &View<'_>,
    buf: &mut [u8],
    chunks: &[Range<usize>],
) -> Result<()> {
    let n = view.n();
    let (l, r) = (view.left(), view.right());
    let header = io.header;
    for step in 0..n.saturating_sub(1) {
        let (s, rc) = allgather_step(view.me, n, step);
        let (send, recv) = split_pair(buf, chunks[s].clone(), chunks[rc].clone());
        io.waiting.set(Waiting::Data(l));
        let (rd, wr) = halves(io.mesh, l, r)?;
        let (sent, got) = tokio::join!(wr.write_all(send), rd.read_exact(recv));
        sent.map_err(|e| lost(r, &header, "sending", &e))?;
        got.map_err(|e| lost(l, &header, "receiving", &e))?;
    }
    Ok(())
}

/// Allreduce in place in three stages (see the module docs).
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
    let chunks = partition(buf.len() / size, local.len());
    let local_view = View {
        me: i,
        members: &local,
    };
    let cross_view = View {
        me: h,
        members: &cross,
    };
    // 1. Within the host: this rank's chunk summed over the host (an average divides later).
    view_reduce_scatter(io, &local_view, buf, &chunks, dtype, op, None).await?;
    // 2. Across hosts, on this rank's chunk only: reduce-scatter then allgather.
    let mine = &mut buf[bytes(&chunks[i], size)];
    let slices = partition(mine.len() / size, cross.len());
    let divisor = (op == ReduceOp::Avg).then_some(io.world);
    view_reduce_scatter(io, &cross_view, mine, &slices, dtype, op, divisor).await?;
    let slice_bytes: Vec<Range<usize>> = slices.iter().map(|s| bytes(s, size)).collect();
    view_allgather(io, &cross_view, mine, &slice_bytes).await?;
    // 3. Within the host: every rank gets every chunk.
    let chunk_bytes: Vec<Range<usize>> = chunks.iter().map(|c| bytes(c, size)).collect();
    view_allgather(io, &local_view, buf, &chunk_bytes).await
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
