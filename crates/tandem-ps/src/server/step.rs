//! Applying gradients, off the async runtime.
//!
//! Tokio's worker threads only move bytes: receiving chunks, answering calls, waiting. Everything
//! that reads or changes the model in bulk runs elsewhere, with one owner per kind of state:
//!
//! - **Sync mode**: one [`Stepper`] thread per server owns the step being aggregated
//!   ([`SyncStep`]). Handlers send it commands (a gradient, a withdrawal, a copy-in, a checkpoint
//!   snapshot) over a channel and await its answer, so commands from one handler are seen in the
//!   order sent (a withdrawal can never overtake the gradient it withdraws), no lock is held
//!   across an `await`, and no tokio thread ever waits on a step being applied.
//! - **Async mode**: each gradient is applied on the blocking pool ([`apply_async`] inside
//!   `spawn_blocking`) after the staleness bound let it through; partitions have their own write
//!   locks, so two gradients for different partitions apply in parallel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::{Code, Status};

use super::checkpoint::Snapshot;
use super::model::{GradientSource, Key, Model, Pending, SyncStep, Unreadable};
use super::replica::{Replicated, Replication};
use crate::failure::status;
use crate::pb;
use crate::pb::Reason;

/// A push's answer, and the checkpoint it made due (written by the caller, in the background).
pub type PushResult = Result<(pb::PushResponse, Option<Snapshot>), Status>;

/// A gradient for a sync step.
pub enum Contribution {
    /// Received whole through the stream: added to the step's running sums.
    Streamed(HashMap<Key, Vec<f32>>),
    /// Left in the worker's memory until the step is applied.
    Pending(Box<dyn GradientSource>),
}

/// What the step thread is asked to do, each with the channel of its answer.
enum Command {
    /// A worker's gradient for a step.
    Push {
        worker: u32,
        step: u64,
        gradient: Contribution,
        reply: oneshot::Sender<PushResult>,
    },
    /// A push ended before its step was applied: its gradient is taken back.
    Withdraw { worker: u32, step: u64 },
    /// Copy a worker's gradient (left where it is) into the step's sum now.
    CopyIn {
        worker: u32,
        step: u64,
        reply: oneshot::Sender<Result<u64, Unreadable>>,
    },
    /// A snapshot between two steps.
    Snapshot { reply: oneshot::Sender<Snapshot> },
    /// Workers just marked gone: the step may now have all it needs.
    Gone {
        reply: oneshot::Sender<Option<Snapshot>>,
    },
    /// A standby started following: send it the current state.
    Replicate {
        reply: oneshot::Sender<super::replica::Replicated>,
    },
    /// This model's versions were set from outside (a standby's replicated state): the next step
    /// is the current version.
    Resync,
}

/// The owner of a sync server's current step: a thread of its own that adds gradients, applies
/// finished steps and takes consistent snapshots. It stops when the last handle is dropped.
#[derive(Clone)]
pub struct Stepper {
    /// Commands to the step thread.
    tx: std::sync::mpsc::Sender<Command>,
}

/// The error of a call made after the step thread stopped.
fn gone() -> Status {
    status(
        Code::Internal,
        Reason::Internal,
        "the server's step thread stopped",
    )
}

impl Stepper {
    /// Starts the thread for `model`; `due(version)` says whether a checkpoint is due.
    pub fn start(
        model: Arc<Model>,
        due: impl Fn(u64) -> bool + Send + 'static,
        replication: Arc<Replication>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        let step = *model.version.borrow();
        std::thread::Builder::new()
            .name("tandem-ps-step".into())
            .spawn(move || {
                let mut st = SyncStep {
                    step,
                    ..SyncStep::default()
                };
                // Ends when every sender is gone (the server stopped).
                while let Ok(cmd) = rx.recv() {
                    run(&model, &mut st, cmd, &due, &replication);
                }
            })?;
        Ok(Stepper { tx })
    }

