//! The standby side of primary-backup replication: a server process configured to follow another
//! ([`FollowConfig`]) serves a second, standby service on a port of its own. A follower task keeps
//! the standby's state equal to its primary's (every update, installed and acknowledged before the
//! primary publishes it; a broken stream is followed again, with backoff, for as long as the
//! process runs). The standby serves nothing of its own accord: the first worker call it receives
//! promotes it (the worker could not reach the primary). From then on it installs no more of the
//! primary's states, tells the primary it was replaced (so a primary still alive stops), and serves
//! the workers from the last state installed: every update a worker could have seen.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_rendezvous::{CheckToken, JobToken};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use super::checkpoint::{self, Snapshot};
use super::model::Model;
use super::service::{Limits, Service};
use crate::pb;
use crate::pb::parameter_server_server::ParameterServerServer;

/// Whom a server's standby follows, and where the standby serves.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// The primary's address (the server whose state the standby holds).
    pub primary: String,
    /// Where the standby listens (port 0: any); workers learn it from the primary.
    pub bind: String,
}

/// Whether the standby was promoted, and the service it promotes.
struct Promotion {
    /// Whether a worker reached the standby.
    promoted: Mutex<bool>,
    /// Signalled once it did.
    signal: watch::Sender<bool>,
    /// The standby's service.
    service: Service,
}

impl Promotion {
    /// A worker reached the standby: it serves from now on (once; the step restarts from the
    /// replicated version).
    fn promote(&self) {
        let mut p = self.promoted.lock().unwrap_or_else(|p| p.into_inner());
        if *p {
            return;
        }
        *p = true;
        if let Some(stepper) = self.service.declared.get().and_then(|d| d.stepper.as_ref()) {
            stepper.resync();
        }
        let version = self.service.model().map(|m| *m.version.borrow());
        tracing::warn!(
            ?version,
            "a worker reached this standby: promoted, serving the primary's partitions"
        );
        self.signal.send_replace(true);
    }

    /// Whether the standby has been promoted.
    fn is_promoted(&self) -> bool {
        *self.signal.borrow()
    }
}

/// Checks the job token, then promotes the standby on the first worker call.
#[derive(Clone)]
struct Gate {
    /// Checks the job's token.
    token: CheckToken,
    /// Promotes the standby at the first worker call.
    promotion: Arc<Promotion>,
}

impl Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let req = self.token.call(req)?;
        self.promotion.promote();
        Ok(req)
    }
}

/// A running standby: its address, and whether (and when) its workers are done.
pub(super) struct Standby {
    /// Whether it was promoted.
    promotion: Arc<Promotion>,
    /// Notified when every worker said done to it.
    all_done: Arc<Notify>,
    /// Stops its serving and following.
    stop: Arc<Notify>,
}

/// Serves the standby's gRPC service on `listener` (only clients past `gate`; no rendezvous
/// identity), until `stop` is notified.
fn serve(
    listener: TcpListener,
    security: &tandem_tls::Security,
    service: Service,
    gate: Gate,
    stop: Arc<Notify>,
) {
    let svc = ParameterServerServer::new(service)
        .max_decoding_message_size(super::MAX_MESSAGE)
        .max_encoding_message_size(super::MAX_MESSAGE);
    let incoming = tandem_tls::grpc::incoming(listener, security.clone(), "standby", |r| {
        !matches!(r, tandem_tls::identity::Role::Rendezvous)
    });
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_concurrent_streams(Some(super::MAX_STREAMS))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(InterceptedService::new(svc, gate))
            .serve_with_incoming_shutdown(incoming, stop.notified())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the standby stopped serving");
        }
    });
}

