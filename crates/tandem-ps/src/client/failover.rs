//! Failing over to a server's standby. Each server may have a standby (another server process
//! holding its replicated state); the client learns its address from the server's answers
//! (declaration, pulls) and, when the server stays unreachable for [`FAILOVER_AFTER`], sends that
//! server's calls to the standby from then on. The standby's first worker call promotes it; its
//! incarnation differs from the primary's, so the pull that follows answers at once with its
//! version, and the worker resumes from there like after a restart from a checkpoint, except that
//! the standby holds every update the primary published.

use std::sync::RwLock;

use super::*;

/// How long a server must stay unreachable before its calls go to its standby: a killed process
/// refuses connections at once, and a brief network hiccup should not move a whole job.
pub(super) const FAILOVER_AFTER: Duration = Duration::from_secs(1);

/// Where one server's calls go.
#[derive(Debug)]
struct Route {
    /// The channel to the server (or its standby once failed over).
    grpc: Grpc,
    /// The address of the server the channel reaches.
    addr: String,
    /// The standby's address (empty: none known).
    standby: String,
    /// The calls already go to the standby.
    failed_over: bool,
}

/// Every server's route.
#[derive(Debug)]
pub(super) struct Routes(RwLock<Vec<Route>>);

impl Routes {
    /// One route per server, none failed over yet.
    pub(super) fn new(servers: Vec<Grpc>, addrs: &[String]) -> Self {
        Routes(RwLock::new(
            servers
                .into_iter()
                .zip(addrs)
                .map(|(grpc, addr)| Route {
                    grpc,
                    addr: addr.clone(),
                    standby: String::new(),
                    failed_over: false,
                })
                .collect(),
        ))
    }
}

impl Client {
    /// The servers' routes as they stand (a failover rewrites one).
    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Vec<Route>> {
        self.routes.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Server `s`'s channel (its standby's once failed over).
    pub(super) fn grpc(&self, s: usize) -> Grpc {
        self.routes()[s].grpc.clone()
    }

    /// Server `s`'s address (its standby's once failed over).
    pub(super) fn addr(&self, s: usize) -> String {
        self.routes()[s].addr.clone()
    }

    /// How many servers.
    pub(super) fn server_count(&self) -> usize {
        self.routes().len()
    }

    /// Records server `s`'s standby, as the server said (empty: none).
    pub(super) fn learn_standby(&self, s: usize, standby: &str) {
        if standby.is_empty() {
            return;
        }
        let mut routes = self.routes.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = routes
            .get_mut(s)
            .filter(|r| !r.failed_over && r.standby != standby)
        {
            tracing::debug!(server = %r.addr, %standby, "the server has a standby");
            r.standby = standby.to_string();
        }
    }

    /// Sends server `s`'s calls to its standby from now on, if it has one and they do not go
    /// there already; returns whether they do now.
    pub(super) async fn fail_over(&self, s: usize, why: &str) -> bool {
        let (standby, from) = {
            let routes = self.routes();
            let r = &routes[s];
            if r.failed_over || r.standby.is_empty() {
                return false;
            }
            (r.standby.clone(), r.addr.clone())
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let grpc = match connect_one(&standby, &self.token, &self.security, deadline, None).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(server = %from, %standby, error = %e, "cannot reach the server's standby either");
                return false;
            }
        };
        {
            let mut routes = self.routes.0.write().unwrap_or_else(|p| p.into_inner());
            let r = &mut routes[s];
            if !r.failed_over {
                tracing::warn!(server = %from, %standby, reason = %why, "parameter server unreachable: failing over to its standby");
                r.grpc = grpc;
                r.addr = standby;
                r.failed_over = true;
            }
        }
        // The standby is another process: tensors go through its stream.
        if let Some(pid) = self.shared.get(s) {
            pid.store(0, Ordering::Relaxed);
        }
        true
    }
}
