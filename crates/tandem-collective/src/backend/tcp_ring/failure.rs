//! When an operation fails: another rank's abort preferred over a closed connection (it is often
//! that failure's echo), a timeout turned into a stall inquiry that names the culprit, and this
//! rank's own failure published for every other rank.

use super::*;

/// Resolves with the abort once one is announced.
async fn aborted(rx: &mut watch::Receiver<Option<Abort>>) -> Abort {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => match v.clone() {
            Some(a) => a,
            None => std::future::pending().await,
        },
        // The watcher is gone: the group is closing; never resolve.
        Err(_) => std::future::pending().await,
    }
}

/// Whether a failure was seen here first (and so is published), or came from another rank.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Nothing to tell the others: it succeeded, or another rank's abort ended it.
    No,
    /// It failed here: the others must be told.
    Yes,
    /// It timed out here.
    TimedOut,
}

impl TcpRing {
    /// Runs `fut` until it ends, this rank's deadline passes or another rank's abort comes; a
    /// failure seen here first is published for the others.
    pub(super) fn drive<T>(
        &self,
        fut: impl Future<Output = Result<T>>,
        waiting: &crate::stall::WaitCell,
        header: &OpHeader,
        timeout: Duration,
    ) -> Result<T> {
        let mut abort = self.abort.clone();
        let (result, local) = self.rt.block_on(async {
            tokio::select! {
                biased;
                r = tokio::time::timeout(timeout, ops::spin_then_park(fut, OP_SPIN)) => match r {
                    Ok(Ok(v)) => (Ok(v), Local::No),
                    // A closed connection is often the echo of a failure another rank has already
                    // diagnosed (it exits after reporting): prefer its abort when one comes soon.
                    Ok(Err(e @ Error::PeerLost { .. })) => {
                        match tokio::time::timeout(Duration::from_millis(500), aborted(&mut abort)).await {
                            Ok(a) => (Err(a.into_error(timeout)), Local::No),
                            Err(_) => (Err(e), Local::Yes),
                        }
                    }
                    Ok(Err(e)) => (Err(e), Local::Yes),
                    Err(_) => (Err(Error::timeout("", timeout)), Local::TimedOut),
                },
                a = aborted(&mut abort) => (Err(a.into_error(timeout)), Local::No),
            }
        });
        let result = match local {
            Local::TimedOut => self.timed_out(waiting.get(), header, timeout),
            _ => result.map_err(|e| (e, local == Local::Yes)),
        };
        match result {
            Ok(v) => Ok(v),
            Err((e, publish)) => {
                if publish {
                    (self.control.publish)(Abort::from_error(&e, self.rank));
                }
                Err(e)
            }
        }
    }

    /// After this rank's operation timed out: asks every rank what it is doing, names the culprit
    /// ([`crate::stall::diagnose`]), and returns the error with whether to publish it. Another
    /// rank's abort that arrives meanwhile wins (it diagnosed the same stall first).
    fn timed_out<T>(
        &self,
        waiting: Waiting,
        header: &OpHeader,
        timeout: Duration,
    ) -> std::result::Result<T, (Error, bool)> {
        let seq = header.seq;
        let op = format!("op #{seq} {header}");
        let grace = (timeout / 4).min(Duration::from_millis(1500));
        let answers = (self.control.inquire)(grace);
        if let Some(a) = self.abort.borrow().clone() {
            return Err((a.into_error(timeout), false));
        }
        let what = match answers {
            Ok(answers) => {
                let mut states = answers;
                states.resize(self.world, None);
                states[self.rank] = Some(self.control.progress.state());
                let grace = format!("{grace:?}");
                crate::stall::diagnose(self.rank, &op, &states, &self.control.addrs, &grace).what
            }
            // The rendezvous is out of reach too: on rank 0, that rank is gone (or cut off);
            // elsewhere, this rank may be the one cut off.
            Err(why) if self.control.rendezvous_on_rank0 && self.rank != 0 => format!(
                "{} during {op}: neither it nor the rendezvous it hosts answers ({why}); this rank was waiting on {} (if every other rank reports the same, rank 0 is cut off; if only this one does, this host is)",
                self.name(0),
                match waiting {
                    Waiting::Header(p) | Waiting::Data(p) => self.name(p),
                    Waiting::Nothing => "no other rank".into(),
                }
            ),
            Err(why) => format!(
                "{op}: the rendezvous could not be reached to ask the other ranks ({why}); this rank was waiting on {} (this host may be cut off)",
                match waiting {
                    Waiting::Header(p) | Waiting::Data(p) => self.name(p),
                    Waiting::Nothing => "no other rank".into(),
                }
            ),
        };
        Err((Error::timeout(what, timeout), true))
    }

    /// "rank r (address)".
    fn name(&self, r: usize) -> String {
        match self.control.addrs.get(r).filter(|a| !a.is_empty()) {
            Some(a) => format!("rank {r} ({a})"),
            None => format!("rank {r}"),
        }
    }
}
