//! The record layer of ring connections ([`crate::record`]) between two real TLS endpoints over
//! loopback: what arrives is what was sent, through key updates and odd sizes; a record changed,
//! cut short or retyped on the way is refused, naming what was wrong; `close_notify` is a clean
//! end of file.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::stream::{ReadHalf, Stream, WriteHalf, accept, connect, explain_io};
use crate::tests::{member, tls_context};
use crate::{Authority, Security, TlsContext};

const T: Duration = Duration::from_secs(10);

/// A connected pair of TLS streams of one job (server side, client side); with `tamper`, the
/// client reaches the server through a proxy that changes its first large record so.
async fn pair(tamper: Option<Tamper>) -> (Stream, Stream) {
    pair_sending(tamper, &[]).await
}

/// [`pair`], the client writing each of `first` (one write each) as soon as its handshake is
/// done (before the server's is known to be).
async fn pair_sending(tamper: Option<Tamper>, first: &[&[u8]]) -> (Stream, Stream) {
    let ca = Authority::generate("job", 1).unwrap();
    let (server, client) = (member(&ca, "rank-0"), member(&ca, "rank-1"));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        accept(&server, tcp, T).await.unwrap()
    });
    let dial = match tamper {
        Some(tamper) => {
            let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let proxy_addr = proxy.local_addr().unwrap();
            tokio::spawn(forward(proxy, addr, tamper));
            proxy_addr
        }
        None => addr,
    };
    let tcp = TcpStream::connect(dial).await.unwrap();
    let mut c = connect(&client, tcp, &dial.to_string(), T).await.unwrap();
    for w in first {
        c.write_all(w).await.unwrap();
    }
    (srv.await.unwrap(), c)
}

/// Deterministic bytes: stream `seed`'s `n` bytes.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` in pieces of odd sizes.
async fn send(w: &mut WriteHalf, data: &[u8]) {
    let mut at = 0;
    let mut step = 1;
    while at < data.len() {
        let n = step.min(data.len() - at);
        w.write_all(&data[at..at + n]).await.unwrap();
        at += n;
        step = (step * 7 + 13) % 70_001;
    }
}

/// Reads `n` bytes in pieces of odd sizes.
async fn receive(r: &mut ReadHalf, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut at = 0;
    let mut step = 3;
    while at < n {
        let k = step.min(n - at);
        r.read_exact(&mut out[at..at + k]).await.unwrap();
        at += k;
        step = (step * 5 + 11) % 50_003;
    }
    out
}

fn writer(w: &mut WriteHalf) -> &mut crate::record::RecordWriter {
    match w {
        WriteHalf::Tls { inner, .. } => inner,
        WriteHalf::Plain(_) | WriteHalf::Local(_) => panic!("not TLS"),
    }
}

#[tokio::test]
async fn both_ways_at_once_through_key_updates_every_bytes_arrives_in_order() {
    let (s, c) = pair(None).await;
    let ((mut sr, mut sw), (mut cr, mut cw)) = (s.into_split(), c.into_split());
    // A key update every 5 records (16 KiB each): dozens per direction.
    writer(&mut sw).update_every(5);
    writer(&mut cw).update_every(5);
    let n = 3 << 20;
    let (up, down) = (bytes(1, n), bytes(2, n));
    let ((), (), got_up, got_down) = tokio::join!(
        send(&mut cw, &up),
        send(&mut sw, &down),
        receive(&mut sr, n),
        receive(&mut cr, n)
    );
    assert!(got_up == up, "client to server");
    assert!(got_down == down, "server to client");
    for w in [&mut sw, &mut cw] {
        let updates = writer(w).key_updates();
        assert!(updates >= (n / (5 << 14)) as u64, "{updates} key updates");
    }
}

fn context(ca: &Authority, name: &str) -> TlsContext {
    tls_context(ca, &ca.issue(name, &["127.0.0.1".into()], 1).unwrap())
}

/// Sends `up` and reads `down` bytes at once on `s`, an endpoint built on rustls's own record
/// layer.
async fn rustls_side(
    s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite,
    up: &[u8],
    down: usize,
) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(s);
    let mut got = vec![0u8; down];
    let (sent, read) = tokio::join!(
        async {
            w.write_all(up).await?;
            w.flush().await
        },
        r.read_exact(&mut got)
    );
    sent.unwrap();
    read.unwrap();
    got
}

