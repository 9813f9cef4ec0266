//! The same-machine data plane, server side: workers on this machine push and pull by address
//! (see `tandem_peer_memory` for the primitive and its guarantees).
//!
//! A push by address is read twice, a piece at a time, out of the worker's memory: a first pass
//! checks every value (and takes each partition's squared norm for clipping) before anything is
//! used, so a bad gradient changes nothing; the second pass applies it (async) or, in sync mode,
//! happens when the step is applied (the gradient stays in the worker until then). The server
//! reads only the regions the worker listed for that push, and only while the worker's word holds
//! the push's tag. What a failure leaves behind is always reported exactly: nothing
//! (`NOT_ATTACHED`, `UNREADABLE_NOTHING_APPLIED`: the worker may push the same gradient through the
//! stream) or the pieces already applied (`PARTIALLY_APPLIED`: it must not).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Code, Status};

use super::Service;
use crate::failure::{invalid, partially_applied, status};
use crate::pb;
use crate::pb::Reason;
use crate::server::model::{GradientSource, Key, Model, PIECE, Partial, Unreadable};
use crate::server::runtime::{blocking, shutting_down};
use crate::server::step::{Contribution, Stepper, wait_staleness};

/// How long a sync push from this machine keeps its gradient in the worker, waiting for the step to
/// be applied, before the server copies it into the step's sum and lets the worker go on.
pub const PENDING_PATIENCE: Duration = Duration::from_secs(1);

/// Workers on this machine whose memory this server has proven it can read, and this server's word
/// for them to prove the converse.
#[derive(Debug)]
pub struct SameHost {
    /// Off with `TANDEM_SAME_HOST=tcp`.
    pub enabled: bool,
    /// This server's word.
    pub word: tandem_peer_memory::LocalWord,
    /// Processes that attached.
    pub attached: Mutex<HashSet<u32>>,
}

impl SameHost {
    /// The data plane as the environment allows it.
    pub fn from_env() -> Self {
        SameHost {
            enabled: tandem_peer_memory::allowed_by_env(),
            word: tandem_peer_memory::LocalWord::new(),
            attached: Mutex::default(),
        }
    }
}

/// A gradient that stays in a worker's memory on this machine while its push is open: the
/// regions the worker offered for this push (one per partition), read only while its word holds
/// the push's tag.
#[derive(Debug)]
pub struct SharedGradient {
    /// The worker's offered regions.
    offer: tandem_peer_memory::Offer,
    /// The worker.
    worker: u32,
    /// Each partition's key and elements; the offer's region of the same index holds it.
    regions: Vec<(Key, usize)>,
}

impl GradientSource for SharedGradient {
    fn held(&self) -> &[(Key, usize)] {
        &self.regions
    }

    fn read(&self, key: &Key, at: usize, dst: &mut [f32]) -> Result<(), Unreadable> {
        let i = self
            .regions
            .iter()
            .position(|(k, _)| k == key)
            .ok_or_else(|| Unreadable::NoPartition {
                param: key.0.clone(),
                part: key.1,
            })?;
        self.read_piece(i, at, dst)
    }
}

impl SharedGradient {
    /// Copies elements `at..at + dst.len()` of region `i`, checking the worker still offers it.
    fn read_piece(&self, i: usize, at: usize, dst: &mut [f32]) -> Result<(), Unreadable> {
        let memory = |detail: String| Unreadable::Memory {
            worker: self.worker,
            param: self.regions[i].0.0.clone(),
            detail,
        };
        let offset = at
            .checked_mul(4)
            .ok_or_else(|| memory("the offset overflows".into()))?;
        self.offer
            .read(i, offset, bytemuck::cast_slice_mut(dst))
            .map_err(|e| match e {
                tandem_peer_memory::ReadError::Withdrawn => Unreadable::Left {
                    worker: self.worker,
                    detail: String::new(),
                },
                e => memory(e.to_string()),
            })
    }

    /// Whether the worker is still in the push (so what was read before is what it sent).
    fn still_in(&self) -> Result<(), Unreadable> {
        self.offer.still_offered().map_err(|e| Unreadable::Left {
            worker: self.worker,
            detail: format!(" ({e})"),
        })
    }

    /// The first pass: every value read and checked (finite, when the model asks) and each
    /// partition's squared norm (when clipping), before anything is used. Nothing is applied.
    fn check(&self, model: &Model, clip: bool) -> Result<Vec<f32>, Status> {
        let unreadable = |why: Unreadable| {
            status(
                Code::Aborted,
                Reason::UnreadableNothingApplied,
                format!("{why}; nothing applied"),
            )
        };
        let mut norms = vec![0.0f32; self.regions.len()];
        if model.mode.reject_non_finite || clip {
            let mut scratch = model.pool.take(PIECE);
            let result = self.check_pieces(model, clip, &mut norms, &mut scratch);
            model.pool.give(scratch);
            result.map_err(|e| match e {
                Checked::Unreadable(why) => unreadable(why),
                Checked::NonFinite(key) => {
                    model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    status(
                        Code::InvalidArgument,
                        Reason::NonFinite,
                        format!("gradient for {:?} holds NaN or Inf; nothing applied", key.0),
                    )
                }
            })?;
        }
        // The worker was still in the push after the first pass, so what was checked is what it
        // sent.
        self.still_in().map_err(unreadable)?;
        Ok(norms)
    }

