//! The worker's side of compression ([`crate::wire`]): the setting settled with the servers when
//! it connects (`auto` measured there), each pushed partition encoded (half precision, or top-k
//! with its residual kept here), pulled chunks widened straight into the caller's tensors.
//!
//! Why measure at connect time: whether bf16 pays depends on the link to the servers, which only
//! a transfer over it shows. A worker whose servers all share its machine measures nothing (it
//! reads their memory, or loopback outruns any cast) and keeps full precision.

use std::time::Instant;

use tandem_core::compression::{AutoChoice, Compression, narrow, widen};

use super::*;
use crate::pb::Wire;
use crate::wire::{encode_top_k, pull_wire};

/// Timed pulls (and latency probes) `auto` takes the fastest of.
const PROBE_RUNS: usize = 2;

/// f32 values of `bytes` (little-endian), borrowed where aligned, else copied.
fn f32s(bytes: &[u8]) -> std::borrow::Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        Ok(v) => std::borrow::Cow::Borrowed(v),
        Err(_) => std::borrow::Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    }
}

impl Client {
    /// The compression in force (`auto` already resolved).
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// What top-k's error feedback still owes the servers (each partition's residual), as bytes
    /// to save with the worker's training state; empty of residuals for the other settings. A
    /// worker that restarts gives it to [`Client::restore_compression_state`], so no gradient
    /// mass is lost with the process.
    pub fn compression_state(&self) -> Vec<u8> {
        let residuals = self.residuals.lock().unwrap_or_else(|p| p.into_inner());
        let mut parts: Vec<serde_json::Value> = residuals
            .iter()
            .map(|((param, part), r)| serde_json::json!({"param": param, "part": part, "residual": r}))
            .collect();
        parts.sort_by_key(|v| (v["param"].to_string(), v["part"].as_u64()));
        serde_json::to_vec(
            &serde_json::json!({"compression": self.compression.to_string(), "parts": parts}),
        )
        .unwrap_or_default()
    }

