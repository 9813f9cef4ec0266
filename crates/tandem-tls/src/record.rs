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
//!
//! Held to RFC 8446 as rustls holds its own: an inner plaintext is at most 2^14 + 1 bytes
//! (`record_overflow`); at most [`MAX_RECORDS_WITHOUT_DATA`] records in a row may carry no
//! application data (key updates, empty records, session tickets); a server refuses session
//! tickets (only servers send them); every failure is sticky (each later read or write fails the
//! same way) and, where the RFC asks for one, the fatal alert (`bad_record_mac`,
//! `record_overflow`, `unexpected_message`, `decode_error`) goes to the peer with the writer's
//! next call. A write that was cancelled is never sent later nor counted as another write's: if
//! none of its records went out they are taken back, otherwise the connection fails.

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

/// Records in a row without application data (key updates, empty records, tickets) a reader
/// accepts before it refuses the connection (rustls allows the same).
pub(crate) const MAX_RECORDS_WITHOUT_DATA: u32 = 32;

const UNEXPECTED_MESSAGE: AlertDescription = AlertDescription::UnexpectedMessage;
const DECODE_ERROR: AlertDescription = AlertDescription::DecodeError;

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

/// A failure of one half, with the alert the peer should get for it (none when the peer ended
/// the connection itself).
type Fatal = (Option<AlertDescription>, io::Error);

fn fatal(alert: AlertDescription, what: &str) -> Fatal {
    (Some(alert), peer_misbehaved(what))
}

/// A failure kept so that every later call fails the same way.
#[derive(Debug, Clone)]
struct Sticky {
    kind: io::ErrorKind,
    tls: Option<rustls::Error>,
    text: String,
}

impl Sticky {
    fn of(e: &io::Error) -> Sticky {
        Sticky {
            kind: e.kind(),
            tls: e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .cloned(),
            text: e.to_string(),
        }
    }

