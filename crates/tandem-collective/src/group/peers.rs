//! What ranks learn about where their peers are while a group forms: the address a rank
//! advertises and listens on, and whether the ranks share a machine (so the ring copies chunks
//! straight out of a neighbour's memory).

use super::*;

/// The host this rank tells the others to reach it at: loopback when the rendezvous is on this
/// machine, else the address of the interface routing to it.
pub(super) fn advertise_host(rendezvous: &str) -> String {
    let addr: Option<SocketAddr> = rendezvous.to_socket_addrs().ok().and_then(|mut a| a.next());
    match addr {
        Some(a) if a.ip().is_loopback() => a.ip().to_string(),
        Some(a) => {
            // The address this machine uses to reach the rendezvous is one its peers can reach.
            let probe =
                UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).and_then(|s| {
                    s.connect(a)?;
                    s.local_addr()
                });
            probe
                .map(|l| l.ip().to_string())
                .unwrap_or_else(|_| "127.0.0.1".into())
        }
        None => "127.0.0.1".into(),
    }
}

/// The address to listen on: the advertised one itself (never every interface), bracketed when it
/// is an IPv6 address.
pub(super) fn bind_host(advertised: &str) -> String {
    match advertised.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => advertised.to_string(),
    }
}

/// Finds out whether every rank can read its left neighbour's memory: each publishes its word, reads
/// its left neighbour's, and publishes the outcome; the ring copies directly only when all succeeded.
/// Logs once why not, otherwise.
pub(super) async fn negotiate_same_host(
    client: &tandem_rendezvous::Client,
    prefix: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Option<SameHost>> {
    let word = LocalWord::new();
    client
        .set(&format!("{prefix}/memory/{rank}"), word.advert())
        .await?;
    let left = (rank + world - 1) % world;
    let advert = client
        .wait(&[&format!("{prefix}/memory/{left}")], timeout)
        .await?;
    let advert = advert
        .first()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let probed = match PeerMemory::parse(&advert) {
        Some(peer) => peer.probe().map(|()| peer).map_err(|e| e.to_string()),
        None => Err(format!("unreadable advert {advert:?}")),
    };
    let verdict = match &probed {
        Ok(_) => "ok".to_string(),
        Err(why) => format!("rank {rank} cannot read rank {left}'s memory: {why}"),
    };
    client
        .set(&format!("{prefix}/memory-ok/{rank}"), verdict)
        .await?;
    let keys: Vec<String> = (0..world)
        .map(|r| format!("{prefix}/memory-ok/{r}"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let verdicts = client.wait(&keys, timeout).await?;
    let refusal = verdicts
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .find(|v| v != "ok");
    match (refusal, probed) {
        (None, Ok(peer)) => Ok(Some(SameHost { word, left: peer })),
        (Some(why), _) => {
            if rank == 0 {
                tracing::info!("ring chunks travel over TCP: {why}");
            }
            Ok(None)
        }
        (None, Err(_)) => Ok(None),
    }
}
