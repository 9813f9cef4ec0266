//! Several streams per peer: a large allreduce or broadcast cut into parts, each moved around its
//! own ring of connections by its own thread.
//!
//! One connection per pair of ranks, driven by one thread, caps a rank at what one core can
//! encrypt, copy and reduce. With `TANDEM_STREAMS_PER_PEER=k` the group forms `k` meshes: the
//! first is the ring's own (driven by the caller's thread, as for every other operation), each
//! other one a [`Channel`] with its own connections and its own current-thread runtime. An
//! operation of at least [`MIN_PART_BYTES`] per part is cut into contiguous parts of whole
//! elements, the same on every rank; part `i` runs the usual algorithm on mesh `i` (each exchanges
//! its own header, so a rank that called something else is caught on every channel), and the
//! caller's thread waits for all of them within the operation's deadline. The first failure of
//! any channel fails the operation at once and stops the others (they are told to, and their
//! threads end before the operation returns).

use std::cell::Cell;
use std::time::Duration;

use tandem_core::{DType, Error, ReduceOp, Result};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::ops::{self, HostLayout, Io};
use crate::stall::WaitCell;
use crate::transport::frame::OpHeader;
use crate::transport::mesh::Mesh;

/// Smallest part an operation is cut into: below it, a thread's wake-up and a header per channel
/// cost more than the bytes gain.
pub const MIN_PART_BYTES: usize = 512 << 10;

/// One extra stream to every peer: its connections and the runtime that owns them.
#[derive(Debug)]
pub struct Channel {
    /// The stream's own runtime (its thread).
    rt: Runtime,
    /// The stream's connections to every peer.
    mesh: Mesh,
    /// Its reduction buffer.
    scratch: Vec<u64>,
}

impl Channel {
    /// A channel over `mesh`, whose sockets were made in `rt`.
    pub fn new(rt: Runtime, mesh: Mesh) -> Self {
        Channel {
            rt,
            mesh,
            scratch: Vec::new(),
        }
    }

    /// The channel's connections.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Gives the channel a receive buffer of one segment.
    pub(super) fn size_scratch(&mut self, segment: usize) {
        self.scratch = vec![0u64; segment.div_ceil(8)];
    }

    /// Runs `what` on `buf` over this channel's connections on the calling thread, until it ends,
    /// `stop` is raised, or `backstop` passes (the caller's deadline comes first: this only
    /// bounds a channel whose caller is gone).
    fn run(
        &mut self,
        ring: Ring,
        buf: &mut [u8],
        what: Part<'_>,
        mut stop: watch::Receiver<bool>,
        backstop: Duration,
    ) -> Result<()> {
        let waiting = WaitCell::default();
        let lateness = Cell::new(None);
        let Channel { rt, mesh, scratch } = self;
        let mut io = Io {
            mesh,
            scratch: bytemuck::cast_slice_mut(scratch.as_mut_slice()),
            rank: ring.rank,
            world: ring.world,
            segment: ring.segment,
            waiting: &waiting,
            header: ring.header,
            lateness: &lateness,
            memory: None,
            shared_min_bytes: usize::MAX,
        };
        rt.block_on(async {
            tokio::select! {
                r = tokio::time::timeout(backstop, what.run(&mut io, buf)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(Error::timeout(
                        format!("op #{} {} on an extra stream", ring.header.seq, ring.header),
                        backstop,
                    )),
                },
                _ = stop.wait_for(|s| *s) => Err(stopped()),
            }
        })
    }
}

/// The error of an operation given to a stream's thread after it stopped.
fn stopped() -> Error {
    Error::Unusable {
        what: "process group".into(),
        reason: "another stream of the operation failed".into(),
    }
}

/// What every channel needs to know of the ring and the operation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ring {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
    /// Pipeline segment, bytes.
    pub segment: usize,
    /// The operation's header, checked against each peer's.
    pub header: OpHeader,
}

/// What each part of a cut operation does.
#[derive(Debug, Clone, Copy)]
pub(super) enum Part<'l> {
    /// An allreduce of the part, hierarchical with a layout.
    Allreduce {
        dtype: DType,
        op: ReduceOp,
        hosts: Option<&'l HostLayout>,
    },
    /// A broadcast of the part from `root`.
    Broadcast { root: usize },
}

