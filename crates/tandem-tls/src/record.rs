//! TLS 1.3 records after the handshake, protected by Tandem with the keys rustls negotiated.
//!
//! rustls's own record layer copies each received byte three times on its way to the caller
//! (into its deframing buffer, into a queue of plaintext, into the caller's buffer) and allocates
//! per record; on a link of several Gbit/s with every core busy those copies cost more than the
//! encryption (BENCHMARKS.md, "Mutual TLS on every connection"). So the ring's connections use
//! rustls for what needs care (the handshake, certificate checks, key derivation and key updates,
//! through its kernel-TLS interface, [`rustls::kernel`]) and protect the records here, as RFC 8446
//! section 5 lays them out, with ring's AEAD: received records are read into one buffer, decrypted
//! in place and copied once into the caller's buffer; sent records are sealed in one buffer and
//! written with one call per batch.
//!
//! Each direction has its own key and sequence number, so the read and write halves of a
//! connection work independently; they meet only at a key update (the rustls connection that
//! derives the next keys is shared under a lock). A sender updates its key before the cipher's
//! confidentiality limit (2^24 records for AES-GCM) and when the peer asks; a receiver follows the
//! peer's updates. Alerts end the connection (`close_notify` as end of file, anything else as the
//! alert named); a connection that ends without `close_notify` is an unexpected end (it could be
//! a truncation); anything else unexpected is an error, never skipped.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Largest plaintext in one record (RFC 8446 5.1).
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;

/// Largest ciphertext in one record (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

/// Record header: type, legacy version, length.
const HEADER: usize = 5;

/// AEAD tag of every cipher suite TLS 1.3 uses here.
const TAG: usize = 16;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// How much ciphertext a connection reads from its socket at once.
const READ_BUFFER: usize = 256 << 10;

/// How much plaintext one write seals before it goes to the socket.
const WRITE_BATCH: usize = 256 << 10;

/// A record-protection error as rustls names it, inside an I/O error (so
/// [`crate::stream::explain_io`] and [`crate::stream::is_tls_error`] see it).
pub(crate) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn peer_misbehaved(what: &str) -> io::Error {
    tls_error(rustls::Error::General(format!("the peer sent {what}")))
}

/// The rustls connection that derives the next keys, shared by a connection's two halves.
pub(crate) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn next(&mut self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, tx) {
            (Keys::Client(k), true) => k.update_tx_secret(),
            (Keys::Client(k), false) => k.update_rx_secret(),
            (Keys::Server(k), true) => k.update_tx_secret(),
            (Keys::Server(k), false) => k.update_rx_secret(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(1 << 24, |s| s.common.confidentiality_limit)
    }
}

/// What a connection's two halves share.
pub(crate) struct Shared {
    keys: Mutex<Keys>,
    /// The peer asked for a key update: the writer sends one before its next record.
    update_asked: AtomicBool,
}

impl Shared {
    pub(crate) fn new(keys: Keys) -> Arc<Self> {
        Arc::new(Shared {
            keys: Mutex::new(keys),
            update_asked: AtomicBool::new(false),
        })
    }

    fn next_keys(&self, tx: bool) -> io::Result<Protection> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| io::Error::other("the TLS key schedule is unusable (a panic)"))?;
        let (seq, secrets) = keys.next(tx).map_err(tls_error)?;
        Protection::new(secrets, seq)
    }

    fn limit(&self) -> u64 {
        self.keys
            .lock()
            .map_or(1 << 24, |k| k.confidentiality_limit())
    }
}

