//! The group's control plane, through the rendezvous rather than the ring: sharing a bootstrap
//! value, agreeing on a choice, aborting every rank, and leaving.

use super::*;

/// The group's control plane: its runtime, its rendezvous session, and the task that watches
/// for aborts.
pub(super) struct Control {
    /// The control plane's runtime.
    pub(super) rt: Runtime,
    /// The rendezvous session (kept for aborts and inquiries).
    pub(super) session: Mutex<Option<Session>>,
    /// The task watching for aborts.
    pub(super) watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ProcessGroup {
    /// Shares a small blob through the rendezvous: the rank that passes `Some(value)` publishes it
    /// under `key`, and every rank returns it once it exists (within the group's timeout). This is
    /// how ranks agree on a bootstrap value such as NCCL's unique id. A world of one returns `value`.
    pub fn share(&self, key: &str, value: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let Some(control) = &self.shared.control else {
            return value.ok_or_else(|| {
                Error::invalid("share", format!("nothing was published under {key:?}"))
            });
        };
        let client = control
            .session
            .lock()
            .map_err(|_| poisoned_queue())?
            .as_ref()
            .map(|s| s.client.clone())
            .ok_or_else(|| Error::Unusable {
                what: "process group".into(),
                reason: "it was shut down".into(),
            })?;
        let full = format!("tandem/pg/{}/share/{key}", self.shared.name);
        let timeout = self.timeout;
        control.rt.block_on(async move {
            if let Some(v) = value {
                client.set(&full, v).await?;
            }
            let got = client.wait(&[&full], timeout).await?;
            got.into_iter()
                .next()
                .map(|b| b.to_vec())
                .ok_or_else(|| Error::transport("the rendezvous", format!("no value for {full:?}")))
        })
    }

    /// Every rank says whether something worked for it (`Err` with why, at most 255 bytes of it kept);
    /// every rank learns whether it worked on all of them, and if not, why on the lowest rank where
    /// it did not ("rank 2: …"; a rank's own reason comes back as it gave it). A collective: every
    /// rank calls it, in the same order as its other operations. This is how ranks decide together
    /// to use a faster path or not, so that no rank takes one the others skip.
    ///
    /// ```no_run
    /// # fn main() -> tandem_core::Result<()> {
    /// let pg = tandem_collective::ProcessGroup::from_env()?;
    /// let here = if std::path::Path::new("/dev/nvidia0").exists() { Ok(()) } else { Err("no GPU") };
    /// match pg.agree(here)? {
    ///     Ok(()) => println!("every rank has a GPU"),
    ///     Err(why) => println!("staying on the CPU: {why}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn agree(
        &self,
        mine: std::result::Result<(), &str>,
    ) -> Result<std::result::Result<(), Declined>> {
        /// Bytes a reason may take in the agreement.
        const RECORD: usize = 256;
        let mut record = [0u8; RECORD];
        if let Err(why) = mine {
            record[0] = 1;
            let n = why.len().min(RECORD - 1);
            record[1..=n].copy_from_slice(&why.as_bytes()[..n]);
        }
        let mut all = vec![0u8; RECORD * self.world_size()];
        self.allgather(&record[..], &mut all)?;
        for (r, rec) in all.chunks_exact(RECORD).enumerate() {
            if rec[0] != 0 {
                let end = rec[1..]
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(RECORD, |i| i + 1);
                let why = String::from_utf8_lossy(&rec[1..end]).into_owned();
                return Ok(Err(Declined {
                    rank: r,
                    mine: r == self.rank(),
                    why,
                }));
            }
        }
        Ok(Ok(()))
    }

    /// Aborts the group on every rank, e.g. when this process is interrupted: operations in flight
    /// here and on the other ranks fail promptly with an error naming this rank and `reason`, and
    /// the group is unusable afterwards. A world of one has nothing to abort.
    pub fn abort(&self, reason: &str) -> Result<()> {
        let Some(control) = &self.shared.control else {
            return Ok(());
        };
        let client = control
            .session
            .lock()
            .map_err(|_| poisoned_queue())?
            .as_ref()
            .map(|s| s.client.clone());
        let Some(client) = client else {
            return Ok(());
        };
        let key = format!("tandem/pg/{}/abort", self.shared.name);
        let msg = crate::messages::Abort::Aborted {
            rank: self.shared.rank,
            reason: reason.to_string(),
        }
        .encode();
        control.rt.block_on(async move {
            match tokio::time::timeout(
                Duration::from_secs(5),
                client.compare_and_set(&key, None, msg),
            )
            .await
            {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(Error::timeout(
                    "the rendezvous to record the abort",
                    Duration::from_secs(5),
                )),
            }
        })
    }

    /// Leaves the group: waits for queued operations, then passes the rendezvous' final barrier so the
    /// rank hosting it stops last.
    pub fn shutdown(self) -> Result<()> {
        self.fence()?;
        let Some(control) = &self.shared.control else {
            return Ok(());
        };
        if let Ok(mut w) = control.watcher.lock()
            && let Some(h) = w.take()
        {
            h.abort();
        }
        let session = control.session.lock().ok().and_then(|mut s| s.take());
        match session {
            Some(s) => control.rt.block_on(s.leave(self.timeout)),
            None => Ok(()),
        }
    }
}

/// Why the ranks did not all agree ([`ProcessGroup::agree`]): the lowest rank that declined, and
/// its reason. Shown as the reason itself when it is this rank's, else as `rank R: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{why}", if *.mine { String::new() } else { format!("rank {rank}: ") })]
pub struct Declined {
    /// The lowest rank where it did not work.
    pub rank: usize,
    /// Whether that is this rank.
    pub mine: bool,
    /// Its reason (at most 255 bytes of it).
    pub why: String,
}
