//! When a connection is encrypted: TLS whenever the process has certificates; plaintext only
//! between loopback addresses, or anywhere when the user says so (`TANDEM_INSECURE=1`), with a
//! warning at every start.

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};

use tandem_core::cluster::{ProcessEnv, Vars};
use tandem_core::{Error, Result};

use crate::context::TlsContext;
use crate::files::{DIR_VAR, TlsFiles};

/// `1` lets a job's processes talk plaintext across hosts (and ignore their certificates).
pub const INSECURE_VAR: &str = tandem_core::settings::INSECURE.name;

/// Why this process's security could not be read from its environment, kept to be returned to
/// every later caller (`tandem_core::Error` is not `Clone`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
struct Unreadable(String);

/// How this process's connections are secured.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS with the job's certificates.
    Tls(Arc<TlsContext>),
    /// No encryption: allowed only to loopback addresses unless `insecure`.
    Plaintext {
        /// The user asked for plaintext everywhere.
        insecure: bool,
    },
}

impl Security {
    /// TLS with these certificates.
    pub fn tls(context: TlsContext) -> Security {
        Security::Tls(Arc::new(context))
    }

    /// Plaintext, for loopback only.
    pub fn loopback_only() -> Security {
        Security::Plaintext { insecure: false }
    }

    /// This process's security, from its environment (read once per process; see
    /// [`Security::from_vars`]).
    pub fn from_env() -> Result<Security> {
        /// Read once (an error kept, as its words, to be returned again).
        static CACHE: OnceLock<std::result::Result<Security, Unreadable>> = OnceLock::new();
        CACHE
            .get_or_init(|| Self::from_vars(&ProcessEnv).map_err(|e| Unreadable(e.to_string())))
            .clone()
            .map_err(|e| Error::config(DIR_VAR, e.0))
    }

    /// `TANDEM_INSECURE=1`: plaintext (with a warning); else certificates named by the variables:
    /// TLS; else plaintext for loopback only.
    pub fn from_vars(vars: &dyn Vars) -> Result<Security> {
        // Read here so a bad value fails the start, not silently later.
        crate::local::from_vars(vars)?;
        if insecure(vars)? {
            warn_insecure();
            return Ok(Security::Plaintext { insecure: true });
        }
        match TlsFiles::from_vars(vars)? {
            Some(files) => {
                let context = TlsContext::load(&files)?;
                tracing::debug!(name = context.name(), "TLS on every connection");
                Ok(Security::tls(context))
            }
            None => Ok(Security::loopback_only()),
        }
    }

    /// Whether connections are encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// Who this process is in its job, when its certificate names it.
    pub fn identity(&self) -> Option<&crate::identity::Identity> {
        match self {
            Security::Tls(ctx) => ctx.identity(),
            Security::Plaintext { .. } => None,
        }
    }

    /// Checks the peer of `stream` for a connection of `what` (see
    /// [`crate::identity::check_peer`]); a local socket's peer passes (see [`crate::local`]).
    pub fn check_peer(
        &self,
        stream: &crate::stream::Stream,
        what: &str,
        expected: &dyn Fn(&crate::identity::Role) -> bool,
    ) -> std::result::Result<(), crate::identity::PeerRefused> {
        // The kernel vouched for a local socket's peer: a process of this user (see
        // crate::local), trusted whatever its role.
        if stream.is_local() {
            return Ok(());
        }
        let cert = stream.peer_certificate();
        crate::identity::check_peer(self.identity(), cert.as_deref(), what, expected)
    }

    /// Checks that `what` may use `addrs` (`host:port` or hosts): always under TLS or when
    /// insecure; otherwise only if every one is a loopback address. The error says how to get
    /// certificates.
    pub fn check_peers<S: AsRef<str>>(&self, what: &str, addrs: &[S]) -> Result<()> {
        if !matches!(self, Security::Plaintext { insecure: false }) {
            return Ok(());
        }
        match addrs.iter().map(AsRef::as_ref).find(|a| !is_loopback(a)) {
            None => Ok(()),
            Some(a) => Err(not_loopback(what, a)),
        }
    }
}

/// Why a process without certificates may not reach `a`.
fn not_loopback(what: &str, a: &str) -> Error {
    Error::config(
        DIR_VAR,
        format!(
            "is not set, and {what} reaches {a}, which is not on this machine's loopback: \
             Tandem encrypts every connection between hosts. Make the job's certificates \
             with `tandem certs init DIR --name HOST ...` and point {DIR_VAR} at them on \
             every process (`tandem launch` does this by itself), or set {INSECURE_VAR}=1 \
             to send everything in clear"
        ),
    )
}

/// `TANDEM_INSECURE`: off unless switched on.
fn insecure(vars: &dyn Vars) -> Result<bool> {
    Ok(tandem_core::settings::INSECURE
        .switch(vars)?
        .unwrap_or(false))
}

