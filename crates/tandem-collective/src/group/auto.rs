//! `auto` compression: the group measures its links once and compresses gradient allreduces only
//! where that saves time.
//!
//! Why measure instead of guess: whether bf16 pays depends on the link (1 Gbit/s or NVLink-class
//! memory copies) and on this machine's casts, and the only honest judge of "the transfer time
//! saved exceeds the compute added" is an allreduce timed both ways. Ranks that share one machine
//! have no network link to save time on, so nothing is measured there and `auto` costs nothing.
//! The ranks agree on the slowest rank's times (an allreduce of them), so every rank chooses the
//! same.

use std::time::Instant;

use super::*;
use crate::compression::{AutoChoice, Compression, Compressor};

/// Size of the probe allreduce: large enough that the link, not latency, sets its time (about
/// 50 ms at 1 Gbit/s across 4 hosts), small enough to cost little when the group forms.
pub const PROBE_BYTES: usize = 4 << 20;

/// Timed runs of the probe per setting (after one warm-up); their median counts.
const PROBE_RUNS: usize = 3;

impl ProcessGroup {
    /// What `auto` compression chose for this group and why, measured the first time it is asked
    /// (when the group forms with `auto` as its default, else at the first allreduce with an
    /// `auto` compressor): a collective call, so every rank asks at the same point.
    ///
    /// ```
    /// use tandem_collective::compression::Compression;
    /// use tandem_collective::{GroupConfig, ProcessGroup};
    /// use tandem_core::ClusterSpec;
    /// let pg = ProcessGroup::init(&ClusterSpec::from_vars(&[("UNSET", "")])?, None, GroupConfig::default())?;
    /// // A group of one has no link: nothing is measured and nothing compressed.
    /// assert_eq!(pg.auto_compression()?.chosen, Compression::None);
    /// # Ok::<(), tandem_core::Error>(())
    /// ```
    pub fn auto_compression(&self) -> Result<AutoChoice> {
        let mut slot =
            self.shared.auto.lock().map_err(|_| {
                Error::invalid("group", "auto compression's probe panicked earlier")
            })?;
        if let Some(choice) = *slot {
            return Ok(choice);
        }
        let choice = self.probe_compression()?;
        *slot = Some(choice);
        if self.rank() == 0 {
            tracing::info!(group = %self.shared.name, chosen = %choice.chosen, "auto compression: {}", choice.reason());
        }
        let chosen = match choice.chosen {
            Compression::Bf16 => "bf16",
            _ => "none",
        };
        tandem_observe::metrics::compression_auto(chosen, choice.none_secs, choice.bf16_secs);
        Ok(choice)
    }

    /// `compression`, with `auto` replaced by the group's choice.
    pub fn resolve_compression(&self, compression: Compression) -> Result<Compression> {
        match compression {
            Compression::Auto => Ok(self.auto_compression()?.chosen),
            other => Ok(other),
        }
    }

    /// What `compression` does to a gradient of `len` `f32` values: `auto` is the group's choice,
    /// except for an allreduce small enough to take the latency path (its bytes times
    /// `world − 1` at most `direct_bytes`, `TANDEM_DIRECT_BYTES`), which `auto` sends
    /// uncompressed: its time is latency, which fewer bytes do not shorten, while the casts
    /// still cost (measured: `auto` chose bf16 across 1 Gbit/s hosts and the demo's 387-value
    /// gradient took 0.15 ms per step in bf16 against 0.14 uncompressed). Every rank decides
    /// the same, as the ring's own choice of path.
    pub fn resolve_compression_for(
        &self,
        compression: Compression,
        len: usize,
    ) -> Result<Compression> {
        if compression == Compression::Auto && self.latency_bound(len) {
            return Ok(Compression::None);
        }
        self.resolve_compression(compression)
    }

    /// Whether an allreduce of `len` `f32` values takes the latency path.
    fn latency_bound(&self, len: usize) -> bool {
        let others = self.world_size().saturating_sub(1).max(1);
        len.saturating_mul(4).saturating_mul(others) <= self.shared.direct_bytes
    }

    /// Times the probe allreduce uncompressed and in bf16 on every rank and agrees on the slowest
    /// rank's medians; on one machine measures nothing.
    fn probe_compression(&self) -> Result<AutoChoice> {
        if self.world_size() < 2 || self.shared.one_machine {
            return Ok(AutoChoice::one_machine());
        }
        let mut buf: Vec<f32> = (0..PROBE_BYTES / 4)
            .map(|i| (i % 251) as f32 / 256.0)
            .collect();
        let mut times = [0f64; 2];
        for (slot, compression) in [Compression::None, Compression::Bf16]
            .into_iter()
            .enumerate()
        {
            let mut c = Compressor::new(compression);
            self.allreduce_compressed(&mut buf, ReduceOp::Avg, &mut c)?;
            let mut runs = [0f64; PROBE_RUNS];
            for run in &mut runs {
                let start = Instant::now();
                self.allreduce_compressed(&mut buf, ReduceOp::Avg, &mut c)?;
                *run = start.elapsed().as_secs_f64();
            }
            runs.sort_by(f64::total_cmp);
            times[slot] = runs[PROBE_RUNS / 2];
        }
        self.allreduce(&mut times, ReduceOp::Max)?;
        Ok(AutoChoice::measured(PROBE_BYTES, times[0], times[1]))
    }
}

/// Whether every rank advertised the same host (so no network link lies between them), from the
/// ranks' `host:port` addresses.
pub(super) fn one_machine(addrs: &[String]) -> bool {
    let host = |a: &String| a.rsplit_once(':').map_or(a.clone(), |(h, _)| h.to_string());
    let mut hosts = addrs.iter().map(host);
    match hosts.next() {
        Some(first) => hosts.all(|h| h == first),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::one_machine;

    #[test]
    fn ranks_on_one_machine_are_told_apart_from_ranks_on_several() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(one_machine(&a(&["127.0.0.1:1", "127.0.0.1:2"])));
        assert!(one_machine(&a(&["[::1]:1", "[::1]:2"])));
        assert!(!one_machine(&a(&["10.0.0.1:1", "10.0.0.2:1"])));
        assert!(!one_machine(&a(&[
            "10.0.0.1:1",
            "10.0.0.1:2",
            "10.0.0.3:2"
        ])));
        assert!(one_machine(&a(&["10.0.0.1:5"])));
        assert!(one_machine(&[]));
    }
}
