//! Tandem's own TCP ring backend.
//!
//! One `current_thread` tokio runtime owns the group's sockets; the calling thread drives it for the
//! duration of one operation, so an operation borrows the caller's buffer and needs no copy. Every
//! operation races three things: its own completion, its deadline, and an abort raised by another
//! rank through the rendezvous. The first failure poisons the group; later calls say so. A deadline
//! is not reported as the neighbour this rank waited on: the ranks first compare what each is doing
//! (see [`crate::stall`]), so every survivor names the same culprit.

use std::cell::Cell;
use std::future::Future;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tandem_core::{DType, Error, ReduceOp, Result};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::Backend;
use super::ops::{self, Io, Waiting};
use super::streams::{self, Channel, Part};
use crate::messages::{Abort, RankState};
use crate::stats::Stragglers;
use crate::transport::frame::{OpHeader, OpKind};
use crate::transport::mesh::{Links, Mesh};
use crate::transport::peer_memory::{LocalWord, PeerMemory};
use tandem_tls::stream::{ReadHalf, WriteHalf};

/// How long an operation polls its sockets (yielding the CPU and letting the runtime check the
/// sockets between polls) before its thread may park in the event loop: small and medium
/// collectives on one machine finish within a few hundred microseconds, and every park and
/// wake-up on the way costs tens of them.
const OP_SPIN: Duration = Duration::from_micros(300);

/// Publishes an abort to the other ranks.
pub type Publish = Box<dyn Fn(Abort) + Send + Sync>;

/// Asks every rank what it is doing (through the rendezvous) and gathers the answers that come
/// within the grace given: `answers[r]` is rank r's state, `None` if it did not answer (or its
/// answer was unreadable). An error says why the rendezvous could not be asked.
pub type Inquire = Box<dyn Fn(Duration) -> Result<Vec<Option<RankState>>> + Send + Sync>;

/// How the ring reaches the other ranks outside its sockets when something goes wrong.
pub struct Control {
    /// Publishes this rank's abort.
    pub publish: Publish,
    /// Asks every rank what it is doing.
    pub inquire: Inquire,
    /// What this rank is doing, answered to inquiries by a watcher.
    pub progress: std::sync::Arc<crate::stall::Progress>,
    /// Each rank's advertised address (names the culprit).
    pub addrs: Vec<String>,
    /// Whether rank 0 hosts the rendezvous (so losing it points at rank 0).
    pub rendezvous_on_rank0: bool,
}

/// What one operation at a time uses: the connections and their buffers, and the sequence.
struct RingState {
    /// Counts each connection's bytes in the metrics; declared before `mesh` so it is dropped
    /// before the sockets close.
    _sockets: Vec<tandem_observe::SocketWatch>,
    /// The connections to every peer.
    mesh: Mesh,
    /// The reduction buffer (u64 for alignment).
    scratch: Vec<u64>,
    /// The other streams to every peer (none with one stream per peer).
    channels: Vec<Channel>,
    /// The next operation's sequence number.
    seq: u64,
    /// Messages sent to each peer: the next send's sequence number (matched by the receiver).
    sent: Vec<u64>,
    /// Messages received from each peer: the next receive's sequence number.
    received: Vec<u64>,
    /// Why the ring can no longer be used, once an operation failed.
    poisoned: Option<String>,
    /// The left neighbour's lateness over recent operations.
    stragglers: Stragglers,
}

/// Knobs of the TCP ring.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Pipeline segment in bytes.
    pub segment_bytes: usize,
    /// Allreduces with `bytes * (world - 1)` up to this go to every rank in one hop.
    pub direct_bytes: usize,
    /// Smallest ring buffer whose chunks are copied by address between ranks on one machine.
    pub shared_min_bytes: usize,
    /// Ranks per host, when large allreduces go hierarchical (several hosts of several ranks).
    pub hosts: Option<ops::HostLayout>,
}

/// Direct reads of the left neighbour's buffers (see [`crate::transport::peer_memory`]).
#[derive(Debug)]
pub struct SameHost {
    /// This rank's word, which the right neighbour checks.
    pub word: LocalWord,
    /// The left neighbour.
    pub left: PeerMemory,
}