impl Security {
    /// Resolves `addr` (`host:port`) once, for a connection of `what`, and returns the addresses
    /// this process may connect to: every one under TLS or `TANDEM_INSECURE=1`, else the loopback
    /// ones only (an error naming the address, and how to get certificates, when none is). Connect
    /// to what this returns, never to the name again: the address checked is the address used.
    pub async fn resolve(&self, what: &str, addr: &str) -> Result<Vec<std::net::SocketAddr>> {
        let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::io(format!("resolving {addr} for {what}"), e))?
            .collect();
        if !matches!(self, Security::Plaintext { insecure: false }) {
            return Ok(found);
        }
        let near: Vec<_> = found
            .iter()
            .copied()
            .filter(|a| a.ip().is_loopback())
            .collect();
        if near.is_empty() {
            return Err(not_loopback(what, addr));
        }
        Ok(near)
    }
}

/// Prints, once per process, that nothing is encrypted.
pub fn warn_insecure() {
    /// Set once the warning was printed.
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let msg = format!(
            "{INSECURE_VAR}=1: this process sends its job token and tensors in clear; anyone on \
             the network can read them and inject data"
        );
        // Once: through the logs when the process has a subscriber, else straight to stderr.
        if tracing::dispatcher::has_been_set() {
            tracing::warn!("{msg}");
        } else {
            eprintln!("tandem: warning: {msg}");
        }
    });
}

/// Whether `addr` (`host:port`, `[v6]:port` or a bare host) resolves to loopback addresses only.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match (host, 0u16).to_socket_addrs() {
        Ok(mut a) => {
            let all: Vec<_> = a.by_ref().collect();
            !all.is_empty() && all.iter().all(|s| s.ip().is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Without certificates a name is resolved once and only its loopback addresses are dialled;
    /// anything else is refused naming the address. With TLS or TANDEM_INSECURE=1 every address is.
    #[tokio::test]
    async fn resolve_keeps_loopback_only_without_certificates() {
        let plain = Security::loopback_only();
        let near = plain.resolve("t", "127.0.0.1:5").await.expect("loopback");
        assert_eq!(near, ["127.0.0.1:5".parse().expect("addr")]);
        let local = plain.resolve("t", "localhost:5").await.expect("localhost");
        assert!(
            !local.is_empty() && local.iter().all(|a| a.ip().is_loopback()),
            "{local:?}"
        );
        let e = plain
            .resolve("the test", "10.255.255.1:5")
            .await
            .expect_err("not loopback")
            .to_string();
        assert!(
            e.contains("the test reaches 10.255.255.1:5") && e.contains("loopback"),
            "{e}"
        );
        let insecure = Security::Plaintext { insecure: true };
        assert_eq!(
            insecure
                .resolve("t", "10.255.255.1:5")
                .await
                .expect("insecure")
                .len(),
            1
        );
    }

    /// Every gRPC connection applies the rule where it connects (a standby's or failover's
    /// address included): refused before any packet is sent, as a refusal (not worth retrying).
    #[tokio::test]
    async fn the_grpc_connector_refuses_far_addresses_without_certificates() {
        use tower_service::Service;
        let mut c = crate::grpc::Connector::new(Security::loopback_only());
        let far = c
            .call("http://10.255.255.1:9".parse().expect("uri"))
            .await
            .expect_err("a far address in plaintext");
        assert!(far.refused && far.reason.contains("loopback"), "{far:?}");
        // A loopback address is dialled (nobody listens here: the connection itself fails).
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let near = c
            .call(format!("http://127.0.0.1:{port}").parse().expect("uri"))
            .await
            .expect_err("nobody listens");
        assert!(!near.refused, "{near:?}");
    }

    #[test]
    fn loopback_addresses() {
        for a in [
            "127.0.0.1:29500",
            "127.0.0.9:1",
            "[::1]:80",
            "::1",
            "localhost:5",
            "127.0.0.1",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["10.0.0.1:29500", "0.0.0.0:1", "[::]:80", "192.168.1.1"] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn plaintext_is_refused_beyond_loopback_only() {
        let s = Security::loopback_only();
        assert!(
            s.check_peers("the ring", &["127.0.0.1:1", "[::1]:2"])
                .is_ok()
        );
        let e = s
            .check_peers("the ring", &["127.0.0.1:1", "10.1.2.3:4"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.1.2.3:4") && e.contains("tandem certs init"),
            "{e}"
        );
        assert!(e.contains(INSECURE_VAR), "{e}");
        let insecure = Security::Plaintext { insecure: true };
        assert!(insecure.check_peers("the ring", &["10.1.2.3:4"]).is_ok());
    }

    #[test]
    fn insecure_variable_values() {
        let with = |v: &str| HashMap::from([(INSECURE_VAR, v.to_string())]);
        assert!(matches!(
            Security::from_vars(&with("1")),
            Ok(Security::Plaintext { insecure: true })
        ));
        for v in ["0", ""] {
            assert!(matches!(
                Security::from_vars(&with(v)),
                Ok(Security::Plaintext { insecure: false })
            ));
        }
        let e = Security::from_vars(&with("plain")).unwrap_err().to_string();
        assert!(e.contains(INSECURE_VAR) && e.contains("plain"), "{e}");
        assert!(matches!(
            Security::from_vars(&HashMap::<&str, String>::new()),
            Ok(Security::Plaintext { insecure: false })
        ));
    }
}
