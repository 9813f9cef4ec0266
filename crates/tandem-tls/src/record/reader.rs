//! The reading half of a ring connection's TLS records.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use ring::aead::Aad;
use rustls::AlertDescription;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

use super::*;

/// The reading half: ciphertext from the socket into one buffer, records decrypted in place.
pub struct RecordReader {
    /// The socket's reading half.
    tcp: OwnedReadHalf,
    /// Ciphertext read, decrypted in place.
    buf: Box<[u8]>,
    /// Ciphertext not yet decrypted: `buf[start..end]`.
    start: usize,
    /// See `start`.
    end: usize,
    /// Plaintext decrypted and not yet given to the caller: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// The peer's key.
    open: Protection,
    /// What the two halves share.
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
            self.shared.any_failed.store(true, Ordering::Release);
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

    /// Handles an alert record: a close_notify ends the stream cleanly, any other is the peer's
    /// failure.
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
