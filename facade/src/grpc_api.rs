//! The gRPC API, `facade.v1.Facade`, over the same core as the HTTP API.

use std::sync::Arc;

use proto::facade::v1 as pb;
use rpc::request_id;
use tonic::{Request, Response, Status};

use crate::{
    failover::FailoverError,
    message_path::{Facade, FacadeError},
};

pub use pb::facade_server::FacadeServer;

pub struct FacadeService {
    facade: Arc<Facade>,
}

impl FacadeService {
    pub fn new(facade: Arc<Facade>) -> Self {
        Self { facade }
    }
}

/// The one place facade errors become gRPC statuses.
fn status(error: FacadeError) -> Status {
    match error {
        FacadeError::Failover(FailoverError::Rejected(status)) => status,
        FacadeError::Failover(
            unavailable @ (FailoverError::Exhausted { .. } | FailoverError::ShuttingDown),
        ) => Status::unavailable(unavailable.to_string()),
        other => Status::invalid_argument(other.to_string()),
    }
}

#[tonic::async_trait]
impl pb::facade_server::Facade for FacadeService {
    async fn post(
        &self,
        request: Request<pb::PostRequest>,
    ) -> Result<Response<pb::PostResponse>, Status> {
        let request_id = request_id::accept(request_id::of(&request).as_deref());
        let pb::PostRequest {
            msg,
            idempotency_key,
        } = request.into_inner();
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key.as_str());
        let id = self
            .facade
            .post(msg, key, &request_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PostResponse { id }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let request_id = request_id::accept(request_id::of(&request).as_deref());
        let listing = self.facade.get(&request_id).await.map_err(status)?;
        Ok(Response::new(pb::GetResponse {
            logs: listing
                .logs
                .into_iter()
                .map(|entry| pb::LogEntry {
                    id: entry.id,
                    msg: entry.msg,
                })
                .collect(),
            message: listing.message.unwrap_or_default(),
            warnings: listing.warnings,
        }))
    }
}
