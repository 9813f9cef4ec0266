//! Which TCP congestion control the collectives' ring connections use: [`Congestion`], read from
//! `TANDEM_TCP_CONGESTION`, checked once against the kernel ([`Congestion::resolve`]) and set on
//! every connection before it opens ([`CongestionChoice::connect`], [`CongestionChoice::apply`]).
//! The parameter server's and the rendezvous's gRPC connections keep the system's: their steps
//! leave the links idle often enough for BBR to see the path (measured: no difference).
//!
//! Why Tandem chooses one: collectives keep every link busy in both directions at once. A rank of a
//! ring sends to one neighbour while acknowledging the other, so its acknowledgements wait in the
//! same queue as its own data, and the round trip its neighbour measures is that queue's depth,
//! never the path's. BBR (v1, as in Linux) drains a connection to four packets for 200 ms whenever
//! it has not seen a new minimum round trip for 10 s ("ProbeRTT"); behind a queue of data four
//! packets per round trip are a trickle, so the link idles for those 200 ms, and on a ring one idle
//! link stalls every rank. Loss-based cubic (Linux's default) has no such phase. So, unless
//! `TANDEM_TCP_CONGESTION` says otherwise, the connections use cubic where the kernel lets the
//! process choose it, and the system's default otherwise:
//!
//! - unset: cubic when the kernel allows it (root, or cubic listed in
//!   `net.ipv4.tcp_allowed_congestion_control`), else the system's default (said once in the log);
//! - `system`: the system's default (`net.ipv4.tcp_congestion_control`), whatever it is;
//! - a name (`cubic`, `reno`, `bbr`, `dctcp`, ...): that one, or an error naming the variable and
//!   the kernel's reason before any connection is made.
//!
//! ```
//! use tandem_collective::transport::congestion::Congestion;
//! let c: Congestion = "reno".parse()?;
//! // Reno is built into every Linux kernel and allowed to every process.
//! assert_eq!(c.resolve()?.name(), Some("reno"));
//! assert!("no such one".parse::<Congestion>().is_err());
//! # Ok::<(), tandem_core::Error>(())
//! ```

use std::fmt;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_core::{Error, Result};

/// The variable that chooses the congestion control of the ring's TCP connections.
pub const CONGESTION_VAR: &str = tandem_core::settings::TCP_CONGESTION.name;

/// What the connections use when [`CONGESTION_VAR`] is unset and the kernel allows it.
pub const PREFERRED: &str = "cubic";

/// The longest name the kernel takes (`TCP_CA_NAME_MAX` less its terminating zero).
pub const MAX_NAME_LEN: usize = 15;

/// Where the kernel lists what it has, what unprivileged processes may choose, and its default.
const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
/// What the kernel lets unprivileged processes choose.
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
/// The system's congestion control.
const DEFAULT: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// Which congestion control a process asks for (see the module's documentation for why).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Congestion {
    /// [`PREFERRED`] where the kernel allows it, the system's default otherwise (the default).
    #[default]
    Preferred,
    /// The system's default, untouched (`system`).
    System,
    /// This algorithm, or an error.
    Named(String),
}

impl std::str::FromStr for Congestion {
    type Err = Error;

    fn from_str(v: &str) -> Result<Self> {
        let name_like = (1..=MAX_NAME_LEN).contains(&v.len())
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        match v {
            "system" => Ok(Congestion::System),
            _ if name_like => Ok(Congestion::Named(v.to_string())),
            _ => Err(Error::config(
                CONGESTION_VAR,
                format!(
                    "expected `system` or the name of a TCP congestion control (1 to \
                     {MAX_NAME_LEN} letters, digits, `_` or `-`, e.g. cubic), got {v:?}"
                ),
            )),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Congestion::Preferred => write!(f, "{PREFERRED} where allowed"),
            Congestion::System => f.write_str("system"),
            Congestion::Named(n) => f.write_str(n),
        }
    }
}

/// The algorithm connections are set to, once checked against the kernel; `None`: the system's
/// default, left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CongestionChoice(Option<String>);

/// Said at most once per process: the preferred algorithm was refused.
static FELL_BACK: AtomicBool = AtomicBool::new(false);

impl Congestion {
    /// Reads [`CONGESTION_VAR`] as every `TANDEM_*` variable is read (trimmed; empty is unset);
    /// unset is [`Congestion::Preferred`].
    pub fn from_env() -> Result<Self> {
        match tandem_core::settings::TCP_CONGESTION.text(&tandem_core::cluster::ProcessEnv)? {
            Some(v) => v.parse(),
            None => Ok(Congestion::Preferred),
        }
    }

