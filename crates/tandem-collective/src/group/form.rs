//! Forming a group, step by step: join the rendezvous, publish this rank's ring address, connect
//! the mesh, find out whether the ranks share a machine, pass the ready barrier, start the abort
//! watcher. Every step has the connect deadline, and a [`Cancel`] lets the caller stop it early
//! (Ctrl-C in Python), so forming never outlives its caller's patience.

use crate::backend::streams::Channel;
use crate::messages::{Abort, RankState};
use crate::transport::mesh::{Listener, Mesh};
use tandem_rendezvous::board::{BoardPlan, TorchrunStore, board_bind};

use super::cancel::Cancel;
use super::peers::{advertise_host, bind_host, negotiate_same_host};
use super::*;

/// The name a stream's mesh is told apart by (its group id in the handshake): the group's own
/// for the first stream, so a group of one stream per peer greets as it always did.
fn channel_group(name: &str, channel: usize) -> String {
    if channel == 0 {
        name.to_string()
    } else {
        format!("{name}#stream{channel}")
    }
}

/// Every rank's address for each extra stream (`out[channel - 1][rank]`), from the ranks' ring
/// addresses and the ports each published (comma-separated, one per extra stream). A rank that
/// published another number of streams is named: every rank must use the same.
fn channel_addresses(
    addrs: &[String],
    ports: &[impl AsRef<[u8]>],
    me: usize,
    streams: usize,
) -> Result<Vec<Vec<String>>> {
    let mut out = vec![Vec::with_capacity(addrs.len()); streams - 1];
    for (r, (addr, ports)) in addrs.iter().zip(ports).enumerate() {
        let ports = String::from_utf8_lossy(ports.as_ref());
        let ports: Vec<&str> = ports.split(',').filter(|p| !p.is_empty()).collect();
        if ports.len() + 1 != streams {
            return Err(Error::config(
                crate::group::STREAMS_VAR,
                format!(
                    "rank {r} ({addr}) uses {} stream(s) per peer but rank {me} uses {streams}: \
                     set the same value on every rank",
                    ports.len() + 1
                ),
            ));
        }
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        for (channel, port) in ports.iter().enumerate() {
            let port: u16 = port.parse().map_err(|_| {
                Error::transport(
                    "exchanging ring addresses",
                    format!("rank {r} published a bad stream port {port:?}"),
                )
            })?;
            out[channel].push(format!("{host}:{port}"));
        }
    }
    Ok(out)
}

/// What forming a group of more than one rank builds, step by step.
struct Formation<'a> {
    /// Who this rank is.
    spec: &'a ClusterSpec,
    /// The configured token; `None` is allowed where a board hands rank 0's token out.
    token: Option<&'a JobToken>,
    /// The group's settings.
    config: &'a GroupConfig,
    /// Stops forming when cancelled.
    cancel: &'a Cancel,
    /// The control plane's runtime.
    control_rt: Runtime,
    /// The ring's runtime.
    ring_rt: Runtime,
    /// The group's prefix in the rendezvous's keys.
    prefix: String,
    /// The congestion control set on every connection, checked against the kernel before joining.
    congestion: crate::transport::congestion::CongestionChoice,
}

impl ProcessGroup {
    /// Forms the group described by the environment (cluster spec, `TANDEM_JOB_TOKEN`, `TANDEM_*`).
    pub fn from_env() -> Result<ProcessGroup> {
        let env = tandem_core::cluster::ProcessEnv;
        let spec = ClusterSpec::from_env()?;
        let token = JobToken::from_env()?;
        Self::init(&spec, token.as_ref(), GroupConfig::from_vars(&env)?)
    }

    /// Forms a group of the spec's ranks: joins the rendezvous (rank 0 hosts it unless
    /// `TANDEM_RENDEZVOUS_EXTERNAL=1`), exchanges listener addresses and connects the mesh.
    /// A world of one needs no rendezvous, no token and no sockets.
    pub fn init(
        spec: &ClusterSpec,
        token: Option<&JobToken>,
        config: GroupConfig,
    ) -> Result<ProcessGroup> {
        Self::init_cancellable(spec, token, config, &Cancel::new())
    }