impl Standby {
    /// Binds the standby's port (before the server runs, so its address is known).
    pub(super) async fn bind(
        config: &FollowConfig,
    ) -> tandem_core::Result<(TcpListener, SocketAddr)> {
        let listener = TcpListener::bind(&config.bind).await.map_err(|e| {
            tandem_core::Error::io(format!("binding the standby to {}", config.bind), e)
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| tandem_core::Error::io("reading the standby's address", e))?;
        Ok((listener, addr))
    }

    /// Serves the standby on `listener` and follows `config.primary`, until [`Standby::stop`].
    pub(super) fn start(
        config: FollowConfig,
        listener: TcpListener,
        addr: SocketAddr,
        token: JobToken,
        limits: Limits,
        security: tandem_tls::Security,
        compression: tandem_core::compression::Compression,
    ) -> Standby {
        let all_done = Arc::new(Notify::new());
        let service = Service::new(limits, all_done.clone(), None, compression);
        let promotion = Arc::new(Promotion {
            promoted: Mutex::new(false),
            signal: watch::Sender::new(false),
            service: service.clone(),
        });
        let stop = Arc::new(Notify::new());
        let gate = Gate {
            token: CheckToken(token.clone()),
            promotion: promotion.clone(),
        };
        serve(listener, &security, service.clone(), gate, stop.clone());
        let follower = Follower {
            primary: config.primary,
            me: addr.to_string(),
            token,
            security,
            promotion: promotion.clone(),
            service,
        };
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = follower.run() => {}
                _ = stopped.notified() => {}
            }
        });
        tracing::info!(standby = %addr, "standby serving (idle until a worker fails over to it)");
        Standby {
            promotion,
            all_done,
            stop,
        }
    }

    /// Resolves once the standby was promoted and every worker said done to it (never while it is
    /// not promoted).
    pub(super) async fn done(&self) {
        let mut rx = self.promotion.signal.subscribe();
        let promoted = rx.wait_for(|p| *p).await.is_ok();
        if !promoted {
            return std::future::pending().await;
        }
        self.all_done.notified().await;
    }

    /// Whether a worker failed over to it.
    pub(super) fn is_promoted(&self) -> bool {
        self.promotion.is_promoted()
    }

    /// Stops serving and following.
    pub(super) fn stop(&self) {
        self.stop.notify_waiters();
    }
}

/// Keeps the standby's state equal to the primary's.
struct Follower {
    /// The primary's address.
    primary: String,
    /// This standby's address, told to the primary.
    me: String,
    /// The job's token.
    token: JobToken,
    /// How the connection to the primary is secured.
    security: tandem_tls::Security,
    /// Stops following once promoted.
    promotion: Arc<Promotion>,
    /// Where replicated states are installed.
    service: Service,
}

impl Follower {
    /// Follows the primary until promoted: subscribes to its replicated states and installs each,
    /// reconnecting with backoff when the stream breaks.
    async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        let mut promoted = self.promotion.signal.subscribe();
        while !self.promotion.is_promoted() {
            match self.follow_once().await {
                Ok(()) => return,
                Err(why) if !warned => {
                    tracing::warn!(primary = %self.primary, "not following the primary ({why}); trying again");
                    warned = true;
                }
                Err(why) => tracing::debug!(primary = %self.primary, "not following: {why}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = async { let _ = promoted.wait_for(|p| *p).await; } => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Follows the primary until its stream breaks (an error) or this standby is promoted (`Ok`,
    /// after telling the primary).
    async fn follow_once(&self) -> tandem_core::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut client = crate::protocol::connect_one(
            &self.primary,
            &self.token,
            &self.security,
            deadline,
            None,
        )
        .await?;
        let broken = |why: &str| tandem_core::Error::transport("following the primary", why);
        let (acks, rx) = tokio::sync::mpsc::channel(4);
        let hello = pb::FollowAck {
            standby: self.me.clone(),
            ..Default::default()
        };
        acks.send(hello)
            .await
            .map_err(|_| broken("the ack channel closed"))?;
        let mut stream = client
            .follow(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| broken(s.message()))?
            .into_inner();
        tracing::info!(primary = %self.primary, "following the primary");
        let mut promoted = self.promotion.signal.subscribe();
        let mut state = Vec::new();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = async { let _ = promoted.wait_for(|p| *p).await; } => {
                    let _ = acks.send(pb::FollowAck { promoted: true, ..Default::default() }).await;
                    // Let the primary read it before the stream goes.
                    let _ = tokio::time::timeout(Duration::from_secs(2), stream.message()).await;
                    return Ok(());
                }
            };
            let chunk = match msg {
                Ok(Some(c)) => c,
                Ok(None) => return Err(broken("the primary closed the stream")),
                Err(s) => return Err(broken(s.message())),
            };
            state.extend_from_slice(&chunk.data);
            if !chunk.last {
                continue;
            }
            // The buffer goes back and forth so its allocation serves every update.
            let mut bytes = std::mem::take(&mut state);
            let (service, promotion) = (self.service.clone(), self.promotion.clone());
            let (installed, back) = tokio::task::spawn_blocking(move || {
                let r = install(&service, &promotion, &bytes);
                bytes.clear();
                (r, bytes)
            })
            .await
            .map_err(|e| broken(&format!("installing the state: {e}")))?;
            state = back;
            match installed {
                Ok(version) => {
                    let ack = pb::FollowAck {
                        version,
                        ..Default::default()
                    };
                    acks.send(ack)
                        .await
                        .map_err(|_| broken("the ack channel closed"))?;
                }
                // Promoted meanwhile: the next turn tells the primary.
                Err(Install::Promoted) => {}
                Err(Install::Bad(why)) => return Err(why),
            }
        }
    }
}

