//! Joining a job: rank 0 hosts the rendezvous in-process, everyone connects to it.
//!
//! Why rank 0 hosts it: a job needs no separate service to start (torchrun's and mpirun's jobs
//! have none), and the first rank is the one every convention names. A launcher that hosts one
//! itself says so (`TANDEM_RENDEZVOUS_EXTERNAL=1`); when another program owns the agreed port (the
//! Store torch hands its backend), rank 0 binds a free port and publishes it on that board.

use std::time::Duration;

use tandem_core::{ClusterSpec, Error, Result};

use crate::auth::{JobToken, TOKEN_VAR};
use crate::board::{Board, Published};
use crate::client::Client;
use crate::server::{Host, ServerConfig};

/// The variable that overrides the address rank 0 binds for the rendezvous (e.g. `0.0.0.0:29500`).
pub const BIND_VAR: &str = tandem_core::settings::RENDEZVOUS_BIND.name;

/// Set to `1` by launchers that host the rendezvous themselves, so rank 0 does not bind it again.
pub const EXTERNAL_VAR: &str = tandem_core::settings::RENDEZVOUS_EXTERNAL.name;

/// A process's membership of a job: its client, and the server when this process hosts it.
#[derive(Debug)]
pub struct Session {
    /// The connection to the rendezvous.
    pub client: Client,
    /// The rendezvous this process hosts, if it does.
    host: Option<Host>,
    /// The spec joined with.
    spec: ClusterSpec,
    /// The file this process published the rendezvous address in (an MPI job's rank 0).
    published: Option<std::path::PathBuf>,
}

/// The address others reach a rendezvous bound at `bind` by: its host with the bound port, or
/// the bound address itself for a wildcard bind.
fn advertised(bind: &str, bound: std::net::SocketAddr) -> String {
    match bind.rsplit_once(':') {
        Some((h, _)) if !h.is_empty() && h != "0.0.0.0" && h != "[::]" => {
            format!("{h}:{}", bound.port())
        }
        _ => bound.to_string(),
    }
}

impl Session {
    /// Joins the job described by `spec`: unless `external`, rank 0 binds the rendezvous address (or
    /// `bind`, when given); then every rank connects within `deadline`.
    pub async fn join(
        spec: &ClusterSpec,
        token: &JobToken,
        bind: Option<&str>,
        external: bool,
        deadline: Duration,
    ) -> Result<Session> {
        let var = |k: &str| std::env::var(k).ok();
        if let Some(file) = crate::discovery::job_file(spec, var) {
            return Self::join_by_file(spec, token, bind, external, deadline, file).await;
        }
        let addr = spec.require_rendezvous()?.to_string();
        let host = if spec.hosts_rendezvous() && !external {
            let bind = bind.unwrap_or(&addr);
            let host = Host::bind(bind, ServerConfig::new(token.clone())).await?;
            tracing::info!(addr = %host.addr(), "hosting the rendezvous");
            Some(host)
        } else {
            None
        };
        let client = Client::connect(&addr, token, deadline).await?;
        Ok(Session {
            client,
            host,
            spec: spec.clone(),
            published: None,
        })
    }

    /// An MPI job whose launcher names no rendezvous ([`crate::discovery`]): rank 0 binds one on
    /// an ephemeral port and publishes its address in `file`; the others wait for it.
    async fn join_by_file(
        spec: &ClusterSpec,
        token: &JobToken,
        bind: Option<&str>,
        external: bool,
        deadline: Duration,
        file: std::path::PathBuf,
    ) -> Result<Session> {
        let (addr, host, published) = if spec.hosts_rendezvous() && !external {
            let var = |k: &str| std::env::var(k).ok();
            let bind = match bind {
                Some(b) => b.to_string(),
                None => crate::discovery::bind_address(spec, var)?,
            };
            let host = Host::bind(&bind, ServerConfig::new(token.clone())).await?;
            let port = host.addr().port();
            let advertised = match bind.rsplit_once(':') {
                Some((h, _)) => format!("{h}:{port}"),
                None => host.addr().to_string(),
            };
            crate::discovery::publish(&file, &advertised)?;
            tracing::info!(addr = %advertised, file = %file.display(), "hosting the rendezvous, published in a file");
            (advertised, Some(host), Some(file))
        } else {
            (
                crate::discovery::wait_for(&file, deadline).await?,
                None,
                None,
            )
        };
        let client = Client::connect(&addr, token, deadline).await?;
        Ok(Session {
            client,
            host,
            spec: spec.clone().with_rendezvous(addr),
            published,
        })
    }