    /// Like [`ProcessGroup::init`], ending early (with [`Error::Unusable`] saying why) when `cancel`
    /// is cancelled, whatever step forming is at.
    pub fn init_cancellable(
        spec: &ClusterSpec,
        token: Option<&JobToken>,
        config: GroupConfig,
        cancel: &Cancel,
    ) -> Result<ProcessGroup> {
        resolve(config.backend)?;
        if spec.world_size() == 1 {
            return Ok(Self::alone(spec.rank(), &config));
        }
        // A congestion control the kernel refuses is named before this rank joins anyone.
        let congestion = config.tcp_congestion.resolve()?;
        let runtime = |b: &mut tokio::runtime::Builder, what: &str| {
            b.enable_all()
                .build()
                .map_err(|e| Error::io(format!("starting the {what} runtime"), e))
        };
        Formation {
            spec,
            token,
            config: &config,
            cancel,
            control_rt: runtime(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("tandem-control"),
                "control",
            )?,
            ring_rt: runtime(&mut tokio::runtime::Builder::new_current_thread(), "ring")?,
            prefix: format!("tandem/pg/{}", config.name),
            congestion,
        }
        .form()
    }

    /// A world of one: no rendezvous, no sockets.
    fn alone(rank: usize, config: &GroupConfig) -> ProcessGroup {
        let shared = Shared {
            name: config.name.clone(),
            compression: config.compression,
            one_machine: true,
            auto: Mutex::new(None),
            direct_bytes: config.direct_bytes,
            kind: config.backend,
            rank,
            world: 1,
            backend: None,
            queue: Mutex::default(),
            drained: Condvar::new(),
            engine: Mutex::new(None),
            control: None,
        };
        ProcessGroup {
            shared: Arc::new(shared),
            timeout: config.timeout,
        }
    }
}

