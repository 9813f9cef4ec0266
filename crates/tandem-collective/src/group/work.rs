//! Async operations and issue order. Async operations run on one worker thread per group, from a
//! queue, in the order submitted; a blocking operation first waits for the queue to drain (the
//! fence), so every rank issues its operations in program order whichever form it used.

use super::*;

/// Background work of the group's worker thread.
pub(super) type Job = Box<dyn FnOnce() + Send>;

/// The outcome of an async operation.
///
/// ```no_run
/// # fn demo(pg: &tandem_collective::ProcessGroup) -> tandem_core::Result<()> {
/// use tandem_core::{DType, ReduceOp, TensorMut};
/// let grads = TensorMut::zeros(DType::F32, &[1 << 20])?;
/// let work = pg.allreduce_async(grads, ReduceOp::Avg);
/// // ... compute the next layer's gradients meanwhile ...
/// let grads = work.wait()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Work<T> {
    /// Where the result arrives.
    rx: mpsc::Receiver<Result<T>>,
    /// Set once the result arrived.
    done: Arc<AtomicBool>,
}

impl<T> Work<T> {
    /// Blocks until the operation finished and returns its result.
    pub fn wait(self) -> Result<T> {
        self.rx.recv().unwrap_or_else(|_| {
            Err(Error::Unusable {
                what: "process group".into(),
                reason: "its worker thread stopped".into(),
            })
        })
    }

    /// Waits up to `timeout`: `Some(result)` when the operation finished (the result is then taken,
    /// and a later wait reports that), `None` when it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<T>> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(Error::Unusable {
                what: "async operation".into(),
                reason: "its result was already taken, or its worker thread stopped".into(),
            })),
        }
    }

    /// Whether the operation has finished (so [`Work::wait`] will not block).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// Operations submitted and completed (what a flush waits for).
#[derive(Default)]
pub(super) struct Queue {
    /// Operations submitted.
    submitted: u64,
    /// Operations completed.
    completed: u64,
}

/// The group as seen from its worker thread.
pub(super) struct DirectGroup<'a>(&'a ProcessGroup);

impl DirectGroup<'_> {
    /// Runs `f` with the group and its deadline.
    pub(super) fn run<T>(&self, f: impl FnOnce(&ProcessGroup, Duration) -> Result<T>) -> Result<T> {
        f(self.0, self.0.timeout)
    }
}

/// The error once a panic poisoned the queue.
pub(super) fn poisoned_queue() -> Error {
    Error::Unusable {
        what: "process group".into(),
        reason: "its queue was poisoned by a panic".into(),
    }
}

impl ProcessGroup {
    /// Waits until the async operations submitted before this call have finished, so blocking
    /// operations keep the order in which this rank issued them.
    pub(super) fn fence(&self) -> Result<()> {
        let mut q = self.shared.queue.lock().map_err(|_| poisoned_queue())?;
        let pending = q.submitted - q.completed;
        if pending == 0 {
            return Ok(());
        }
        let limit = self.timeout * (pending as u32).saturating_add(1) + Duration::from_secs(10);
        let (guard, res) = self
            .shared
            .drained
            .wait_timeout_while(q, limit, |q| q.completed < q.submitted)
            .map_err(|_| poisoned_queue())?;
        q = guard;
        if res.timed_out() && q.completed < q.submitted {
            return Err(Error::timeout("earlier async operations to finish", limit));
        }
        Ok(())
    }

    /// Queues `job` on the group's worker thread, after every operation submitted before it.
    pub(super) fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(&DirectGroup<'_>) -> Result<T> + Send + 'static,
    ) -> Work<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let done = Arc::new(AtomicBool::new(false));
        let work = Work {
            rx,
            done: done.clone(),
        };
        let pg = self.clone();
        // When the caller asked for it: the flight recorder keeps it beside the start.
        let enqueued = std::time::Instant::now();
        let run: Job = Box::new(move || {
            crate::observe::enqueued_at(enqueued);
            let r = job(&pg.direct());
            done.store(true, Ordering::Release);
            let _ = tx.send(r);
            if let Ok(mut q) = pg.shared.queue.lock() {
                q.completed += 1;
            }
            pg.shared.drained.notify_all();
        });
        if let Err(e) = self.enqueue(run) {
            let (tx, rx) = mpsc::sync_channel(1);
            let _ = tx.send(Err(e));
            return Work {
                rx,
                done: Arc::new(AtomicBool::new(true)),
            };
        }
        work
    }

    /// Hands `job` to the worker thread (started at the first job).
    pub(super) fn enqueue(&self, job: Job) -> Result<()> {
        let mut engine = self.shared.engine.lock().map_err(|_| poisoned_queue())?;
        if engine.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name(format!("tandem-collective-{}", self.shared.rank))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .map_err(|e| Error::io("starting the collective worker thread", e))?;
            *engine = Some(tx);
        }
        self.shared
            .queue
            .lock()
            .map_err(|_| poisoned_queue())?
            .submitted += 1;
        let sent = engine.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            if let Ok(mut q) = self.shared.queue.lock() {
                q.submitted -= 1;
            }
            return Err(Error::Unusable {
                what: "process group".into(),
                reason: "its worker thread stopped".into(),
            });
        }
        Ok(())
    }

    /// A handle for the worker thread: same group, but operations skip the fence (they are the queue).
    pub(super) fn direct(&self) -> DirectGroup<'_> {
        DirectGroup(self)
    }

    /// Starts an allreduce on the worker thread; the tensor comes back from [`Work::wait`].
    pub fn allreduce_async(&self, mut t: TensorMut, op: ReduceOp) -> Work<TensorMut> {
        self.submit(move |pg| {
            let dtype = t.dtype();
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?.allreduce(t.bytes_mut(), dtype, op, to)?;
                }
                Ok(())
            })?;
            Ok(t)
        })
    }

    /// Starts a broadcast from `root` on the worker thread.
    pub fn broadcast_async(&self, mut t: TensorMut, root: usize) -> Work<TensorMut> {
        if let Err(e) = self.check_root("root", root) {
            return self.submit(move |_| Err(e));
        }
        self.submit(move |pg| {
            let dtype = t.dtype();
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?.broadcast(t.bytes_mut(), dtype, root, to)?;
                }
                Ok(())
            })?;
            Ok(t)
        })
    }

    /// Starts an allgather; the result has shape `[world, ..input shape]`.
    pub fn allgather_async(&self, t: Tensor) -> Work<TensorMut> {
        let world = self.shared.world;
        self.submit(move |pg| {
            let mut shape = vec![world];
            shape.extend_from_slice(t.shape());
            let mut out = TensorMut::zeros(t.dtype(), &shape)?;
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?
                        .allgather(t.bytes(), out.bytes_mut(), t.dtype(), to)
                } else {
                    out.bytes_mut().copy_from_slice(t.bytes());
                    Ok(())
                }
            })?;
            Ok(out)
        })
    }

    /// Starts a barrier on the worker thread.
    pub fn barrier_async(&self) -> Work<()> {
        self.submit(|pg| {
            pg.run(|g, to| {
                if g.shared.world > 1 {
                    g.backend()?.barrier(to)
                } else {
                    Ok(())
                }
            })
        })
    }
}
