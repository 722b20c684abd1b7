//! The gRPC API, `facade.v1.Facade`, over the same message path as the HTTP API.

use std::sync::Arc;

use proto::facade::v1 as pb;
use rpc::request_id;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::message_path::{Facade, FacadeError, MessagesText};

pub use pb::facade_server::FacadeServer;

pub struct FacadeService {
    facade: Arc<Facade>,
}

impl FacadeService {
    pub fn new(facade: Arc<Facade>) -> Self {
        Self { facade }
    }
}

/// The one place facade errors become gRPC statuses (the same words as over HTTP).
fn status(error: FacadeError) -> Status {
    let message = error.to_string();
    match error {
        FacadeError::MissingMessage
        | FacadeError::EmptyMessage
        | FacadeError::MessageTooLarge { .. }
        | FacadeError::InvalidIdempotencyKey(_)
        | FacadeError::Invalid(_)
        | FacadeError::InvalidLimit
        | FacadeError::InvalidCursor => Status::invalid_argument(message),
        FacadeError::KeyReused => Status::already_exists(message),
        FacadeError::StoreFull => Status::resource_exhausted(message),
        FacadeError::Unavailable { .. }
        | FacadeError::NoInstance(_)
        | FacadeError::ShuttingDown
        | FacadeError::Broken
        | FacadeError::Busy(_) => Status::unavailable(message),
        FacadeError::Upstream(_) => Status::internal(message),
    }
}

fn request_id_of<T>(request: &Request<T>) -> String {
    request_id::accept(request_id::of(request).as_deref())
}

#[tonic::async_trait]
impl pb::facade_server::Facade for FacadeService {
    async fn post(
        &self,
        request: Request<pb::PostRequest>,
    ) -> Result<Response<pb::PostResponse>, Status> {
        let request_id = request_id_of(&request);
        let peer = rpc::peer_ip(&request);
        let pb::PostRequest {
            msg,
            idempotency_key,
        } = request.into_inner();
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key.as_str());
        let id = self
            .facade
            .post(msg, key, &request_id, peer)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PostResponse { id }))
    }

    type GetStream = ReceiverStream<Result<pb::GetResponse, Status>>;

    /// Every text in batches as the log is read, then the messages service's text; an
    /// error status ends a read that broke.
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let request_id = request_id_of(&request);
        let peer = rpc::peer_ip(&request);
        let mut read = self
            .facade
            .read_all(&request_id, peer)
            .await
            .map_err(status)?;
        let messages = tokio::spawn({
            let facade = Arc::clone(&self.facade);
            async move { facade.messages_text(&request_id).await }
        });
        let (responses, receiver) = mpsc::channel(2);
        tokio::spawn(async move {
            loop {
                let response = match read.next().await {
                    Ok(Some(logs)) => Ok(pb::GetResponse {
                        logs,
                        ..Default::default()
                    }),
                    Ok(None) => break,
                    Err(error) => Err(status(error)),
                };
                let failed = response.is_err();
                if responses.send(response).await.is_err() || failed {
                    return;
                }
            }
            let MessagesText { text, warnings } = match messages.await {
                Ok(text) => text,
                Err(_) => MessagesText {
                    text: None,
                    warnings: vec!["messages service unavailable".to_owned()],
                },
            };
            let last = pb::GetResponse {
                logs: Vec::new(),
                message: text.unwrap_or_default(),
                warnings,
            };
            let _ = responses.send(Ok(last)).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn read_page(
        &self,
        request: Request<pb::ReadPageRequest>,
    ) -> Result<Response<pb::ReadPageResponse>, Status> {
        let request_id = request_id_of(&request);
        let pb::ReadPageRequest { limit, after } = request.into_inner();
        let limit = (limit > 0).then_some(limit);
        let after = (!after.is_empty()).then_some(after.as_str());
        let page = self
            .facade
            .read_page(after, limit, &request_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReadPageResponse {
            messages: page
                .messages
                .into_iter()
                .map(|entry| pb::LogEntry {
                    id: entry.id,
                    msg: entry.msg,
                })
                .collect(),
            next: page.next.unwrap_or_default(),
        }))
    }
}