    /// Joins through a [`Board`]: rank 0 binds the rendezvous on `bind` (port 0 for an ephemeral
    /// one) and publishes its address there; the others read it. When `token` is `None`, rank 0
    /// makes one if `one_machine` and publishes it with the address (the others take it from
    /// there); across machines a token must be configured. Returns the session and the job token
    /// every rank now shares.
    pub async fn join_on_board(
        spec: &ClusterSpec,
        token: Option<&JobToken>,
        board: std::sync::Arc<dyn Board>,
        bind: &str,
        one_machine: bool,
        deadline: Duration,
    ) -> Result<(Session, JobToken)> {
        let missing = || {
            Error::config(
                TOKEN_VAR,
                "is not set; a job on several machines needs the same token in every process (tandem certs and tandem launch make one)",
            )
        };
        let (addr, host, token) = if spec.hosts_rendezvous() {
            let (token, share) = match token {
                Some(t) => (t.clone(), false),
                None if one_machine => (JobToken::generate(), true),
                None => return Err(missing()),
            };
            let host = Host::bind(bind, ServerConfig::new(token.clone())).await?;
            let advertised = advertised(bind, host.addr());
            let record = Published {
                addr: advertised.clone(),
                token: share.then(|| token.as_str().to_string()),
            };
            let b = board.clone();
            tokio::task::spawn_blocking(move || b.publish(&record, deadline))
                .await
                .map_err(|e| Error::transport("publishing the rendezvous", e.to_string()))??;
            tracing::info!(addr = %advertised, board = %board.describe(), "hosting the rendezvous, published on the board");
            (advertised, Some(host), token)
        } else {
            let b = board.clone();
            let record = tokio::task::spawn_blocking(move || b.lookup(deadline))
                .await
                .map_err(|e| Error::transport("reading the rendezvous", e.to_string()))??;
            let token = match (record.token, token) {
                (Some(t), _) => JobToken::new(t)?,
                (None, Some(t)) => t.clone(),
                (None, None) => return Err(missing()),
            };
            (record.addr, None, token)
        };
        let client = Client::connect(&addr, &token, deadline).await?;
        Ok((
            Session {
                client,
                host,
                spec: spec.clone().with_rendezvous(addr),
                published: None,
            },
            token,
        ))
    }

    /// Joins with the spec, token and bind address from the environment.
    pub async fn join_from_env(deadline: Duration) -> Result<Session> {
        let spec = ClusterSpec::from_env()?;
        let token = JobToken::from_env()?.ok_or_else(|| {
            Error::config(
                TOKEN_VAR,
                "is not set; every process of a job needs the same token (tandem launch sets one)",
            )
        })?;
        let env = tandem_core::cluster::ProcessEnv;
        let bind = tandem_core::settings::RENDEZVOUS_BIND.text(&env)?;
        let external = tandem_core::settings::RENDEZVOUS_EXTERNAL
            .switch(&env)?
            .unwrap_or(false);
        Self::join(&spec, &token, bind.as_deref(), external, deadline).await
    }

    /// The spec this session was joined with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Whether this process hosts the rendezvous.
    pub fn is_host(&self) -> bool {
        self.host.is_some()
    }

    /// Leaves the job. The host first waits (up to `deadline`) until every rank has left, so no rank
    /// loses the rendezvous mid-call.
    pub async fn leave(self, deadline: Duration) -> Result<()> {
        let n = self.spec.world_size();
        let r = self
            .client
            .barrier("tandem/leave", n, self.spec.rank(), deadline)
            .await;
        if let Some(file) = &self.published {
            let _ = std::fs::remove_file(file);
        }
        if let Some(h) = self.host {
            h.stop().await?;
        }
        r
    }
}