    /// Checks the choice against the kernel on a fresh socket, so a refusal is named before any
    /// connection is made: a [`Congestion::Named`] algorithm the kernel lacks or does not allow
    /// this process is an error naming [`CONGESTION_VAR`]; [`Congestion::Preferred`] falls back to
    /// the system's default (logged once).
    pub fn resolve(&self) -> Result<CongestionChoice> {
        match self {
            Congestion::System => Ok(CongestionChoice(None)),
            Congestion::Preferred => choose(PREFERRED, true),
            Congestion::Named(n) => choose(n, false),
        }
    }
}

/// `name` if a fresh socket takes it; otherwise the system's default when `fall_back`, else an
/// error naming [`CONGESTION_VAR`] and the kernel's reason.
fn choose(name: &str, fall_back: bool) -> Result<CongestionChoice> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| Error::io("opening a socket to check the TCP congestion control", e))?;
    match probe.set_tcp_congestion(name.as_bytes()) {
        Ok(()) => Ok(CongestionChoice(Some(name.to_string()))),
        Err(e) if fall_back => {
            if !FELL_BACK.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    system = %system_default().unwrap_or_else(|| "unknown".into()),
                    reason = %refusal(name, &e),
                    "the ring's TCP connections keep the system's congestion control ({CONGESTION_VAR}=system \
                     says so without this line; see tandem_collective::transport::congestion for why {PREFERRED} is \
                     preferred)"
                );
            }
            Ok(CongestionChoice(None))
        }
        Err(e) => Err(Error::config(CONGESTION_VAR, refusal(name, &e))),
    }
}

/// Why the kernel refused `name`, with the lists that say what it would take.
fn refusal(name: &str, e: &std::io::Error) -> String {
    let list = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    };
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "this kernel has no congestion control named {name:?} (it has: {})",
            list(AVAILABLE)
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "this process may not choose {name:?}: without CAP_NET_ADMIN only those in \
             net.ipv4.tcp_allowed_congestion_control may be chosen ({})",
            list(ALLOWED)
        ),
        _ => format!("the kernel refused {name:?}: {e}"),
    }
}

/// The system's default congestion control (`net.ipv4.tcp_congestion_control` of this process's
/// network namespace), if it can be read.
pub fn system_default() -> Option<String> {
    let s = std::fs::read_to_string(DEFAULT).ok()?;
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

impl CongestionChoice {
    /// The system's default, left alone.
    pub fn system() -> Self {
        CongestionChoice(None)
    }

    /// The algorithm set on each connection; `None`: the system's default.
    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Connects to `addr` (`host:port`; each address it resolves to in turn, like
    /// `TcpStream::connect`) with the choice set before the connection opens. Set afterwards, the
    /// system's algorithm has already initialised the connection, and a BBR default leaves it
    /// pacing its sends (one small burst at a time) whatever it is switched to.
    pub async fn connect(&self, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
        let targets: Vec<_> = tokio::net::lookup_host(addr).await?.collect();
        self.connect_to(addr, &targets).await
    }

    /// [`CongestionChoice::connect`] to addresses resolved already (`addr` names them in errors).
    pub async fn connect_to(
        &self,
        addr: &str,
        targets: &[std::net::SocketAddr],
    ) -> std::io::Result<tokio::net::TcpStream> {
        let mut last = None;
        for &a in targets {
            let socket = if a.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            self.apply(&socket);
            match socket.connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{addr} resolves to no address"),
            )
        }))
    }

    /// Sets the choice on a TCP socket: before it connects, or on a listener before it accepts
    /// (accepted connections inherit it), so the system's algorithm never starts them (see
    /// [`CongestionChoice::connect`]). The kernel accepted it on a fresh socket already, so a
    /// refusal here is only logged: the connection works with the system's default.
    pub fn apply(&self, socket: &impl AsFd) {
        let Some(name) = &self.0 else {
            return;
        };
        if let Err(e) = socket2::SockRef::from(socket).set_tcp_congestion(name.as_bytes()) {
            tracing::warn!(algorithm = %name, error = %e, "could not set the TCP congestion control");
        }
    }
}

