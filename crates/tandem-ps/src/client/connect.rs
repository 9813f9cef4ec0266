//! Reaching the servers: one gRPC channel per server (retried with backoff until the deadline),
//! the declaration of the partition map on each, and the mapping of a server's status (its code
//! and typed reason, never its text) to a Tandem error.

use super::*;
use crate::protocol::local_rank;

/// The Tandem error for a failed call, decided on the status code and the typed reason the server
/// attached (never on the message text).
pub(super) fn status_error(addr: &str, what: &str, s: Status, waited: Duration) -> Error {
    let ctx = format!("{what} at the parameter server {addr}");
    if let Some(why) = tandem_tls::grpc::refusal(&s) {
        return Error::Authentication {
            peer: format!("parameter server {addr}"),
            reason: why,
        };
    }
    if crate::failure::reason_of(&s) == crate::pb::Reason::LeaseExpired {
        return Error::LeaseExpired {
            context: ctx,
            detail: s.message().to_string(),
        };
    }
    if crate::failure::reason_of(&s) == crate::pb::Reason::PartiallyApplied {
        return Error::PartiallyApplied {
            context: ctx,
            applied: s.message().to_string(),
        };
    }
    match s.code() {
        Code::Unauthenticated => Error::Authentication {
            peer: format!("parameter server {addr}"),
            reason: s.message().into(),
        },
        Code::FailedPrecondition => Error::Precondition {
            context: ctx,
            problem: s.message().to_string(),
        },
        Code::NotFound | Code::InvalidArgument | Code::AlreadyExists | Code::OutOfRange => {
            Error::invalid(ctx, s.message().to_string())
        }
        Code::DeadlineExceeded => Error::timeout(format!("{ctx}: {}", s.message()), waited),
        _ => {
            let hint = tandem_tls::grpc::plaintext_hint(&s);
            Error::transport(ctx, format!("{}{hint}", s.message()))
        }
    }
}

impl Client {
    /// Connects to every server (retrying until `deadline`) and declares the partition map on each,
    /// with the compression `TANDEM_COMPRESSION` names (none when unset).
    pub async fn connect(
        addrs: &[String],
        token: &JobToken,
        worker: u32,
        map: PartitionMap,
        optimizer: Optimizer,
        mode: TrainingMode,
        deadline: Duration,
    ) -> Result<Client> {
        let compression = Compression::from_env()?;
        Self::connect_compressed(
            addrs,
            token,
            worker,
            (map, optimizer, mode),
            compression,
            deadline,
        )
        .await
    }

