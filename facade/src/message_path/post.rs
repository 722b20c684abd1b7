//! POST: a message is checked, given its id, and stored through the failover, in one
//! AppendBatch call with the POSTs that arrived while the previous calls were in flight
//! ([`crate::batch`]); each message is still answered, retried and failed over on its own.

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures_util::future::join_all;
use parking_lot::Mutex;
use proto::logging::v1::{
    logging_client::LoggingClient, AppendBatchRequest, AppendRequest, AppendResult, BatchedAppend,
};
use tokio::time::Instant;
use tonic::{transport::Channel, Code, Status};
use tracing::debug;

use super::{
    errors::FacadeError,
    facade::{logging_request, Facade},
};
use crate::{
    batch::Sink,
    failover::{is_transient, FailoverError},
};

impl Facade {
    /// Stores `msg` through a live logging instance, failing over and retrying with the
    /// same id; returns the id. POSTs that arrive while the facade's calls to logging
    /// are all in flight share the next one ([`crate::batch`]).
    ///
    /// A POST that finds the queue of POSTs waiting for logging full, or its `peer`
    /// with `--max-posts-per-peer` POSTs in progress, is answered [`FacadeError::Busy`] at
    /// once (its refusal counted, and logged once a minute per peer).
    pub async fn post(
        self: &Arc<Self>,
        msg: String,
        idempotency_key: Option<&str>,
        request_id: &str,
        peer: Option<IpAddr>,
    ) -> Result<String, FacadeError> {
        self.validate(&msg)?;
        let id = Self::message_id(idempotency_key)?;
        let _in_progress = self
            .posts
            .enter(peer)
            .map_err(|refused| FacadeError::Busy(refused.to_string()))?;
        debug!(request_id, id, "posting");
        let append = BatchedAppend {
            id: id.clone(),
            text: msg,
            request_id: request_id.to_owned(),
        };
        self.appends
            .submit(self, append)
            .await
            .map_err(|full| {
                let why = format!(
                    "POSTs waiting for logging: {full} (--max-queued-posts, \
                     --max-queued-post-bytes)"
                );
                self.queue_refusals.refuse(peer, &why);
                FacadeError::Busy(why)
            })?
            .unwrap_or(Err(FailoverError::ShuttingDown))
            .map_err(|error| self.failed("store the message", request_id, error))?;
        Ok(id)
    }
}

/// The facade sends POSTs to logging in batches: one AppendBatch call through the
/// failover, each message answered on its own. A message the instance could not store
/// now (a transient code) goes to the next instance with the others like it; a message
/// with a final answer (stored, or refused) is not sent again.
impl Sink for Facade {
    type Item = BatchedAppend;
    type Outcome = Result<(), FailoverError>;

    async fn send(&self, items: Vec<(BatchedAppend, Instant)>) -> Vec<Result<(), FailoverError>> {
        // The oldest request's budget is the batch's: nobody waits longer than a POST
        // alone would have.
        let began = items.iter().map(|(_, arrived)| *arrived).min();
        let began = began.unwrap_or_else(Instant::now);
        let appends: Vec<BatchedAppend> = items.into_iter().map(|(append, _)| append).collect();
        let label = match appends.as_slice() {
            [only] => only.request_id.clone(),
            [first, rest @ ..] => format!("{} and {} more", first.request_id, rest.len()),
            [] => return Vec::new(),
        };
        let answers: Mutex<Vec<Option<Result<(), Status>>>> = Mutex::new(vec![None; appends.len()]);
        let deadline = self.failover.policy().attempt_deadline;
        let result = self
            .call_logging(began, &label, |address, mut client| {
                let unanswered: Vec<usize> = answers
                    .lock()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, answer)| answer.is_none().then_some(i))
                    .collect();
                let request = AppendBatchRequest {
                    appends: unanswered.iter().map(|&i| appends[i].clone()).collect(),
                };
                let (answers, appends) = (&answers, &appends);
                async move {
                    let results = match client.append_batch(rpc::request(request, deadline)).await {
                        Ok(reply) => reply.into_inner().results,
                        // An instance from before AppendBatch (a rolling upgrade): the
                        // same appends, a call each.
                        Err(status) if status.code() == Code::Unimplemented => {
                            let one_by_one = unanswered.iter().map(|&i| appends[i].clone());
                            append_one_by_one(&client, one_by_one, deadline).await
                        }
                        Err(status) => return Err(status),
                    };
                    if results.len() != unanswered.len() {
                        return Err(Status::internal(format!(
                            "{address} answered {} results for {} appends",
                            results.len(),
                            unanswered.len()
                        )));
                    }
                    let mut answers = answers.lock();
                    let mut again = None;
                    for (i, result) in unanswered.into_iter().zip(results) {
                        match Code::from(result.code) {
                            Code::Ok => answers[i] = Some(Ok(())),
                            code if is_transient(code) => {
                                again = Some(Status::new(code, result.error))
                            }
                            code => answers[i] = Some(Err(Status::new(code, result.error))),
                        }
                    }
                    // Those not stored yet go to the next instance.
                    again.map_or(Ok(()), Err)
                }
            })
            .await;
        let answers = answers.into_inner();
        answers
            .into_iter()
            .map(|answer| match (answer, &result) {
                (Some(Ok(())), _) => Ok(()),
                (Some(Err(status)), _) => Err(FailoverError::Rejected(status)),
                (None, Err(error)) => Err(error.clone()),
                // Unreachable: the call only succeeds once every append has an answer.
                (None, Ok(())) => Err(FailoverError::Rejected(Status::internal(
                    "an append was left without an answer",
                ))),
            })
            .collect()
    }

    fn size(append: &BatchedAppend) -> usize {
        append.text.len()
    }
}

/// Sends each append as its own `Append` call, all at once, and answers as
/// `AppendBatch` would.
async fn append_one_by_one(
    client: &LoggingClient<Channel>,
    appends: impl Iterator<Item = BatchedAppend>,
    deadline: Duration,
) -> Vec<AppendResult> {
    join_all(appends.map(|append| {
        let mut client = client.clone();
        async move {
            let message = AppendRequest {
                id: append.id,
                text: append.text,
            };
            let request = logging_request(message, Some(deadline), &append.request_id);
            match client.append(request).await {
                Ok(reply) => AppendResult {
                    code: Code::Ok as i32,
                    error: String::new(),
                    duplicate: reply.into_inner().duplicate,
                },
                Err(status) => AppendResult {
                    code: status.code() as i32,
                    error: status.message().to_owned(),
                    duplicate: false,
                },
            }
        }
    }))
    .await
}
