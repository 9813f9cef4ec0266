//! The service's side of primary-backup replication (see [`crate::server::replica`]): a standby
//! that follows this server is registered and sent the current state, then every update.
//!
//! Why the state first, then every update: a standby that joins late must start from the
//! primary's whole state, and from then on receive each applied step before the step is published,
//! so a worker that fails over never finds a step it saw missing.

use super::*;
use crate::server::replica::FollowStream;

impl Service {
    /// A standby follows this server: registers it, and once parameters are declared sends it the
    /// current state (later updates follow as they are applied).
    pub(super) async fn followed_by(
        &self,
        mut acks: tonic::Streaming<pb::FollowAck>,
    ) -> Result<FollowStream, Status> {
        let first = acks
            .message()
            .await?
            .ok_or_else(|| invalid("a standby's first message must name its address"))?;
        tandem_core::cluster::check_address("the standby's address", &first.standby)
            .map_err(|e| invalid(e.to_string()))?;
        if self.replication.is_replaced() {
            return Err(shutting_down());
        }
        let (chunks, rx) = tokio::sync::mpsc::channel(8);
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        let (replication, standby) = (self.replication.clone(), first.standby.clone());
        tokio::spawn(async move {
            while let Ok(Some(a)) = acks.message().await {
                if a.promoted {
                    // Stop now, not at the next update: nothing may be served from here on.
                    replication.replace(standby.clone());
                }
                if ack_tx.send(a).is_err() {
                    break;
                }
            }
        });
        self.replication.register(
            first.standby,
            chunks,
            ack_rx,
            tokio::runtime::Handle::current(),
        );
        let svc = self.clone();
        tokio::spawn(async move { svc.replicate_current().await });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Sends the current state to the standby once parameters are declared (between two steps in
    /// sync mode). Waits for the declaration as long as a standby follows.
    async fn replicate_current(&self) {
        loop {
            if self.replication.standby().is_empty() {
                return;
            }
            if let Some(d) = self.declared.get() {
                let r = match &d.stepper {
                    Some(stepper) => stepper.replicate().await.ok(),
                    None => {
                        let (model, replication) = (d.model.clone(), self.replication.clone());
                        tokio::task::spawn_blocking(move || {
                            let version = *model.version.borrow();
                            replication.replicate(&model, version)
                        })
                        .await
                        .ok()
                    }
                };
                tracing::debug!(?r, "current state sent to the standby");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
