//! Connections between processes of one machine, which the kernel authenticates: Unix domain
//! sockets in the abstract namespace instead of TLS over loopback.
//!
//! TLS between two processes of one machine buys nothing the kernel does not already give: the
//! bytes never leave it, and the kernel says which user is at the other end (`SO_PEERCRED`). So
//! every listener of Tandem (the ring's, a parameter server's, the rendezvous's) that listens on
//! `ip:port` also listens on the abstract Unix socket named after that address ([`name`]), and a
//! process about to dial `ip:port` first tries that name. It exists only where the TCP port is
//! reachable without leaving the machine's network namespace (abstract names are per namespace:
//! another host, a container or a simulated host has its own), and only the process holding the
//! TCP port binds it, so no address is published and nothing is left on disk. Both ends check
//! that the other runs as the same user and in the same PID namespace (anyone else at that name,
//! such as a process of another container sharing the host's network, is refused, and a client
//! then falls back to TCP with TLS); the job token still travels inside, so processes of another job
//! of the same user are refused as before. Processes of one user trust each other (they could
//! read each other's keys and memory anyway): roles are not checked between them; see
//! SECURITY.md.
//!
//! `TANDEM_LOCAL_SOCKETS=0` turns this off (TLS, or plaintext, over loopback as between hosts).
//!
//! ```
//! let addr: std::net::SocketAddr = "127.0.0.1:29500".parse().unwrap();
//! assert_eq!(tandem_tls::local::name(&addr), "\0tandem/127.0.0.1:29500");
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tandem_core::Result;
use tandem_core::cluster::{ProcessEnv, Vars};
use tokio::net::{UnixListener, UnixStream};

/// `0` makes processes of one machine connect over TCP (and TLS) like processes of different
/// machines; `1` (the default) over Unix domain sockets.
pub const LOCAL_VAR: &str = tandem_core::settings::LOCAL_SOCKETS.name;

/// How long dialling a local socket may take (it either answers at once or is not there; this
/// only bounds a listener whose backlog is full).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads [`LOCAL_VAR`]: on unless it is off; a value that is not a switch is an error naming
/// the variable.
pub fn from_vars(vars: &dyn Vars) -> Result<bool> {
    Ok(tandem_core::settings::LOCAL_SOCKETS
        .switch(vars)?
        .unwrap_or(true))
}

/// What [`set_enabled`] said: 0 nothing (the variable decides), 1 off, 2 on.
static CHOSEN: AtomicU8 = AtomicU8::new(0);

/// Whether this process uses local sockets: as [`set_enabled`] said, else as [`LOCAL_VAR`] says
/// (read once; a bad value reads as off here and is reported by [`crate::Security::from_env`]).
pub fn enabled() -> bool {
    /// What the variable said, read once.
    static ON: OnceLock<bool> = OnceLock::new();
    match CHOSEN.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => *ON.get_or_init(|| from_vars(&ProcessEnv).unwrap_or(false)),
    }
}

/// Turns local sockets on or off for this whole process, whatever [`LOCAL_VAR`] says: for a
/// program (or a test) that must speak TLS to servers of its own machine. Listeners and
/// connections made before keep what they had.
pub fn set_enabled(on: bool) {
    CHOSEN.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// The abstract socket name that stands for the TCP listener at `addr` on this machine (with a
/// leading NUL, as tokio takes abstract names). A listener on every address (`0.0.0.0`, `::`)
/// is named after its port alone ([`wildcard_name`]).
pub fn name(addr: &SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        wildcard_name(addr.port())
    } else {
        format!("\0tandem/{addr}")
    }
}

/// The name a listener on every address of port `port` takes.
pub fn wildcard_name(port: u16) -> String {
    format!("\0tandem/*:{port}")
}

/// This process's effective user.
fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why a local socket's peer is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum NotThisUser {
    /// The kernel did not say who it is.
    #[error("its credentials are unreadable: {0}")]
    Unreadable(#[source] io::Error),
    /// It runs in another PID namespace (another container, say): the kernel hides its
    /// process, and a user id means nothing across that boundary.
    #[error("it runs outside this process's PID namespace (another container?)")]
    Elsewhere,
    /// It runs as another user.
    #[error("it runs as user {uid} (pid {pid}), not as this process's user {me}")]
    Other {
        /// Its user.
        uid: u32,
        /// Its process, when the kernel says.
        pid: String,
        /// This process's user.
        me: u32,
    },
}

/// Why the peer of `s` may not be trusted as one of this user's processes, if it may not.
pub fn check_user(s: &UnixStream) -> std::result::Result<(), NotThisUser> {
    let cred = s.peer_cred().map_err(NotThisUser::Unreadable)?;
    // The kernel reports pid 0 for a process it does not show in this PID namespace.
    if cred.pid().is_none_or(|p| p <= 0) {
        return Err(NotThisUser::Elsewhere);
    }
    if cred.uid() == me() {
        Ok(())
    } else {
        Err(NotThisUser::Other {
            uid: cred.uid(),
            pid: cred.pid().map_or_else(|| "?".into(), |p| p.to_string()),
            me: me(),
        })
    }
}

