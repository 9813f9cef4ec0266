//! Pushes through the gRPC stream applied as they are read, so a server holds bounded pieces on
//! every path, never a whole push.
//!
//! A worker's first chunk lists the partitions it carries, in order; the rest of its stream is
//! read a piece at a time by whoever applies it: the blocking pool at once in async mode, the step
//! thread when the step is applied in sync mode ([`StreamedGradient`] is a [`GradientSource`]
//! like a gradient left in a worker's memory on this machine). Until then the worker's bytes wait
//! in the network: HTTP/2 flow control stops it once its stream window (`STREAM_WINDOW`) is full.
//!
//! Why not "nothing applied unless all arrives": that needs the whole push in the server (what
//! pushes without a partition list still do) or every byte sent twice. Instead every element is
//! applied exactly once, or the push says exactly which were (`PARTIALLY_APPLIED`), the guarantee
//! pushes by address give too. The client checks its gradient for NaN and Inf before it sends any
//! of it, so a non-finite gradient is refused whole; the server checks every piece again as it
//! reads it, and one found part-way stops the push there like a broken stream.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tonic::{Code, Status};

use super::Service;
use super::decode::Chunks;
use super::intake::{Claim, Taking};
use super::{all_finite, check_worker, part_of};
use crate::failure::{invalid, partially_applied, status};
use crate::pb;
use crate::pb::Reason;
use crate::server::model::{GradientSource, Key, Model, Partial, Unreadable};
use crate::server::runtime::{blocking, shutting_down};
use crate::server::step::wait_staleness;

/// How long a sync push through the stream waits for its step before the server copies the rest
/// of its gradient into the step's sum and lets the worker go on (so workers waiting on each other
/// across servers, after a restart, cannot deadlock). Longer than by address: the copy costs a sum
/// as large as the partitions, which only a straggler later than this makes the server hold.
pub const STREAMED_PATIENCE: Duration = Duration::from_secs(10);

/// Where the reader is in a push's stream.
struct Reader {
    /// The push's stream, decoded to f32 chunks.
    stream: Chunks,
    /// The chunk being consumed, and how many of its bytes were.
    chunk: Option<(pb::PushChunk, usize)>,
    /// Partition being read (index into the list), and elements of it read.
    part: usize,
    /// Elements of the partition read so far.
    at: usize,
    /// Why reading stopped, once it did (every later read fails with it).
    failed: Option<Unreadable>,
    /// A piece held NaN or Inf.
    non_finite: bool,
}

/// One worker's push through the stream, read in order as it is applied.
pub struct StreamedGradient {
    /// The worker.
    worker: u32,
    /// The partitions, in stream order, with their elements.
    parts: Vec<(Key, usize)>,
    /// Where reading is (one reader at a time).
    reader: Arc<Mutex<Reader>>,
    /// The model, for its counters and pool.
    model: Arc<Model>,
    /// The runtime the stream is read on.
    runtime: tokio::runtime::Handle,
    /// Longest wait for the next chunk.
    wait: Duration,
}

impl std::fmt::Debug for StreamedGradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedGradient")
            .field("worker", &self.worker)
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

impl GradientSource for StreamedGradient {
    fn held(&self) -> &[(Key, usize)] {
        &self.parts
    }

    fn read(&self, key: &Key, at: usize, dst: &mut [f32]) -> Result<(), Unreadable> {
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &r.failed {
            return Err(why.clone());
        }
        let result = self.read_locked(&mut r, key, at, dst);
        if let Err(why) = &result {
            r.failed = Some(why.clone());
        }
        result
    }

    fn rereadable(&self) -> bool {
        false
    }
}