/// Why a replicated state was not installed.
enum Install {
    /// The standby was promoted meanwhile: states from the primary no longer count.
    Promoted,
    /// The state could not be installed.
    Bad(tandem_core::Error),
}

/// Installs one replicated state (the first one creates the model), unless promoted.
fn install(service: &Service, promotion: &Promotion, bytes: &[u8]) -> Result<u64, Install> {
    /// What an error about the replicated state calls it.
    const WHAT: &str = "the primary's replicated state";
    let promoted = promotion.promoted.lock().unwrap_or_else(|p| p.into_inner());
    if *promoted {
        return Err(Install::Promoted);
    }
    let version = match service.model() {
        None => {
            let snap = checkpoint::decode(bytes, WHAT.into()).map_err(Install::Bad)?;
            let version = snap.version;
            service
                .restore(Model::from_snapshot(snap))
                .map_err(Install::Bad)?;
            version
        }
        Some(m) => m.overwrite_encoded(bytes).map_err(Install::Bad)?,
    };
    drop(promoted);
    Ok(version)
}

/// The error for a replicated state of another model than this standby's.
fn not_this_model(map_hash: u64, parts: usize, model: &Model) -> tandem_core::Error {
    tandem_core::Error::invalid(
        "replicated state",
        format!(
            "the replicated state (map {map_hash:016x}, {parts} partitions) is not this standby's \
             model (map {:016x}, {} partitions)",
            model.map_hash,
            model.parts.len()
        ),
    )
}

