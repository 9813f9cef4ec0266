//! Typed failures on the wire. Every error a server returns carries an encoded [`pb::Failure`] in
//! the gRPC status details; clients decide what to do (push again through the stream, give up) on
//! its [`pb::Reason`], never by reading the message, which is written for people and may change.

use prost::Message;
use tonic::{Code, Status};

use crate::pb;
use crate::pb::Reason;

/// A status with `reason` attached as details.
pub(crate) fn status(code: Code, reason: Reason, message: impl Into<String>) -> Status {
    let failure = pb::Failure {
        reason: reason as i32,
        applied: Vec::new(),
    };
    Status::with_details(code, message, failure.encode_to_vec().into())
}

/// InvalidArgument with [`Reason::Invalid`]: the request is malformed; nothing was applied.
pub(crate) fn invalid(message: impl Into<String>) -> Status {
    status(Code::InvalidArgument, Reason::Invalid, message)
}

/// Aborted with [`Reason::PartiallyApplied`] and exactly what was applied.
pub(crate) fn partially_applied(
    message: impl Into<String>,
    applied: &[(crate::protocol::Key, usize)],
) -> Status {
    let failure = pb::Failure {
        reason: Reason::PartiallyApplied as i32,
        applied: applied
            .iter()
            .map(|((param, part), n)| pb::Applied {
                param: param.clone(),
                part: *part,
                elements: *n as u64,
            })
            .collect(),
    };
    Status::with_details(Code::Aborted, message, failure.encode_to_vec().into())
}

/// The failure a status carries; [`Reason::Unspecified`] when it carries none (a status made by
/// the transport, or by a server that predates typed failures).
pub fn failure_of(st: &Status) -> pb::Failure {
    pb::Failure::decode(st.details()).unwrap_or_default()
}

/// The reason a status carries (see [`failure_of`]).
pub fn reason_of(st: &Status) -> Reason {
    Reason::try_from(failure_of(st).reason).unwrap_or(Reason::Unspecified)
}

/// Whether a same-host push that failed with `st` left nothing applied, so the same gradient may
/// be pushed again through the stream.
pub fn may_push_through_stream(st: &Status) -> bool {
    matches!(
        reason_of(st),
        Reason::NotAttached | Reason::UnreadableNothingApplied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_survive_the_status_and_decide_the_fallback() {
        let st = status(
            Code::FailedPrecondition,
            Reason::NotAttached,
            "whatever text",
        );
        assert_eq!(reason_of(&st), Reason::NotAttached);
        assert!(may_push_through_stream(&st));
        let st = status(
            Code::Aborted,
            Reason::UnreadableNothingApplied,
            "reading worker 1's gradient from its memory failed",
        );
        assert!(may_push_through_stream(&st));
        // The text that used to trigger the fallback does not, when pieces were applied.
        let st = partially_applied(
            "reading worker 1's gradient from its memory failed",
            &[(("w".into(), 0), 7)],
        );
        assert_eq!(reason_of(&st), Reason::PartiallyApplied);
        assert!(!may_push_through_stream(&st));
        let f = failure_of(&st);
        assert_eq!(f.applied.len(), 1);
        assert_eq!(
            (f.applied[0].param.as_str(), f.applied[0].elements),
            ("w", 7)
        );
        // A status without details (made by the transport) falls back to nothing.
        let st = Status::aborted("not attached; from its memory");
        assert_eq!(reason_of(&st), Reason::Unspecified);
        assert!(!may_push_through_stream(&st));
        assert!(!may_push_through_stream(&invalid("bad")));
        assert_eq!(
            reason_of(&Status::with_details(
                Code::Internal,
                "x",
                vec![0xff, 0xff].into()
            )),
            Reason::Unspecified,
            "garbage details are no reason"
        );
    }
}