/// One direction's key, fixed IV and record sequence number.
pub(crate) struct Protection {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Protection {
    pub(crate) fn new(secrets: ConnectionTrafficSecrets, seq: u64) -> io::Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(tls_error(rustls::Error::General(
                    "a cipher suite this connection cannot protect".into(),
                )));
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| tls_error(rustls::Error::General("a bad traffic key".into())))?;
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| tls_error(rustls::Error::General("a bad traffic IV".into())))?;
        Ok(Protection {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (RFC 8446 5.3), which uses up its sequence number.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| tls_error(rustls::Error::EncryptError))?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

fn header(len: usize) -> [u8; HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// The reading half: ciphertext from the socket into one buffer, records decrypted in place.
pub struct RecordReader {
    tcp: OwnedReadHalf,
    buf: Box<[u8]>,
    /// Ciphertext not yet decrypted: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext decrypted and not yet given to the caller: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    open: Protection,
    shared: Arc<Shared>,
    /// The peer sent `close_notify`.
    closed: bool,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("seq", &self.open.seq)
            .field("buffered", &(self.end - self.start))
            .finish_non_exhaustive()
    }
}

impl RecordReader {
    /// Reads `tcp` with `open`. What the handshake already took from the socket comes first:
    /// `early.plain` (application data rustls decrypted), then `early.records` (ciphertext).
    pub(crate) fn new(
        tcp: OwnedReadHalf,
        open: Protection,
        shared: Arc<Shared>,
        early: &crate::handshake::Early,
    ) -> io::Result<Self> {
        let (p, r) = (early.plain.len(), early.records.len());
        let mut buf = vec![0u8; (READ_BUFFER + HEADER + MAX_CIPHERTEXT).max(p + r)];
        buf[..p].copy_from_slice(&early.plain);
        buf[p..p + r].copy_from_slice(&early.records);
        Ok(RecordReader {
            tcp,
            buf: buf.into_boxed_slice(),
            start: p,
            end: p + r,
            plain: (0, p),
            open,
            shared,
            closed: false,
        })
    }

    /// The socket.
    pub(crate) fn tcp(&self) -> &OwnedReadHalf {
        &self.tcp
    }

    /// Decrypts the next whole record in the buffer, if there is one: `Ok(true)` when it was
    /// taken (its plaintext, if application data, is now in `plain`).
    fn next_record(&mut self) -> io::Result<bool> {
        let avail = self.end - self.start;
        if avail < HEADER {
            return Ok(false);
        }
        let mut head = [0u8; HEADER];
        head.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        if head[0] != APPLICATION_DATA {
            return Err(peer_misbehaved(&format!(
                "an unprotected record of type {} after the handshake",
                head[0]
            )));
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(peer_misbehaved(&format!("a record of {len} bytes")));
        }
        if avail < HEADER + len {
            return Ok(false);
        }
        let body = self.start + HEADER;
        let nonce = self.open.next_nonce()?;
        let plain_len = self
            .open
            .key
            .open_in_place(nonce, Aad::from(head), &mut self.buf[body..body + len])
            .map_err(|_| tls_error(rustls::Error::DecryptError))?
            .len();
        self.start = body + len;
        // The content type is the last non-zero byte; zeros after it are padding.
        let content = &self.buf[body..body + plain_len];
        let Some(last) = content.iter().rposition(|b| *b != 0) else {
            return Err(peer_misbehaved("a record without a content type"));
        };
        match content[last] {
            APPLICATION_DATA => self.plain = (body, body + last),
            ALERT => self.alert(body, last)?,
            HANDSHAKE => self.handshake(body, last)?,
            other => {
                return Err(peer_misbehaved(&format!(
                    "a record of content type {other}"
                )));
            }
        }
        Ok(true)
    }

    fn alert(&mut self, body: usize, len: usize) -> io::Result<()> {
        match self.buf[body..body + len] {
            [_, 0] => {
                self.closed = true;
                Ok(())
            }
            [_, desc] => Err(tls_error(rustls::Error::AlertReceived(
                AlertDescription::from(desc),
            ))),
            _ => Err(peer_misbehaved("a malformed alert")),
        }
    }

    /// Handshake messages after the handshake: key updates (followed), session tickets (none are
    /// used: ignored); anything else is refused.
    fn handshake(&mut self, body: usize, len: usize) -> io::Result<()> {
        let mut at = body;
        let end = body + len;
        while at < end {
            let Some(&[typ, a, b, c]) = self.buf.get(at..at + 4) else {
                return Err(peer_misbehaved("a truncated handshake message"));
            };
            let n = u32::from_be_bytes([0, a, b, c]) as usize;
            let msg = at + 4..at + 4 + n;
            if msg.end > end {
                return Err(peer_misbehaved("a truncated handshake message"));
            }
            match (typ, &self.buf[msg.clone()]) {
                (KEY_UPDATE, [asked]) if *asked <= 1 => {
                    if msg.end != end {
                        return Err(peer_misbehaved("data after a key update in its record"));
                    }
                    self.open = self.shared.next_keys(false)?;
                    if *asked == 1 {
                        self.shared.update_asked.store(true, Ordering::Release);
                    }
                }
                (NEW_SESSION_TICKET, _) => {}
                _ => {
                    return Err(peer_misbehaved(&format!(
                        "a handshake message of type {typ} after the handshake"
                    )));
                }
            }
            at = msg.end;
        }
        Ok(())
    }
}

impl AsyncRead for RecordReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            let (p0, p1) = me.plain;
            if p0 < p1 {
                let n = (p1 - p0).min(out.remaining());
                out.put_slice(&me.buf[p0..p0 + n]);
                me.plain.0 += n;
                return Poll::Ready(Ok(()));
            }
            if me.closed || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if me.next_record()? {
                continue;
            }
            // A partial record at most is left: move it to the front when the rest of the
            // buffer could not hold a whole one.
            if me.start == me.end {
                (me.start, me.end) = (0, 0);
            } else if me.buf.len() - me.end < HEADER + MAX_CIPHERTEXT {
                me.buf.copy_within(me.start..me.end, 0);
                me.end -= me.start;
                me.start = 0;
                me.plain = (0, 0);
            }
            let mut rb = ReadBuf::new(&mut me.buf[me.end..]);
            ready!(Pin::new(&mut me.tcp).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // Only `close_notify` ends a TLS stream: a bare end of the connection could be
                // anyone's (a truncation), so it is an unexpected end, as in rustls.
                let why = if me.start == me.end {
                    "the connection closed without a TLS close_notify"
                } else {
                    "the connection closed in the middle of a TLS record"
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
            }
            me.end += n;
        }
    }
}

