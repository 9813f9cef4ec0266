//! The writing half of a ring connection's TLS records.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use ring::aead::Aad;
use rustls::AlertDescription;
use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;

use super::*;

/// The writing half: plaintext sealed into records in one buffer, written out before a write
/// returns (so nothing waits in a buffer while the peer waits for it).
pub struct RecordWriter {
    /// The socket's writing half.
    tcp: OwnedWriteHalf,
    /// Sealed records not yet on the socket.
    out: Vec<u8>,
    /// Bytes of `out` already on the socket.
    sent: usize,
    /// This side's key.
    seal: Protection,
    /// What the two halves share.
    shared: Arc<Shared>,
    /// Records sealed with one key before the next key update.
    update_at: u64,
    /// A write whose records are still going out.
    pending: Option<PendingWrite>,
    /// Whether `close_notify` went out.
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
    /// See `seq_before`.
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
    /// The writing half over `tcp`, sealing with `seal`.
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
        if !self.shared.any_failed.load(Ordering::Acquire) {
            return None;
        }
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

    /// Sends what is sealed and not sent yet.
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

    /// Seals and sends `data` (a retry of the same bytes after Pending reuses what was sealed).
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
