//! The `logging.v1.Logging` gRPC service over any [`MessageStore`].

use std::sync::Arc;

use proto::logging::v1 as pb;
use rpc::request_id;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::store::{Appended, Message, MessageStore, StoreError};

/// Longest id accepted, in bytes (a uuid is 36).
pub const MAX_ID_BYTES: usize = 128;
/// Longest message text accepted by default, in bytes (the facade's limit too).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 64 * 1024;

pub use pb::logging_server::LoggingServer;

pub struct LoggingService<S> {
    store: Arc<S>,
    max_text_bytes: usize,
}

impl<S: MessageStore> LoggingService<S> {
    pub fn new(store: Arc<S>, max_text_bytes: usize) -> Self {
        Self {
            store,
            max_text_bytes,
        }
    }

    fn validate(&self, request: &pb::AppendRequest) -> Result<(), Status> {
        if request.id.is_empty() {
            return Err(Status::invalid_argument("id is empty"));
        }
        if request.id.len() > MAX_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "id is {} bytes, at most {MAX_ID_BYTES} allowed",
                request.id.len()
            )));
        }
        if request.text.is_empty() {
            return Err(Status::invalid_argument("text is empty"));
        }
        if request.text.len() > self.max_text_bytes {
            return Err(Status::invalid_argument(format!(
                "text is {} bytes, at most {} allowed",
                request.text.len(),
                self.max_text_bytes
            )));
        }
        Ok(())
    }
}

/// The one place store errors become gRPC statuses.
fn status(error: StoreError) -> Status {
    match error {
        StoreError::Unavailable(_) => Status::unavailable(error.to_string()),
    }
}

#[tonic::async_trait]
impl<S: MessageStore> pb::logging_server::Logging for LoggingService<S> {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let request_id = request_id::of(&request).unwrap_or_default();
        let request = request.into_inner();
        self.validate(&request)?;
        let pb::AppendRequest { id, text } = request;
        let message = Message {
            id: id.clone(),
            text: text.clone(),
        };
        let outcome = self.store.append(message).await.map_err(|error| {
            metrics::counter!("logging_appends_total", "outcome" => "unavailable").increment(1);
            warn!(request_id, id, %error, "not stored");
            status(error)
        })?;
        match outcome {
            Appended::Inserted => {
                metrics::counter!("logging_appends_total", "outcome" => "inserted").increment(1);
                info!(request_id, id, text, "stored");
            }
            Appended::Duplicate => {
                metrics::counter!("logging_appends_total", "outcome" => "duplicate").increment(1);
                info!(request_id, id, "duplicate: already stored, nothing changed");
            }
        }
        Ok(Response::new(pb::AppendResponse {
            duplicate: outcome == Appended::Duplicate,
        }))
    }

    async fn list(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let messages = self.store.list().await.map_err(status)?;
        Ok(Response::new(pb::ListResponse {
            messages: messages
                .into_iter()
                .map(|m| pb::Message {
                    id: m.id,
                    text: m.text,
                })
                .collect(),
        }))
    }
}
