//! The metrics endpoint: plain HTTP/1.1 on one thread, one short request at a time.
//!
//! `GET /metrics` (or any other path) answers the Prometheus text of [`crate::metrics::render`];
//! `GET /flight` answers the flight recorder as a dump ([`crate::dump::Dump`]) without writing a
//! file. Requests are read for at most 2 s and 8 KiB; a slow client cannot hold the endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest request read (the endpoint answers any path with the metrics).
const REQUEST_LIMIT: usize = 8 << 10;
/// How long a scraper may take to send its request or read the answer.
const IO_DEADLINE: Duration = Duration::from_secs(2);

/// Serves this process's metrics at `addr` from a thread of its own; returns the bound address
/// (port 0 picks a free one).
pub fn serve(addr: &str) -> std::io::Result<SocketAddr> {
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))?;
    let listener = TcpListener::bind(target)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {target}: {e}")))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("tandem-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s) {
                            tracing::debug!("metrics request: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("metrics accept: {e}"),
                }
            }
        })?;
    tracing::info!("metrics at http://{bound}/metrics");
    Ok(bound)
}

/// Serves at [`crate::METRICS_ADDR_VAR`] when it is set, at its port plus `local` (the process's
/// index among those of its role on the host), so every rank of a host has its own port.
pub fn serve_from_env(local: usize) -> std::io::Result<Option<SocketAddr>> {
    let Some(addr) = std::env::var(crate::METRICS_ADDR_VAR)
        .ok()
        .filter(|a| !a.is_empty())
    else {
        return Ok(None);
    };
    let shifted = offset_port(&addr, local).ok_or_else(|| {
        std::io::Error::other(format!(
            "{}={addr:?} is not host:port with room for local rank {local}",
            crate::METRICS_ADDR_VAR
        ))
    })?;
    serve(&shifted).map(Some)
}

/// `host:port` with `port + local`; `None` if it is not `host:port` or the port overflows.
pub(crate) fn offset_port(addr: &str, local: usize) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let port = if port == 0 {
        0
    } else {
        u16::try_from(usize::from(port).checked_add(local)?).ok()?
    };
    if host.is_empty() {
        return None;
    }
    Some(format!("{host}:{port}"))
}

/// Answers one scrape: reads the request (bounded in size and time), writes the metrics.
fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_DEADLINE))?;
    s.set_write_timeout(Some(IO_DEADLINE))?;
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > REQUEST_LIMIT {
            return respond(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    if path.starts_with("/flight") {
        let body = crate::dump::take("GET /flight")
            .and_then(|d| serde_json::to_string_pretty(&d).ok())
            .unwrap_or_else(|| "{}".into());
        respond(&mut s, "200 OK", "application/json", &body)
    } else {
        let body = crate::metrics::render();
        respond(
            &mut s,
            "200 OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            &body,
        )
    }
}

/// Writes an HTTP/1.1 response and closes.
fn respond(s: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_offset_by_the_local_rank() {
        assert_eq!(
            offset_port("0.0.0.0:9400", 3).as_deref(),
            Some("0.0.0.0:9403")
        );
        assert_eq!(offset_port("[::1]:9400", 0).as_deref(), Some("[::1]:9400"));
        assert_eq!(offset_port("h:0", 5).as_deref(), Some("h:0"));
        assert_eq!(offset_port("h:65535", 0).as_deref(), Some("h:65535"));
        assert_eq!(offset_port("h:65535", 1), None);
        assert_eq!(offset_port("9400", 0), None);
        assert_eq!(offset_port(":9400", 0), None);
        assert_eq!(offset_port("h:x", 0), None);
    }

    #[test]
    fn a_request_gets_the_metrics_and_an_oversized_one_is_refused() {
        let addr = serve("127.0.0.1:0").unwrap();
        let get = |req: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        let ok = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("version=0.0.4"));
        let flight = get(b"GET /flight HTTP/1.1\r\n\r\n");
        assert!(flight.contains("application/json"));
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', REQUEST_LIMIT + 10));
        let refused = get(&big);
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    }
}
