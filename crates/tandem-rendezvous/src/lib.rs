//! The rendezvous where the processes of one Tandem job meet, in the manner of PyTorch's TCPStore:
//! `set`, `get`, `wait` with a deadline, atomic `add`, `compare_and_set`, `delete` and named barriers,
//! over gRPC (`tandem.rendezvous.v1`), with every request authenticated by the job's token.
//!
//! Rank 0 hosts it inside its own process ([`Session::join`]), or it runs standalone as
//! `tandem rendezvous --bind ADDR`. Later layers use it to exchange ring addresses, NCCL unique ids
//! and the parameter-server partition map.
//!
//! # Layout
//! - [`store`]: the in-memory store (pure logic, bounded).
//! - `service`: the gRPC service over the store; `server`: [`run`] and [`Host`].
//! - [`client`]: the async [`Client`] (connect with retry, deadlines on every call);
//!   [`BlockingClient`] for code without tokio.
//! - `auth`: [`JobToken`] and the interceptors that attach and check it.
//! - `session`: [`Session`], joining a job from its [`ClusterSpec`](tandem_core::ClusterSpec).
//! - [`board`]: where rank 0 publishes the rendezvous when another program owns the agreed port
//!   (torchrun's store, read through [`torch_store`], or the Store torch hands a backend).
//!
//! # Feature Flags
//! None.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tandem_core::Result<()> {
//! use std::time::Duration;
//! use tandem_rendezvous::{Client, Host, JobToken, ServerConfig};
//! let token = JobToken::generate();
//! let host = Host::bind("127.0.0.1:0", ServerConfig::new(token.clone())).await?;
//! let c = Client::connect(&host.addr().to_string(), &token, Duration::from_secs(5)).await?;
//! assert_eq!(c.add("counter", 2).await?, 2);
//! host.stop().await?;
//! # Ok(()) }
//! ```

mod auth;
mod blocking;
pub mod board;
pub mod client;
pub mod discovery;
mod server;
mod service;
mod session;
pub mod store;
pub mod torch_store;

/// Code generated from `proto/tandem/rendezvous/v1/rendezvous.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tandem.rendezvous.v1");
}

pub use auth::{AttachToken, CheckToken, JobToken, TOKEN_VAR};
pub use blocking::BlockingClient;
pub use client::{Client, Swap};
pub use server::{Host, MAX_STREAMS, ServerConfig, run, shutdown_signal};
pub use service::Service;
pub use session::{BIND_VAR, EXTERNAL_VAR, Session};
pub use store::Limits;