impl Formation<'_> {
    /// Forms the group: rendezvous, addresses, mesh, backend, each step under the connect deadline.
    fn form(self) -> Result<ProcessGroup> {
        let (rank, world) = (self.spec.rank(), self.spec.world_size());
        tandem_observe::identify(
            tandem_observe::Identity::new("rank", rank, world).local(self.spec.local_rank()),
        );
        let (session, token) = self.join()?;
        let client = session.client.clone();
        let rendezvous = session.spec().require_rendezvous()?.to_string();
        let (mesh, channels, addrs) = self.connect_mesh(&client, &rendezvous, &token)?;
        let same_host = if self.config.same_host {
            let timeout = self.config.connect_timeout;
            self.cancel.run(
                &self.control_rt,
                "finding out whether the ranks share a machine",
                negotiate_same_host(&client, &self.prefix, rank, world, timeout),
            )?
        } else {
            None
        };
        let copies = if same_host.is_some() {
            "same-host copies"
        } else {
            "sockets"
        };
        self.cancel.run(
            &self.control_rt,
            "waiting for every rank to be ready",
            client.barrier(
                &format!("{}/ready", self.prefix),
                world,
                rank,
                self.config.connect_timeout,
            ),
        )?;
        tandem_observe::set_addr(addrs.get(rank).map_or("", String::as_str));
        let progress = std::sync::Arc::new(crate::stall::Progress::new());
        let live = std::sync::Arc::downgrade(&progress);
        tandem_observe::recorder::set_live(move || {
            live.upgrade()
                .and_then(|p| crate::observe::wait_of(p.waiting.get()))
        });
        let (abort_rx, watcher) = self.watch_aborts(&client, progress.clone());
        let control = crate::backend::tcp_ring::Control {
            publish: self.abort_publisher(&client),
            inquire: self.stall_inquirer(&client),
            progress,
            addrs: addrs.clone(),
            rendezvous_on_rank0: !std::env::var(tandem_rendezvous::EXTERNAL_VAR)
                .is_ok_and(|v| v == "1"),
        };
        let Formation {
            config,
            control_rt,
            ring_rt,
            ..
        } = self;
        // Several hosts of several ranks each (by the addresses the ranks advertised): large
        // allreduces go within hosts, across, and within again.
        let hosts = if config.hierarchical && same_host.is_none() {
            crate::backend::ops::HostLayout::from_addrs(&addrs)
        } else {
            None
        };
        if let (Some(h), 0) = (&hosts, rank) {
            tracing::info!(
                hosts = h.hosts(),
                per_host = h.per_host(),
                "large allreduces are hierarchical"
            );
        }
        let tuning = Tuning {
            segment_bytes: config.segment_bytes,
            direct_bytes: config.direct_bytes,
            shared_min_bytes: config.same_host_min_bytes,
            hosts,
        };
        let one_machine = same_host.is_some() || super::auto::one_machine(&addrs);
        let ring = TcpRing::new(
            rank, world, ring_rt, mesh, channels, tuning, abort_rx, control, same_host,
        );
        tracing::info!(rank, world, group = %config.name, "process group ready (tcp ring, {copies})");
        let shared = Shared {
            name: config.name.clone(),
            compression: config.compression,
            one_machine,
            auto: Mutex::new(None),
            direct_bytes: config.direct_bytes,
            kind: config.backend,
            rank,
            world,
            backend: Some(Box::new(ring)),
            queue: Mutex::default(),
            drained: Condvar::new(),
            engine: Mutex::new(None),
            control: Some(Control {
                rt: control_rt,
                session: Mutex::new(Some(session)),
                watcher: Mutex::new(Some(watcher)),
            }),
        };
        let pg = ProcessGroup {
            shared: Arc::new(shared),
            timeout: config.timeout,
        };
        // `auto` measures the links now, so the log and the metrics say what it chose from the
        // start (and the first gradient's allreduce is not the one that pays for the probe).
        if config.compression == crate::compression::Compression::Auto {
            pg.auto_compression()?;
        }
        Ok(pg)
    }

    /// Joins the rendezvous (hosting it on rank 0 unless a launcher does; publishing it on a board
    /// when another program owns the agreed port). Returns the session and the job's token.
    fn join(&self) -> Result<(Session, JobToken)> {
        let bind = std::env::var(tandem_rendezvous::BIND_VAR)
            .ok()
            .filter(|s| !s.is_empty());
        let plan = self.config.board.clone().or_else(|| {
            let var = |k: &str| std::env::var(k).ok();
            TorchrunStore::from_spec(self.spec, &self.config.name, var).map(|b| BoardPlan {
                board: std::sync::Arc::new(b),
                one_machine: self.spec.local_world_size() >= self.spec.world_size(),
                towards: self.spec.rendezvous().map(str::to_string),
            })
        });
        if let Some(plan) = plan {
            let bind = board_bind(bind.as_deref(), plan.one_machine, plan.towards.as_deref())?;
            return self.cancel.run(
                &self.control_rt,
                "joining the rendezvous",
                Session::join_on_board(
                    self.spec,
                    self.token,
                    plan.board,
                    &bind,
                    plan.one_machine,
                    self.config.connect_timeout,
                ),
            );
        }
        let token = self.token.ok_or_else(|| {
            Error::config(
                TOKEN_VAR,
                "is not set; every process of a job needs the same token",
            )
        })?;
        let external = std::env::var(tandem_rendezvous::EXTERNAL_VAR).is_ok_and(|v| v == "1");
        let session = self.cancel.run(
            &self.control_rt,
            "joining the rendezvous",
            Session::join(
                self.spec,
                token,
                bind.as_deref(),
                external,
                self.config.connect_timeout,
            ),
        )?;
        Ok((session, token.clone()))
    }

    /// Publishes this rank's ring address (and those of its other streams), learns everyone's,
    /// and connects the mesh, and one more mesh per extra stream per peer.
    fn connect_mesh(
        &self,
        client: &tandem_rendezvous::Client,
        rendezvous: &str,
        token: &JobToken,
    ) -> Result<(Mesh, Vec<Channel>, Vec<String>)> {
        let rank = self.spec.rank();
        let streams = self.config.streams_per_peer.max(1);
        let host = self
            .config
            .advertise_host
            .clone()
            .unwrap_or_else(|| advertise_host(rendezvous));
        let security = match &self.config.security {
            Some(s) => s.clone(),
            None => tandem_tls::Security::from_env()?,
        };
        let (listener, port, extra) = self.bind_listeners(&host, streams)?;
        let ports: Vec<String> = extra.iter().map(|(_, _, p)| p.to_string()).collect();
        let timeout = self.config.connect_timeout;
        let (addrs, their_ports) =
            self.exchange_addresses(client, &format!("{host}:{port}"), &ports.join(","))?;
        let channel_addrs = channel_addresses(&addrs, &their_ports, rank, streams)?;
        security.check_peers("the ring", &addrs)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let spec = |addrs, channel: usize| MeshSpec {
            rank,
            addrs,
            token,
            group: group_id(&channel_group(&self.config.name, channel)),
            security: &security,
            congestion: &self.congestion,
            job_ranks: self.config.name == crate::group::DEFAULT_NAME,
        };
        let (mesh, channels) = std::thread::scope(|s| {
            let mut threads = Vec::with_capacity(extra.len());
            for (i, (rt, listener, _)) in extra.into_iter().enumerate() {
                let (addrs, spec) = (&channel_addrs[i], &spec);
                threads.push(s.spawn(move || {
                    let mesh = self.cancel.run(
                        &rt,
                        "connecting the other streams to the other ranks",
                        establish(&listener, &spec(addrs, i + 1), deadline),
                    )?;
                    Ok::<_, Error>(Channel::new(rt, mesh))
                }));
            }
            let mesh = self.cancel.run(
                &self.ring_rt,
                "connecting to the other ranks",
                establish(&listener, &spec(&addrs, 0), deadline),
            );
            let channels: Result<Vec<Channel>> = threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(Error::Unusable {
                            what: "process group".into(),
                            reason: "connecting a stream panicked".into(),
                        })
                    })
                })
                .collect();
            Ok::<_, Error>((mesh?, channels?))
        })?;
        Ok((mesh, channels, addrs))
    }

    /// Binds the ring's listener (with its local socket) on the caller's runtime, and one more
    /// per extra stream, each on a runtime of its own (its sockets are driven by its own thread):
    /// the listener, its port, and the extra streams' runtimes, listeners and ports.
    #[allow(clippy::type_complexity)]
    fn bind_listeners(
        &self,
        host: &str,
        streams: usize,
    ) -> Result<(Listener, u16, Vec<(Runtime, Listener, u16)>)> {
        let bind = format!("{}:0", bind_host(host));
        let listen = |rt: &Runtime| -> Result<(Listener, u16)> {
            let listener = rt
                .block_on(Listener::bind(&bind))
                .map_err(|e| Error::io(format!("binding the ring listener to {bind}"), e))?;
            // Before any peer learns the address: accepted connections inherit it.
            self.congestion.apply(&listener.tcp);
            let port = listener
                .tcp
                .local_addr()
                .map_err(|e| Error::io("reading the ring listener address", e))?
                .port();
            Ok((listener, port))
        };
        let (listener, port) = listen(&self.ring_rt)?;
        let mut extra = Vec::with_capacity(streams.saturating_sub(1));
        for _ in 1..streams {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("starting a stream's runtime", e))?;
            let (listener, port) = listen(&rt)?;
            extra.push((rt, listener, port));
        }
        Ok((listener, port, extra))
    }

    /// Publishes this rank's ring address and its extra streams' ports, and waits for every
    /// rank's: (addresses, ports), by rank.
    fn exchange_addresses(
        &self,
        client: &tandem_rendezvous::Client,
        addr: &str,
        ports: &str,
    ) -> Result<(Vec<String>, Vec<bytes::Bytes>)> {
        let (rank, world) = (self.spec.rank(), self.spec.world_size());
        let prefix = &self.prefix;
        let timeout = self.config.connect_timeout;
        let (addrs, ports) =
            self.cancel
                .run(&self.control_rt, "exchanging ring addresses", async {
                    client
                        .set(&format!("{prefix}/streams/{rank}"), ports.to_string())
                        .await?;
                    client
                        .set(&format!("{prefix}/addr/{rank}"), addr.to_string())
                        .await?;
                    let keys = |what: &str| -> Vec<String> {
                        (0..world).map(|r| format!("{prefix}/{what}/{r}")).collect()
                    };
                    let (addrs, streams) = (keys("addr"), keys("streams"));
                    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
                    let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
                    let addrs = client.wait(&addrs, timeout).await?;
                    let streams = client.wait(&streams, timeout).await?;
                    Ok((addrs, streams))
                })?;
        let addrs = addrs
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Ok((addrs, ports))
    }

    /// Starts the task that turns an abort published by any rank (or the loss of the rendezvous)
    /// into this rank's abort signal, and answers a stall inquiry from any rank with what this
    /// rank is doing (`progress`), even while it is busy in its own code.
    fn watch_aborts(
        &self,
        client: &tandem_rendezvous::Client,
        progress: std::sync::Arc<crate::stall::Progress>,
    ) -> (watch::Receiver<Option<Abort>>, tokio::task::JoinHandle<()>) {
        let (abort_tx, abort_rx) = watch::channel(None);
        let hosted_by_rank0 =
            !std::env::var(tandem_rendezvous::EXTERNAL_VAR).is_ok_and(|v| v == "1");
        let rank = self.spec.rank();
        let client = client.clone();
        let key = format!("{}/abort", self.prefix);
        let (ask, answer) = (
            format!("{}/stall/ask", self.prefix),
            format!("{}/stall/state/{rank}", self.prefix),
        );
        let answering = client.clone();
        let aborts = async move {
            loop {
                match client.wait(&[&key], Duration::from_secs(3600)).await {
                    Ok(v) => {
                        let msg = v
                            .first()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .unwrap_or_default();
                        let abort =
                            Abort::decode(&msg).unwrap_or_else(|e| Abort::unreadable(&e, rank));
                        let _ = abort_tx.send(Some(abort));
                        return;
                    }
                    Err(Error::Timeout { .. }) => continue,
                    Err(e) => {
                        let abort = if hosted_by_rank0 {
                            Abort::PeerLost {
                                rank: 0,
                                context: format!("lost the rendezvous hosted by rank 0 ({e})"),
                            }
                        } else {
                            Abort::Other {
                                seen_by: rank,
                                message: format!("lost the rendezvous ({e})"),
                            }
                        };
                        let _ = abort_tx.send(Some(abort));
                        return;
                    }
                }
            }
        };
        // One inquiry per group: the first stall poisons it.
        let inquiries = async move {
            loop {
                match answering.wait(&[&ask], Duration::from_secs(3600)).await {
                    Ok(_) => {
                        let state = progress.state().encode();
                        if let Err(e) = answering.set(&answer, state).await {
                            tracing::warn!("could not answer a stall inquiry: {e}");
                        }
                        return;
                    }
                    Err(Error::Timeout { .. }) => continue,
                    Err(_) => return,
                }
            }
        };
        let watcher = self.control_rt.spawn(async move {
            tokio::join!(aborts, inquiries);
        });
        (abort_rx, watcher)
    }

    /// How a rank whose operation timed out asks every rank what it is doing: it raises the
    /// group's inquiry (once), then gathers the answers that come within the grace.
    fn stall_inquirer(
        &self,
        client: &tandem_rendezvous::Client,
    ) -> crate::backend::tcp_ring::Inquire {
        let client = client.clone();
        let handle = self.control_rt.handle().clone();
        let world = self.spec.world_size();
        let ask = format!("{}/stall/ask", self.prefix);
        let answers: Vec<String> = (0..world)
            .map(|r| format!("{}/stall/state/{r}", self.prefix))
            .collect();
        Box::new(move |grace: Duration| {
            let (c, ask, answers) = (client.clone(), ask.clone(), answers.clone());
            handle.block_on(async move {
                let end = tokio::time::Instant::now() + grace;
                let asked = tokio::time::timeout(grace, c.compare_and_set(&ask, None, "1")).await;
                match asked {
                    Err(_) => {
                        return Err(Error::timeout("an answer from the rendezvous", grace));
                    }
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(_)) => {}
                }
                let mut got: Vec<Option<RankState>> = vec![None; answers.len()];
                loop {
                    let missing: Vec<usize> =
                        (0..got.len()).filter(|r| got[*r].is_none()).collect();
                    let reads = missing.iter().map(|&r| {
                        let c = &c;
                        let key = &answers[r];
                        async move { (r, tokio::time::timeout_at(end, c.get(key)).await) }
                    });
                    for (r, v) in futures::future::join_all(reads).await {
                        if let Ok(Ok(Some(v))) = v {
                            match RankState::decode(&String::from_utf8_lossy(&v)) {
                                Ok(s) => got[r] = Some(s),
                                Err(e) => tracing::debug!(rank = r, "{e}"),
                            }
                        }
                    }
                    if got.iter().all(Option::is_some) || tokio::time::Instant::now() >= end {
                        return Ok(got);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
    }

    /// How the ring publishes its first failure for every other rank to see (first writer wins).
    fn abort_publisher(&self, client: &tandem_rendezvous::Client) -> Publish {
        let client = client.clone();
        let handle = self.control_rt.handle().clone();
        let key = format!("{}/abort", self.prefix);
        Box::new(move |abort: Abort| {
            let msg = abort.encode();
            let c = client.clone();
            let key = key.clone();
            let _ = handle.block_on(async move {
                tokio::time::timeout(Duration::from_secs(2), c.compare_and_set(&key, None, msg))
                    .await
            });
        })
    }
}
