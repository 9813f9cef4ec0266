//! The gRPC streams, the data plane between machines: pushes cut into chunks (zero-copy slices of
//! the caller's tensors), pulls that wait for a version in slices, and the detection of a server
//! that restarted from a checkpoint while a worker waited.

use super::*;

impl Client {
    /// Pulls from one server, letting it wait at most `wait` for `min_version`; `None` when the
    /// version was not reached in that time.
    pub(super) async fn pull_one(
        &self,
        s: usize,
        min_version: u64,
        incarnation: u64,
        wait: Duration,
    ) -> Result<Option<Reply>> {
        let req = self.pull_request(min_version, vec![], wait, incarnation);
        if self.shared_pid(s).is_some() {
            let r = self
                .call(
                    s,
                    "pulling",
                    wait + Duration::from_secs(10),
                    move |mut c| {
                        let req = req.clone();
                        async move {
                            match c.pull_shared(req).await {
                                Ok(r) => Ok(Some(r.into_inner())),
                                Err(st) if st.code() == Code::DeadlineExceeded => Ok(None),
                                Err(st) => Err(st),
                            }
                        }
                    },
                )
                .await?;
            return Ok(r.map(Reply::Shared));
        }
        self.pull_stream(s, req, wait)
            .await
            .map(|r| r.map(Reply::Chunks))
    }

    /// Pulls from server `s` through the gRPC stream.
    pub(super) async fn pull_stream(
        &self,
        s: usize,
        req: pb::PullRequest,
        wait: Duration,
    ) -> Result<Option<Vec<pb::PullChunk>>> {
        self.call(
            s,
            "pulling",
            wait + Duration::from_secs(10),
            move |mut c| {
                let req = req.clone();
                async move {
                    let mut stream = match c.pull(req).await {
                        Ok(r) => r.into_inner(),
                        Err(st) if st.code() == Code::DeadlineExceeded => return Ok(None),
                        Err(st) => return Err(st),
                    };
                    let mut chunks = Vec::new();
                    loop {
                        match stream.message().await {
                            Ok(Some(ch)) => chunks.push(ch),
                            Ok(None) => return Ok(Some(chunks)),
                            // A sync pull streams each partition once the step applied it: one
                            // not applied within the wait ends the stream like a version not
                            // reached (asked again, the partitions already sent are sent again).
                            Err(st) if st.code() == Code::DeadlineExceeded => return Ok(None),
                            Err(st) => return Err(st),
                        }
                    }
                }
            },
        )
        .await
    }

    /// The incarnation of every server, from their stats.
    pub(super) async fn incarnations_now(&self) -> Result<Vec<u64>> {
        let calls = (0..self.server_count()).map(|s| {
            self.call(s, "stats", Duration::from_secs(10), |mut c| async move {
                c.stats(pb::StatsRequest {})
                    .await
                    .map(|r| r.into_inner().incarnation)
            })
        });
        futures::future::try_join_all(calls).await
    }

    /// Pulls from every server in parallel, waiting in slices of at most 2 s. If a server turns out
    /// to have restarted from a checkpoint (seen in a reply, or in its stats while waiting), the
    /// others are asked again without waiting, so the worker learns the restored step instead of
    /// waiting for a version that needs its own gradients first.
    pub(super) async fn pull_all(&self, min_version: u64) -> Result<Vec<Reply>> {
        use futures::stream::{FuturesUnordered, StreamExt as _};
        let known: Vec<u64> = self
            .incarnations
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let n = self.server_count();
        let end = Instant::now() + self.timeout;
        // A server that holds no partition (a model smaller than the servers can share) gets no
        // pushes, so its version never moves: there is nothing to pull from it either.
        let mut results: Vec<Option<Reply>> = (0..n)
            .map(|s| {
                (!self.map.parts.iter().any(|p| p.server == s)).then(|| Reply::Chunks(Vec::new()))
            })
            .collect();
        let changed = |s: usize, inc: u64| known.get(s).is_some_and(|k| *k != 0 && *k != inc);
        let mut restarted = false;
        while !restarted && results.iter().any(Option::is_none) {
            let slice = end
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            {
                let mut pending: FuturesUnordered<_> = (0..n)
                    .filter(|s| results[*s].is_none())
                    .map(|s| {
                        let inc = known.get(s).copied().unwrap_or(0);
                        async move { (s, self.pull_one(s, min_version, inc, slice).await) }
                    })
                    .collect();
                while let Some((s, r)) = pending.next().await {
                    if let Some(reply) = r? {
                        restarted |= changed(s, reply.incarnation());
                        results[s] = Some(reply);
                        if restarted {
                            break;
                        }
                    }
                }
            }
            if restarted || results.iter().all(Option::is_some) {
                break;
            }
            let now = self.incarnations_now().await?;
            restarted = now.iter().enumerate().any(|(s, inc)| changed(s, *inc));
            if !restarted && Instant::now() >= end {
                return Err(Error::timeout(
                    format!(
                        "parameters at version {min_version} from every parameter server (a worker may be missing)"
                    ),
                    self.timeout,
                ));
            }
        }
        if restarted {
            tracing::warn!("a parameter server restarted; resuming from its step");
            for (s, slot) in results.iter_mut().enumerate() {
                if slot.is_none() {
                    *slot = self.pull_one(s, 0, 0, Duration::ZERO).await?;
                }
            }
        }
        results
            .into_iter()
            .enumerate()
            .map(|(s, r)| {
                r.ok_or_else(|| {
                    Error::transport("pulling", format!("server {} sent nothing", self.addr(s)))
                })
            })
            .collect()
    }

