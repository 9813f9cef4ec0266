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
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ring::aead::{self, LessSafeKey, Nonce, UnboundKey};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets};

/// Largest plaintext in one record (RFC 8446 5.1).
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;

/// Largest ciphertext in one record (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

/// Record header: type, legacy version, length.
const HEADER: usize = 5;

/// AEAD tag of every cipher suite TLS 1.3 uses here.
const TAG: usize = 16;

/// TLS content type of application data.
const APPLICATION_DATA: u8 = 23;
/// TLS content type of a handshake message (post-handshake: key updates, tickets).
const HANDSHAKE: u8 = 22;
/// TLS content type of an alert.
const ALERT: u8 = 21;
/// Handshake message type of a key update.
const KEY_UPDATE: u8 = 24;
/// Handshake message type of a session ticket (ignored: no resumption).
const NEW_SESSION_TICKET: u8 = 4;

/// Records in a row without application data (key updates, empty records, tickets) a reader
/// accepts before it refuses the connection (rustls allows the same).
pub(crate) const MAX_RECORDS_WITHOUT_DATA: u32 = 32;

/// The alert for a record that has no place here.
const UNEXPECTED_MESSAGE: AlertDescription = AlertDescription::UnexpectedMessage;
/// The alert for a record that cannot be parsed.
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

/// An error saying the peer broke the protocol by sending `what`.
fn peer_misbehaved(what: &str) -> io::Error {
    tls_error(rustls::Error::General(format!("the peer sent {what}")))
}

/// A failure of one half, with the alert the peer should get for it (none when the peer ended
/// the connection itself).
type Fatal = (Option<AlertDescription>, io::Error);

/// A failure that sends `alert` to the peer.
fn fatal(alert: AlertDescription, what: &str) -> Fatal {
    (Some(alert), peer_misbehaved(what))
}

/// A failure kept so that every later call fails the same way.
#[derive(Debug, Clone)]
struct Sticky {
    /// The error's kind.
    kind: io::ErrorKind,
    /// The TLS error, when it was one.
    tls: Option<rustls::Error>,
    /// Its words.
    text: String,
}

impl Sticky {
    /// Keeps `e` to be returned again.
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

    /// The kept failure as a new error of the same kind and text.
    fn error(&self) -> io::Error {
        match &self.tls {
            Some(t) => tls_error(t.clone()),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

/// The rustls connection that derives the next keys, shared by a connection's two halves.
pub(crate) enum Keys {
    /// The dialling side's.
    Client(KernelConnection<ClientConnectionData>),
    /// The accepting side's.
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    /// The next secret of one direction (`tx`: sending) and the sequence number it starts at.
    fn next(&mut self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, tx) {
            (Keys::Client(k), true) => k.update_tx_secret(),
            (Keys::Client(k), false) => k.update_rx_secret(),
            (Keys::Server(k), true) => k.update_tx_secret(),
            (Keys::Server(k), false) => k.update_rx_secret(),
        }
    }

    /// How many records the negotiated suite may protect under one key before it must change.
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
    /// The key schedule (a key update takes the lock).
    keys: Mutex<Keys>,
    /// The peer asked for a key update: the writer sends one before its next record.
    update_asked: AtomicBool,
    /// This end is the server.
    server: bool,
    /// The reader failed: the fatal alert the writer sends (if any), and the failure.
    failed: Mutex<Option<(Option<AlertDescription>, Sticky)>>,
    /// `failed` holds something: the writer checks this flag, not the lock, on every write.
    any_failed: AtomicBool,
}

impl Shared {
    /// The state both halves of a connection share, around its key schedule.
    pub(crate) fn new(keys: Keys) -> Arc<Self> {
        let server = matches!(keys, Keys::Server(_));
        Arc::new(Shared {
            keys: Mutex::new(keys),
            update_asked: AtomicBool::new(false),
            server,
            failed: Mutex::new(None),
            any_failed: AtomicBool::new(false),
        })
    }

    /// The next key of one direction (after a key update).
    fn next_keys(&self, tx: bool) -> io::Result<Protection> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| io::Error::other("the TLS key schedule is unusable (a panic)"))?;
        let (seq, secrets) = keys.next(tx).map_err(tls_error)?;
        Protection::new(secrets, seq)
    }

    /// The confidentiality limit of the connection's suite (records per key).
    fn limit(&self) -> u64 {
        self.keys
            .lock()
            .map_or(1 << 24, |k| k.confidentiality_limit())
    }
}

/// One direction's key, fixed IV and record sequence number.
pub(crate) struct Protection {
    /// The AEAD key.
    key: LessSafeKey,
    /// The fixed IV, XORed with the sequence number for each nonce.
    iv: [u8; aead::NONCE_LEN],
    /// The next record's sequence number.
    seq: u64,
}

impl Protection {
    /// One direction's protection from its traffic secret, at sequence number `seq`.
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

/// The header of an application-data record of `len` bytes.
fn header(len: usize) -> [u8; HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

mod reader;
mod writer;

pub use reader::RecordReader;
pub use writer::RecordWriter;
