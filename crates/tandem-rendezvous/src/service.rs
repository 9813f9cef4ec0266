//! The gRPC face of the [`Store`]: decoding requests, mapping store errors to `Status` once.
//!
//! Why a thin face: the store is plain, synchronous and tested alone; the service only turns
//! requests into store calls and store errors into `Status` codes the client maps back, so the
//! store's rules (bounds, rounds of barriers) live in one place.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::pb::rendezvous_server::Rendezvous;
use crate::pb::*;
use crate::store::{Store, StoreError, WaitOutcome};

/// Implements the `tandem.rendezvous.v1.Rendezvous` service over a shared [`Store`].
#[derive(Clone)]
pub struct Service {
    /// The store served.
    store: Arc<Store>,
}

impl Service {
    /// A service over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Service { store }
    }
}

/// A store refusal as the gRPC status the client maps back.
fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Full(m) => Status::resource_exhausted(m),
        StoreError::NotACounter(m) => Status::failed_precondition(m),
    }
}

#[tonic::async_trait]
impl Rendezvous for Service {
    async fn set(&self, req: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let r = req.into_inner();
        self.store.set(&r.key, r.value).map_err(status)?;
        Ok(Response::new(SetResponse {}))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = req.into_inner();
        let v = self.store.get(&r.key).map_err(status)?;
        Ok(Response::new(GetResponse {
            found: v.is_some(),
            value: v.unwrap_or_default(),
        }))
    }

    async fn wait(&self, req: Request<WaitRequest>) -> Result<Response<WaitResponse>, Status> {
        let r = req.into_inner();
        let out = self
            .store
            .wait(&r.keys, Duration::from_millis(r.timeout_ms))
            .await
            .map_err(status)?;
        Ok(Response::new(match out {
            WaitOutcome::Ready(values) => WaitResponse {
                complete: true,
                values,
                missing: vec![],
            },
            WaitOutcome::TimedOut(missing) => WaitResponse {
                complete: false,
                values: vec![],
                missing,
            },
        }))
    }

    async fn add(&self, req: Request<AddRequest>) -> Result<Response<AddResponse>, Status> {
        let r = req.into_inner();
        let value = self.store.add(&r.key, r.delta).map_err(status)?;
        Ok(Response::new(AddResponse { value }))
    }

    async fn compare_and_set(
        &self,
        req: Request<CompareAndSetRequest>,
    ) -> Result<Response<CompareAndSetResponse>, Status> {
        let r = req.into_inner();
        let expected = if r.expect_absent {
            None
        } else {
            Some(&r.expected[..])
        };
        let out = self
            .store
            .compare_and_set(&r.key, expected, r.desired)
            .map_err(status)?;
        Ok(Response::new(CompareAndSetResponse {
            swapped: out.swapped,
            found: out.current.is_some(),
            current: out.current.unwrap_or_default(),
        }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let existed = self.store.delete(&req.into_inner().key).map_err(status)?;
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn barrier(
        &self,
        req: Request<BarrierRequest>,
    ) -> Result<Response<BarrierResponse>, Status> {
        let r = req.into_inner();
        let missing = self
            .store
            .barrier(
                &r.name,
                r.participants,
                r.member,
                Duration::from_millis(r.timeout_ms),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(BarrierResponse {
            complete: missing.is_empty(),
            missing,
        }))
    }
}