    /// Reads every region once before anything is applied: refuses NaN/Inf (when the mode does) and
    /// sums each partition's squares into `norms` for clipping.
    fn check_pieces(
        &self,
        model: &Model,
        clip: bool,
        norms: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), Checked> {
        for (i, ((key, numel), norm_sq)) in self.regions.iter().zip(norms.iter_mut()).enumerate() {
            let mut at = 0;
            while at < *numel {
                let piece = &mut scratch[..PIECE.min(numel - at)];
                self.read_piece(i, at, piece).map_err(Checked::Unreadable)?;
                if model.mode.reject_non_finite && !super::all_finite(piece) {
                    return Err(Checked::NonFinite(key.clone()));
                }
                if clip {
                    *norm_sq = crate::optimizer::add_squares(*norm_sq, piece);
                }
                at += piece.len();
            }
        }
        Ok(())
    }
}

/// Why a gradient read by address was refused before anything was applied.
enum Checked {
    /// A region could not be read.
    Unreadable(Unreadable),
    /// A partition held NaN or Inf.
    NonFinite(Key),
}

/// Withdraws a worker's gradient from the sync step it is waiting on if its push ends before the
/// step is applied (deadline, or the worker cancelled the call). The withdrawal is sent after the
/// gradient on the same channel, so the step thread always sees them in that order.
struct Withdraw<'a> {
    /// The step thread to withdraw from.
    stepper: &'a Stepper,
    /// The worker.
    worker: u32,
    /// The step.
    step: u64,
    /// Whether dropping it withdraws the gradient.
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.stepper.withdraw(self.worker, self.step);
        }
    }
}

/// The error a push reports for a gradient applied in part only.
fn partial_status(worker: u32, p: &Partial) -> Status {
    tracing::warn!(worker, "gradient applied in part: {p}");
    partially_applied(
        format!("worker {worker}'s gradient could not be read to the end: {p}"),
        &p.applied,
    )
}