impl Model {
    /// Like [`Model::overwrite`] from an encoded state, copying each partition's floats straight
    /// into place (no intermediate snapshot); answers the state's version. The state is checked
    /// whole (checksum, map, every partition's size) before anything is written.
    pub fn overwrite_encoded(&self, bytes: &[u8]) -> tandem_core::Result<u64> {
        /// What an error about the replicated state calls it.
        const WHAT: &str = "the primary's replicated state";
        let mut seen = 0usize;
        let check = |_: &checkpoint::Header, p: checkpoint::PartBytes<'_>| {
            let fits = self.parts.get(&(p.param.clone(), p.part)).is_some_and(|e| {
                e.numel * 4 == p.values.len()
                    && [p.m.len(), p.v.len()]
                        .iter()
                        .all(|n| *n == 0 || *n == p.values.len())
            });
            seen += 1;
            if fits {
                Ok(())
            } else {
                Err(tandem_core::Error::invalid(
                    "replicated state",
                    format!(
                        "its {:?} partition {} does not match this standby's",
                        p.param, p.part
                    ),
                ))
            }
        };
        let h = checkpoint::visit(bytes, WHAT.into(), check)?;
        if h.map_hash != self.map_hash || seen != self.parts.len() {
            return Err(not_this_model(h.map_hash, seen, self));
        }
        let floats = |dst: &mut Vec<f32>, src: &[u8]| {
            dst.resize(src.len() / 4, 0.0);
            bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(src);
        };
        checkpoint::visit(bytes, WHAT.into(), |_, p| {
            if let Some(e) = self.parts.get(&(p.param.clone(), p.part)) {
                let mut d = e.write();
                let data = &mut *d;
                floats(&mut data.values, p.values);
                floats(&mut data.state.m, p.m);
                floats(&mut data.state.v, p.v);
                data.state.t = p.t;
                data.version = p.version;
            }
            Ok(())
        })?;
        self.version.send_replace(h.version);
        self.worker_steps
            .send_modify(|s| s.iter_mut().for_each(|x| *x = h.version));
        Ok(h.version)
    }

    /// Sets every partition (values, optimizer state, versions) and the version from `snap`, which
    /// must hold exactly this model's partitions.
    pub fn overwrite(&self, snap: &Snapshot) -> tandem_core::Result<()> {
        if snap.map_hash != self.map_hash || snap.parts.len() != self.parts.len() {
            return Err(not_this_model(snap.map_hash, snap.parts.len(), self));
        }
        for p in &snap.parts {
            let fits = self
                .parts
                .get(&(p.param.clone(), p.part))
                .is_some_and(|e| e.numel == p.values.len());
            if !fits {
                return Err(tandem_core::Error::invalid(
                    "replicated state",
                    format!(
                        "its {:?} partition {} does not match this standby's",
                        p.param, p.part
                    ),
                ));
            }
        }
        for p in &snap.parts {
            if let Some(e) = self.parts.get(&(p.param.clone(), p.part)) {
                let mut d = e.write();
                d.values.copy_from_slice(&p.values);
                d.state.m.clone_from(&p.m);
                d.state.v.clone_from(&p.v);
                d.state.t = p.t;
                d.version = p.version;
            }
        }
        self.version.send_replace(snap.version);
        self.worker_steps
            .send_modify(|s| s.iter_mut().for_each(|x| *x = snap.version));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::Optimizer;
    use crate::server::Mode;

    fn model(hash: u64, elems: u64) -> Model {
        let (opt, mode) = (Optimizer::momentum(0.5, 0.9), Mode::sync_for_test(2, 2));
        Model::one_partition_for_test(hash, opt, mode, elems)
    }

    #[test]
    fn overwrite_takes_a_state_of_the_same_model_whole_and_refuses_any_other() {
        let primary = model(7, 3);
        {
            let e = &primary.parts[&("w".to_string(), 0)];
            let mut d = e.write();
            d.values = vec![1.0, 2.0, 3.0];
            d.state.m = vec![0.5; 3];
            d.state.t = 4;
            d.version = 4;
        }
        primary.version.send_replace(4);
        let snap = primary.snapshot();
        let standby = model(7, 3);
        standby.overwrite(&snap).expect("same model");
        assert_eq!(
            standby.snapshot(),
            snap,
            "values, optimizer state and versions"
        );
        assert_eq!(*standby.worker_steps.borrow(), vec![4, 4]);
        let e = standby
            .overwrite(&model(8, 3).snapshot())
            .expect_err("another map");
        assert!(e.to_string().contains("not this standby's model"), "{e}");
        let e = standby
            .overwrite(&model(7, 4).snapshot())
            .expect_err("another size");
        assert!(e.to_string().contains("does not match"), "{e}");
        assert_eq!(standby.snapshot(), snap, "a refused state changes nothing");
        // The same from the encoded state, as a standby receives it.
        let mut bytes = Vec::new();
        primary.encode_state(5, &mut bytes);
        let fresh = model(7, 3);
        assert_eq!(fresh.overwrite_encoded(&bytes).expect("the same model"), 5);
        let mut want = snap.clone();
        want.version = 5;
        assert_eq!(fresh.snapshot(), want);
        let mut other = Vec::new();
        model(8, 3).encode_state(1, &mut other);
        let e = fresh.overwrite_encoded(&other).expect_err("another map");
        assert!(e.to_string().contains("not this standby's model"), "{e}");
        model(7, 4).encode_state(1, &mut other);
        let e = fresh.overwrite_encoded(&other).expect_err("another size");
        assert!(e.to_string().contains("does not match"), "{e}");
        let mut torn = bytes.clone();
        torn[40] ^= 0xff;
        let e = fresh.overwrite_encoded(&torn).expect_err("corrupt");
        assert!(e.to_string().contains("checksum"), "{e}");
        assert_eq!(fresh.snapshot(), want, "a refused state changes nothing");
    }
}
