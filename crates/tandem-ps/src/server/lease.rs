//! A lease on the workers: every call that carries a worker id refreshes that worker's, so a
//! server can tell when every worker it still waits for has gone silent (cut off, or gone) and
//! stop with a final checkpoint instead of serving nobody forever (`--worker-timeout`).

use std::path::PathBuf;
use std::time::Duration;

use super::checkpoint;
use super::same_host::blocking;
use super::service::Service;

impl Service {
    /// Notes that worker `worker` was heard from now.
    pub(super) fn heard_from(&self, worker: u32) {
        let mut h = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        h.1.insert(worker, std::time::Instant::now());
    }

    /// When every worker that has not said done has been silent for at least `timeout`: which
    /// ones, and for how long (`None` while any of them was heard from more recently, or when
    /// there is nobody left to wait for).
    pub fn silent_workers(&self, timeout: Duration) -> Option<String> {
        let workers = self.model().map_or(0, |m| m.mode.workers);
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let h = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let (started, heard) = (&h.0, &h.1);
        // Before any declaration the workers are not known: those heard from, or worker 0.
        let expected: Vec<u32> = if workers > 0 {
            (0..workers).filter(|w| !done.contains(w)).collect()
        } else {
            let mut known: Vec<u32> = heard.keys().copied().collect();
            if known.is_empty() {
                known.push(0);
            }
            known
        };
        if expected.is_empty() {
            return None;
        }
        let silent: Vec<(u32, Duration)> = expected
            .iter()
            .map(|w| (*w, heard.get(w).unwrap_or(started).elapsed()))
            .collect();
        if silent.iter().any(|(_, d)| *d < timeout) {
            return None;
        }
        let names: Vec<String> = silent
            .iter()
            .map(|(w, d)| format!("worker {w} ({:.0} s)", d.as_secs_f64()))
            .collect();
        Some(format!("silent workers: {}", names.join(", ")))
    }

    /// Writes a checkpoint now, if the server has a checkpoint directory and parameters.
    pub async fn final_checkpoint(&self) -> tandem_core::Result<Option<PathBuf>> {
        let (Some(policy), Some(d)) = (self.checkpoint.clone(), self.declared.get().cloned())
        else {
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
        let path = blocking(move || checkpoint::write(&policy.dir, policy.index, &snap))
            .await
            .map_err(|st| {
                tandem_core::Error::transport("the final checkpoint", st.message().to_string())
            })??;
        Ok(Some(path))
    }
}