impl fmt::Display for CongestionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(n) => f.write_str(n),
            None => match system_default() {
                Some(d) => write!(f, "{d} (the system's)"),
                None => f.write_str("the system's"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The congestion control a TCP socket uses, if it is one.
    fn of_socket(socket: &impl AsFd) -> Option<String> {
        let name = socket2::SockRef::from(socket).tcp_congestion().ok()?;
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        Some(String::from_utf8_lossy(name).into_owned()).filter(|s| !s.is_empty())
    }

    #[test]
    fn names_are_read_and_bad_ones_are_named() {
        assert_eq!(
            "system".parse::<Congestion>().ok(),
            Some(Congestion::System)
        );
        for ok in ["cubic", "bbr", "reno", "a", "abcdefghijklmno", "my_cc-2"] {
            assert_eq!(
                ok.parse::<Congestion>().ok(),
                Some(Congestion::Named(ok.into())),
                "{ok}"
            );
        }
        for bad in ["", "abcdefghijklmnop", "cu bic", "cubic\0", "cübic", "a/b"] {
            let e = bad.parse::<Congestion>().expect_err(bad).to_string();
            assert!(
                e.contains(CONGESTION_VAR) && e.contains("system"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn a_named_algorithm_is_set_on_the_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let reno = Congestion::Named("reno".into()).resolve().expect("reno");
        assert_eq!(reno.name(), Some("reno"));
        reno.apply(&client);
        reno.apply(&server);
        assert_eq!(of_socket(&client).as_deref(), Some("reno"));
        assert_eq!(of_socket(&server).as_deref(), Some("reno"));
        // The system's choice leaves a socket as the kernel made it.
        let fresh =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let system = Congestion::System.resolve().expect("system");
        assert_eq!(system, CongestionChoice::system());
        system.apply(&fresh);
        assert_eq!(of_socket(&fresh), system_default());
    }

    #[test]
    fn an_algorithm_the_kernel_lacks_is_an_error_naming_it() {
        let e = Congestion::Named("nosuchcc".into())
            .resolve()
            .expect_err("no such algorithm")
            .to_string();
        assert!(
            e.contains(CONGESTION_VAR) && e.contains("nosuchcc") && e.contains("has: "),
            "{e}"
        );
    }

    #[test]
    fn choices_and_refusals_are_said_in_words() {
        assert_eq!(Congestion::Preferred.to_string(), "cubic where allowed");
        assert_eq!(Congestion::System.to_string(), "system");
        assert_eq!(Congestion::Named("reno".into()).to_string(), "reno");
        assert_eq!(CongestionChoice(Some("reno".into())).to_string(), "reno");
        let system = CongestionChoice::system().to_string();
        assert!(
            system.ends_with("(the system's)") || system == "the system's",
            "{system}"
        );
        if let Some(d) = system_default() {
            assert!(system.starts_with(&d), "{system}");
        }
        let denied = refusal(
            "cubic",
            &std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(
            denied.contains("CAP_NET_ADMIN") && denied.contains("\"cubic\""),
            "{denied}"
        );
        let missing = refusal("x", &std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(
            missing.contains("no congestion control named \"x\""),
            "{missing}"
        );
        let other = refusal("x", &std::io::Error::from(std::io::ErrorKind::InvalidInput));
        assert!(other.starts_with("the kernel refused \"x\""), "{other}");
    }

    #[test]
    fn a_refused_preferred_algorithm_falls_back_to_the_systems_and_a_named_one_fails() {
        assert_eq!(
            choose("nosuchcc", true).ok(),
            Some(CongestionChoice::system())
        );
        assert!(choose("nosuchcc", false).is_err());
        assert_eq!(
            choose("reno", true).ok().as_ref().and_then(|c| c.name()),
            Some("reno")
        );
    }

    #[test]
    fn the_preferred_algorithm_falls_back_to_the_systems_when_refused() {
        let available = std::fs::read_to_string(AVAILABLE).unwrap_or_default();
        let allowed = std::fs::read_to_string(ALLOWED).unwrap_or_default();
        let has = |list: &str| list.split_whitespace().any(|n| n == PREFERRED);
        let chosen = Congestion::Preferred.resolve().expect("never an error");
        // Root may choose anything the kernel has; others only what is allowed.
        if has(&allowed) || (is_root() && has(&available)) {
            assert_eq!(chosen.name(), Some(PREFERRED));
        } else if !has(&available) {
            assert_eq!(chosen.name(), None);
        }
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert_eq!(of_socket(&udp), None, "not a TCP socket");
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(2) == Some("0"))
            })
            .unwrap_or(false)
    }
}