impl Part<'_> {
    /// The operation on one part over `io`'s connections.
    pub(super) async fn run(self, io: &mut Io<'_>, buf: &mut [u8]) -> Result<()> {
        match self {
            Part::Allreduce {
                dtype,
                op,
                hosts: Some(layout),
            } => ops::allreduce_hierarchical(io, buf, dtype, op, layout).await,
            Part::Allreduce { dtype, op, .. } => ops::allreduce(io, buf, dtype, op).await,
            Part::Broadcast { root } => ops::broadcast(io, buf, root).await,
        }
    }
}

/// How many parts a buffer of `bytes` is cut into with `streams` streams per peer: as many as
/// the streams, but none under [`MIN_PART_BYTES`] (so at least one).
pub(super) fn parts_for(bytes: usize, streams: usize) -> usize {
    (bytes / MIN_PART_BYTES).clamp(1, streams.max(1))
}

/// Cuts `buf` into `parts` contiguous parts of whole elements of `size` bytes (the first ones one
/// element longer when the count does not divide), the same on every rank.
pub(super) fn cut(buf: &mut [u8], parts: usize, size: usize) -> Vec<&mut [u8]> {
    let count = buf.len() / size.max(1);
    let parts = parts.max(1);
    let mut out = Vec::with_capacity(parts);
    let mut rest = buf;
    for i in 0..parts {
        let elems = count / parts + usize::from(i < count % parts);
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(elems * size);
        out.push(mine);
        rest = tail;
    }
    out
}

/// Runs `what` cut into `1 + channels.len()` parts (or fewer, see [`parts_for`]): part 0 by
/// `first` on the calling thread, part `i` on `channels[i - 1]` by a thread of its own. `first`
/// gets part 0 and [`Others`], which ends when every channel did (with the first channel's error,
/// if any); the channels are stopped once `first` returns.
pub(super) fn run_cut<T>(
    channels: &mut [Channel],
    ring: Ring,
    buf: &mut [u8],
    size: usize,
    what: Part<'_>,
    backstop: Duration,
    first: impl FnOnce(&mut [u8], Others) -> Result<T>,
) -> Result<T> {
    let n = parts_for(buf.len(), channels.len() + 1);
    let mut parts = cut(buf, n, size).into_iter();
    let head = parts.next().unwrap_or_default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::scope(|s| {
        let mut failed = None;
        for (channel, part) in channels.iter_mut().zip(parts) {
            let (stop, done) = (stop_rx.clone(), done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name("tandem-stream".into())
                .spawn_scoped(s, move || {
                    let _ = done.send(channel.run(ring, part, what, stop, backstop));
                });
            if let Err(e) = spawned {
                failed = Some(Error::io("starting a stream's thread", e));
                break;
            }
        }
        // From here the channels' threads hold the only senders: the receiver ends once all of
        // them have answered.
        drop(done_tx);
        let outcome = match failed {
            Some(e) => Err(e),
            None => first(head, Others { done: done_rx }),
        };
        let _ = stop_tx.send(true);
        outcome
    })
}

/// The channels of a cut operation, as seen from the caller's thread.
pub(super) struct Others {
    /// Each stream's outcome.
    done: tokio::sync::mpsc::UnboundedReceiver<Result<()>>,
}

impl Others {
    /// Ends when every channel ended, or at the first channel that failed, with its error.
    pub(super) async fn finished(mut self) -> Result<()> {
        while let Some(r) = self.done.recv().await {
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_whole_elements_covering_the_buffer_in_order() {
        for (len, parts, size) in [(40, 3, 4), (36, 4, 4), (8, 4, 8), (12, 5, 4), (0, 3, 2)] {
            let mut buf: Vec<u8> = (0..len as u8).collect();
            let cut = cut(&mut buf, parts, size);
            assert_eq!(cut.len(), parts);
            let lens: Vec<usize> = cut.iter().map(|p| p.len()).collect();
            assert!(lens.iter().all(|l| l % size == 0), "{lens:?}");
            assert!(lens.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= size));
            let joined: Vec<u8> = cut.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(joined, (0..len as u8).collect::<Vec<u8>>());
        }
    }

    #[test]
    fn a_buffer_is_cut_only_into_parts_of_the_minimum_size() {
        assert_eq!(parts_for(0, 4), 1);
        assert_eq!(parts_for(MIN_PART_BYTES * 2 - 1, 4), 1);
        assert_eq!(parts_for(MIN_PART_BYTES * 2, 4), 2);
        assert_eq!(parts_for(MIN_PART_BYTES * 4, 4), 4);
        assert_eq!(parts_for(MIN_PART_BYTES * 100, 4), 4);
        assert_eq!(parts_for(MIN_PART_BYTES * 100, 1), 1);
        assert_eq!(parts_for(MIN_PART_BYTES * 100, 0), 1);
    }
}
