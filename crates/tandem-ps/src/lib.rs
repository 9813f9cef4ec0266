//! The parameter server: workers push gradients to and pull parameters from sharded server processes
//! over gRPC; the servers run the optimizer.
//!
//! # Layout
//! - [`placement`]: the partition map (pure; hashed so disagreement is detected).
//! - [`protocol`]: what client and server share (limits, windows, keys, opening a connection);
//!   the two sides never import each other.
//! - [`init`], [`optimizer`]: initializers and update rules (pure).
//! - [`server`]: the gRPC service and [`server::run`].
//! - [`finite`]: the NaN/Inf check of gradients (server and client).
//! - [`failure`]: the typed reasons every server error carries, and what a client may do on each.
//! - [`wire`]: gradients and parameters in fewer bytes (bf16, fp16, top-k) on the streams.
//! - [`client`]: the async worker [`client::Client`]; [`blocking::BlockingClient`] owns a runtime.
//!
//! Why servers run the optimizer: a worker then sends gradients and receives parameters, never
//! optimizer state, and the state of a model larger than one machine's memory is sharded with it.
//! Why gRPC: every language and launcher can speak it, and HTTP/2's flow control gives the
//! streaming pushes their back-pressure for free.
//!
//! # Feature Flags
//! None.

pub mod blocking;
pub mod client;
pub mod failure;
pub mod finite;
pub mod init;
pub mod job;
mod observe;
pub mod optimizer;
pub mod placement;
pub mod protocol;
pub mod server;
pub mod wire;

/// Code generated from `proto/tandem/ps/v1/ps.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tandem.ps.v1");
}