    /// Takes back what [`Client::compression_state`] saved. Refused, with nothing changed: bytes
    /// that are not a saved state, a state of another compression, a partition this worker's map
    /// does not have, or a residual of another length than its partition.
    pub fn restore_compression_state(&self, state: &[u8]) -> Result<()> {
        let bad = |why: String| Error::invalid("compression state", why);
        let v: serde_json::Value =
            serde_json::from_slice(state).map_err(|e| bad(format!("not a saved state: {e}")))?;
        let saved = v["compression"].as_str().unwrap_or_default();
        if saved != self.compression.to_string() {
            return Err(bad(format!(
                "saved under compression {saved:?}, but this worker uses {}",
                self.compression
            )));
        }
        let mut restored = Residuals::new();
        for p in v["parts"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(param), Some(part), Some(values)) = (
                p["param"].as_str(),
                p["part"].as_u64(),
                p["residual"].as_array(),
            ) else {
                return Err(bad(format!(
                    "a partition without param, part and residual: {p}"
                )));
            };
            let found = u32::try_from(part).ok().and_then(|part| {
                self.map
                    .parts
                    .iter()
                    .find(|q| q.param == param && q.part == part)
            });
            let Some(found) = found else {
                return Err(bad(format!(
                    "partition {param}/{part} is not in this worker's map"
                )));
            };
            if values.len() != found.numel() {
                return Err(bad(format!(
                    "partition {param}/{part} holds {} elements, the saved residual {}",
                    found.numel(),
                    values.len()
                )));
            }
            let residual: Option<Vec<f32>> = values
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect();
            let residual = residual.ok_or_else(|| {
                bad(format!(
                    "partition {param}/{part}: a residual value is not a number"
                ))
            })?;
            restored.insert((param.to_string(), found.part), residual);
        }
        *self.residuals.lock().unwrap_or_else(|p| p.into_inner()) = restored;
        Ok(())
    }

    /// A pull request for this worker, asking for the values in this client's pull encoding.
    pub(super) fn pull_request(
        &self,
        min_version: u64,
        parts: Vec<pb::PartRef>,
        wait: Duration,
        incarnation: u64,
    ) -> pb::PullRequest {
        pb::PullRequest {
            worker: self.worker,
            min_version,
            parts,
            timeout_ms: wait.as_millis().min(u64::MAX as u128) as u64,
            incarnation,
            wire: pull_wire(self.compression).into(),
        }
    }

    /// One partition of a push as it goes on the wire: the f32 bytes as they are, narrowed to a
    /// half type, or its top-k pairs (gradient plus residual; the rest stays in the residual).
    pub(super) fn encode_part(&self, key: &(String, u32), bytes: Bytes) -> (Bytes, Wire) {
        match self.compression {
            Compression::Bf16 | Compression::Fp16 => {
                let wire = pull_wire(self.compression);
                let values = f32s(&bytes);
                let mut out = vec![0u8; values.len() * 2];
                let dtype = self
                    .compression
                    .half_dtype()
                    .unwrap_or(tandem_core::DType::BF16);
                // Lengths match by construction.
                let _ = narrow(&values, dtype, &mut out);
                (Bytes::from(out), wire)
            }
            Compression::TopK { fraction } => {
                let mut acc = f32s(&bytes).into_owned();
                let mut residuals = self.residuals.lock().unwrap_or_else(|p| p.into_inner());
                let residual = residuals.entry(key.clone()).or_default();
                if residual.len() == acc.len() {
                    for (a, r) in acc.iter_mut().zip(residual.iter()) {
                        *a += r;
                    }
                }
                let (data, wire) = encode_top_k(&mut acc, fraction);
                *residual = acc;
                (data, wire)
            }
            _ => (bytes, Wire::F32),
        }
    }

    /// Writes pulled chunk `ch` into its partition `dst` (decoding half precision); returns the
    /// f32 bytes it filled. A chunk that overruns the partition, or is not whole elements, is an
    /// error naming it.
    pub(super) fn place_pulled(&self, ch: &pb::PullChunk, dst: &mut [f32]) -> Result<usize> {
        let overrun = || {
            Error::transport(
                "pulling",
                format!("chunk of {}/{} overruns the partition", ch.param, ch.part),
            )
        };
        let off = usize::try_from(ch.offset).map_err(|_| overrun())?;
        match ch.wire() {
            Wire::F32 => {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
                let end = off.checked_add(ch.data.len()).filter(|e| *e <= bytes.len());
                let end = end.ok_or_else(overrun)?;
                bytes[off..end].copy_from_slice(&ch.data);
                Ok(ch.data.len())
            }
            wire @ (Wire::Bf16 | Wire::Fp16) => {
                let dtype = if wire == Wire::Bf16 {
                    tandem_core::DType::BF16
                } else {
                    tandem_core::DType::F16
                };
                if !off.is_multiple_of(2) || !ch.data.len().is_multiple_of(2) {
                    return Err(overrun());
                }
                let (at, n) = (off / 2, ch.data.len() / 2);
                let end = at.checked_add(n).filter(|e| *e <= dst.len());
                let end = end.ok_or_else(overrun)?;
                widen(&ch.data, dtype, &mut dst[at..end])?;
                Ok(n * 4)
            }
            Wire::Topk => Err(Error::transport(
                "pulling",
                format!("a server sent {}/{} as top-k pairs", ch.param, ch.part),
            )),
        }
    }

    /// Settles the compression after the declarations: what this worker asked, unless it asked
    /// `auto`, which takes the servers' fixed setting, or (servers on `auto` too) is measured
    /// here. `servers` are their answers.
    pub(super) async fn settle_compression(
        &mut self,
        asked: Compression,
        servers: &[String],
    ) -> Result<()> {
        if asked != Compression::Auto {
            self.compression = asked;
            return Ok(());
        }
        let mut fixed: Vec<Compression> = Vec::new();
        for (s, said) in servers.iter().enumerate() {
            let c = Compression::parse(said).map_err(|e| {
                Error::transport(
                    "declaring parameters",
                    format!("server {} answered compression {said:?}: {e}", self.addr(s)),
                )
            })?;
            if c != Compression::Auto && !fixed.contains(&c) {
                fixed.push(c);
            }
        }
        match fixed.as_slice() {
            [] => {
                let choice = self.measure_compression().await?;
                self.compression = choice.chosen;
                tracing::info!(worker = self.worker, chosen = %choice.chosen, "auto compression: {}", choice.reason());
                let chosen = if choice.chosen == Compression::Bf16 {
                    "bf16"
                } else {
                    "none"
                };
                tandem_observe::metrics::compression_auto(
                    chosen,
                    choice.none_secs,
                    choice.bf16_secs,
                );
            }
            [one] => self.compression = *one,
            many => {
                let names: Vec<String> = many.iter().map(Compression::to_string).collect();
                return Err(Error::config(
                    tandem_core::settings::COMPRESSION.name,
                    format!(
                        "the parameter servers were started with different compressions ({}); start them alike",
                        names.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `auto` against servers on `auto`: nothing measured when every server shares this machine;
    /// otherwise the fastest of a few whole pulls, less the fastest round trip (a stats call), is
    /// the transfer time bf16 would halve, and the casts of the pulled bytes timed here are what
    /// it would add.
    async fn measure_compression(&self) -> Result<AutoChoice> {
        let local = |a: &str| {
            let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        };
        let all_local =
            (0..self.server_count()).all(|s| self.shared_pid(s).is_some() || local(&self.addr(s)));
        if all_local {
            return Ok(AutoChoice::one_machine());
        }
        let mut round_trip = f64::INFINITY;
        let mut pull = f64::INFINITY;
        let mut out = HashMap::new();
        for _ in 0..PROBE_RUNS {
            let start = Instant::now();
            self.incarnations_now().await?;
            round_trip = round_trip.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            self.pull_into(0, &mut out).await?;
            pull = pull.min(start.elapsed().as_secs_f64());
        }
        let values: Vec<f32> = out.values().flatten().copied().collect();
        let bytes = values.len() * 4;
        let mut half = vec![0u8; values.len() * 2];
        let mut back = vec![0f32; values.len()];
        let start = Instant::now();
        narrow(&values, tandem_core::DType::BF16, &mut half)?;
        widen(&half, tandem_core::DType::BF16, &mut back)?;
        let casts = start.elapsed().as_secs_f64();
        let transfer = (pull - round_trip).max(0.0);
        let bf16 = round_trip + transfer / 2.0 + casts;
        Ok(AutoChoice::measured(bytes, pull, bf16))
    }
}
