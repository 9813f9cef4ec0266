//! The control messages ranks exchange through the rendezvous, outside the ring's sockets: a
//! group's abort (the first failure, published for every rank to see) and a rank's answer to a
//! stall inquiry. Typed here and encoded as JSON (serde), never text split on separators; what a
//! peer sends is decoded without trust (an unreadable message is an error naming it, not a
//! panic or a guess).
//!
//! ```
//! use tandem_collective::messages::Abort;
//! let a = Abort::Mismatch { seen_by: 1, detail: "rank 0 called broadcast".into() };
//! assert_eq!(Abort::decode(&a.encode()).unwrap(), a);
//! assert!(Abort::decode("peer_lost\t0\tgone").is_err());
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_core::Error;

pub use crate::backend::ops::Waiting;
pub use crate::stall::RankState;

/// A control message that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("an unreadable {what} from another rank ({len} bytes): {source}")]
pub struct Unreadable {
    /// What it should have been.
    pub what: &'static str,
    /// How long it was.
    pub len: usize,
    /// Why it could not be read.
    #[source]
    pub source: serde_json::Error,
}

/// Why a group stopped: the first failure of any rank, published for every other rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Abort {
    /// `rank` was lost (its connection closed, or the rendezvous it hosted is gone).
    PeerLost {
        /// The rank lost.
        rank: usize,
        /// What was going on, as the rank that saw it said.
        context: String,
    },
    /// `rank` aborted the group itself (`ProcessGroup::abort`).
    Aborted {
        /// The rank that aborted.
        rank: usize,
        /// Its reason.
        reason: String,
    },
    /// An operation timed out on `seen_by` (the culprit named in `what`).
    Timeout {
        /// The rank whose operation timed out.
        seen_by: usize,
        /// What it waited for, and who is at fault.
        what: String,
    },
    /// The ranks called different operations.
    Mismatch {
        /// The rank that noticed.
        seen_by: usize,
        /// What differed.
        detail: String,
    },
    /// Any other failure.
    Other {
        /// The rank it happened on.
        seen_by: usize,
        /// The error, in words.
        message: String,
    },
}

impl Abort {
    /// The abort that tells the other ranks about `e`, seen on rank `seen_by`.
    pub fn from_error(e: &Error, seen_by: usize) -> Abort {
        match e {
            Error::PeerLost { rank, context } => Abort::PeerLost {
                rank: *rank,
                context: format!("{context} (seen by rank {seen_by})"),
            },
            Error::Timeout { what, .. } => Abort::Timeout {
                seen_by,
                what: format!("{what} (seen by rank {seen_by})"),
            },
            Error::OpMismatch(m) => Abort::Mismatch {
                seen_by,
                detail: m.clone(),
            },
            other => Abort::Other {
                seen_by,
                message: format!("{other} (on rank {seen_by})"),
            },
        }
    }

    /// The error this rank reports for another rank's abort (`timeout`: this rank's operation
    /// deadline, for a timeout).
    pub fn into_error(self, timeout: Duration) -> Error {
        match self {
            Abort::PeerLost { rank, context } => Error::PeerLost { rank, context },
            Abort::Aborted { rank, reason } => Error::PeerLost {
                rank,
                context: format!("the group, which rank {rank} aborted: {reason}"),
            },
            Abort::Timeout { what, .. } => Error::timeout(what, timeout),
            Abort::Mismatch { detail, .. } => Error::OpMismatch(detail),
            Abort::Other { message, .. } => {
                Error::transport("a collective on another rank", message)
            }
        }
    }

    /// The wire form.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// Reads what [`Abort::encode`] wrote.
    pub fn decode(s: &str) -> Result<Abort, Unreadable> {
        decode("abort", s)
    }

    /// The abort for a message that could not be read: a failure all the same (some rank
    /// published it), reported with what was wrong.
    pub fn unreadable(e: &Unreadable, seen_by: usize) -> Abort {
        Abort::Other {
            seen_by,
            message: e.to_string(),
        }
    }
}

impl RankState {
    /// The wire form of a stall answer.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// Reads what [`RankState::encode`] wrote.
    pub fn decode(s: &str) -> Result<RankState, Unreadable> {
        decode("stall answer", s)
    }
}

/// A control message as JSON.
fn encode<T: Serialize>(v: &T) -> String {
    // These types hold strings and integers only: serialising them cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// A control message read back; what cannot be read is named (`what`) with its length.
fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, s: &str) -> Result<T, Unreadable> {
    serde_json::from_str(s).map_err(|source| Unreadable {
        what,
        len: s.len(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_abort_travels_and_becomes_the_error_it_describes() {
        let t = Duration::from_secs(3);
        let cases = [
            Error::PeerLost {
                rank: 2,
                context: "allreduce".into(),
            },
            Error::timeout("rank 1 never started", t),
            Error::OpMismatch("rank 0 called broadcast".into()),
            Error::invalid("x", "bad\tvalue with\ttabs"),
        ];
        for e in cases {
            let a = Abort::from_error(&e, 3);
            let back = Abort::decode(&a.encode()).expect("decodes");
            assert_eq!(back, a);
            let got = back.into_error(t);
            assert_eq!(
                got.kind(),
                match &e {
                    Error::PeerLost { .. } => Error::PeerLost {
                        rank: 0,
                        context: String::new()
                    }
                    .kind(),
                    Error::Timeout { .. } => Error::timeout("", t).kind(),
                    Error::OpMismatch(_) => Error::OpMismatch(String::new()).kind(),
                    _ => Error::transport("", "").kind(),
                }
            );
            assert!(got.to_string().contains("rank"), "{got}");
        }
        let user = Abort::Aborted {
            rank: 1,
            reason: "out of data".into(),
        };
        let e = Abort::decode(&user.encode())
            .expect("decodes")
            .into_error(t);
        assert!(
            matches!(&e, Error::PeerLost { rank: 1, context } if context.contains("out of data")),
            "{e}"
        );
    }

    #[test]
    fn unreadable_messages_are_errors_naming_them() {
        for bad in [
            "",
            "peer_lost\t0\tgone",
            "{\"kind\":\"nope\"}",
            "{\"kind\":\"peer_lost\"}",
        ] {
            let e = Abort::decode(bad).expect_err(bad);
            assert!(e.to_string().contains("unreadable abort"), "{e}");
        }
        let a = Abort::unreadable(&Abort::decode("x").expect_err("x"), 4);
        assert!(matches!(a, Abort::Other { seen_by: 4, .. }));
    }

    #[test]
    fn stall_answers_travel_and_bad_ones_are_refused() {
        for waiting in [Waiting::Header(3), Waiting::Data(1), Waiting::Nothing] {
            let s = RankState {
                started: 17,
                in_op: true,
                waiting,
                ms: 2500,
            };
            assert_eq!(RankState::decode(&s.encode()).expect("decodes"), s);
        }
        for bad in ["17 1 header 3 2500", "{}", "{\"started\":-1}"] {
            assert!(RankState::decode(bad).is_err(), "{bad}");
        }
    }
}