/// The writing half: plaintext sealed into records in one buffer, written out before a write
/// returns (so nothing waits in a buffer while the peer waits for it).
pub struct RecordWriter {
    tcp: OwnedWriteHalf,
    out: Vec<u8>,
    /// Bytes of `out` already on the socket.
    sent: usize,
    seal: Protection,
    shared: Arc<Shared>,
    /// Records sealed with one key before the next key update.
    update_at: u64,
    /// Plaintext taken by a write whose records are still going out.
    accepted: Option<usize>,
    close_sent: bool,
    /// Key updates sent so far.
    key_updates: u64,
}

impl std::fmt::Debug for RecordWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordWriter")
            .field("seq", &self.seal.seq)
            .field("pending", &(self.out.len() - self.sent))
            .field("key_updates", &self.key_updates)
            .finish_non_exhaustive()
    }
}

impl RecordWriter {
    pub(crate) fn new(tcp: OwnedWriteHalf, seal: Protection, shared: Arc<Shared>) -> Self {
        // Well before the confidentiality limit, as rustls does for its own records.
        let update_at = shared.limit().saturating_sub(1 << 12).max(1);
        RecordWriter {
            tcp,
            out: Vec::with_capacity(WRITE_BATCH + WRITE_BATCH / MAX_PLAINTEXT * 64),
            sent: 0,
            seal,
            shared,
            update_at,
            accepted: None,
            close_sent: false,
            key_updates: 0,
        }
    }

    /// Lowers the number of records between key updates (tests).
    #[cfg(test)]
    pub(crate) fn update_every(&mut self, records: u64) {
        self.update_at = records;
    }

    /// Key updates sent so far.
    pub fn key_updates(&self) -> u64 {
        self.key_updates
    }

    /// Seals one record of inner type `typ` around `content`, sent with the next write or flush
    /// (tests: what a misbehaving or foreign peer could send).
    #[cfg(test)]
    pub(crate) fn queue_record(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        self.seal_record(typ, content)
    }

    /// Queues a key update that asks the peer to update its own key too (tests: peers built on
    /// this layer never ask, other TLS 1.3 implementations may).
    #[cfg(test)]
    pub(crate) fn update_asking_the_peer(&mut self) -> io::Result<()> {
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1])?;
        self.seal = self.shared.next_keys(true)?;
        self.key_updates += 1;
        Ok(())
    }

    /// Seals one record of `content` with inner type `typ` onto `out`.
    fn seal_record(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        let len = content.len() + 1 + TAG;
        let head = header(len);
        self.out.extend_from_slice(&head);
        let body = self.out.len();
        self.out.extend_from_slice(content);
        self.out.push(typ);
        let nonce = self.seal.next_nonce()?;
        let tag = self
            .seal
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(head), &mut self.out[body..])
            .map_err(|_| tls_error(rustls::Error::EncryptError))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Before a record: a key update when this key has sealed its share or the peer asked.
    fn update_if_due(&mut self) -> io::Result<()> {
        let asked = self.shared.update_asked.swap(false, Ordering::AcqRel);
        if self.seal.seq >= self.update_at || asked {
            // key_update, update_not_requested, under the old key; then the new key.
            self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
            self.seal = self.shared.next_keys(true)?;
            self.key_updates += 1;
        }
        Ok(())
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.accepted.is_none() {
            ready!(me.poll_drain(cx))?;
            if data.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = data.len().min(WRITE_BATCH);
            for chunk in data[..n].chunks(MAX_PLAINTEXT) {
                me.update_if_due()?;
                me.seal_record(APPLICATION_DATA, chunk)?;
            }
            me.accepted = Some(n);
        }
        ready!(me.poll_drain(cx))?;
        Poll::Ready(Ok(me.accepted.take().unwrap_or(0)))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        if !me.close_sent {
            me.close_sent = true;
            // close_notify, a warning.
            me.seal_record(ALERT, &[1, 0])?;
            ready!(me.poll_drain(cx))?;
        }
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}