impl StreamedGradient {
    /// Copies elements `at..at + dst.len()` of partition `key`, which must be the next ones in
    /// the stream, and checks them.
    fn read_locked(
        &self,
        r: &mut Reader,
        key: &Key,
        at: usize,
        dst: &mut [f32],
    ) -> Result<(), Unreadable> {
        // Partitions read to their end (or holding nothing) are behind the reader.
        while r.part < self.parts.len() && r.at == self.parts[r.part].1 {
            r.part += 1;
            r.at = 0;
        }
        let Some((want, numel)) = self.parts.get(r.part) else {
            return Err(Unreadable::Stream {
                worker: self.worker,
                problem: "has no more partitions to read".into(),
            });
        };
        if want != key || at != r.at || at + dst.len() > *numel {
            return Err(Unreadable::Stream {
                worker: self.worker,
                problem: format!(
                    "was read out of order ({:?} partition {} at element {at}; the stream is at {:?} partition {} element {})",
                    key.0, key.1, want.0, want.1, r.at
                ),
            });
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        let mut filled = 0;
        while filled < bytes.len() {
            let pos = at * 4 + filled;
            let (chunk, used) = match r.chunk.take() {
                Some((c, used)) if used < c.data.len() => (c, used),
                _ => (self.next_chunk(&mut r.stream, key, pos, *numel)?, 0),
            };
            let n = (chunk.data.len() - used).min(bytes.len() - filled);
            bytes[filled..filled + n].copy_from_slice(&chunk.data[used..used + n]);
            filled += n;
            r.chunk = Some((chunk, used + n));
        }
        if self.model.mode.reject_non_finite && !all_finite(dst) {
            r.non_finite = true;
            self.model.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(Unreadable::NonFinite {
                worker: self.worker,
                param: key.0.clone(),
                at,
            });
        }
        r.at = at + dst.len();
        Ok(())
    }

    /// The next chunk, which must continue partition `key` at byte `pos`.
    fn next_chunk(
        &self,
        stream: &mut Chunks,
        key: &Key,
        pos: usize,
        numel: usize,
    ) -> Result<pb::PushChunk, Unreadable> {
        let worker = self.worker;
        let broken = |problem: String| Unreadable::Stream { worker, problem };
        let where_ = || {
            format!(
                "{:?} partition {} at byte {pos} of {}",
                key.0,
                key.1,
                numel * 4
            )
        };
        let next = self
            .runtime
            .block_on(async { tokio::time::timeout(self.wait, stream.next()).await });
        let c = match next {
            Err(_) => Err(format!(
                "sent nothing for {:?} (stopped at {})",
                self.wait,
                where_()
            )),
            Ok(Some(Err(st))) => Err(format!("stream broke at {}: {}", where_(), st.message())),
            Ok(None) => Err(format!("stream ended early, at {}", where_())),
            Ok(Some(Ok(c))) => Ok(c),
        }
        .map_err(broken)?;
        let fits = c.offset == pos as u64
            && (pos + c.data.len()) <= numel * 4
            && !c.data.is_empty()
            && c.param == key.0
            && c.part == key.1;
        if !fits {
            return Err(broken(format!(
                "sent {} bytes of {:?} partition {} at byte {} where {} was due",
                c.data.len(),
                c.param,
                c.part,
                c.offset,
                where_()
            )));
        }
        Ok(c)
    }
}

/// The state of a push after its gradient was used: whether NaN or Inf stopped it, and whether
/// its stream held more than the partitions it listed.
struct Afterwards {
    /// Where reading stopped.
    reader: Arc<Mutex<Reader>>,
    /// The runtime the stream is read on.
    runtime: tokio::runtime::Handle,
}

impl Afterwards {
    /// Whether the stream held NaN or Inf (the push was refused for it).
    fn non_finite(&self) -> bool {
        self.reader.lock().map(|r| r.non_finite).unwrap_or(false)
    }

    /// Warns when the stream goes on after its last listed partition (a client bug: what the push
    /// listed was applied, the rest ignored).
    async fn check_end(self, worker: u32) {
        let _ = blocking(move || {
            let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            if r.failed.is_some() {
                return;
            }
            let more = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(1), r.stream.next()).await
            });
            if let Ok(Some(Ok(c))) = more {
                tracing::warn!(
                    worker,
                    "push stream went on after its listed partitions ({:?} partition {}); ignored",
                    c.param,
                    c.part
                );
            }
        })
        .await;
    }
}

/// The status of a push whose gradient was applied in part only, or not at all.
fn failed_status(worker: u32, p: &Partial, non_finite: bool) -> Status {
    if !p.applied.is_empty() {
        tracing::warn!(worker, "gradient applied in part: {p}");
        return partially_applied(
            format!("worker {worker}'s push could not be applied to the end: {p}"),
            &p.applied,
        );
    }
    if non_finite {
        return status(
            Code::InvalidArgument,
            Reason::NonFinite,
            format!("{}; nothing applied", p.why),
        );
    }
    status(
        Code::Aborted,
        Reason::UnreadableNothingApplied,
        format!("{}; nothing applied", p.why),
    )
}

