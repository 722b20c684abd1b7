//! The `logging.v1.Logging` gRPC service over any [`MessageStore`].

use std::sync::Arc;

use proto::logging::v1 as pb;
use rpc::request_id;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::store::{Appended, Message, MessageStore, StoreError, MAX_PAGE};

/// Longest id accepted, in bytes (a uuid is 36).
pub const MAX_ID_BYTES: usize = 128;
/// Longest message text accepted by default, in bytes (the facade's limit too).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 64 * 1024;
/// Most appends in one AppendBatch call.
pub const MAX_BATCH_APPENDS: usize = 1000;
/// Largest request taken by default (`--max-request-bytes`): an AppendBatch of up to 4
/// MiB (the facade sends at most 1 MiB and one message per call).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Full reads (Stream calls) served at once by default (`--max-full-reads`); each holds
/// under 3 MiB (see [`crate::store`]).
pub const DEFAULT_MAX_FULL_READS: usize = 16;

pub use pb::logging_server::LoggingServer;

pub struct LoggingService<S> {
    store: Arc<S>,
    max_text_bytes: usize,
    /// Full reads in progress; over the limit a Stream is refused RESOURCE_EXHAUSTED.
    full_reads: Arc<rpc::Gate>,
}

impl<S: MessageStore> LoggingService<S> {
    pub fn new(store: Arc<S>, max_text_bytes: usize, max_full_reads: usize) -> Self {
        Self {
            store,
            max_text_bytes,
            full_reads: rpc::Gate::new(
                "full reads",
                // One limit for the instance, whoever asks: a full read's peer is a facade.
                None,
                Some((max_full_reads, "--max-full-reads")),
                "logging_full_reads_refused_total",
            ),
        }
    }

    fn validate(&self, id: &str, text: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("id is empty"));
        }
        if id.len() > MAX_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "id is {} bytes, at most {MAX_ID_BYTES} allowed",
                id.len()
            )));
        }
        if text.is_empty() {
            return Err(Status::invalid_argument("text is empty"));
        }
        if text.len() > self.max_text_bytes {
            return Err(Status::invalid_argument(format!(
                "text is {} bytes, at most {} allowed",
                text.len(),
                self.max_text_bytes
            )));
        }
        Ok(())
    }

    /// Prints and counts what happened to one append (of Append, or an item of
    /// AppendBatch) and answers it: `Ok(true)` when it was already stored with this text.
    fn answer(
        request_id: &str,
        message: &Message,
        outcome: Result<Appended, StoreError>,
    ) -> Result<bool, Status> {
        let Message { id, text } = message;
        let outcome = outcome.map_err(|error| {
            metrics::counter!("logging_appends_total", "outcome" => "unavailable").increment(1);
            warn!(request_id, id, %error, "not stored");
            status(error)
        })?;
        match outcome {
            Appended::Inserted => {
                metrics::counter!("logging_appends_total", "outcome" => "inserted").increment(1);
                info!(request_id, id, text, "stored");
                Ok(false)
            }
            Appended::Duplicate => {
                metrics::counter!("logging_appends_total", "outcome" => "duplicate").increment(1);
                info!(request_id, id, "duplicate: already stored, nothing changed");
                Ok(true)
            }
            Appended::Conflict => {
                metrics::counter!("logging_appends_total", "outcome" => "conflict").increment(1);
                info!(
                    request_id,
                    id, "conflict: already stored with another text, nothing changed"
                );
                Err(Status::already_exists(format!(
                    "id {id} is already stored with another text"
                )))
            }
        }
    }
}

/// The one place store errors become gRPC statuses.
fn status(error: StoreError) -> Status {
    let message = error.to_string();
    match error {
        StoreError::Unavailable(_) => Status::unavailable(message),
        StoreError::Full(_) => Status::resource_exhausted(message),
        StoreError::PastTheEnd { .. } => Status::out_of_range(message),
    }
}