    /// [`Client::connect`] with `compression` instead of `TANDEM_COMPRESSION`: gradients pushed and
    /// parameters pulled in bf16 or fp16, or top-k pushes (error kept here), through the gRPC
    /// streams (see [`crate::wire`]); `auto` takes the servers' setting, or measures the link
    /// when they are on `auto` too. A server started with another setting refuses the
    /// declaration, naming both. `declared` is the partition map, optimizer and mode.
    pub async fn connect_compressed(
        addrs: &[String],
        token: &JobToken,
        worker: u32,
        declared: (PartitionMap, Optimizer, TrainingMode),
        compression: Compression,
        deadline: Duration,
    ) -> Result<Client> {
        let (map, optimizer, mode) = declared;
        let compression = crate::wire::check_setting(compression)?;
        check_job(addrs, &map, worker, mode)?;
        optimizer.validate()?;
        tandem_observe::identify(
            tandem_observe::Identity::new("worker", worker as usize, mode.workers as usize)
                .local(local_rank()),
        );
        let security = tandem_tls::Security::from_env()?;
        security.check_peers("the parameter-server client", addrs)?;
        let end = Instant::now() + deadline;
        let servers = futures::future::try_join_all(
            (addrs.iter().enumerate()).map(|(i, a)| connect_one(a, token, &security, end, Some(i))),
        )
        .await?;
        let mut client = Client {
            incarnations: std::sync::Arc::new(std::sync::Mutex::new(vec![0; servers.len()])),
            shared: std::sync::Arc::new((0..servers.len()).map(|_| AtomicU32::new(0)).collect()),
            routes: std::sync::Arc::new(super::failover::Routes::new(servers, addrs)),
            token: token.clone(),
            security,
            map,
            worker,
            chunk_bytes: 1 << 20,
            timeout: deadline,
            mode,
            push_ids: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(first_push_id())),
            compression: Compression::None,
            residuals: std::sync::Arc::default(),
        };
        let servers_say = client.declare_all(&optimizer, mode, compression).await?;
        if tandem_peer_memory::allowed_by_env() {
            client.attach_all().await;
        }
        client.settle_compression(compression, &servers_say).await?;
        Ok(client)
    }

    /// Declares each server's partitions, optimizer, mode and this worker's compression on it, all
    /// servers at once; returns each server's compression setting.
    async fn declare_all(
        &self,
        optimizer: &Optimizer,
        mode: TrainingMode,
        compression: Compression,
    ) -> Result<Vec<String>> {
        let (mode, optimizer, hash) = (
            mode_to_wire(mode),
            optimizer_to_wire(optimizer),
            self.map.hash(),
        );
        let declares = (0..self.server_count()).map(|s| {
            let req = pb::DeclareRequest {
                partitions: self.partitions_of(s),
                optimizer: Some(optimizer.clone()),
                mode: Some(mode),
                map_hash: hash,
                compression: compression.to_string(),
            };
            let mut c = self.grpc(s);
            let addr = self.addr(s);
            let deadline = self.timeout;
            async move {
                c.declare(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| status_error(&addr, "declaring parameters", e, deadline))
            }
        });
        let answers = futures::future::try_join_all(declares).await?;
        for (s, answer) in answers.iter().enumerate() {
            self.learn_standby(s, &answer.standby);
        }
        Ok(answers.into_iter().map(|a| a.compression).collect())
    }

    /// The partitions server `s` holds, as declared on the wire.
    fn partitions_of(&self, s: usize) -> Vec<pb::Partition> {
        self.map
            .parts
            .iter()
            .filter(|p| p.server == s)
            .map(|p| {
                let decl = self.map.param(&p.param);
                let (kind, a, b, seed) = decl.map_or(("zeros", 0.0, 0.0, 0), |d| d.init.to_wire());
                let shape: Vec<u64> = match decl.map(|d| d.shape.as_slice()) {
                    Some([]) | None => vec![1],
                    Some(s) => s.iter().map(|d| *d as u64).collect(),
                };
                pb::Partition {
                    param: p.param.clone(),
                    part: p.part,
                    shape,
                    row_start: p.row_start as u64,
                    rows: p.rows as u64,
                    dtype: "f32".into(),
                    init: Some(pb::Initializer {
                        kind: kind.into(),
                        a,
                        b,
                        seed,
                    }),
                }
            })
            .collect()
    }
}

/// The job's shape agrees with itself: one address per server of the map, a worker index in range.
fn check_job(addrs: &[String], map: &PartitionMap, worker: u32, mode: TrainingMode) -> Result<()> {
    if addrs.len() != map.servers {
        return Err(Error::invalid(
            "servers",
            format!(
                "{} addresses for a map of {} servers",
                addrs.len(),
                map.servers
            ),
        ));
    }
    if worker >= mode.workers {
        return Err(Error::invalid(
            "worker",
            format!("worker {worker} is not below the {} workers", mode.workers),
        ));
    }
    Ok(())
}

/// The training mode as the declaration carries it.
fn mode_to_wire(mode: TrainingMode) -> pb::Mode {
    pb::Mode {
        sync: mode.sync,
        workers: mode.workers,
        replicas_to_aggregate: mode.replicas_to_aggregate,
        bounded: mode.staleness.is_some(),
        staleness: mode.staleness.unwrap_or(0),
        reject_non_finite: mode.reject_non_finite,
    }
}

/// The optimizer as the declaration carries it.
fn optimizer_to_wire(o: &Optimizer) -> pb::Optimizer {
    pb::Optimizer {
        kind: o.kind_name().into(),
        lr: o.lr as f64,
        momentum: o.momentum as f64,
        beta1: o.beta1 as f64,
        beta2: o.beta2 as f64,
        eps: o.eps as f64,
        weight_decay: o.weight_decay as f64,
        clip_norm: o.clip_norm as f64,
        decay_rate: o.decay_rate as f64,
        decay_steps: o.decay_steps,
    }
}

/// A random first push id (never 0), from the standard library's randomly keyed hasher.
fn first_push_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() >> 1) | 1
}
