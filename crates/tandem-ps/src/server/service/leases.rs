//! The service's side of the leases on the workers (see [`crate::server::lease`]): a call of a
//! worker keeps its lease, expired leases make workers gone, silent workers stop the server with a
//! final checkpoint.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::server::lease::{Call, Gone};

impl Service {
    /// A call of worker `worker` starts: it is heard from now, and its lease holds until the
    /// returned guard is dropped.
    pub(crate) fn calling(&self, worker: u32) -> Call {
        self.roster.calling(worker)
    }

    /// Marks as gone every worker (not done, not gone already) with no call in progress that has
    /// been silent for at least `lease`; returns them. Sync steps then need the live workers only.
    pub fn expire_leases(&self, lease: Duration) -> Vec<u32> {
        let Some(model) = self.model() else {
            return Vec::new();
        };
        let done = self.roster.done();
        let mut gone = model.gone.lock().unwrap_or_else(|p| p.into_inner());
        let at = *model.version.borrow();
        let mut expired = Vec::new();
        for w in 0..model.mode.workers {
            if done.contains(&w) || gone.contains_key(&w) {
                continue;
            }
            let Some(silent) = self.roster.silent(w) else {
                continue;
            };
            if silent >= lease {
                gone.insert(w, Gone { at, silent, lease });
                expired.push(w);
            }
        }
        if !expired.is_empty() {
            tracing::warn!(
                workers = ?expired,
                lease_s = lease.as_secs_f64(),
                version = at,
                "workers silent past their lease: going on without them until they push again"
            );
        }
        expired
    }

    /// When every worker that has not said done has been silent for at least `timeout`: which
    /// ones, and for how long (`None` while any of them was heard from more recently, or when
    /// there is nobody left to wait for).
    pub fn silent_workers(&self, timeout: Duration) -> Option<String> {
        let workers = self.model().map_or(0, |m| m.mode.workers);
        let done = self.roster.done();
        // Before any declaration the workers are not known: those heard from, or worker 0.
        let expected: Vec<u32> = (0..workers).filter(|w| !done.contains(w)).collect();
        if workers > 0 && expected.is_empty() {
            return None;
        }
        let silent = self.roster.silences(&expected);
        if silent.iter().any(|(_, d)| *d < timeout) {
            return None;
        }
        let names: Vec<String> = silent
            .iter()
            .map(|(w, d)| format!("worker {w} ({:.0} s)", d.as_secs_f64()))
            .collect();
        Some(format!("silent workers: {}", names.join(", ")))
    }

    /// Expires the leases of workers silent for `lease` every `lease / 4` (at most every second),
    /// forever: sync steps that now have every live worker's gradient are applied, and async
    /// workers waiting on the staleness bound for a gone worker go on.
    pub async fn enforce_leases(&self, lease: Duration) {
        let every = (lease / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            if self.expire_leases(lease).is_empty() {
                continue;
            }
            let Some(d) = self.declared.get() else {
                continue;
            };
            match &d.stepper {
                Some(stepper) => match stepper.workers_gone().await {
                    Ok(Some(snap)) => self.write_in_background(snap),
                    Ok(None) => {}
                    Err(_) => return,
                },
                // Wakes the pushes waiting on the staleness bound.
                None => d.model.worker_steps.send_modify(|_| {}),
            }
        }
    }

    /// Writes a checkpoint now, if the server has a checkpoint directory and parameters.
    pub async fn final_checkpoint(&self) -> tandem_core::Result<Option<PathBuf>> {
        let (true, Some(d)) = (self.checkpoints.enabled(), self.declared.get().cloned()) else {
            return Ok(None);
        };
        let snap = match &d.stepper {
            Some(stepper) => stepper.snapshot().await.map_err(|st| {
                tandem_core::Error::transport("the final checkpoint", st.message().to_string())
            })?,
            None => {
                let model = d.model.clone();
                blocking(move || model.snapshot()).await.map_err(|st| {
                    tandem_core::Error::transport("the final checkpoint", st.message().to_string())
                })?
            }
        };
        let checkpoints = self.checkpoints.clone();
        blocking(move || checkpoints.write(&snap))
            .await
            .map_err(|st| {
                tandem_core::Error::transport("the final checkpoint", st.message().to_string())
            })?
            .transpose()
    }
}
