//! Two things every handler and part of a server uses, below all of them: running CPU work on the
//! blocking pool, and the answer of a server that is stopping.
//!
//! Why the blocking pool: summing and applying a gradient of megabytes takes milliseconds of CPU;
//! on tokio's threads it would stall every other connection's bytes meanwhile.

use tonic::{Code, Status};

use crate::failure::status;
use crate::pb::Reason;

/// Unavailable: the server is stopping.
pub fn shutting_down() -> Status {
    status(
        Code::Unavailable,
        Reason::ShuttingDown,
        "the server is shutting down",
    )
}

/// Runs CPU work on the blocking pool, so tokio's threads keep moving bytes.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        status(
            Code::Internal,
            Reason::Internal,
            format!("a server task failed: {e}"),
        )
    })
}