#[tonic::async_trait]
impl<S: MessageStore> pb::logging_server::Logging for LoggingService<S> {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let request_id = request_id::of(&request).unwrap_or_default();
        let pb::AppendRequest { id, text } = request.into_inner();
        self.validate(&id, &text)?;
        let message = Message { id, text };
        let outcome = self.store.append(message.clone()).await;
        let duplicate = Self::answer(&request_id, &message, outcome)?;
        Ok(Response::new(pb::AppendResponse { duplicate }))
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        let appends = request.into_inner().appends;
        if appends.len() > MAX_BATCH_APPENDS {
            return Err(Status::invalid_argument(format!(
                "{} appends in one call, at most {MAX_BATCH_APPENDS} allowed",
                appends.len()
            )));
        }
        // Every valid append goes to the store in one call (one atomic batch for the
        // NATS store); an invalid one is answered on its own and stores nothing.
        let mut checked = Vec::with_capacity(appends.len());
        let mut valid = Vec::new();
        for pb::BatchedAppend {
            id,
            text,
            request_id,
        } in appends
        {
            let check = self.validate(&id, &text);
            if check.is_ok() {
                valid.push(Message {
                    id: id.clone(),
                    text: text.clone(),
                });
            }
            checked.push((request_id, Message { id, text }, check));
        }
        let mut outcomes = self.store.append_batch(valid).await.into_iter();
        let results = checked
            .into_iter()
            .map(|(request_id, message, check)| {
                let answer = check.and_then(|()| {
                    let outcome = outcomes.next().unwrap_or_else(|| {
                        Err(StoreError::unavailable(
                            "append",
                            "the store gave no answer",
                        ))
                    });
                    Self::answer(&request_id, &message, outcome)
                });
                match answer {
                    Ok(duplicate) => pb::AppendResult {
                        code: Code::Ok as i32,
                        error: String::new(),
                        duplicate,
                    },
                    Err(status) => pb::AppendResult {
                        code: status.code() as i32,
                        error: status.message().to_owned(),
                        duplicate: false,
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::AppendBatchResponse { results }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let pb::ReadRequest { after, limit } = request.into_inner();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Status::invalid_argument(format!(
                "limit must be 1 to {MAX_PAGE}, got {limit}"
            )));
        }
        let page = self.store.read(after, limit).await.map_err(status)?;
        Ok(Response::new(pb::ReadResponse {
            messages: page.messages.into_iter().map(pb::Message::from).collect(),
            more: page.more,
        }))
    }

    type StreamStream = ReceiverStream<Result<pb::StreamResponse, Status>>;

    async fn stream(
        &self,
        request: Request<pb::StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let request_id = request_id::of(&request).unwrap_or_default();
        let peer = rpc::peer_ip(&request);
        let pass = self.full_reads.enter(peer).map_err(|refused| {
            Status::resource_exhausted(format!("busy with full reads: {refused}; try again"))
        })?;
        let pb::StreamRequest { after, until } = request.into_inner();
        let until = (until > 0).then_some(until);
        let mut batches = self.store.stream(after, until).await.map_err(status)?;
        let (until, log) = (batches.until, self.store.log().to_owned());
        info!(request_id, after, until, "streaming the log");
        let (responses, receiver) = mpsc::channel(2);
        tokio::spawn(async move {
            let _pass = pass;
            let mut sent = false;
            while let Some(batch) = batches.receiver.recv().await {
                let response = batch.map_err(status).map(|batch| pb::StreamResponse {
                    messages: batch.into_iter().map(pb::Message::from).collect(),
                    until,
                    log: log.clone(),
                });
                let failed = response.is_err();
                if responses.send(response).await.is_err() || failed {
                    return;
                }
                sent = true;
            }
            if !sent {
                // Nothing to send still tells the reader which log it read, and where
                // it ends.
                let empty = pb::StreamResponse {
                    messages: Vec::new(),
                    until,
                    log,
                };
                let _ = responses.send(Ok(empty)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[cfg(test)]
mod tests {
    use pb::logging_server::Logging;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::store::{MemoryStore, STREAM_BATCH};

    /// Full reads over the limit are refused RESOURCE_EXHAUSTED; one that ends lets the
    /// next in.
    #[tokio::test]
    async fn full_reads_over_the_limit_are_refused_until_one_ends() {
        let store = Arc::new(MemoryStore::default());
        for i in 0..(STREAM_BATCH * 8) {
            store
                .append(Message {
                    id: format!("id-{i}"),
                    text: "text".into(),
                })
                .await
                .expect("append");
        }
        let service = LoggingService::new(store, DEFAULT_MAX_TEXT_BYTES, 2);
        let read = || service.stream(Request::new(pb::StreamRequest { after: 0, until: 0 }));
        // Two reads that do not read on hold their places.
        let first = read().await.expect("first");
        let _second = read().await.expect("second");
        let refused = read().await.expect_err("a third");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("--max-full-reads"),
            "{refused:?}"
        );
        // Read to the end: its place is given back.
        let mut first = first.into_inner();
        while let Some(batch) = first.next().await {
            batch.expect("batch");
        }
        let mut third = None;
        for _ in 0..100 {
            match read().await {
                Ok(stream) => {
                    third = Some(stream);
                    break;
                }
                Err(_) => tokio::task::yield_now().await,
            }
        }
        assert!(third.is_some(), "a place once the first read ended");
    }
}
