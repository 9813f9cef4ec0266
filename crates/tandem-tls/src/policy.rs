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
pub const INSECURE_VAR: &str = "TANDEM_INSECURE";

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
        static CACHE: OnceLock<std::result::Result<Security, String>> = OnceLock::new();
        CACHE
            .get_or_init(|| Self::from_vars(&ProcessEnv).map_err(|e| e.to_string()))
            .clone()
            .map_err(|e| Error::config(DIR_VAR, e))
    }

    /// `TANDEM_INSECURE=1`: plaintext (with a warning); else certificates named by the variables:
    /// TLS; else plaintext for loopback only.
    pub fn from_vars(vars: &dyn Vars) -> Result<Security> {
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

    /// Checks that `what` may use `addrs` (`host:port` or hosts): always under TLS or when
    /// insecure; otherwise only if every one is a loopback address. The error says how to get
    /// certificates.
    pub fn check_peers<S: AsRef<str>>(&self, what: &str, addrs: &[S]) -> Result<()> {
        if !matches!(self, Security::Plaintext { insecure: false }) {
            return Ok(());
        }
        match addrs.iter().map(AsRef::as_ref).find(|a| !is_loopback(a)) {
            None => Ok(()),
            Some(a) => Err(Error::config(
                DIR_VAR,
                format!(
                    "is not set, and {what} reaches {a}, which is not on this machine's loopback: \
                     Tandem encrypts every connection between hosts. Make the job's certificates \
                     with `tandem certs init DIR --name HOST ...` and point {DIR_VAR} at them on \
                     every process (`tandem launch` does this by itself), or set {INSECURE_VAR}=1 \
                     to send everything in clear"
                ),
            )),
        }
    }
}

fn insecure(vars: &dyn Vars) -> Result<bool> {
    match vars.var(INSECURE_VAR).as_deref() {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(Error::config(
            INSECURE_VAR,
            format!("is {other:?}; give 1 (plaintext between hosts) or 0"),
        )),
    }
}

/// Prints, once per process, that nothing is encrypted.
pub fn warn_insecure() {
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

    struct Map(HashMap<&'static str, String>);
    impl Vars for Map {
        fn raw(&self, k: &str) -> Option<String> {
            self.0.get(k).cloned()
        }
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
        let with = |v: &str| Map(HashMap::from([(INSECURE_VAR, v.to_string())]));
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
        let e = Security::from_vars(&with("yes")).unwrap_err().to_string();
        assert!(e.contains(INSECURE_VAR) && e.contains("yes"), "{e}");
        assert!(matches!(
            Security::from_vars(&Map(HashMap::new())),
            Ok(Security::Plaintext { insecure: false })
        ));
    }
}
