//! A push, from its arrival to its answer: the gradient received (streamed or by address) and
//! checked against the declared partitions, handed to the step, and the step's outcome turned into
//! the worker's answer; and how long a pull may wait for its version.

use super::*;

/// A push being received: one buffer per partition, filled in order.
pub(super) struct Incoming {
    /// The worker pushing.
    pub(super) worker: u32,
    /// The step it pushes for.
    pub(super) step: u64,
    /// Each partition's gradient, written straight into f32 storage, and the bytes received.
    pub(super) parts: HashMap<Key, (Vec<f32>, usize)>,
}

impl Incoming {
    /// Copies chunk `c` into its partition's buffer, which it must continue exactly; a chunk that
    /// does not is refused (nothing applied) and counted as rejected.
    pub(super) fn take(&mut self, model: &Model, c: pb::PushChunk) -> Result<(), Status> {
        let key = (c.param, c.part);
        let entry = part_of(model, &key)?;
        let want = entry.numel * 4;
        let (buf, filled) = self
            .parts
            .entry(key.clone())
            .or_insert_with(|| (model.pool.take(entry.numel), 0));
        let end = filled.checked_add(c.data.len());
        if c.offset != *filled as u64 || end.is_none_or(|e| e > want) {
            model.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(invalid(format!(
                "gradient for {:?} partition {}: chunk at byte {} of {} bytes does not follow the {} bytes received (partition holds {want} bytes); nothing applied",
                key.0,
                key.1,
                c.offset,
                c.data.len(),
                *filled
            )));
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf.as_mut_slice());
        bytes[*filled..*filled + c.data.len()].copy_from_slice(&c.data);
        *filled += c.data.len();
        Ok(())
    }
}

impl Service {
    /// Checks a received push (worker index, sizes, finiteness) and hands it to the sync step or
    /// applies it (async), off the async runtime.
    pub(super) async fn accept(
        &self,
        model: Arc<Model>,
        inc: Incoming,
    ) -> Result<pb::PushResponse, Status> {
        check_worker(&model, inc.worker)?;
        let (worker, step) = (inc.worker, inc.step);
        let checked = {
            let model = model.clone();
            blocking(move || check_streamed(&model, inc.parts)).await?
        };
        let grads = checked.inspect_err(|_| {
            model.counters.rejected.fetch_add(1, Ordering::Relaxed);
        })?;
        let result = match self.declared_with_stepper()?.1 {
            Some(stepper) => {
                stepper
                    .push(worker, step, Contribution::Streamed(grads))
                    .await
            }
            None => {
                wait_staleness(&model, worker, self.limits.max_wait).await?;
                let svc = self.clone();
                blocking(move || {
                    svc.apply_async_pooled(&model, worker, step, |version, _| {
                        for (key, mut g) in grads {
                            model.apply(&key, &mut g, version);
                            model.pool.give(g);
                        }
                        Ok(())
                    })
                })
                .await?
            }
        };
        self.answer(result)
    }

    /// The response to a push, after starting the checkpoint it made due, if any.
    pub(in crate::server) fn answer(&self, result: PushResult) -> Result<pb::PushResponse, Status> {
        let (response, snapshot) = result?;
        if let Some(snap) = snapshot {
            self.write_in_background(snap);
        }
        Ok(response)
    }

    /// Waits until the parameters reach the pull's `min_version` (a restarted server answers at once).
    /// How long a pull may wait: what it asks, at most the server's limit.
    pub(super) fn pull_wait(&self, r: &pb::PullRequest) -> Duration {
        Duration::from_millis(r.timeout_ms).min(self.limits.max_wait)
    }

    /// Waits for the version a pull asks for: published, or (`early`: the pull's first partition
    /// in a sync job) that partition finished by the step being applied. Answers the version to
    /// report (at least the one asked for) and the one asked for (0 for a worker that last saw
    /// another incarnation: it is told at once where this one stands).
    pub(in crate::server) async fn wait_version(
        &self,
        model: &Model,
        r: &pb::PullRequest,
        early: Option<&Key>,
    ) -> Result<(u64, u64), Status> {
        let wait = self.pull_wait(r);
        let restarted = r.incarnation != 0 && r.incarnation != self.incarnation;
        let min_version = if restarted { 0 } else { r.min_version };
        if let Some(first) = early {
            if model.wait_reached(first, min_version, wait).await {
                let v = (*model.version.borrow()).max(min_version);
                return Ok((v, min_version));
            }
        } else {
            let mut rx = model.version.subscribe();
            match tokio::time::timeout(wait, rx.wait_for(|v| *v >= min_version)).await {
                Ok(Ok(v)) => return Ok((*v, min_version)),
                Ok(Err(_)) => return Err(shutting_down()),
                Err(_) => {}
            }
        }
        Err(status(
            Code::DeadlineExceeded,
            Reason::Deadline,
            format!(
                "version {} not reached within {wait:?} (server at {}); a worker may be missing",
                r.min_version,
                *model.version.borrow()
            ),
        ))
    }
}

/// Every partition of a streamed push complete and (when the model asks) finite; the buffers go
/// back to the pool when not.
fn check_streamed(
    model: &Model,
    parts: HashMap<Key, (Vec<f32>, usize)>,
) -> Result<HashMap<Key, Vec<f32>>, Status> {
    let mut grads: HashMap<Key, Vec<f32>> = HashMap::new();
    let mut failure = None;
    for (key, (g, filled)) in parts {
        if failure.is_none() {
            let numel = model.parts.get(&key).map_or(0, |e| e.numel);
            if filled != numel * 4 {
                failure = Some(invalid(format!(
                    "gradient for {:?} partition {} is truncated: {filled} of {} bytes; nothing applied",
                    key.0,
                    key.1,
                    numel * 4
                )));
            } else if model.mode.reject_non_finite && !all_finite(&g) {
                failure = Some(status(
                    Code::InvalidArgument,
                    Reason::NonFinite,
                    format!("gradient for {:?} holds NaN or Inf; nothing applied", key.0),
                ));
            }
        }
        grads.insert(key, g);
    }
    match failure {
        Some(st) => {
            grads.into_values().for_each(|g| model.pool.give(g));
            Err(st)
        }
        None => Ok(grads),
    }
}