    fn error(&self) -> io::Error {
        match &self.tls {
            Some(t) => tls_error(t.clone()),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
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
    /// This end is the server.
    server: bool,
    /// The reader failed: the fatal alert the writer sends (if any), and the failure.
    failed: Mutex<Option<(Option<AlertDescription>, Sticky)>>,
}

impl Shared {
    pub(crate) fn new(keys: Keys) -> Arc<Self> {
        let server = matches!(keys, Keys::Server(_));
        Arc::new(Shared {
            keys: Mutex::new(keys),
            update_asked: AtomicBool::new(false),
            server,
            failed: Mutex::new(None),
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
    /// Records in a row without application data.
    without_data: u32,
    /// The failure every later read repeats.
    failed: Option<Sticky>,
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
            without_data: 0,
            failed: None,
        })
    }

    /// Keeps `f` for every later read, hands its alert to the writer, and returns the error.
    fn fail(&mut self, (alert, e): Fatal) -> io::Error {
        let sticky = Sticky::of(&e);
        self.failed = Some(sticky.clone());
        if let Ok(mut f) = self.shared.failed.lock()
            && f.is_none()
        {
            *f = Some((alert, sticky));
        }
        e
    }

    /// The socket.
    pub(crate) fn tcp(&self) -> &OwnedReadHalf {
        &self.tcp
    }

    /// Decrypts the next whole record in the buffer, if there is one: `Ok(true)` when it was
    /// taken (its plaintext, if application data, is now in `plain`).
    fn next_record(&mut self) -> Result<bool, Fatal> {
        let avail = self.end - self.start;
        if avail < HEADER {
            return Ok(false);
        }
        let mut head = [0u8; HEADER];
        head.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        if head[0] != APPLICATION_DATA {
            return Err(fatal(
                UNEXPECTED_MESSAGE,
                &format!(
                    "an unprotected record of type {} after the handshake",
                    head[0]
                ),
            ));
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(fatal(
                AlertDescription::RecordOverflow,
                &format!("a record of {len} bytes"),
            ));
        }
        if len <= TAG {
            return Err(fatal(DECODE_ERROR, &format!("a record of {len} bytes")));
        }
        if avail < HEADER + len {
            return Ok(false);
        }
        let body = self.start + HEADER;
        let nonce = self.open.next_nonce().map_err(|e| (None, e))?;
        let plain_len = self
            .open
            .key
            .open_in_place(nonce, Aad::from(head), &mut self.buf[body..body + len])
            .map_err(|_| {
                (
                    Some(AlertDescription::BadRecordMac),
                    tls_error(rustls::Error::DecryptError),
                )
            })?
            .len();
        self.start = body + len;
        if plain_len > MAX_PLAINTEXT + 1 {
            return Err(fatal(
                AlertDescription::RecordOverflow,
                &format!("a record of {plain_len} bytes of inner plaintext (at most 2^14 + 1)"),
            ));
        }
        // The content type is the last non-zero byte; zeros after it are padding.
        let content = &self.buf[body..body + plain_len];
        let Some(last) = content.iter().rposition(|b| *b != 0) else {
            return Err(fatal(UNEXPECTED_MESSAGE, "a record without a content type"));
        };
        let data = content[last] == APPLICATION_DATA && last > 0;
        match content[last] {
            APPLICATION_DATA => self.plain = (body, body + last),
            ALERT => self.alert(body, last)?,
            HANDSHAKE => self.handshake(body, last)?,
            other => {
                return Err(fatal(
                    UNEXPECTED_MESSAGE,
                    &format!("a record of content type {other}"),
                ));
            }
        }
        self.without_data = if data { 0 } else { self.without_data + 1 };
        if self.without_data > MAX_RECORDS_WITHOUT_DATA {
            return Err(fatal(
                UNEXPECTED_MESSAGE,
                &format!(
                    "more than {MAX_RECORDS_WITHOUT_DATA} records in a row without data (key \
                     updates, empty records or tickets)"
                ),
            ));
        }
        Ok(true)
    }

    fn alert(&mut self, body: usize, len: usize) -> Result<(), Fatal> {
        match self.buf[body..body + len] {
            [_, 0] => {
                self.closed = true;
                Ok(())
            }
            // The peer ended the connection: nothing to answer.
            [_, desc] => Err((
                None,
                tls_error(rustls::Error::AlertReceived(AlertDescription::from(desc))),
            )),
            _ => Err(fatal(DECODE_ERROR, "a malformed alert")),
        }
    }

    /// Handshake messages after the handshake: key updates (followed), session tickets to a
    /// client (none are used: ignored); anything else, tickets to a server included, is refused.
    fn handshake(&mut self, body: usize, len: usize) -> Result<(), Fatal> {
        let mut at = body;
        let end = body + len;
        while at < end {
            let Some(&[typ, a, b, c]) = self.buf.get(at..at + 4) else {
                return Err(fatal(DECODE_ERROR, "a truncated handshake message"));
            };
            let n = u32::from_be_bytes([0, a, b, c]) as usize;
            let msg = at + 4..at + 4 + n;
            if msg.end > end {
                return Err(fatal(DECODE_ERROR, "a truncated handshake message"));
            }
            match (typ, &self.buf[msg.clone()]) {
                (KEY_UPDATE, [asked]) if *asked <= 1 => {
                    if msg.end != end {
                        return Err(fatal(
                            UNEXPECTED_MESSAGE,
                            "data after a key update in its record",
                        ));
                    }
                    self.open = self.shared.next_keys(false).map_err(|e| (None, e))?;
                    if *asked == 1 {
                        self.shared.update_asked.store(true, Ordering::Release);
                    }
                }
                (NEW_SESSION_TICKET, _) if !self.shared.server => {}
                (NEW_SESSION_TICKET, _) => {
                    return Err(fatal(
                        UNEXPECTED_MESSAGE,
                        "a session ticket to a server (only servers send them)",
                    ));
                }
                _ => {
                    return Err(fatal(
                        UNEXPECTED_MESSAGE,
                        &format!("a handshake message of type {typ} after the handshake"),
                    ));
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
        if let Some(f) = &me.failed {
            return Poll::Ready(Err(f.error()));
        }
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
            match me.next_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(f) => return Poll::Ready(Err(me.fail(f))),
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
            if let Err(e) = ready!(Pin::new(&mut me.tcp).poll_read(cx, &mut rb)) {
                return Poll::Ready(Err(me.fail((None, e))));
            }
            let n = rb.filled().len();
            if n == 0 {
                // Only `close_notify` ends a TLS stream: a bare end of the connection could be
                // anyone's (a truncation), so it is an unexpected end, as in rustls.
                let why = if me.start == me.end {
                    "the connection closed without a TLS close_notify"
                } else {
                    "the connection closed in the middle of a TLS record"
                };
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, why);
                return Poll::Ready(Err(me.fail((None, e))));
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
    /// A write whose records are still going out.
    pending: Option<PendingWrite>,
    close_sent: bool,
    /// The reader's fatal alert is sealed (and goes out before this half fails).
    alert_sealed: bool,
    /// Key updates sent so far.
    key_updates: u64,
    /// The failure every later call repeats.
    failed: Option<Sticky>,
}

/// A write that returned `Pending` with its records sealed: what it was (to tell its retry from
/// another write after it was cancelled) and how to take its records back.
struct PendingWrite {
    /// Plaintext bytes the write took.
    taken: usize,
    /// A copy of them (made only when the socket could not take the records at once).
    plain: Vec<u8>,
    /// The sequence number and key updates before its records were sealed.
    seq_before: u64,
    updates_before: u64,
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
            pending: None,
            close_sent: false,
            alert_sealed: false,
            key_updates: 0,
            failed: None,
        }
    }

    /// Keeps `e` for every later call and returns it.
    fn fail(&mut self, e: io::Error) -> io::Error {
        self.failed = Some(Sticky::of(&e));
        e
    }

    /// The reader's failure, if any: its fatal alert is sealed (once) before this half fails too.
    fn reader_failed(&mut self) -> Option<(Option<AlertDescription>, Sticky)> {
        self.shared.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Fails every call once either half failed, after sending the reader's alert.
    fn poll_failed(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Error>> {
        if let Some(f) = &self.failed {
            return Poll::Ready(Some(f.error()));
        }
        let Some((alert, why)) = self.reader_failed() else {
            return Poll::Ready(None);
        };
        if let Some(desc) = alert {
            if !self.alert_sealed {
                self.alert_sealed = true;
                self.close_sent = true;
                // Whatever was going out goes first (records are never cut), then the alert.
                self.out.drain(..self.sent);
                self.sent = 0;
                let _ = self.seal_record(ALERT, &[2, u8::from(desc)]);
            }
            // Until it is out (or the socket fails: the peer is gone then anyway).
            let _ = ready!(self.poll_drain(cx));
        }
        Poll::Ready(Some(self.fail(why.error())))
    }

    /// Lowers the number of records between key updates (tests).
    #[cfg(test)]
    pub(crate) fn update_every(&mut self, records: u64) {
        self.update_at = records;
    }

    /// Seals `data` as a write would and leaves it unsent, as a write whose socket took nothing
    /// before it was cancelled (tests); `partly` pretends one byte of it went out.
    #[cfg(test)]
    pub(crate) fn stage_unsent(&mut self, data: &[u8], partly: bool) -> io::Result<()> {
        let (seq_before, updates_before) = (self.seal.seq, self.key_updates);
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.update_if_due()?;
            self.seal_record(APPLICATION_DATA, chunk)?;
        }
        self.pending = Some(PendingWrite {
            taken: data.len(),
            plain: data.to_vec(),
            seq_before,
            updates_before,
        });
        self.sent = usize::from(partly);
        Ok(())
    }

    /// Key updates sent so far.
    pub fn key_updates(&self) -> u64 {
        self.key_updates
    }

    /// Seals one record of inner type `typ` around `content`, sent with the next write or flush
    /// (tests and fuzzing: what a misbehaving or foreign peer could send).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn queue_record(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        self.seal_record(typ, content)
    }

    /// Queues a key update now (not asking the peer to update its own; tests).
    #[cfg(test)]
    pub(crate) fn update_now(&mut self) -> io::Result<()> {
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        self.seal = self.shared.next_keys(true)?;
        self.key_updates += 1;
        Ok(())
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

impl RecordWriter {
    /// A write found a write still pending: the same write again (its retry), or another one
    /// after the first was cancelled. Returns whether `data` is the retry; a cancelled write's
    /// records are taken back when none of them went out, and fail the connection otherwise.
    fn is_retry(&mut self, data: &[u8]) -> io::Result<bool> {
        let Some(p) = &self.pending else {
            return Ok(false);
        };
        if data.len() >= p.taken && data[..p.taken] == p.plain[..] {
            return Ok(true);
        }
        if self.sent == 0 && self.key_updates == p.updates_before {
            // Nothing of it reached the socket: as if it had never been written.
            self.seal.seq = p.seq_before;
            self.out.clear();
            self.pending = None;
            return Ok(false);
        }
        Err(self.fail(io::Error::other(
            "a write was cancelled after part of its TLS records went out; the connection \
             cannot go on without sending them",
        )))
    }

    fn write_inner(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if !self.is_retry(data)? {
            ready!(self.poll_drain(cx))?;
            if data.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = data.len().min(WRITE_BATCH);
            let (seq_before, updates_before) = (self.seal.seq, self.key_updates);
            for chunk in data[..n].chunks(MAX_PLAINTEXT) {
                self.update_if_due()?;
                self.seal_record(APPLICATION_DATA, chunk)?;
            }
            if self.poll_drain(cx)?.is_ready() {
                return Poll::Ready(Ok(n));
            }
            self.pending = Some(PendingWrite {
                taken: n,
                plain: data[..n].to_vec(),
                seq_before,
                updates_before,
            });
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        Poll::Ready(Ok(self.pending.take().map_or(0, |p| p.taken)))
    }
}

impl AsyncWrite for RecordWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if let Some(e) = ready!(me.poll_failed(cx)) {
            return Poll::Ready(Err(e));
        }
        match ready!(me.write_inner(cx, data)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(me.fail(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(e) = ready!(me.poll_failed(cx)) {
            return Poll::Ready(Err(e));
        }
        if let Err(e) = ready!(me.poll_drain(cx)) {
            return Poll::Ready(Err(me.fail(e)));
        }
        Pin::new(&mut me.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(e) = ready!(me.poll_failed(cx)) {
            return Poll::Ready(Err(e));
        }
        if let Err(e) = ready!(me.poll_drain(cx)) {
            return Poll::Ready(Err(me.fail(e)));
        }
        if !me.close_sent {
            me.close_sent = true;
            // close_notify, a warning.
            me.seal_record(ALERT, &[1, 0])?;
            ready!(me.poll_drain(cx))?;
        }
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}