impl Service {
    /// Answers a worker's offer to share its memory: attached when this server can read it (same
    /// machine, same user, a probe read), else the reason it cannot.
    pub(super) fn attach_worker(&self, advert: &str) -> Result<pb::AttachResponse, Status> {
        let refuse = |reason: String| {
            Ok(pb::AttachResponse {
                ok: false,
                advert: String::new(),
                reason,
            })
        };
        if !self.same_host.enabled {
            return refuse("TANDEM_SAME_HOST=tcp on the server".into());
        }
        let peer = tandem_peer_memory::PeerMemory::parse(advert)
            .ok_or_else(|| invalid(format!("unreadable attach advert {advert:?}")))?;
        if let Err(e) = peer.probe() {
            return refuse(format!("the server cannot read the worker's memory: {e}"));
        }
        self.same_host
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.pid());
        Ok(pb::AttachResponse {
            ok: true,
            advert: self.same_host.word.advert(),
            reason: String::new(),
        })
    }

    /// Checks a push by address against the partitions before anything is read.
    fn shared_gradient(&self, model: &Model, r: pb::SharedPush) -> Result<SharedGradient, Status> {
        let attached = self
            .same_host
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&r.pid);
        let peer = tandem_peer_memory::PeerMemory::of_process(r.pid)
            .filter(|_| attached)
            .ok_or_else(|| {
                status(
                    Code::FailedPrecondition,
                    Reason::NotAttached,
                    format!(
                        "process {} has not attached to this server; push through the stream",
                        r.pid
                    ),
                )
            })?;
        super::check_worker(model, r.worker)?;
        let mut regions: Vec<(Key, usize)> = Vec::with_capacity(r.parts.len());
        let mut offered: Vec<(u64, u64)> = Vec::with_capacity(r.parts.len());
        for region in r.parts {
            let key = (region.param, region.part);
            let entry = super::part_of(model, &key)?;
            let want = entry.numel as u64 * 4;
            if region.len != want || regions.iter().any(|(k, _)| *k == key) {
                model.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(invalid(format!(
                    "gradient for {:?} partition {}: {} bytes offered (partition holds {want} bytes, once); nothing applied",
                    key.0, key.1, region.len
                )));
            }
            regions.push((key, entry.numel));
            offered.push((region.addr, region.len));
        }
        let offer = tandem_peer_memory::Offer::new(peer, r.word, r.tag, &offered)
            .map_err(|e| invalid(format!("worker {}'s offer: {e}; nothing applied", r.worker)))?;
        Ok(SharedGradient {
            offer,
            worker: r.worker,
            regions,
        })
    }

    /// A push whose gradient stays in the worker's memory: checked, then applied (async) or handed to
    /// the step (sync), read a piece at a time.
    pub(super) async fn push_by_address(
        &self,
        r: pb::SharedPush,
    ) -> Result<pb::PushResponse, Status> {
        let (model, stepper) = self.declared_with_stepper()?;
        let (worker, step) = (r.worker, r.step);
        let from = self.shared_gradient(&model, r)?;
        let bytes: u64 = from.regions.iter().map(|(_, n)| *n as u64 * 4).sum();
        let Some(stepper) = stepper else {
            return self.apply_now(model, from, bytes, worker, step).await;
        };
        // One check pass at a time per permit, on the blocking pool.
        let receiving = self.intake.admit().await?;
        let from = {
            let model = model.clone();
            blocking(move || from.check(&model, false).map(|_| from)).await??
        };
        drop(receiving);
        model.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        let outcome = self
            .push_pending(
                &model,
                &stepper,
                Box::new(from),
                worker,
                step,
                PENDING_PATIENCE,
            )
            .await?;
        outcome.map_err(|p| partial_status(worker, &p))
    }

    /// Sync: the gradient stays where it is (the worker's memory, or its stream) until the step is
    /// applied; the push returns then, so the worker is still in the call and its buffer unchanged
    /// when the server reads it. After `patience` the server copies it into the step's sum and
    /// the push returns. `Ok(Err(_))`: what of it was applied, when not all of it was.
    pub(super) async fn push_pending(
        &self,
        model: &Model,
        stepper: &Stepper,
        from: Box<dyn GradientSource>,
        worker: u32,
        step: u64,
        patience: Duration,
    ) -> Result<Result<pb::PushResponse, Partial>, Status> {
        let mut withdraw = Withdraw {
            stepper,
            worker,
            step,
            armed: true,
        };
        let (mut response, snapshot) = stepper
            .push(worker, step, Contribution::Pending(from))
            .await?;
        if let Some(snap) = snapshot {
            self.write_in_background(snap);
        }
        if !response.applied {
            withdraw.armed = false;
            return Ok(Ok(response));
        }
        if response.version <= step {
            let mut rx = model.version.subscribe();
            let waited = tokio::time::timeout(patience, rx.wait_for(|v| *v > step))
                .await
                .map(|r| r.map(|v| *v));
            match waited {
                Ok(Ok(v)) => response.version = v,
                Ok(Err(_)) => return Err(shutting_down()),
                Err(_) => {
                    // The step is slow to complete (a straggler; a restarted server the other
                    // workers are catching up with): the gradient is copied into the step's sum
                    // and the worker goes on, rather than wait on workers that may be waiting on
                    // it elsewhere.
                    withdraw.armed = false;
                    response.version = stepper.copy_in(worker, step).await?.map_err(|why| {
                        status(
                            Code::Aborted,
                            Reason::UnreadableNothingApplied,
                            format!(
                                "worker {worker}'s gradient for step {step} could not be copied in ({why}); withdrawn, nothing applied"
                            ),
                        )
                    })?;
                }
            }
        }
        withdraw.armed = false;
        Ok(match model.partial_of(step, worker) {
            Some(p) => Err(p),
            None => Ok(response),
        })
    }

    /// Async: applied now, piece by piece, each piece used only if the worker was still in the
    /// push after it was read (it clears its word before reusing its buffer).
    async fn apply_now(
        &self,
        model: Arc<Model>,
        from: SharedGradient,
        bytes: u64,
        worker: u32,
        step: u64,
    ) -> Result<pb::PushResponse, Status> {
        // The staleness bound first (without a permit, so a waiting push never blocks the pushes
        // it waits for), then the check pass and the update in one trip to the blocking pool.
        wait_staleness(&model, worker, self.limits.max_wait).await?;
        let receiving = self.intake.admit().await?;
        let svc = self.clone();
        let result = blocking(move || {
            let clip = model.optimizer.clip_norm > 0.0;
            let norms = from.check(&model, clip)?;
            model.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
            svc.apply_async_pooled(&model, worker, step, |version, scratch| {
                model
                    .apply_source(&from, version, Some(&norms), scratch)
                    .map_err(|p| (partial_status(worker, &p), true))
            })
        })
        .await?;
        drop(receiving);
        self.answer(result)
    }

    /// A pull answered by writing the parameters straight into the worker's memory.
    pub(super) async fn pull_by_address(
        &self,
        r: pb::PullRequest,
    ) -> Result<pb::SharedPull, Status> {
        let model = self.declared()?;
        let (version, _) = self.wait_version(&model, &r, None).await?;
        let mut parts = Vec::new();
        for key in super::requested(&model, r.parts) {
            let at = super::part_of(&model, &key)?.locate();
            parts.push(pb::SharedPart {
                param: key.0,
                part: key.1,
                addr: at.addr as u64,
                len: at.len as u64,
                seq_addr: at.seq_addr as u64,
                seq: at.seq,
            });
        }
        let total: u64 = parts.iter().map(|p| p.len).sum();
        model.counters.bytes_out.fetch_add(total, Ordering::Relaxed);
        Ok(pb::SharedPull {
            version,
            incarnation: self.incarnation,
            pid: std::process::id(),
            parts,
            standby: self.replication.standby(),
        })
    }
}
