//! Where a server of a job listens: the address its peers reach it at, never every interface.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

use crate::{Error, Result};

/// The local address this machine uses to reach `peer` (`host:port`): the interface its routes
/// pick, found without sending anything. `None` when `peer` does not resolve or is unreachable.
pub fn local_address_towards(peer: &str) -> Option<IpAddr> {
    let to: SocketAddr = peer.to_socket_addrs().ok()?.next()?;
    let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let probe = UdpSocket::bind(any).ok()?;
    probe.connect(to).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

/// The address a server whose job names it `own` (`host:port`) listens on: `own` itself, unless
/// its host resolves to a loopback address while some of `peers` are elsewhere (Debian's
/// `/etc/hosts` maps a machine's own name to 127.0.1.1), where it is the address of the interface
/// that routes to them, with `own`'s port. Errors name an unusable `own`.
///
/// ```
/// let peers = vec!["127.0.0.1:2223".to_string()];
/// assert_eq!(tandem_core::cluster::listen_address("127.0.0.1:2222", &peers).unwrap(), "127.0.0.1:2222");
/// ```
pub fn listen_address(own: &str, peers: &[String]) -> Result<String> {
    super::check_address("own address", own)?;
    let resolved: Vec<SocketAddr> = own
        .to_socket_addrs()
        .map_err(|e| Error::config("own address", format!("{own:?} does not resolve: {e}")))?
        .collect();
    let Some(first) = resolved.first() else {
        return Err(Error::config(
            "own address",
            format!("{own:?} resolves to no address"),
        ));
    };
    if !first.ip().is_loopback() {
        return Ok(own.to_string());
    }
    let remote = peers.iter().find(|p| {
        p.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| !a.ip().is_loopback())
    });
    match remote.and_then(|p| local_address_towards(p)) {
        Some(ip) => Ok(SocketAddr::new(ip, first.port()).to_string()),
        None => Ok(own.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_address_is_kept_unless_it_is_loopback_among_remote_peers() {
        let local = vec!["127.0.0.1:1".to_string(), "localhost:2".to_string()];
        assert_eq!(
            listen_address("127.0.0.1:2222", &local).unwrap(),
            "127.0.0.1:2222"
        );
        assert_eq!(
            listen_address("10.9.8.7:2222", &local).unwrap(),
            "10.9.8.7:2222"
        );
        // A remote peer: the loopback name gives way to the interface routing to it (or stays,
        // where this machine has no route there at all).
        let remote = vec!["127.0.0.1:1".to_string(), "192.0.2.1:2".to_string()];
        let got = listen_address("127.0.1.1:2222", &remote).unwrap();
        assert!(got.ends_with(":2222"), "{got}");
        match local_address_towards("192.0.2.1:2") {
            Some(ip) => assert_eq!(got, SocketAddr::new(ip, 2222).to_string()),
            None => assert_eq!(got, "127.0.1.1:2222"),
        }
        for bad in ["nohostport", "host:notaport"] {
            assert!(listen_address(bad, &local).is_err(), "{bad}");
        }
    }
}