/// This record layer against rustls's own, both ways round (ours accepting, then ours
/// connecting): nonces, record framing, key updates (ours every 3 records, which rustls must
/// follow) and the bytes must be the standard's, not merely agree with themselves.
#[tokio::test]
async fn records_interoperate_with_rustls_own_record_layer() {
    let ca = Authority::generate("job", 1).unwrap();
    let n = 1 << 20;
    let (up, down) = (bytes(5, n), bytes(6, n));
    for ours_accepts in [true, false] {
        let (ours, theirs) = (context(&ca, "rank-0"), context(&ca, "rank-1"));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let (ours_stream, their_end) = if ours_accepts {
            let srv = tokio::spawn(async move {
                let (tcp, _) = l.accept().await.unwrap();
                accept(&Security::tls(ours), tcp, T).await.unwrap()
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut c = tokio_rustls::TlsConnector::from(theirs.client_config())
                .connect(name, tcp)
                .await
                .unwrap();
            // rustls updates its key before its first record: ours must follow.
            c.get_mut().1.refresh_traffic_keys().unwrap();
            (srv.await.unwrap(), tokio_rustls::TlsStream::Client(c))
        } else {
            let srv = tokio::spawn(async move {
                let (tcp, _) = l.accept().await.unwrap();
                tokio_rustls::TlsAcceptor::from(theirs.server_config())
                    .accept(tcp)
                    .await
                    .unwrap()
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            let c = connect(&Security::tls(ours), tcp, &addr.to_string(), T)
                .await
                .unwrap();
            let mut s = srv.await.unwrap();
            s.get_mut().1.refresh_traffic_keys().unwrap();
            (c, tokio_rustls::TlsStream::Server(s))
        };
        let (mut r, mut w) = ours_stream.into_split();
        writer(&mut w).update_every(3);
        let (got_up, (), got_down) = tokio::join!(
            rustls_side(their_end, &down, n),
            send(&mut w, &up),
            receive(&mut r, n)
        );
        assert!(
            got_up == up,
            "ours accepting: {ours_accepts}: ours to rustls"
        );
        assert!(
            got_down == down,
            "ours accepting: {ours_accepts}: rustls to ours"
        );
        assert!(writer(&mut w).key_updates() >= (n / (3 << 14)) as u64);
    }
}

/// A peer that asks this side to update its key (as other TLS 1.3 implementations may) gets an
/// update before this side's next record, and the bytes still arrive.
#[tokio::test]
async fn a_key_update_the_peer_asks_for_is_sent_before_the_next_record() {
    let (s, c) = pair(None).await;
    let ((mut sr, mut sw), (mut cr, mut cw)) = (s.into_split(), c.into_split());
    writer(&mut cw).update_asking_the_peer().unwrap();
    send(&mut cw, b"after the update").await;
    assert_eq!(receive(&mut sr, 16).await, b"after the update");
    assert_eq!(writer(&mut sw).key_updates(), 0);
    send(&mut sw, b"answer").await;
    assert_eq!(writer(&mut sw).key_updates(), 1, "asked for: sent");
    assert_eq!(receive(&mut cr, 6).await, b"answer");
    send(&mut sw, b"again").await;
    assert_eq!(writer(&mut sw).key_updates(), 1, "asked once: sent once");
    assert_eq!(receive(&mut cr, 5).await, b"again");
}

/// Handshake flights larger than the first read buffer (16 KiB): certificates naming a thousand
/// hosts, on both sides.
#[tokio::test]
async fn certificates_larger_than_the_first_read_still_connect() {
    let ca = Authority::generate("job", 1).unwrap();
    let names: Vec<String> = (0..1000)
        .map(|i| format!("worker-{i}.tandem.example"))
        .chain(["127.0.0.1".to_string()])
        .collect();
    let big = |name: &str| {
        let cert = ca.issue(name, &names, 1).unwrap();
        assert!(cert.cert_pem.len() > 24 << 10, "{}", cert.cert_pem.len());
        Security::tls(tls_context(&ca, &cert))
    };
    let (server, client) = (big("rank-0"), big("rank-1"));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = accept(&server, tcp, T).await.unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).await.unwrap();
        got
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut c = connect(&client, tcp, &addr.to_string(), T).await.unwrap();
    c.write_all(b"ok").await.unwrap();
    assert_eq!(&srv.await.unwrap(), b"ok");
}

/// What the server's reader makes of one record of inner type `typ` around `content`, sent
/// between two pieces of data: `Ok` with the data that arrived after it, or the error in words.
async fn after_record(typ: u8, content: &[u8]) -> Result<Vec<u8>, String> {
    after_records(false, &[(typ, content)]).await
}

/// [`after_record`] with several records in a row, read by the client when `to_client`.
async fn after_records(to_client: bool, records: &[(u8, &[u8])]) -> Result<Vec<u8>, String> {
    let (s, c) = pair(None).await;
    let ((sr, sw), (cr, cw)) = (s.into_split(), c.into_split());
    let (mut r, mut w, _keep) = if to_client {
        (cr, sw, (sr, cw))
    } else {
        (sr, cw, (cr, sw))
    };
    send(&mut w, b"before").await;
    for (typ, content) in records {
        writer(&mut w).queue_record(*typ, content).unwrap();
    }
    w.flush().await.unwrap();
    send(&mut w, b"after").await;
    assert_eq!(receive(&mut r, 6).await, b"before");
    let mut got = [0u8; 5];
    match r.read_exact(&mut got).await {
        Ok(_) => Ok(got.to_vec()),
        Err(e) => Err(explain_io(&e)),
    }
}

/// After the handshake: session tickets are skipped by a client and refused by a server, a
/// fatal alert is named, and anything else out of place is refused, naming it.
#[tokio::test]
async fn messages_after_the_handshake_are_taken_or_refused_by_kind() {
    // A new_session_ticket (type 4) of 3 bytes to the client: skipped.
    let ticket: &[u8] = &[4, 0, 0, 3, 1, 2, 3];
    assert_eq!(
        after_records(true, &[(22, ticket)]).await.as_deref(),
        Ok(&b"after"[..])
    );
    // Two tickets in one record: both skipped.
    assert_eq!(
        after_records(true, &[(22, &[4, 0, 0, 1, 9, 4, 0, 0, 0])])
            .await
            .as_deref(),
        Ok(&b"after"[..])
    );
    // Only servers send tickets: one to a server is refused.
    let e = after_record(22, ticket)
        .await
        .expect_err("a ticket to a server");
    assert!(e.contains("a session ticket to a server"), "{e}");
    let refused = [
        (22, vec![4, 0, 0, 9, 1], "a truncated handshake message"),
        (22, vec![4, 0], "a truncated handshake message"),
        (22, vec![24, 0, 0, 1, 2], "a handshake message of type 24"),
        (
            22,
            vec![24, 0, 0, 1, 0, 4, 0, 0, 0],
            "data after a key update",
        ),
        (22, vec![1, 0, 0, 0], "a handshake message of type 1"),
        (25, vec![1, 2, 3], "a record of content type 25"),
        (21, vec![2], "a malformed alert"),
        (21, vec![2, 40], "HandshakeFailure"),
        (0, vec![], "a record without a content type"),
    ];
    for (typ, content, want) in refused {
        let e = after_record(typ, &content)
            .await
            .expect_err(&format!("type {typ} {content:?}"));
        assert!(e.contains(want), "type {typ} {content:?}: {e}");
    }
}

/// `close_notify` ends the stream cleanly; a connection that just closes does not (anyone on the
/// path could have closed it).
#[tokio::test]
async fn close_notify_ends_the_stream_cleanly_and_a_bare_close_does_not() {
    let (s, c) = pair(None).await;
    let ((mut sr, _sw), (_cr, mut cw)) = (s.into_split(), c.into_split());
    send(&mut cw, b"last words").await;
    cw.shutdown().await.unwrap();
    let mut all = Vec::new();
    sr.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"last words");

    // Dropped without a shutdown: the socket closes, no close_notify is sent.
    let (s, c) = pair(None).await;
    let (mut sr, _sw) = s.into_split();
    drop(c);
    let mut all = Vec::new();
    let e = sr.read_to_end(&mut all).await.expect_err("a bare close");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("without a TLS close_notify"), "{e}");
}

/// What the proxy does to the first large record from the client (application data: handshake
/// records are far smaller).
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Nothing changed, but everything the client sends after its hello held back until its
    /// first large record, then sent at once: the server reads the end of the handshake and
    /// application data in one go.
    HoldUntilData,
    FlipBodyByte,
    Retype,
    Oversize,
    Undersize,
    CutShort,
}