    /// Sends `cmd` to the step thread and waits for its answer.
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(cmd(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }

    /// Hands worker `worker`'s gradient for `step` to the step.
    pub async fn push(&self, worker: u32, step: u64, gradient: Contribution) -> PushResult {
        self.ask(|reply| Command::Push {
            worker,
            step,
            gradient,
            reply,
        })
        .await?
    }

    /// Takes worker `worker`'s gradient back out of `step`, if that step is still open (its push
    /// ended early: its memory is about to be reused, and a retry must be accepted).
    pub fn withdraw(&self, worker: u32, step: u64) {
        let _ = self.tx.send(Command::Withdraw { worker, step });
    }

    /// Copies worker `worker`'s gradient, still in its memory, into the sums of `step` so its push
    /// can return before the step is applied. Answers the step the server is at; an error says why
    /// the gradient could not be read (it is then withdrawn).
    pub async fn copy_in(&self, worker: u32, step: u64) -> Result<Result<u64, Unreadable>, Status> {
        self.ask(|reply| Command::CopyIn {
            worker,
            step,
            reply,
        })
        .await
    }

    /// A snapshot between two steps.
    pub async fn snapshot(&self) -> Result<Snapshot, Status> {
        self.ask(|reply| Command::Snapshot { reply }).await
    }

    /// Workers were marked gone ([`Model::gone`]): applies the step if the gradients already
    /// added are now enough. Answers the checkpoint that made due, if any.
    pub async fn workers_gone(&self) -> Result<Option<Snapshot>, Status> {
        self.ask(|reply| Command::Gone { reply }).await
    }

    /// Sends the current state (between two steps) to the standby that just started following.
    pub async fn replicate(&self) -> Result<super::replica::Replicated, Status> {
        self.ask(|reply| Command::Replicate { reply }).await
    }

    /// The model's version was set from outside (a promoted standby): the step being aggregated
    /// becomes the current version, with nothing in it yet. Commands sent after it see that.
    pub fn resync(&self) {
        let _ = self.tx.send(Command::Resync);
    }
}

/// The step thread's handling of one command.
fn run(
    model: &Model,
    st: &mut SyncStep,
    cmd: Command,
    due: &dyn Fn(u64) -> bool,
    replication: &Replication,
) {
    match cmd {
        Command::Push {
            worker,
            step,
            gradient,
            reply,
        } => {
            let r = push_sync(model, st, worker, step, gradient, due, replication);
            let _ = reply.send(r);
        }
        Command::Withdraw { worker, step } => withdraw(st, worker, step),
        Command::CopyIn {
            worker,
            step,
            reply,
        } => {
            let r = if st.step == step {
                model.copy_in(st, worker).map(|_| st.step)
            } else {
                Ok(st.step)
            };
            let _ = reply.send(r);
        }
        Command::Snapshot { reply } => {
            let _ = reply.send(model.snapshot());
        }
        Command::Gone { reply } => {
            let _ = reply.send(apply_if_complete(model, st, due, replication));
        }
        Command::Replicate { reply } => {
            let _ = reply.send(replication.replicate(model, st.step));
        }
        Command::Resync => {
            let version = *model.version.borrow();
            if st.step != version {
                tracing::info!(from = st.step, to = version, "step resynchronised");
            }
            *st = SyncStep {
                step: version,
                ..SyncStep::default()
            };
        }
    }
}

/// Takes back `worker`'s gradient of `step` when the push ended before the step was applied.
fn withdraw(st: &mut SyncStep, worker: u32, step: u64) {
    if st.step == step && st.pending.iter().any(|p| p.worker == worker) {
        st.pending.retain(|p| p.worker != worker);
        st.contributors.remove(&worker);
        tracing::warn!(
            worker,
            step,
            "gradient withdrawn: the push ended before its step was applied"
        );
    }
}

/// Applies the step when it has every gradient it needs (K, or every live worker), replicates it
/// to the standby if one follows, then publishes it; answers the snapshot to write if a
/// checkpoint became due. A step whose standby was promoted meanwhile is not published: this
/// server is stopping, replaced.
fn apply_if_complete(
    model: &Model,
    st: &mut SyncStep,
    due: &dyn Fn(u64) -> bool,
    replication: &Replication,
) -> Option<Snapshot> {
    if st.contributors.is_empty() || (st.contributors.len() as u32) < model.needed() {
        return None;
    }
    let step_no = st.step;
    // Pulls may stream each partition as soon as it is applied unless a standby must hold the
    // step first.
    model.early.allow(!replication.follows());
    crate::observe::traced_sync(crate::observe::Call::Apply, step_no, 0, || {
        model.apply_step(st)
    });
    if let Replicated::Replaced(_) = replication.replicate(model, st.step) {
        return None;
    }
    model.version.send_replace(st.step);
    due(st.step).then(|| model.snapshot())
}

/// A push's answer: whether its gradient was applied, and the version now.
fn response(applied: bool, version: u64) -> pb::PushResponse {
    pb::PushResponse {
        applied,
        dropped: !applied,
        version,
    }
}

/// One worker's gradient for a sync step: counted once the step is known to want it; the one that
/// brings the K-th gradient applies the step.
pub fn push_sync(
    model: &Model,
    st: &mut SyncStep,
    worker: u32,
    step: u64,
    gradient: Contribution,
    due: &dyn Fn(u64) -> bool,
    replication: &Replication,
) -> PushResult {
    // A worker gone past its lease is back when it pushes for the current step; a gradient for a
    // step applied without it is refused, so it learns to pull the current parameters.
    if let Some(gone) = model.gone_worker(worker, step == st.step)
        && step < st.step
    {
        if let Contribution::Streamed(grads) = gradient {
            grads.into_values().for_each(|g| model.pool.give(g));
        }
        model.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return Err(gone.refusal(worker, step, st.step));
    }
    if step != st.step || st.contributors.contains(&worker) {
        if step > st.step {
            // Only after this server restarted from an older checkpoint: the worker learns the
            // server's step from the response and its next pull, and continues from there.
            tracing::warn!(
                worker,
                step,
                server_step = st.step,
                "gradient for a step ahead of this server dropped"
            );
        } else if step == st.step {
            // A retry (or a replay after a restart elsewhere): the first gradient stands.
            tracing::warn!(worker, step, "second gradient for the same step ignored");
        }
        if let Contribution::Streamed(grads) = gradient {
            grads.into_values().for_each(|g| model.pool.give(g));
        }
        model.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return Ok((response(false, st.step), None));
    }
    match gradient {
        Contribution::Streamed(grads) => st.add(grads, &model.pool),
        Contribution::Pending(source) => st.pending.push(Pending { worker, source }),
    }
    st.contributors.insert(worker);
    model.worker_steps.send_modify(|s| {
        if let Some(x) = s.get_mut(worker as usize) {
            *x = step + 1;
        }
    });
    model.counters.applied.fetch_add(1, Ordering::Relaxed);
    let snapshot = apply_if_complete(model, st, due, replication);
    if replication.is_replaced() {
        return Err(super::runtime::shutting_down());
    }
    Ok((response(true, st.step), snapshot))
}

/// Waits while worker `worker` is more than the staleness bound ahead of the slowest (async mode).
pub async fn wait_staleness(model: &Model, worker: u32, max_wait: Duration) -> Result<(), Status> {
    let Some(bound) = model.mode.staleness else {
        return Ok(());
    };
    if model.gone_worker(worker, true).is_some() {
        // Back after its lease expired: it resumes level with the slowest live worker.
        let gone = model.gone.lock().unwrap_or_else(|p| p.into_inner()).clone();
        model.worker_steps.send_modify(|s| {
            let slowest = live_steps(s, &gone).min();
            if let (Some(x), Some(slowest)) = (s.get_mut(worker as usize), slowest) {
                *x = (*x).max(slowest);
            }
        });
    }
    let mut rx = model.worker_steps.subscribe();
    let ahead = |s: &Vec<u64>| {
        let mine = s.get(worker as usize).copied().unwrap_or(0);
        let gone = model.gone.lock().unwrap_or_else(|p| p.into_inner());
        let slowest = live_steps(s, &gone).min().unwrap_or(mine);
        mine.saturating_sub(slowest) <= bound as u64
    };
    match tokio::time::timeout(max_wait, rx.wait_for(ahead)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(status(
            Code::Unavailable,
            Reason::ShuttingDown,
            "the server is shutting down",
        )),
        Err(_) => Err(status(
            Code::DeadlineExceeded,
            Reason::Deadline,
            format!(
                "worker {worker} waited {max_wait:?} for the slowest worker to come within {bound} steps"
            ),
        )),
    }
}

/// The steps of the workers not gone.
fn live_steps<'a, V>(
    steps: &'a [u64],
    gone: &'a std::collections::BTreeMap<u32, V>,
) -> impl Iterator<Item = u64> + 'a {
    steps
        .iter()
        .enumerate()
        .filter(|(w, _)| !gone.contains_key(&(*w as u32)))
        .map(|(_, s)| *s)
}