/// The TCP ring backend of one process group.
pub struct TcpRing {
    /// This rank.
    rank: usize,
    /// Ranks in the group.
    world: usize,
    /// Pipeline segment, bytes.
    segment: usize,
    /// Largest allreduce (times n - 1) sent in one hop.
    direct_bytes: usize,
    /// Smallest buffer whose ring steps copy by address.
    shared_min_bytes: usize,
    /// Streams per peer (1 + the channels).
    streams: usize,
    /// The ring's runtime (one thread).
    rt: Runtime,
    /// What one operation at a time uses.
    state: Mutex<RingState>,
    /// The abort another rank announced, if any.
    abort: watch::Receiver<Option<Abort>>,
    /// The group's control plane (aborts, stall inquiries).
    control: Control,
    /// Copies by address between the ranks of one machine, when they all can.
    same_host: Option<SameHost>,
    /// How the ring's own connections are carried.
    links: Links,
    /// The ranks per host, when a hierarchical allreduce applies.
    hosts: Option<ops::HostLayout>,
    /// The flight recorder of this group's operations (written under `state`'s lock).
    log: std::sync::Arc<tandem_observe::oplog::OpLog>,
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

/// The header of message `seq` between a pair of ranks, addressed to rank `to`.
fn message(seq: u64, dtype: DType, to: usize, count: usize) -> OpHeader {
    OpHeader {
        seq,
        kind: OpKind::Send,
        dtype,
        op: None,
        root: to as u32,
        count: count as u64,
    }
}

/// A collective header: takes the next sequence number.
fn collective(
    st: &mut RingState,
    kind: OpKind,
    dtype: DType,
    op: Option<ReduceOp>,
    root: usize,
    count: usize,
) -> OpHeader {
    let h = OpHeader {
        seq: st.seq,
        kind,
        dtype,
        op,
        root: root as u32,
        count: count as u64,
    };
    st.seq += 1;
    h
}

impl TcpRing {
    /// Wraps an established mesh. `rt` must be the runtime the mesh's sockets were created in;
    /// `channels` are the other streams to every peer (empty with one; large allreduces and
    /// broadcasts are cut into parts over them, see [`streams`]); `same_host` is set when every
    /// rank of the ring can read its left neighbour's memory (the channels then stay unused).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rank: usize,
        world: usize,
        rt: Runtime,
        mesh: Mesh,
        mut channels: Vec<Channel>,
        tuning: Tuning,
        abort: watch::Receiver<Option<Abort>>,
        control: Control,
        same_host: Option<SameHost>,
    ) -> Self {
        let segment = tuning.segment_bytes.clamp(4096, 64 << 20) / 8 * 8;
        let direct_bytes = tuning.direct_bytes;
        let links = mesh.links();
        let mut sockets = watch_sockets(&mesh);
        for channel in &mut channels {
            sockets.extend(watch_sockets(channel.mesh()));
            channel.size_scratch(segment);
        }
        TcpRing {
            rank,
            world,
            segment,
            direct_bytes,
            shared_min_bytes: tuning.shared_min_bytes,
            streams: 1 + channels.len(),
            hosts: tuning.hosts,
            rt,
            state: Mutex::new(RingState {
                _sockets: sockets,
                mesh,
                scratch: vec![0u64; segment / 8],
                channels,
                seq: 0,
                sent: vec![0; world],
                received: vec![0; world],
                poisoned: None,
                stragglers: Stragglers::new(64),
            }),
            abort,
            control,
            same_host,
            links,
            log: crate::observe::log(),
        }
    }