    /// Pushes `grads` (whole tensors as bytes) to the servers `only` through the gRPC stream.
    pub(super) async fn push_streamed_to(
        &self,
        step: u64,
        grads: &[(&str, &[u8])],
        only: &[usize],
    ) -> Result<Vec<pb::PushResponse>> {
        let whole: Vec<(String, Bytes)> = grads
            .iter()
            .map(|(n, b)| (n.to_string(), Bytes::copy_from_slice(b)))
            .collect();
        self.push_chunks(step, whole, Some(only)).await
    }

    /// Cuts each whole gradient into its partitions' chunks (zero-copy slices) and streams them.
    pub(super) async fn push_bytes(
        &self,
        step: u64,
        grads: Vec<(String, Bytes)>,
    ) -> Result<PushOutcome> {
        let results = self.push_chunks(step, grads, None).await?;
        Ok(outcome(&results))
    }

    /// Streams the chunks of `grads` to every server holding a partition (or only to `only`). Each
    /// server's stream starts by listing its partitions in ascending order and carries them in
    /// that order, so the server applies it as it reads it (bounded memory there). A gradient
    /// holding NaN or Inf (when the job refuses them) is not sent: its servers are told so, and
    /// refuse it whole.
    pub(super) async fn push_chunks(
        &self,
        step: u64,
        grads: Vec<(String, Bytes)>,
        only: Option<&[usize]>,
    ) -> Result<Vec<pb::PushResponse>> {
        // Per server, its partitions in ascending (param, part) order with their bytes.
        let mut per_server: Vec<std::collections::BTreeMap<(String, u32), Bytes>> =
            vec![Default::default(); self.server_count()];
        for (name, all) in &grads {
            for p in self.map.parts_of(name) {
                let r = p.range();
                per_server[p.server]
                    .insert((p.param.clone(), p.part), all.slice(r.start * 4..r.end * 4));
            }
        }
        let wait = self.timeout + Duration::from_secs(10);
        let pushes = per_server
            .into_iter()
            .enumerate()
            .filter(|(s, c)| !c.is_empty() && only.is_none_or(|o| o.contains(s)))
            .map(|(s, parts)| {
                let chunks = self.chunks_of(step, parts);
                self.call(s, "pushing", wait, move |mut c| {
                    let chunks = chunks.clone();
                    async move {
                        c.push(tokio_stream::iter(chunks))
                            .await
                            .map(|r| r.into_inner())
                    }
                })
            });
        futures::future::try_join_all(pushes).await
    }

    /// One server's push: a first chunk listing the partitions, then their bytes in order
    /// (zero-copy slices); only the first chunk when a value is NaN or Inf.
    fn chunks_of(
        &self,
        step: u64,
        parts: std::collections::BTreeMap<(String, u32), Bytes>,
    ) -> Vec<pb::PushChunk> {
        let non_finite =
            self.mode.reject_non_finite && !parts.values().all(|b| crate::finite::bytes_finite(b));
        let mut chunks = vec![pb::PushChunk {
            worker: self.worker,
            step,
            parts: parts
                .keys()
                .map(|(param, part)| pb::PartRef {
                    param: param.clone(),
                    part: *part,
                })
                .collect(),
            non_finite,
            // The same id on every attempt of this push (the retries inside `call`).
            push_id: self
                .push_ids
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        }];
        if non_finite {
            return chunks;
        }
        for ((param, part), bytes) in parts {
            let key = (param, part);
            let (bytes, wire) = self.encode_part(&key, bytes);
            // Dense data in chunks of whole elements; top-k pairs in one chunk.
            let step = match crate::wire::element_bytes(wire) {
                Some(size) => (self.chunk_bytes / size).max(1) * size,
                None => bytes.len().max(1),
            };
            let mut off = 0;
            while off < bytes.len() {
                let end = (off + step).min(bytes.len());
                chunks.push(pb::PushChunk {
                    param: key.0.clone(),
                    part: key.1,
                    offset: off as u64,
                    data: bytes.slice(off..end),
                    wire: wire.into(),
                    ..Default::default()
                });
                off = end;
            }
        }
        chunks
    }
}