/// One worker's gradient in async mode, once the staleness bound let it through: `apply(version)`
/// applies it. Call it on the blocking pool. When `apply` fails having changed the parameters
/// (part of a gradient), the version still advances, and the error is returned.
pub fn apply_async(
    model: &Model,
    worker: u32,
    step: u64,
    apply: impl FnOnce(u64) -> Result<(), (Status, bool)>,
    due: &dyn Fn(u64) -> bool,
    replication: &Replication,
) -> PushResult {
    let version = *model.version.borrow();
    model
        .counters
        .record_staleness(version.saturating_sub(step));
    let applied =
        crate::observe::traced_sync(crate::observe::Call::Apply, version, 0, || apply(version));
    if let Err((st, changed)) = applied {
        if changed {
            model.version.send_modify(|x| *x += 1);
        }
        return Err(st);
    }
    model.counters.applied.fetch_add(1, Ordering::Relaxed);
    // Async updates are replicated one at a time (in the order they take the replica's lock, each
    // carrying every update applied before it) before their version is published.
    if let Replicated::Replaced(_) = replication.replicate(model, version + 1) {
        return Err(super::runtime::shutting_down());
    }
    model.worker_steps.send_modify(|s| {
        if let Some(x) = s.get_mut(worker as usize) {
            *x += 1;
        }
    });
    let mut now = 0;
    model.version.send_modify(|x| {
        *x += 1;
        now = *x;
    });
    let snapshot = due(now).then(|| model.snapshot());
    Ok((response(true, now), snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::Optimizer;
    use crate::server::Mode;

    #[derive(Debug)]
    struct Ones(usize);

    impl GradientSource for Ones {
        fn covers(&self, key: &Key) -> bool {
            key.0 == "w"
        }
        fn partitions(&self) -> Vec<Key> {
            vec![("w".into(), 0)]
        }
        fn read(&self, _: &Key, _: usize, dst: &mut [f32]) -> Result<(), Unreadable> {
            dst.fill(self.0 as f32);
            Ok(())
        }
    }

    fn model() -> Arc<Model> {
        let mode = Mode::sync_for_test(2, 2);
        Arc::new(Model::one_partition_for_test(
            1,
            Optimizer::sgd(1.0),
            mode,
            3,
        ))
    }

    #[tokio::test]
    async fn a_withdrawn_gradient_leaves_the_step_and_its_retry_is_accepted() {
        let model = model();
        let stepper = Stepper::start(model.clone(), |_| false, Arc::default()).expect("thread");
        let pending = |w| Contribution::Pending(Box::new(Ones(w)));
        let (r, _) = stepper.push(0, 0, pending(10)).await.expect("push");
        assert!(r.applied && r.version == 0);
        // A second gradient of worker 0 for the same step is dropped...
        let (r, _) = stepper.push(0, 0, pending(10)).await.expect("push");
        assert!(r.dropped && !r.applied);
        // ...until the first is withdrawn (sent after it: the thread sees them in order).
        stepper.withdraw(0, 0);
        let (r, _) = stepper.push(0, 0, pending(2)).await.expect("push");
        assert!(r.applied, "the retry after a withdrawal counts");
        let (r, _) = stepper.push(1, 0, pending(4)).await.expect("push");
        assert_eq!(r.version, 1, "the K-th gradient applies the step");
        // SGD with lr 1 from zeros: minus the mean of 2 and 4, not of 10.
        let snap = stepper.snapshot().await.expect("snapshot");
        assert_eq!(snap.parts[0].values, vec![-3.0; 3]);
        assert_eq!(snap.version, 1);
        // Withdrawing from a step already applied changes nothing.
        stepper.withdraw(1, 0);
        assert_eq!(stepper.snapshot().await.expect("snapshot").version, 1);
        assert_eq!(stepper.copy_in(0, 0).await.expect("copy in"), Ok(1));
    }

    #[tokio::test]
    async fn a_gone_worker_is_not_awaited_its_late_push_is_refused_and_it_rejoins() {
        let mode = Mode::sync_for_test(3, 3);
        let model = Arc::new(Model::one_partition_for_test(
            1,
            Optimizer::sgd(1.0),
            mode,
            3,
        ));
        let stepper = Stepper::start(model.clone(), |_| false, Arc::default()).expect("thread");
        let pending = |w| Contribution::Pending(Box::new(Ones(w)));
        assert_eq!(model.needed(), 3);
        stepper.push(0, 0, pending(2)).await.expect("push");
        stepper.push(1, 0, pending(4)).await.expect("push");
        // Nobody gone: two of three is not a step.
        assert!(stepper.workers_gone().await.expect("gone").is_none());
        assert_eq!(*model.version.borrow(), 0);
        let gone = super::super::lease::Gone {
            at: 0,
            silent: Duration::from_secs(3),
            lease: Duration::from_secs(2),
        };
        model.gone.lock().expect("gone").insert(2, gone);
        assert_eq!(model.needed(), 2);
        stepper.workers_gone().await.expect("gone");
        assert_eq!(
            *model.version.borrow(),
            1,
            "the live workers' step is applied"
        );
        // Its gradient for the step applied without it is refused, nothing applied.
        let late = stepper
            .push(2, 0, pending(100))
            .await
            .expect_err("late push");
        assert_eq!(crate::failure::reason_of(&late), Reason::LeaseExpired);
        assert!(
            late.message()
                .contains("silent for 3.0 s, past its 2.0 s lease"),
            "{}",
            late.message()
        );
        assert!(
            late.message().contains("push for step 1 to rejoin"),
            "{}",
            late.message()
        );
        assert_eq!(model.needed(), 2, "a refused push does not bring it back");
        // Pushing for the current step brings it back: the step then needs all three again.
        let (r, _) = stepper.push(2, 1, pending(6)).await.expect("rejoin");
        assert!(r.applied);
        assert_eq!(model.needed(), 3);
        stepper.push(0, 1, pending(6)).await.expect("push");
        assert_eq!(
            *model.version.borrow(),
            1,
            "two of three live workers is not a step"
        );
        stepper.push(1, 1, pending(6)).await.expect("push");
        let snap = stepper.snapshot().await.expect("snapshot");
        // Step 0: mean of 2 and 4; step 1: mean of three 6s.
        assert_eq!(snap.parts[0].values, vec![-9.0; 3]);
        assert_eq!(snap.version, 2);
    }

    #[test]
    fn needed_is_k_or_every_live_worker_and_never_zero() {
        let mode = Mode::sync_for_test;
        let gone = super::super::lease::Gone {
            at: 0,
            silent: Duration::ZERO,
            lease: Duration::ZERO,
        };
        let m = Model::new(1, Optimizer::sgd(1.0), mode(4, 2), vec![]);
        assert_eq!(m.needed(), 2);
        m.gone.lock().expect("gone").insert(0, gone);
        assert_eq!(m.needed(), 2, "3 live, K = 2 (backups)");
        m.gone.lock().expect("gone").insert(1, gone);
        assert_eq!(m.needed(), 2, "2 live, K = 2");
        m.gone.lock().expect("gone").insert(2, gone);
        assert_eq!(m.needed(), 1, "1 live");
        m.gone.lock().expect("gone").insert(3, gone);
        assert_eq!(m.needed(), 1, "none live: still one gradient per step");
    }

    #[tokio::test]
    async fn the_step_thread_ends_with_its_last_handle() {
        let model = model();
        let stepper = Stepper::start(model.clone(), |_| false, Arc::default()).expect("thread");
        drop(stepper);
        // The thread held the only other reference to the model.
        for _ in 0..200 {
            if Arc::strong_count(&model) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the step thread still holds the model");
    }
}