    /// The ring's state for one operation, or Unusable after a panic.
    fn begin(&self) -> Result<MutexGuard<'_, RingState>> {
        let st = self.state.lock().map_err(|_| Error::Unusable {
            what: "process group".into(),
            reason: "an earlier operation panicked".into(),
        })?;
        if let Some(reason) = &st.poisoned {
            return Err(Error::Unusable {
                what: "process group".into(),
                reason: reason.clone(),
            });
        }
        Ok(st)
    }

    /// Runs one operation: `header` takes the operation's header from the locked state (a sequence
    /// number), `body` moves its bytes through the [`Io`] it is given. The body races the deadline
    /// and an abort from another rank; the outcome poisons the group if it failed.
    fn run_op<T>(
        &self,
        timeout: Duration,
        header: impl FnOnce(&mut RingState) -> OpHeader,
        body: impl AsyncFnOnce(&mut Io<'_>) -> Result<T>,
    ) -> Result<T> {
        self.run_with(header, |st, op| {
            let RingState { mesh, scratch, .. } = st;
            let memory = self.same_host.as_ref().map(|m| m.left);
            let mut io = self.io(mesh, scratch, op, memory);
            // The right neighbour may read this rank's chunks only while the lease lives: it ends
            // (the word cleared) before the buffer goes back to the caller.
            let lease = self.same_host.as_ref().map(|m| m.word.lease(op.header.seq));
            let outcome = self.drive(body(&mut io), op.waiting, &op.header, timeout);
            drop(lease);
            outcome
        })
    }

    /// Runs one allreduce or broadcast of `buf` cut into parts, one per stream to every peer (see
    /// [`streams`]), under the same deadline, abort and poisoning as [`TcpRing::run_op`].
    fn run_cut(
        &self,
        timeout: Duration,
        header: impl FnOnce(&mut RingState) -> OpHeader,
        buf: &mut [u8],
        size: usize,
        what: Part<'_>,
    ) -> Result<()> {
        self.run_with(header, |st, op| {
            let RingState {
                mesh,
                scratch,
                channels,
                ..
            } = st;
            let ring = streams::Ring {
                rank: self.rank,
                world: self.world,
                segment: self.segment,
                header: op.header,
            };
            // Past the caller's deadline and the culprit inquiry that may follow it.
            let backstop = timeout.saturating_mul(2) + Duration::from_secs(5);
            streams::run_cut(channels, ring, buf, size, what, backstop, |head, others| {
                let mut io = self.io(mesh, scratch, op, None);
                let both = async {
                    tokio::try_join!(what.run(&mut io, head), others.finished()).map(|_| ())
                };
                self.drive(both, op.waiting, &op.header, timeout)
            })
        })
    }

    /// Whether an operation on `bytes` is cut over several streams per peer.
    fn cuts(&self, bytes: usize) -> bool {
        self.same_host.is_none() && streams::parts_for(bytes, self.streams) > 1
    }

    /// The [`Io`] of the ring's own connections for one operation.
    fn io<'a>(
        &self,
        mesh: &'a mut Mesh,
        scratch: &'a mut Vec<u64>,
        op: &'a OpRun<'a>,
        memory: Option<PeerMemory>,
    ) -> Io<'a> {
        Io {
            mesh,
            scratch: bytemuck::cast_slice_mut(scratch.as_mut_slice()),
            rank: self.rank,
            world: self.world,
            segment: self.segment,
            waiting: op.waiting,
            header: op.header,
            lateness: &op.lateness,
            memory,
            shared_min_bytes: self.shared_min_bytes,
        }
    }

    /// The bookkeeping around every operation: takes the lock and the header, records the
    /// operation (flight recorder, progress for stall inquiries, straggler statistics), runs
    /// `run`, and poisons the group if it failed.
    fn run_with<T>(
        &self,
        header: impl FnOnce(&mut RingState) -> OpHeader,
        run: impl FnOnce(&mut RingState, &OpRun<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.begin()?;
        let header = header(&mut st);
        // One clock read at each end serves the stall inquiry, the recorder and the metrics.
        let started = std::time::Instant::now();
        let recording = crate::observe::begin(&self.log, &header, self.rank, self.world, started);
        let progress = self.control.progress.clone();
        progress.begin_at(st.seq, started);
        let op = OpRun {
            header,
            waiting: &progress.waiting,
            lateness: Cell::new(None),
        };
        let outcome = run(&mut st, &op);
        let ended = std::time::Instant::now();
        crate::observe::end(
            &self.log,
            recording,
            ended,
            op.lateness.get(),
            op.waiting.get(),
            outcome.as_ref().err(),
        );
        progress.end_at(ended);
        self.settle(&mut st, &header, op.lateness.get(), outcome)
    }

    /// Ends an operation: counts a late peer (naming it a straggler when it is late in most of a
    /// window), and on failure marks the ring unusable for later operations.
    fn settle<T>(
        &self,
        st: &mut RingState,
        header: &OpHeader,
        lateness: Option<(usize, Duration)>,
        outcome: Result<T>,
    ) -> Result<T> {
        if let (Some((peer, late)), true) = (lateness, header.kind != OpKind::Send)
            && let Some(s) = st.stragglers.record(peer, late)
        {
            tandem_observe::metrics::straggler(s.rank);
            tracing::warn!(
                "straggler: rank {} started {} of the last {} collectives after rank {}, {:?} late (median)",
                s.rank,
                s.late,
                s.window,
                self.rank,
                s.median
            );
        }
        if let Err(e) = &outcome {
            st.poisoned = Some(e.to_string());
        }
        outcome
    }
}

/// One byte-counting watch per connection of the mesh: the kernel's TCP counters (the read half
/// shares the socket with the write half), or a local socket's own.
fn watch_sockets(mesh: &Mesh) -> Vec<tandem_observe::SocketWatch> {
    mesh.readers
        .iter()
        .enumerate()
        .filter_map(
            |(peer, r)| match (r.as_ref()?, mesh.writers[peer].as_ref()?) {
                (ReadHalf::Local(r), WriteHalf::Local(w)) => {
                    Some(tandem_observe::watch_counted(peer, w.bytes(), r.bytes()))
                }
                (r, _) => Some(tandem_observe::watch_socket(peer, r.raw_fd()?)),
            },
        )
        .collect()
}

