//! Early pulls: in sync mode a pull for the next version streams each partition as soon as the
//! step being applied has finished it, instead of waiting for the whole step to be published.
//!
//! Why: a worker that pushes its gradient and pulls the next parameters at once
//! ([`crate::client::Client::push_pull_into`]) then receives partition 0 of the new step while the
//! later partitions' gradients are still arriving. The server's link carries the pushes in and the
//! pulls out at the same time (links are full duplex), so a step costs about the larger of the two
//! instead of their sum; BytePS pipelines its pushes and pulls per partition the same way.
//!
//! What a pull sees is unchanged: every partition it receives holds the step it asked for (or a
//! later one, as before with backup workers), each whole. A step is read early only when no standby
//! follows this server: with a standby, a step is published only once the standby holds it, so a
//! worker never holds parameters a promoted standby would not have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::model::{Key, Model};

/// Whether the step being applied may be read before it is published, and a signal each time it
/// finished a partition.
#[derive(Debug)]
pub struct EarlyPulls {
    /// Whether pulls may read partitions of the step being applied.
    allowed: AtomicBool,
    /// Partitions of the step finished so far.
    finished: watch::Sender<u64>,
}

impl Default for EarlyPulls {
    fn default() -> Self {
        EarlyPulls {
            allowed: AtomicBool::new(false),
            finished: watch::Sender::new(0),
        }
    }
}

impl EarlyPulls {
    /// Set by the step's owner before it applies a step: whether that step's partitions may be
    /// pulled before it is published (no standby follows).
    pub fn allow(&self, allowed: bool) {
        self.allowed.store(allowed, Ordering::Release);
    }
}

impl Model {
    /// The step being applied finished partition `key`, which now holds `version`.
    pub(super) fn finished_part(&self, key: &Key, version: u64) {
        if !self.early.allowed.load(Ordering::Acquire) {
            return;
        }
        if let Some(e) = self.parts.get(key) {
            e.ready.store(version, Ordering::Release);
        }
        self.early.finished.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether partition `key` holds `min_version` or later: the version is published, or (sync)
    /// the step being applied finished this partition.
    pub fn reached(&self, key: &Key, min_version: u64) -> bool {
        *self.version.borrow() >= min_version
            || (self.mode.sync
                && self
                    .parts
                    .get(key)
                    .is_some_and(|e| e.ready.load(Ordering::Acquire) >= min_version))
    }

    /// Waits at most `wait` for partition `key` to reach `min_version`; whether it did.
    pub async fn wait_reached(&self, key: &Key, min_version: u64, wait: Duration) -> bool {
        // Subscribed before the first check: any change after it wakes the loop.
        let mut published = self.version.subscribe();
        let mut finished = self.early.finished.subscribe();
        let reached = async {
            loop {
                if self.reached(key, min_version) {
                    return true;
                }
                tokio::select! {
                    r = published.changed() => if r.is_err() { return false },
                    r = finished.changed() => if r.is_err() { return false },
                }
            }
        };
        tokio::time::timeout(wait, reached).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::optimizer::Optimizer;
    use crate::server::Mode;

    fn model(sync: bool) -> Arc<Model> {
        let mut mode = Mode::sync_for_test(1, 1);
        mode.sync = sync;
        Arc::new(Model::one_partition_for_test(
            1,
            Optimizer::sgd(1.0),
            mode,
            4,
        ))
    }

    fn key() -> Key {
        ("w".into(), 0)
    }

    #[tokio::test]
    async fn a_finished_partition_is_reached_before_its_step_is_published_only_when_allowed() {
        let m = model(true);
        assert!(m.reached(&key(), 0));
        assert!(!m.reached(&key(), 1));
        m.finished_part(&key(), 1);
        assert!(!m.reached(&key(), 1), "not allowed: waits for the step");
        m.early.allow(true);
        let waiter = {
            let m = m.clone();
            tokio::spawn(async move { m.wait_reached(&key(), 1, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        m.finished_part(&key(), 1);
        assert!(
            waiter.await.expect("waiter"),
            "woken by the finished partition"
        );
        assert!(m.reached(&key(), 1));
        assert!(!m.reached(&key(), 2), "one step only");
        assert!(!m.reached(&("b".into(), 0), 1), "another partition is not");
        assert!(
            !m.wait_reached(&key(), 2, Duration::from_millis(1)).await,
            "not reached within the wait"
        );
    }

    #[tokio::test]
    async fn a_published_version_is_reached_by_every_partition() {
        let m = model(true);
        let waiter = {
            let m = m.clone();
            tokio::spawn(async move { m.wait_reached(&key(), 3, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        m.version.send_replace(2);
        tokio::task::yield_now().await;
        m.version.send_replace(3);
        assert!(waiter.await.expect("waiter"));
        assert!(m.reached(&("b".into(), 0), 3));
    }

    #[test]
    fn async_mode_never_reads_early() {
        let m = model(false);
        m.early.allow(true);
        m.finished_part(&key(), 1);
        assert!(!m.reached(&key(), 1));
    }
}