/// Listens on the local socket that stands for the TCP listener at `addr`. `None` when local
/// sockets are off or the name is taken (then every peer uses TCP: slower, equally secure).
pub fn listen(addr: &SocketAddr) -> Option<UnixListener> {
    if !enabled() {
        return None;
    }
    match UnixListener::bind(name(addr)) {
        Ok(l) => Some(l),
        Err(e) => {
            // Normally free: the name stands for a TCP port this process holds.
            tracing::warn!(%addr, error = %e, "no local socket beside this listener (its name is taken); peers on this machine use TCP");
            None
        }
    }
}

/// Accepts one connection of `listener`, checking that its process runs as this user. The
/// outer error is the listener's (out of descriptors and the like); the inner one a refusal.
pub async fn accept(
    listener: &UnixListener,
) -> io::Result<std::result::Result<UnixStream, NotThisUser>> {
    let (s, _) = listener.accept().await?;
    Ok(check_user(&s).map(|()| s))
}

/// Dials the local socket that stands for `addr`, when local sockets are on and a process of
/// this user listens there. `None` means: use TCP (nobody there, or someone else: logged).
pub async fn connect(addr: &SocketAddr) -> Option<UnixStream> {
    if !enabled() {
        return None;
    }
    for name in [name(addr), wildcard_name(addr.port())] {
        let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&name)).await
        else {
            continue;
        };
        match check_user(&s) {
            Ok(()) => return Some(s),
            Err(why) => {
                tracing::warn!(%addr, "not using the local socket for {addr}: {why}; connecting over TCP");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A one-thread runtime for a test that drives the listeners by hand.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A TCP port held for the test and its address (the local socket is named after it).
    fn held_port() -> (std::net::TcpListener, SocketAddr) {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let addr = tcp.local_addr().expect("addr");
        (tcp, addr)
    }

    #[test]
    fn the_variable_is_a_switch_on_by_default() {
        let with = |v: &str| from_vars(&HashMap::from([(LOCAL_VAR, v.to_string())]));
        assert!(from_vars(&HashMap::<&str, String>::new()).expect("unset"));
        assert!(with("1").expect("1") && with("").expect("empty"));
        assert!(!with("0").expect("0") && !with("off").expect("off"));
        let e = with("2").expect_err("2").to_string();
        assert!(e.contains(LOCAL_VAR) && e.contains("\"2\""), "{e}");
    }

    #[test]
    fn names_stand_for_addresses() {
        let a: SocketAddr = "10.1.2.3:4".parse().expect("addr");
        assert_eq!(name(&a), "\0tandem/10.1.2.3:4");
        let v6: SocketAddr = "[::1]:7".parse().expect("addr");
        assert_eq!(name(&v6), "\0tandem/[::1]:7");
        for any in ["0.0.0.0:9", "[::]:9"] {
            let any: SocketAddr = any.parse().expect("addr");
            assert_eq!(name(&any), wildcard_name(9));
        }
    }

    /// A listener's name is found by a client dialling its address (or, for a wildcard
    /// listener, any address with its port), and both ends see the same user.
    #[tokio::test]
    async fn a_client_finds_the_listener_of_its_address() {
        let (_tcp, addr) = held_port();
        let l = listen(&addr).expect("local listener");
        let (accepted, dialled) = tokio::join!(accept(&l), connect(&addr));
        assert!(accepted.expect("accept").is_ok());
        assert!(dialled.is_some());
        // Nobody there: TCP it is.
        let other: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert!(connect(&other).await.is_none());
        // A wildcard listener is reached through any address of its port.
        let any = std::net::TcpListener::bind("0.0.0.0:0").expect("port");
        let port = any.local_addr().expect("addr").port();
        let l = listen(&any.local_addr().expect("addr")).expect("wildcard listener");
        let via: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let (accepted, dialled) = tokio::join!(accept(&l), connect(&via));
        assert!(accepted.expect("accept").is_ok() && dialled.is_some());
    }

    /// A name held by a process of another user is not trusted (the kernel says who it is).
    #[test]
    fn another_user_is_refused() {
        // Only root can become another user; elsewhere this test has nothing to show.
        if me() != 0 {
            return;
        }
        let (_tcp, addr) = held_port();
        let name = name(&addr);
        // A child that drops to user 65534 and listens on the name until it is dialled once.
        // (the kernel records who listened at listen(): the user is dropped before)
        let script = "import os,socket;os.setuid(65534);s=socket.socket(socket.AF_UNIX);\
                      s.bind('\\0'+os.environ['NAME']);s.listen();\
                      print('ok',flush=True);c,_=s.accept();c.recv(1)";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .env("NAME", &name[1..])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("ready");
        assert_eq!(line.trim(), "ok");
        let rt = runtime();
        let s = rt.block_on(async {
            let s = UnixStream::connect(&name).await.expect("dial");
            (check_user(&s), connect(&addr).await.is_none())
        });
        let _ = child.kill();
        let _ = child.wait();
        let why = s.0.expect_err("another user").to_string();
        assert!(why.contains("user 65534"), "{why}");
        assert!(s.1, "a client falls back to TCP");
    }

    /// A server's local socket hands it connections of this user only: another user's is
    /// refused (and counted), this user's comes through with no certificate needed.
    #[tokio::test]
    async fn a_server_admits_its_own_user_only() {
        use tokio_stream::StreamExt;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("port");
        let addr = tcp.local_addr().expect("addr");
        let mut incoming =
            crate::grpc::incoming(tcp, crate::Security::loopback_only(), "local-test", |_| {
                true
            });
        if me() == 0 {
            // A process of user 65534 dials the name and waits to be dropped.
            let script = "import os,socket;os.setuid(65534);s=socket.socket(socket.AF_UNIX);\
                          s.connect('\\0'+os.environ['NAME']);s.send(b'x');s.recv(1)";
            let mut child = std::process::Command::new("python3")
                .args(["-c", script])
                .env("NAME", &name(&addr)[1..])
                .spawn()
                .expect("python3");
            let next = tokio::time::timeout(Duration::from_secs(2), incoming.next()).await;
            let _ = child.kill();
            let _ = child.wait();
            assert!(next.is_err(), "another user's connection was admitted");
        }
        let mut c = crate::grpc::Connector::new(crate::Security::loopback_only());
        let (served, dialled) = tokio::join!(
            incoming.next(),
            tower_service::Service::call(&mut c, format!("http://{addr}").parse().expect("uri"))
        );
        assert!(dialled.expect("dial").into_inner().is_local());
        assert!(served.expect("admitted").expect("stream").is_local());
    }

    /// A process in another PID namespace (another container sharing the network) is refused
    /// even as the same user: this test's own binary, run in a new PID namespace, dials a
    /// listener of this process (which it cannot see) and reports what `check_user` says; a
    /// process this one can see passes.
    #[test]
    fn a_process_of_another_pid_namespace_is_refused() {
        if me() != 0
            || std::process::Command::new("unshare")
                .arg("--help")
                .output()
                .is_err()
        {
            return;
        }
        let rt = runtime();
        let _guard = rt.enter();
        let (_tcp, addr) = held_port();
        let l = listen(&addr).expect("local listener");
        let exe = std::env::current_exe().expect("test binary");
        let child = std::process::Command::new("unshare")
            .args(["--pid", "--fork"])
            .arg(&exe)
            .args([
                "--ignored",
                "--exact",
                "local::tests::pid_namespace_client",
                "--nocapture",
            ])
            .env("TANDEM_TEST_LOCAL_ADDR", addr.to_string())
            .output()
            .expect("unshare");
        let out = String::from_utf8_lossy(&child.stdout).into_owned();
        assert!(out.contains("CHECK elsewhere"), "{out}");
        // This process's own client is visible to it.
        let (accepted, dialled) = rt.block_on(async { tokio::join!(accept(&l), connect(&addr)) });
        assert!(accepted.expect("accept").is_ok() && dialled.is_some());
    }

    /// The client half of the test above, run by it in a new PID namespace.
    #[test]
    #[ignore = "run by a_process_of_another_pid_namespace_is_refused"]
    fn pid_namespace_client() {
        let Ok(addr) = std::env::var("TANDEM_TEST_LOCAL_ADDR") else {
            return;
        };
        let addr: SocketAddr = addr.parse().expect("addr");
        let rt = runtime();
        let said = rt.block_on(async {
            let s = UnixStream::connect(name(&addr)).await.expect("dial");
            match check_user(&s) {
                Err(NotThisUser::Elsewhere) => "elsewhere".to_string(),
                other => format!("{other:?}"),
            }
        });
        println!("CHECK {said}");
    }

    /// `set_enabled` decides for the whole process, both ways, over the variable: checked in a
    /// process of its own (this test binary again), so the other tests keep the default.
    #[test]
    fn a_process_can_turn_local_sockets_off_and_on() {
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "local::tests::set_enabled_in_a_process_of_its_own",
                "--nocapture",
            ])
            .env("TANDEM_TEST_SET_ENABLED", "1")
            .env(LOCAL_VAR, "1")
            .output()
            .expect("the test binary");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(said.contains("SET off none on some"), "{said}");
    }

    /// The child half of the test above.
    #[test]
    #[ignore = "run by a_process_can_turn_local_sockets_off_and_on"]
    fn set_enabled_in_a_process_of_its_own() {
        if std::env::var("TANDEM_TEST_SET_ENABLED").is_err() {
            return;
        }
        let rt = runtime();
        let _guard = rt.enter();
        let (_tcp, addr) = held_port();
        set_enabled(false);
        let off = (enabled(), listen(&addr).is_some());
        set_enabled(true);
        let on = (enabled(), listen(&addr).is_some());
        let word = |(e, l): (bool, bool)| match (e, l) {
            (false, false) => "off none",
            (true, true) => "on some",
            _ => "mixed",
        };
        println!("SET {} {}", word(off), word(on));
    }
}
