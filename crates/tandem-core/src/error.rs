//! The one error type every Tandem crate returns.
//!
//! Why one enum for every crate: a user's training loop calls collectives, the parameter server and
//! the rendezvous, and wants to react to *what* went wrong (a lost peer, a timeout, a bad argument,
//! a refused token) the same way wherever it happened; the Python bindings map each variant to one
//! exception class. Each variant carries the context that names the culprit (the rank, the
//! variable, the address), because an error that says only "timed out" sends people to debug the
//! wrong machine.

use std::time::Duration;

use crate::dtype::DType;

/// Convenience alias for results carrying a Tandem [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Tandem, each variant with the context that explains it.
///
/// The enum is `#[non_exhaustive]`: later versions add variants, so match with a wildcard arm.
///
/// ```
/// use tandem_core::Error;
/// let e = Error::config("TF_CONFIG", "task.index 3 is out of range: the cluster lists 2 workers");
/// assert!(e.to_string().contains("TF_CONFIG"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration from the environment, a file or a builder is missing, malformed or contradictory.
    #[error("configuration error in {variable}: {problem}")]
    Config {
        /// The variable, flag or field at fault (e.g. `TF_CONFIG`, `SLURM_TASKS_PER_NODE`).
        variable: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An operating-system I/O call failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What Tandem was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A transport (gRPC, TCP framing) failed for a reason other than a timeout or a lost peer.
    #[error("transport error while {context}: {message}")]
    Transport {
        /// What Tandem was doing.
        context: String,
        /// What the transport reported.
        message: String,
    },
    /// Something awaited did not happen before its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited, with the names that explain it (address, keys, rank).
        what: String,
        /// How long Tandem waited.
        after: Duration,
    },
    /// A peer process stopped answering or closed its connection.
    #[error("lost peer rank {rank} during {context}")]
    PeerLost {
        /// The rank of the lost peer.
        rank: usize,
        /// The operation (and its sequence number) during which it was lost.
        context: String,
    },
    /// A tensor had the wrong shape.
    #[error("shape mismatch for {name}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which tensor or parameter.
        name: String,
        /// The shape that was required.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A tensor had the wrong element type.
    #[error("dtype mismatch for {name}: expected {expected}, got {got}")]
    DTypeMismatch {
        /// Which tensor or parameter.
        name: String,
        /// The dtype that was required.
        expected: DType,
        /// The dtype that was given.
        got: DType,
    },
    /// Ranks of one group called different collective operations at the same point.
    #[error("collective mismatch: {0}")]
    OpMismatch(String),
    /// A caller gave an argument Tandem cannot act on (bad length, out-of-range root, unknown name).
    #[error("invalid argument {name}: {problem}")]
    InvalidArgument {
        /// The argument at fault.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A peer or a request did not carry the job's token.
    #[error("authentication failed with {peer}: {reason}")]
    Authentication {
        /// Who was refused or who refused us.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A requested backend (e.g. NCCL) cannot be used in this build or on this machine.
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        backend: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A server refused a call because of its state, not the call's content: nothing is declared
    /// yet, another declaration is in force, no checkpoint directory was configured.
    #[error("{context} was refused: {problem}")]
    Precondition {
        /// What Tandem was doing, and with whom.
        context: String,
        /// The state that refused it.
        problem: String,
    },
    /// A gradient was applied in part only (the worker's memory stopped being readable part-way);
    /// `applied` says exactly which part. Pushing it again would apply that part twice.
    #[error("{context}: only part of the gradient was applied ({applied})")]
    PartiallyApplied {
        /// What Tandem was doing, and with whom.
        context: String,
        /// What was applied, partition by partition.
        applied: String,
    },
    /// A parameter server went on without this worker: it was silent past its lease (sync mode),
    /// and the gradient it pushed is for a step already applied without it; nothing of it was
    /// applied. Pull the current parameters and push for the server's step to take part again.
    #[error("{context} was refused: {detail}")]
    LeaseExpired {
        /// What Tandem was doing, and with whom.
        context: String,
        /// How long the worker was silent, its lease, the steps it missed.
        detail: String,
    },
    /// The object was shut down or poisoned by an earlier failure and cannot be used again.
    #[error("{what} is no longer usable: {reason}")]
    Unusable {
        /// The object (e.g. "process group").
        what: String,
        /// The earlier failure that made it unusable.
        reason: String,
    },
}

impl Error {
    /// Builds a [`Error::Config`] naming the variable and the problem.
    pub fn config(variable: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config {
            variable: variable.into(),
            problem: problem.into(),
        }
    }

    /// Builds an [`Error::Io`] with what Tandem was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds an [`Error::Transport`].
    pub fn transport(context: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Transport {
            context: context.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Timeout`].
    pub fn timeout(what: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            what: what.into(),
            after,
        }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            problem: problem.into(),
        }
    }

    /// A short, stable name of the error's kind, used by bindings and logs
    /// (`"config"`, `"timeout"`, `"peer_lost"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config { .. } => "config",
            Error::Io { .. } => "io",
            Error::Transport { .. } => "transport",
            Error::Timeout { .. } => "timeout",
            Error::PeerLost { .. } => "peer_lost",
            Error::ShapeMismatch { .. } => "shape",
            Error::DTypeMismatch { .. } => "dtype",
            Error::OpMismatch(_) => "mismatch",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::Authentication { .. } => "authentication",
            Error::BackendUnavailable { .. } => "backend_unavailable",
            Error::Unusable { .. } => "unusable",
            Error::Precondition { .. } => "precondition",
            Error::PartiallyApplied { .. } => "partially_applied",
            Error::LeaseExpired { .. } => "lease_expired",
        }
    }
}

/// An error and its sources, joined with `: ` (what a failed connection attempt reports: tonic's
/// and hyper's errors keep the cause in their sources).
///
/// ```
/// let e = std::io::Error::other("refused");
/// assert_eq!(tandem_core::error::source_chain(&e), "refused");
/// ```
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
