//! The same-machine data plane, worker side: attaching to each server (both sides prove they can
//! read the other's memory), pushes by address (the server reads the listed regions while this
//! worker's word holds the push's tag), and pulls by address (a seqlock read of the server's
//! partitions). A push that fails with nothing applied (`NOT_ATTACHED`,
//! `UNREADABLE_NOTHING_APPLIED`) goes through the stream instead; any other failure is the
//! caller's, so no piece is ever applied twice.

use super::*;

impl Client {
    /// Tries the same-machine data plane with every server: each side reads the other's word. A
    /// server where that fails (another machine, a kernel or container that forbids it) is used
    /// through the gRPC stream; the outcome is logged once per server.
    pub(super) async fn attach_all(&self) {
        let word = tandem_peer_memory::LocalWord::new();
        let advert = word.advert();
        let calls = (0..self.server_count()).map(|s| {
            let mut c = self.grpc(s);
            let req = pb::AttachRequest {
                advert: advert.clone(),
            };
            async move {
                let r = tokio::time::timeout(Duration::from_secs(10), c.attach(req)).await;
                (s, r)
            }
        });
        for (s, r) in futures::future::join_all(calls).await {
            let addr = &self.addr(s);
            let outcome = match r {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    if !resp.ok {
                        Err(resp.reason)
                    } else {
                        match tandem_peer_memory::PeerMemory::parse(&resp.advert) {
                            Some(peer) => peer.probe().map(|()| peer.pid()).map_err(|e| {
                                format!("the worker cannot read the server's memory: {e}")
                            }),
                            None => Err(format!("unreadable advert {:?}", resp.advert)),
                        }
                    }
                }
                Ok(Err(st)) => Err(st.message().to_string()),
                Err(_) => Err("no answer to attach within 10 s".into()),
            };
            match outcome {
                Ok(pid) => {
                    self.shared[s].store(pid, Ordering::Relaxed);
                    tracing::debug!(%addr, "tensors move by same-host memory reads");
                }
                Err(why) => {
                    tracing::info!(%addr, reason = %why, "tensors move through the gRPC stream")
                }
            }
        }
    }

    /// The server's pid when the same-machine data plane is on for server `s`.
    pub(super) fn shared_pid(&self, s: usize) -> Option<u32> {
        Some(self.shared[s].load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Turns the same-machine data plane off for server `s` (it restarted, or a read failed).
    pub(super) fn unshare(&self, s: usize, why: &str) {
        if self.shared[s].swap(0, Ordering::Relaxed) != 0 {
            tracing::warn!(addr = %self.addr(s), reason = %why, "falling back to the gRPC stream");
        }
    }

    /// Whether every server is reached through the same-machine data plane.
    pub fn same_host(&self) -> bool {
        (0..self.server_count()).all(|s| self.shared_pid(s).is_some())
    }

    /// Copies server `s`'s partitions straight out of its memory into `out`, each a seqlock read
    /// against the partition's sequence word (a torn read is an error, never silent).
    pub(super) async fn read_shared(
        &self,
        s: usize,
        sp: &pb::SharedPull,
        out: &mut HashMap<String, Vec<f32>>,
    ) -> std::result::Result<(), SharedPullError> {
        let other = |m: String| SharedPullError::Other(m);
        if self.shared_pid(s) != Some(sp.pid) {
            return Err(other(format!("the server now runs as process {}", sp.pid)));
        }
        let peer = tandem_peer_memory::PeerMemory::of_process(sp.pid)
            .ok_or_else(|| other(format!("bad pid {}", sp.pid)))?;
        for sp_part in &sp.parts {
            let part = self
                .map
                .parts
                .iter()
                .find(|p| p.param == sp_part.param && p.part == sp_part.part && p.server == s)
                .ok_or_else(|| {
                    other(format!(
                        "unknown partition {}/{}",
                        sp_part.param, sp_part.part
                    ))
                })?;
            let dst = out
                .get_mut(&sp_part.param)
                .ok_or_else(|| other(format!("unknown parameter {}", sp_part.param)))?;
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut dst[part.range()]);
            if sp_part.len != bytes.len() as u64 {
                return Err(other(format!(
                    "partition {}/{} is {} bytes on the server, {} here",
                    sp_part.param,
                    sp_part.part,
                    sp_part.len,
                    bytes.len()
                )));
            }
            let region = |a: u64, len: u64| {
                tandem_peer_memory::check_region(a, len).map_err(|e| other(e.to_string()))
            };
            let (addr, seq_addr) = (
                region(sp_part.addr, sp_part.len)?,
                region(sp_part.seq_addr, 8)?,
            );
            // An update racing the copy (async mode) is waited out for a while before the caller
            // falls back to the stream; values newer than the reply's version are fine, since a
            // pull asks for at least a version.
            let deadline = Instant::now() + SHARED_READ_PATIENCE;
            loop {
                match peer.read_consistent(addr, bytes, seq_addr, sp_part.seq) {
                    Ok(_) => break,
                    Err(tandem_peer_memory::ReadError::Raced) if Instant::now() < deadline => {
                        // Never a thread sleep here: this runs on the async runtime.
                        tokio::time::sleep(Duration::from_micros(100)).await;
                    }
                    Err(tandem_peer_memory::ReadError::Raced) => {
                        return Err(SharedPullError::Raced);
                    }
                    Err(e) => return Err(other(e.to_string())),
                }
            }
        }
        Ok(())
    }

    /// After a failed shared read: stops using the data plane with a server that is not the
    /// process attached (restarted) or could not be read; a read that merely raced updates keeps
    /// it.
    pub(super) fn unshare_if_gone(&self, s: usize, sp: &pb::SharedPull, why: &SharedPullError) {
        if self.shared_pid(s) != Some(sp.pid) || !matches!(why, SharedPullError::Raced) {
            self.unshare(s, &why.to_string());
        } else {
            tracing::debug!(addr = %self.addr(s), "pull raced updates; streaming it");
        }
    }

    /// Pushes through the same-machine data plane: each server copies its partitions out of
    /// `grads` while the call is open. Returns the servers that must be pushed through the stream
    /// instead (not attached any more, or a read failed) with the outcomes of the others.
    pub(super) async fn push_shared(
        &self,
        step: u64,
        grads: &[(&str, &[u8])],
    ) -> Result<(Vec<pb::PushResponse>, Vec<usize>)> {
        let word = tandem_peer_memory::LocalWord::new();
        // The servers may read the gradients only while this lease lives.
        let lease = word.lease(step);
        let mut per_server: Vec<Vec<pb::Region>> = vec![Vec::new(); self.server_count()];
        for (name, all) in grads {
            for p in self.map.parts_of(name) {
                let r = p.range();
                let bytes = &all[r.start * 4..r.end * 4];
                per_server[p.server].push(pb::Region {
                    param: p.param.clone(),
                    part: p.part,
                    addr: bytes.as_ptr() as usize as u64,
                    len: bytes.len() as u64,
                });
            }
        }
        let wait = self.timeout + Duration::from_secs(10);
        let pushes = per_server
            .into_iter()
            .enumerate()
            .filter(|(_, regions)| !regions.is_empty())
            .map(|(s, regions)| {
                let req = pb::SharedPush {
                    worker: self.worker,
                    step,
                    pid: std::process::id(),
                    word: word.address() as u64,
                    tag: lease.tag(),
                    parts: regions,
                };
                async move {
                    let r = self
                        .call_raw(s, "pushing", wait, move |mut c| {
                            let req = req.clone();
                            async move { c.push_shared(req).await.map(|r| r.into_inner()) }
                        })
                        .await;
                    (s, r)
                }
            });
        let results = futures::future::join_all(pushes).await;
        // The servers have read what they will read: from here the gradients are the caller's.
        drop(lease);
        let mut done = Vec::new();
        let mut again = Vec::new();
        for (s, r) in results {
            match r {
                Ok(resp) => done.push(resp),
                // Nothing of this gradient was applied there: the same gradient goes through the
                // stream. Any other failure (a part applied included) is the caller's.
                Err(Failed::Status(st)) if crate::failure::may_push_through_stream(&st) => {
                    self.unshare(s, st.message());
                    again.push(s);
                }
                Err(Failed::Status(st)) => {
                    return Err(status_error(&self.addr(s), "pushing", st, wait));
                }
                Err(Failed::Other(e)) => return Err(e),
            }
        }
        Ok((done, again))
    }

    /// Pushes by address to the servers on this machine and through the stream to the others.
    pub(super) async fn push_views(
        &self,
        step: u64,
        grads: &[(&str, &[u8])],
    ) -> Result<PushOutcome> {
        let (mut results, again) = self.push_shared(step, grads).await?;
        if !again.is_empty() {
            results.extend(self.push_streamed_to(step, grads, &again).await?);
        }
        Ok(outcome(&results))
    }
}

/// Why a pull by address failed.
#[derive(Debug)]
pub(super) enum SharedPullError {
    /// Updates raced every copy for a while (the server is fine; stream this once).
    Raced,
    /// Anything else (a restarted server, a region that cannot be read).
    Other(String),
}

impl std::fmt::Display for SharedPullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedPullError::Raced => f.write_str("updated during every copy"),
            SharedPullError::Other(m) => f.write_str(m),
        }
    }
}