/// One operation under way: its header and what it is waiting for.
struct OpRun<'a> {
    /// The operation's header.
    header: OpHeader,
    /// What the rank waits on now (read by a stall inquiry).
    waiting: &'a crate::stall::WaitCell,
    /// The latest peer's lateness, when one was late.
    lateness: Cell<Option<(usize, Duration)>>,
}

impl Backend for TcpRing {
    fn name(&self) -> &'static str {
        "tcp"
    }
    fn same_host(&self) -> bool {
        self.same_host.is_some()
    }
    fn links(&self) -> Links {
        self.links
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn allreduce(
        &self,
        data: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        timeout: Duration,
    ) -> Result<()> {
        let count = data.len() / dtype.size();
        let direct = data.len().saturating_mul(self.world - 1) <= self.direct_bytes;
        if !direct && self.cuts(data.len()) {
            let what = Part::Allreduce {
                dtype,
                op,
                hosts: self.hosts.as_ref(),
            };
            return self.run_cut(
                timeout,
                |st| collective(st, OpKind::Allreduce, dtype, Some(op), 0, count),
                data,
                dtype.size(),
                what,
            );
        }
        self.run_op(
            timeout,
            |st| collective(st, OpKind::Allreduce, dtype, Some(op), 0, count),
            async move |io| {
                if direct && ops::doubling_fits(io.world, dtype) {
                    ops::allreduce_doubling(io, data, dtype, op).await
                } else if direct {
                    ops::allreduce_direct(io, data, dtype, op).await
                } else if let Some(layout) = &self.hosts {
                    ops::allreduce_hierarchical(io, data, dtype, op, layout).await
                } else {
                    ops::allreduce(io, data, dtype, op).await
                }
            },
        )
    }

    fn broadcast(
        &self,
        data: &mut [u8],
        dtype: DType,
        root: usize,
        timeout: Duration,
    ) -> Result<()> {
        let count = data.len() / dtype.size();
        if self.cuts(data.len()) {
            return self.run_cut(
                timeout,
                |st| collective(st, OpKind::Broadcast, dtype, None, root, count),
                data,
                dtype.size(),
                Part::Broadcast { root },
            );
        }
        self.run_op(
            timeout,
            |st| collective(st, OpKind::Broadcast, dtype, None, root, count),
            async |io| ops::broadcast(io, data, root).await,
        )
    }

    fn allgather(
        &self,
        mine: &[u8],
        out: &mut [u8],
        dtype: DType,
        timeout: Duration,
    ) -> Result<()> {
        let count = mine.len() / dtype.size();
        self.run_op(
            timeout,
            |st| collective(st, OpKind::Allgather, dtype, None, 0, count),
            async |io| ops::allgather(io, mine, out).await,
        )
    }

    fn reduce_scatter(
        &self,
        data: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        timeout: Duration,
    ) -> Result<Range<usize>> {
        let count = data.len() / dtype.size();
        self.run_op(
            timeout,
            |st| collective(st, OpKind::ReduceScatter, dtype, Some(op), 0, count),
            async |io| ops::reduce_scatter(io, data, dtype, op).await,
        )
    }

    fn reduce(
        &self,
        data: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
        timeout: Duration,
    ) -> Result<()> {
        let count = data.len() / dtype.size();
        self.run_op(
            timeout,
            |st| collective(st, OpKind::Reduce, dtype, Some(op), root, count),
            async |io| ops::reduce(io, data, dtype, op, root).await,
        )
    }

    fn barrier(&self, timeout: Duration) -> Result<()> {
        // One element per rank, so every ring step carries data and orders the ranks.
        let mut token = vec![1u8; self.world];
        let n = self.world;
        self.run_op(
            timeout,
            |st| collective(st, OpKind::Barrier, DType::U8, Some(ReduceOp::Max), 0, n),
            async |io| ops::allreduce(io, &mut token, DType::U8, ReduceOp::Max).await,
        )
    }

    fn send(&self, data: &[u8], dtype: DType, to: usize, timeout: Duration) -> Result<()> {
        let count = data.len() / dtype.size();
        self.run_op(
            timeout,
            |st| {
                let seq = st.sent[to];
                st.sent[to] += 1;
                message(seq, dtype, to, count)
            },
            async |io| ops::send(io, data, to).await,
        )
    }

    fn recv(&self, data: &mut [u8], dtype: DType, from: usize, timeout: Duration) -> Result<()> {
        let count = data.len() / dtype.size();
        let me = self.rank;
        self.run_op(
            timeout,
            |st| {
                let seq = st.received[from];
                st.received[from] += 1;
                message(seq, dtype, me, count)
            },
            async |io| ops::recv(io, data, from).await,
        )
    }
}

mod failure;