impl Service {
    /// A push whose first chunk lists its partitions: applied as it is read.
    pub(super) async fn push_as_read(
        &self,
        first: pb::PushChunk,
        stream: Chunks,
    ) -> Result<pb::PushResponse, Status> {
        let (model, stepper) = self.declared_with_stepper()?;
        let (worker, step, first_push_id) = (first.worker, first.step, first.push_id);
        check_worker(&model, worker)?;
        let parts = listed_parts(&model, &first.parts)?;
        if first.non_finite {
            model.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(status(
                Code::InvalidArgument,
                Reason::NonFinite,
                format!("worker {worker}'s gradient holds NaN or Inf; nothing applied"),
            ));
        }
        let reader = Arc::new(Mutex::new(Reader {
            stream,
            // The first chunk may carry data already.
            chunk: (!first.data.is_empty()).then_some((first, 0)),
            part: 0,
            at: 0,
            failed: None,
            non_finite: false,
        }));
        if let Some((c, _)) = reader.lock().map_err(|_| shutting_down())?.chunk.as_ref() {
            let starts = parts
                .first()
                .is_some_and(|(k, _)| *k == (c.param.clone(), c.part));
            if !starts || c.offset != 0 || c.data.len() > parts[0].1 * 4 {
                return Err(invalid(format!(
                    "worker {worker}'s first chunk ({:?} partition {} at byte {}) is not the start of its first listed partition; nothing applied",
                    c.param, c.part, c.offset
                )));
            }
        }
        let runtime = tokio::runtime::Handle::current();
        let source = StreamedGradient {
            worker,
            parts,
            reader: reader.clone(),
            model: model.clone(),
            runtime: runtime.clone(),
            wait: self.limits.receive_wait,
        };
        let after = Afterwards { reader, runtime };
        let response = match stepper {
            Some(stepper) => self
                .push_pending(
                    &model,
                    &stepper,
                    Box::new(source),
                    worker,
                    step,
                    STREAMED_PATIENCE,
                )
                .await?
                .map_err(|p| failed_status(worker, &p, after.non_finite()))?,
            None => {
                self.apply_streamed_once(model, source, worker, step, first_push_id)
                    .await?
            }
        };
        after.check_end(worker).await;
        Ok(response)
    }

    /// Async, by push id: a push this server already took (the worker lost its connection and sent
    /// it again) is answered as it was, never applied twice.
    async fn apply_streamed_once(
        &self,
        model: Arc<Model>,
        source: StreamedGradient,
        worker: u32,
        step: u64,
        push_id: u64,
    ) -> Result<pb::PushResponse, Status> {
        if push_id == 0 {
            return self.apply_streamed(model, source, worker, step, None).await;
        }
        let mut waited = Duration::ZERO;
        let taking = loop {
            match self.intake.claim(worker, push_id)? {
                Claim::New(taking) => break taking,
                Claim::Answered(answer) => {
                    tracing::warn!(
                        worker,
                        push_id,
                        "push sent again; answered as the first time"
                    );
                    return answer;
                }
                // The first attempt is still being applied: its answer is due soon.
                Claim::InProgress if waited < self.limits.receive_wait => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    waited += Duration::from_millis(50);
                }
                Claim::InProgress => {
                    return Err(status(
                        Code::DeadlineExceeded,
                        Reason::Deadline,
                        format!(
                            "worker {worker}'s push {push_id} is still being applied from an earlier attempt"
                        ),
                    ));
                }
            }
        };
        self.apply_streamed(model, source, worker, step, Some(taking))
            .await
    }

    /// Async: applied now, a piece at a time as it arrives, after the staleness bound let it in.
    /// `taking` records the answer under the push's id, even if this call is dropped meanwhile.
    async fn apply_streamed(
        &self,
        model: Arc<Model>,
        source: StreamedGradient,
        worker: u32,
        step: u64,
        mut taking: Option<Taking>,
    ) -> Result<pb::PushResponse, Status> {
        wait_staleness(&model, worker, self.limits.max_wait).await?;
        let receiving = self.intake.admit().await?;
        let svc = self.clone();
        // From here the blocking task owns the outcome: it records it whatever happens to this call.
        let record = taking.as_mut().map(Taking::own);
        let result = blocking(move || {
            let r = svc.apply_async_pooled(&model, worker, step, |version, scratch| {
                model
                    .apply_source(&source, version, None, scratch)
                    .map_err(|p| {
                        let non_finite = source.reader.lock().is_ok_and(|r| r.non_finite);
                        (failed_status(worker, &p, non_finite), !p.applied.is_empty())
                    })
            });
            drop(receiving);
            if let Some(recorder) = record {
                recorder.record(r.as_ref().map(|(resp, _)| *resp).map_err(Clone::clone));
            }
            r
        })
        .await?;
        self.answer(result)
    }
}

/// The partitions a push lists: each held here, in ascending order, none twice.
fn listed_parts(model: &Model, parts: &[pb::PartRef]) -> Result<Vec<(Key, usize)>, Status> {
    let mut out: Vec<(Key, usize)> = Vec::with_capacity(parts.len());
    for p in parts {
        let key = (p.param.clone(), p.part);
        let entry = part_of(model, &key)?;
        if out.last().is_some_and(|(last, _)| *last >= key) {
            return Err(invalid(format!(
                "a push lists {:?} partition {} out of ascending order or twice; nothing applied",
                key.0, key.1
            )));
        }
        out.push((key, entry.numel));
    }
    Ok(out)
}