/// Forwards between a client accepted on `proxy` and `to`, changing the client's first record of
/// 10 KB or more as `tamper` says.
async fn forward(proxy: TcpListener, to: std::net::SocketAddr, tamper: Tamper) {
    let (client, _) = proxy.accept().await.unwrap();
    let server = TcpStream::connect(to).await.unwrap();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    });
    // Client to server, record by record.
    let mut done = false;
    let mut held: Vec<u8> = Vec::new();
    let mut records = 0;
    loop {
        let mut head = [0u8; 5];
        if cr.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        let mut body = vec![0u8; len];
        if cr.read_exact(&mut body).await.is_err() {
            return;
        }
        records += 1;
        if matches!(tamper, Tamper::HoldUntilData) && !done && records > 1 {
            held.extend_from_slice(&head);
            held.extend_from_slice(&body);
            if len >= 10_000 {
                done = true;
                if sw.write_all(&held).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if !done && len >= 10_000 {
            done = true;
            match tamper {
                Tamper::HoldUntilData => {}
                Tamper::FlipBodyByte => body[len / 2] ^= 1,
                Tamper::Retype => head[0] = 22,
                Tamper::Oversize => head[3..5].copy_from_slice(&0x4101u16.to_be_bytes()),
                Tamper::Undersize => head[3..5].copy_from_slice(&16u16.to_be_bytes()),
                Tamper::CutShort => {
                    let _ = sw.write_all(&head).await;
                    let _ = sw.write_all(&body[..len / 2]).await;
                    let _ = sw.shutdown().await;
                    return;
                }
            }
        }
        if sw.write_all(&head).await.is_err() || sw.write_all(&body).await.is_err() {
            return;
        }
    }
}

/// The server's read error when the client's first large record is changed by `tamper`.
async fn tampered(tamper: Tamper) -> String {
    let (s, c) = pair(Some(tamper)).await;
    let ((mut sr, _sw), (_cr, mut cw)) = (s.into_split(), c.into_split());
    let data = bytes(3, 64 << 10);
    let sending = tokio::spawn(async move {
        let _ = cw.write_all(&data).await;
        cw
    });
    let mut got = vec![0u8; 64 << 10];
    let e = sr
        .read_exact(&mut got)
        .await
        .expect_err("a tampered stream");
    drop(sending);
    format!("{:?}: {}", e.kind(), explain_io(&e))
}

/// A client that sends data the moment its handshake is done: the server may read that data
/// with the client's last handshake message, decrypted by rustls already; it comes first, then
/// the rest.
#[tokio::test]
async fn data_sent_with_the_last_handshake_message_is_not_lost() {
    let data = bytes(4, 100 << 10);
    let (s, _c) = pair_sending(Some(Tamper::HoldUntilData), &[b"first", &data]).await;
    let (mut sr, _sw) = s.into_split();
    assert_eq!(receive(&mut sr, 5).await, b"first");
    assert!(receive(&mut sr, data.len()).await == data);
}

#[tokio::test]
async fn a_changed_record_is_refused() {
    let e = tampered(Tamper::FlipBodyByte).await;
    assert!(e.contains("decrypt"), "{e}");
}

#[tokio::test]
async fn an_unprotected_record_after_the_handshake_is_refused() {
    let e = tampered(Tamper::Retype).await;
    assert!(e.contains("unprotected record of type 22"), "{e}");
}

#[tokio::test]
async fn a_record_longer_than_tls_allows_is_refused() {
    let e = tampered(Tamper::Oversize).await;
    assert!(e.contains("a record of 16641 bytes"), "{e}");
}

/// A record too short to hold a tag and a content type.
#[tokio::test]
async fn a_record_shorter_than_its_tag_is_refused() {
    let e = tampered(Tamper::Undersize).await;
    assert!(e.contains("a record of 16 bytes"), "{e}");
}

#[tokio::test]
async fn a_connection_cut_inside_a_record_is_an_unexpected_end() {
    let e = tampered(Tamper::CutShort).await;
    assert!(
        e.starts_with("UnexpectedEof") && e.contains("middle of a TLS record"),
        "{e}"
    );
}

/// RFC 8446 5.4: the inner plaintext (content, type, padding) is at most 2^14 + 1 bytes; one byte
/// more is refused with `record_overflow`, which the peer then receives.
#[tokio::test]
async fn inner_plaintext_over_two_to_the_fourteen_plus_one_is_refused() {
    let most = vec![7u8; 1 << 14];
    assert_eq!(
        after_record(23, &most).await.map(|v| v.len()),
        Ok(5),
        "2^14 bytes of data and its type are allowed"
    );
    let over = vec![7u8; (1 << 14) + 1];
    let e = after_record(23, &over).await.expect_err("2^14 + 2 bytes");
    assert!(e.contains("inner plaintext"), "{e}");
}

/// At most 32 records in a row without data (key updates, empty records, tickets); the 33rd is
/// refused, whatever the mix.
#[tokio::test]
async fn records_without_data_are_capped() {
    let empty: (u8, &[u8]) = (23, &[]);
    let ticket: (u8, &[u8]) = (22, &[4, 0, 0, 0]);
    for (what, record) in [("empty records", empty), ("tickets", ticket)] {
        let most = vec![record; crate::record::MAX_RECORDS_WITHOUT_DATA as usize];
        assert_eq!(
            after_records(true, &most).await.as_deref(),
            Ok(&b"after"[..]),
            "{what}: 32 are allowed"
        );
        let over = vec![record; crate::record::MAX_RECORDS_WITHOUT_DATA as usize + 1];
        let e = after_records(true, &over).await.expect_err(what);
        assert!(e.contains("records in a row without data"), "{what}: {e}");
    }
}

/// Key updates count as records without data: 32 in a row are followed, the 33rd is refused.
#[tokio::test]
async fn key_updates_without_data_are_capped() {
    for (updates, ok) in [(32usize, true), (33, false)] {
        let (s, c) = pair(None).await;
        let ((mut sr, _sw), (_cr, mut cw)) = (s.into_split(), c.into_split());
        send(&mut cw, b"before").await;
        for _ in 0..updates {
            writer(&mut cw).update_now().unwrap();
        }
        cw.flush().await.unwrap();
        send(&mut cw, b"after").await;
        assert_eq!(receive(&mut sr, 6).await, b"before");
        let mut got = [0u8; 5];
        let r = sr.read_exact(&mut got).await.map_err(|e| explain_io(&e));
        match ok {
            true => assert_eq!(&got, b"after", "{updates} updates: {r:?}"),
            false => assert!(
                r.expect_err("33 updates")
                    .contains("records in a row without data"),
                "{updates}"
            ),
        }
    }
}

/// A failed reader stays failed (every later read repeats the failure), and the peer gets the
/// fatal alert with this end's next write, which fails too.
#[tokio::test]
async fn failures_are_sticky_and_the_peer_is_told() {
    let (s, c) = pair(None).await;
    let ((mut sr, mut sw), (mut cr, mut cw)) = (s.into_split(), c.into_split());
    writer(&mut cw)
        .queue_record(23, &vec![1u8; (1 << 14) + 1])
        .unwrap();
    cw.flush().await.unwrap();
    send(&mut cw, b"more data after it").await;
    let mut b = [0u8; 4];
    let first = explain_io(&sr.read_exact(&mut b).await.expect_err("over-long record"));
    let again = explain_io(&sr.read_exact(&mut b).await.expect_err("sticky"));
    assert_eq!(first, again);
    let w = sw
        .write_all(b"reply")
        .await
        .expect_err("the writer fails with the reader");
    assert!(explain_io(&w).contains("inner plaintext"), "{w}");
    assert!(sw.write_all(b"reply").await.is_err(), "and stays failed");
    let told = explain_io(&cr.read_exact(&mut b).await.expect_err("an alert"));
    assert!(told.contains("RecordOverflow"), "{told}");
}

/// A write cancelled before any of its records went out is taken back: the next write's data
/// is what arrives, under the same keys. One cancelled after part of it went out fails the
/// connection for every later write instead of being sent or counted for another.
#[tokio::test]
async fn cancelled_writes_are_never_sent_later_or_credited() {
    let (s, c) = pair(None).await;
    let ((mut sr, _sw), (_cr, mut cw)) = (s.into_split(), c.into_split());
    writer(&mut cw).stage_unsent(b"cancelled", false).unwrap();
    send(&mut cw, b"kept").await;
    cw.flush().await.unwrap();
    assert_eq!(receive(&mut sr, 4).await, b"kept");
    // The retry of a pending write is still that write.
    writer(&mut cw).stage_unsent(b"retried", false).unwrap();
    assert_eq!(cw.write(b"retried").await.unwrap(), 7);
    assert_eq!(receive(&mut sr, 7).await, b"retried");

    let (s, c) = pair(None).await;
    let ((_sr, _sw), (_cr, mut cw)) = (s.into_split(), c.into_split());
    writer(&mut cw).stage_unsent(b"half gone", true).unwrap();
    let e = cw
        .write_all(b"other")
        .await
        .expect_err("part of it went out");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert!(cw.write_all(b"other").await.is_err(), "and stays failed");
}
