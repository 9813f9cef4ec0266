//! When and where a server checkpoints, one part of the service with its own state: the policy
//! (folder, this server's index, every how many versions), whether a version is due, and writing
//! a snapshot there ([`crate::server::checkpoint`] holds the file format).

use std::path::PathBuf;

use crate::server::checkpoint::{self, Snapshot};

/// Where and how often a server checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// Directory of the checkpoint files.
    pub dir: PathBuf,
    /// This server's index (names its file).
    pub index: usize,
    /// Write every this many versions (0: only on request).
    pub every: u64,
}

/// A server's checkpoints: none without a policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Checkpoints(Option<CheckpointPolicy>);

impl Checkpoints {
    /// Checkpoints as `policy` says (`None`: never).
    pub(crate) fn new(policy: Option<CheckpointPolicy>) -> Checkpoints {
        Checkpoints(policy)
    }

    /// Whether the server has a checkpoint folder at all.
    pub(crate) fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether a checkpoint is due at `version`.
    pub(crate) fn due(&self, version: u64) -> bool {
        self.0
            .as_ref()
            .is_some_and(|c| c.every > 0 && version > 0 && version.is_multiple_of(c.every))
    }

    /// Writes `snap` now (blocking); `None` without a folder.
    pub(crate) fn write(&self, snap: &Snapshot) -> Option<tandem_core::Result<PathBuf>> {
        self.0
            .as_ref()
            .map(|p| checkpoint::write(&p.dir, p.index, snap))
    }

    /// Writes `snap` on the blocking pool, logging the outcome (a failure leaves the previous
    /// checkpoint intact).
    pub(crate) fn write_in_background(&self, snap: Snapshot) {
        if !self.enabled() {
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || match me.write(&snap) {
            Some(Ok(p)) => {
                tracing::info!(version = snap.version, path = %p.display(), "checkpoint written")
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "checkpoint failed; the previous one is intact")
            }
            None => {}
        });
    }
}
