//! The message path: what the facade does, independent of how it is asked (HTTP or
//! gRPC). POST validates, makes the id and writes through [`Failover`], in a call
//! shared with the POSTs that arrived meanwhile ([`crate::batch`]); a page read is
//! one failover call; a full read ([`FullRead`]) streams the whole log from one
//! instance and, if that instance fails midway, resumes on another that serves the same
//! log (a shared NATS store), from the last position received.
//!
//! Errors that reach a client say what failed in plain words ([`FacadeError`]); the
//! details (addresses, transport errors) go to the log with the request id.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;

use dashmap::DashMap;
use futures_util::future::join_all;
use proto::{
    logging::v1::{
        logging_client::LoggingClient, AppendBatchRequest, AppendRequest, AppendResult,
        BatchedAppend, ReadRequest, StreamRequest, StreamResponse,
    },
    messages::v1::{messages_client::MessagesClient, GetRequest},
};
use rpc::request_id;
use tokio::time::Instant;
use tonic::{transport::Channel, Code, Status, Streaming};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::{
    batch::{self, Batcher, Sink},
    discovery::Discovery,
    failover::{is_transient, Failover, FailoverError},
};

pub const LOGGING: &str = "logging";
pub const MESSAGES: &str = "messages";
/// Longest Idempotency-Key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Messages in a page when the client does not say.
pub const DEFAULT_PAGE: u32 = 100;
/// Most messages in one page.
pub const MAX_PAGE: u32 = 1000;
/// How long a full read waits for the next batch before it calls the instance hung and
/// resumes elsewhere.
const READ_STALL: Duration = Duration::from_secs(3);
/// Most bytes of text in one AppendBatch call (a message over it still goes, alone), far
/// below the 4 MiB a gRPC peer accepts by default.
const MAX_APPEND_BATCH_BYTES: usize = 1024 * 1024;
/// Ids made from idempotency keys live in their own uuid v5 namespace.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_3b8e_2a4d_4e0f_9c51_7d2b_8a3e_4f60);

/// What a client is told when a call fails: plain words, no internal details.
#[derive(Debug, thiserror::Error)]
pub enum FacadeError {
    #[error("msg is required: send {{\"msg\": \"...\"}}")]
    MissingMessage,
    #[error("msg is empty")]
    EmptyMessage,
    #[error("msg is {len} bytes, at most {limit} allowed")]
    MessageTooLarge { len: usize, limit: usize },
    #[error("invalid Idempotency-Key: {0}")]
    InvalidIdempotencyKey(String),
    /// A logging instance refused the input (its own validation, in words for users).
    #[error("{0}")]
    Invalid(String),
    #[error("this Idempotency-Key was already used with another message; the first one is kept")]
    KeyReused,
    #[error("the message store is full: nothing was stored")]
    StoreFull,
    #[error("limit must be a whole number from 1 to {MAX_PAGE}")]
    InvalidLimit,
    #[error("unknown cursor: pass the `next` of an earlier page")]
    InvalidCursor,
    #[error("no {service} instance could {what} within {budget:?}; try again")]
    Unavailable {
        service: &'static str,
        what: &'static str,
        budget: Duration,
    },
    #[error("the {0} service answered with an error")]
    Upstream(&'static str),
    #[error("the facade is shutting down; try again")]
    ShuttingDown,
    #[error("the log could not be read to the end; try again")]
    Broken,
}

/// One stored message, with its id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogEntry {
    pub id: String,
    pub msg: String,
}

/// One page of messages, and the cursor of the next one (`None` at the end).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Page {
    pub messages: Vec<LogEntry>,
    pub next: Option<String>,
}

/// The messages service's text, or why there is none.
#[derive(Debug, Clone)]
pub struct MessagesText {
    pub text: Option<String>,
    pub warnings: Vec<String>,
}

/// The cursor of the page after position `position`. Opaque to clients.
pub fn cursor(position: u64) -> String {
    format!("c{position}")
}

/// The position a cursor stands for; only cursors [`cursor`] makes are accepted.
pub fn position(cursor: &str) -> Result<u64, FacadeError> {
    cursor
        .strip_prefix('c')
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .filter(|position| *position > 0)
        .ok_or(FacadeError::InvalidCursor)
}

pub struct Facade {
    discovery: Discovery,
    failover: Failover,
    /// One channel per instance address, made on first use and reused (channels are
    /// cheap handles over one HTTP/2 connection that reconnects by itself). Addresses
    /// that left every list are forgotten, so the pool does not grow with churn.
    channels: DashMap<String, Channel>,
    /// The discovery change count the pool was last pruned at.
    pruned_at: AtomicU64,
    max_message_bytes: usize,
    messages_deadline: Duration,
    /// POSTs on their way to logging: those that arrive while earlier calls are in
    /// flight go out together, in one AppendBatch call.
    appends: Batcher<Facade>,
}

/// How POSTs are grouped into calls to logging.
#[derive(Debug, Clone, Copy)]
pub struct AppendBatching {
    /// Most AppendBatch calls in flight at once; POSTs that arrive while all are busy
    /// wait for the next free one and go out together.
    pub calls: usize,
    /// Most messages in one call (1: every POST is its own call).
    pub messages: usize,
    /// A call that has not answered within this stops counting against `calls`, so
    /// the POSTs behind it go on in another call.
    pub patience: Duration,
}

impl Default for AppendBatching {
    fn default() -> Self {
        Self {
            calls: 1,
            messages: 64,
            patience: Duration::from_millis(50),
        }
    }
}

impl Facade {
    pub fn new(
        discovery: Discovery,
        failover: Failover,
        max_message_bytes: usize,
        batching: AppendBatching,
    ) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            failover,
            channels: DashMap::new(),
            pruned_at: AtomicU64::new(0),
            max_message_bytes,
            messages_deadline: Duration::from_secs(1),
            appends: Batcher::new(batch::Limits {
                in_flight: batching.calls,
                items: batching.messages,
                bytes: MAX_APPEND_BATCH_BYTES,
                patience: batching.patience,
            }),
        })
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.forget_unlisted();
        if let Some(channel) = self.channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = rpc::channel(address)
            .map_err(|e| Status::unavailable(format!("bad instance address {address}: {e}")))?;
        let channel = self
            .channels
            .entry(address.to_owned())
            .or_insert(channel)
            .clone();
        metrics::gauge!("facade_channels").set(self.channels.len() as f64);
        Ok(channel)
    }

    /// After any list changed, drops the channels of addresses no list holds any more
    /// (calls still using one keep their own clone). Costs one atomic load otherwise.
    fn forget_unlisted(&self) {
        let changes = self.discovery.changes();
        if self.pruned_at.swap(changes, Ordering::AcqRel) == changes {
            return;
        }
        let listed = self.discovery.listed();
        self.channels.retain(|address, _| listed.contains(address));
        metrics::gauge!("facade_channels").set(self.channels.len() as f64);
    }

    /// The id a message gets: from the idempotency key when there is one (the same key
    /// always gives the same id), else a fresh random uuid.
    pub fn message_id(idempotency_key: Option<&str>) -> Result<String, FacadeError> {
        match idempotency_key {
            None => Ok(Uuid::new_v4().to_string()),
            Some(key) => {
                if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
                    return Err(FacadeError::InvalidIdempotencyKey(format!(
                        "must be 1-{MAX_IDEMPOTENCY_KEY} bytes"
                    )));
                }
                Ok(Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes()).to_string())
            }
        }
    }

    fn validate(&self, msg: &str) -> Result<(), FacadeError> {
        if msg.is_empty() {
            return Err(FacadeError::EmptyMessage);
        }
        if msg.len() > self.max_message_bytes {
            return Err(FacadeError::MessageTooLarge {
                len: msg.len(),
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }

    /// What a client is told about a failed failover, with the details logged.
    fn failed(&self, what: &'static str, request_id: &str, error: FailoverError) -> FacadeError {
        match error {
            FailoverError::Rejected(status) => match status.code() {
                Code::InvalidArgument => FacadeError::Invalid(status.message().to_owned()),
                Code::AlreadyExists => FacadeError::KeyReused,
                Code::ResourceExhausted => {
                    warn!(
                        request_id,
                        error = status.message(),
                        "logging refused: store full"
                    );
                    FacadeError::StoreFull
                }
                Code::OutOfRange => FacadeError::InvalidCursor,
                code => {
                    warn!(
                        request_id,
                        ?code,
                        error = status.message(),
                        "a logging instance answered with an error"
                    );
                    FacadeError::Upstream(LOGGING)
                }
            },
            FailoverError::Exhausted { .. } => {
                warn!(request_id, error = %error, "gave up: could not {what}");
                FacadeError::Unavailable {
                    service: LOGGING,
                    what,
                    budget: self.failover.policy().budget,
                }
            }
            FailoverError::ShuttingDown => FacadeError::ShuttingDown,
        }
    }

    /// Stores `msg` through a live logging instance, failing over and retrying with the
    /// same id; returns the id. POSTs that arrive while the facade's calls to logging
    /// are all in flight share the next one ([`batch`]).
    pub async fn post(
        self: &Arc<Self>,
        msg: String,
        idempotency_key: Option<&str>,
        request_id: &str,
    ) -> Result<String, FacadeError> {
        self.validate(&msg)?;
        let id = Self::message_id(idempotency_key)?;
        debug!(request_id, id, "posting");
        let append = BatchedAppend {
            id: id.clone(),
            text: msg,
            request_id: request_id.to_owned(),
        };
        self.appends
            .submit(self, append)
            .await
            .unwrap_or(Err(FailoverError::ShuttingDown))
            .map_err(|error| self.failed("store the message", request_id, error))?;
        Ok(id)
    }

    /// One page: up to `limit` (default [`DEFAULT_PAGE`]) messages after the cursor
    /// `after` (from the start without one). Costs the same at any depth of the log.
    pub async fn read_page(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
        request_id: &str,
    ) -> Result<Page, FacadeError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(FacadeError::InvalidLimit);
        }
        let after = after.map(position).transpose()?.unwrap_or(0);
        let deadline = self.failover.policy().attempt_deadline;
        let reply = self
            .call_logging(Instant::now(), request_id, |_, mut client| {
                let request =
                    logging_request(ReadRequest { after, limit }, Some(deadline), request_id);
                async move { client.read(request).await }
            })
            .await
            .map_err(|error| self.failed("read the log", request_id, error))?
            .into_inner();
        let next = match reply.messages.last() {
            Some(last) if reply.more => Some(cursor(last.position)),
            _ => None,
        };
        Ok(Page {
            messages: reply
                .messages
                .into_iter()
                .map(|m| LogEntry {
                    id: m.id,
                    msg: m.text,
                })
                .collect(),
            next,
        })
    }

    /// Starts reading the whole log, as it stands now, from a live logging instance.
    /// Fails (503) only if no instance can start; after that, [`FullRead::next`] resumes
    /// on another instance if the first one fails.
    pub async fn read_all(self: &Arc<Self>, request_id: &str) -> Result<FullRead, FacadeError> {
        let (stream, first) = self
            .open_stream(request_id, 0, 0, None)
            .await
            .map_err(|error| self.failed("read the log", request_id, error))?;
        let mut read = FullRead {
            facade: Arc::clone(self),
            request_id: request_id.to_owned(),
            log: first.log.clone(),
            until: first.until,
            position: 0,
            stream,
            ready: None,
        };
        read.take(first);
        Ok(read)
    }

    /// Opens a Stream on some instance and waits for its first answer (which says which
    /// log it reads); with `log`, only an instance that serves that log will do.
    async fn open_stream(
        &self,
        request_id: &str,
        after: u64,
        until: u64,
        log: Option<&str>,
    ) -> Result<(Streaming<StreamResponse>, StreamResponse), FailoverError> {
        self.call_logging(Instant::now(), request_id, |address, mut client| {
            // No deadline in the header: it would bound the whole stream. The failover
            // bounds opening it (to the first answer) locally.
            let request = logging_request(StreamRequest { after, until }, None, request_id);
            async move {
                let mut stream = client.stream(request).await?.into_inner();
                let first = stream.message().await?.ok_or_else(|| {
                    Status::unavailable("the stream ended before its first answer")
                })?;
                if log.is_some_and(|log| log != first.log) {
                    return Err(Status::failed_precondition(format!(
                        "{address} serves another log ({}), so it cannot resume this read",
                        first.log
                    )));
                }
                Ok((stream, first))
            }
        })
        .await
    }

    /// One call to a live logging instance through the failover, for a request that
    /// began at `began`: `call` gets the instance's address and a client on its pooled
    /// channel.
    async fn call_logging<T, C, CF>(
        &self,
        began: Instant,
        request_id: &str,
        call: C,
    ) -> Result<T, FailoverError>
    where
        C: Fn(String, LoggingClient<Channel>) -> CF,
        CF: std::future::Future<Output = Result<T, Status>>,
    {
        self.failover
            .run(
                began,
                LOGGING,
                request_id,
                || self.discovery.instances(LOGGING),
                |address| {
                    let channel = self.channel(&address);
                    let call = &call;
                    async move { call(address, LoggingClient::new(channel?)).await }
                },
            )
            .await
    }

    /// The messages service's text. An outage does not fail a read: the logs are what
    /// the caller came for, so it becomes a warning (details in the log).
    pub async fn messages_text(&self, request_id: &str) -> MessagesText {
        let instances = self.discovery.instances(MESSAGES).await;
        let result = match instances.first() {
            None => Err("not in the registry".to_owned()),
            Some(address) => match self.channel(address) {
                Err(status) => Err(status.message().to_owned()),
                Ok(channel) => {
                    let mut client = MessagesClient::new(channel);
                    let deadline = self.messages_deadline;
                    rpc::call(deadline, async move {
                        client.get(rpc::request(GetRequest {}, deadline)).await
                    })
                    .await
                    .map(|reply| reply.into_inner().text)
                    .map_err(|status| format!("{address}: {}", status.message()))
                }
            },
        };
        match result {
            Ok(text) => MessagesText {
                text: Some(text),
                warnings: Vec::new(),
            },
            Err(error) => {
                warn!(request_id, error, "messages service unavailable");
                MessagesText {
                    text: None,
                    warnings: vec!["messages service unavailable".to_owned()],
                }
            }
        }
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

/// A read of the whole log, as it stood when it began, batch by batch. Holds one batch
/// at a time; the instance behind it may change, the log may not.
pub struct FullRead {
    facade: Arc<Facade>,
    request_id: String,
    /// Which log is being read; a resumed read must read the same one.
    log: String,
    /// The last position to read.
    until: u64,
    /// The last position received.
    position: u64,
    stream: Streaming<StreamResponse>,
    /// Texts received while opening a stream, not yet handed out.
    ready: Option<Vec<String>>,
}

impl FullRead {
    /// The next texts, in order; `None` once the whole log has been read. An error means
    /// the read broke and could not resume: the caller must not present what it got as
    /// the whole log.
    pub async fn next(&mut self) -> Result<Option<Vec<String>>, FacadeError> {
        loop {
            if let Some(texts) = self.ready.take() {
                return Ok(Some(texts));
            }
            if self.position >= self.until {
                return Ok(None);
            }
            let error = match tokio::time::timeout(READ_STALL, self.stream.message()).await {
                Ok(Ok(Some(response))) => {
                    self.take(response);
                    continue;
                }
                Ok(Ok(None)) => "the stream ended early".to_owned(),
                Ok(Err(status)) => status.message().to_owned(),
                Err(_) => format!("no batch within {READ_STALL:?}"),
            };
            self.resume(&error).await?;
        }
    }

    /// Keeps the texts of `response` that are new (a resumed stream may repeat none, but
    /// never trust it), moving the position on.
    fn take(&mut self, response: StreamResponse) {
        let mut texts = Vec::with_capacity(response.messages.len());
        for message in response.messages {
            if message.position > self.position && message.position <= self.until {
                self.position = message.position;
                texts.push(message.text);
            }
        }
        if !texts.is_empty() {
            self.ready = Some(texts);
        }
    }

    async fn resume(&mut self, error: &str) -> Result<(), FacadeError> {
        warn!(
            request_id = self.request_id,
            error,
            position = self.position,
            until = self.until,
            "full read interrupted; resuming on another instance"
        );
        metrics::counter!("facade_read_resumes_total").increment(1);
        match self
            .facade
            .open_stream(&self.request_id, self.position, self.until, Some(&self.log))
            .await
        {
            Ok((stream, first)) => {
                self.stream = stream;
                self.take(first);
                Ok(())
            }
            Err(error) => {
                warn!(request_id = self.request_id, error = %error,
                      "full read cannot resume; the client gets a broken answer");
                metrics::counter!("facade_read_broken_total").increment(1);
                Err(FacadeError::Broken)
            }
        }
    }
}

/// A request to a logging instance: the attempt's deadline (when the call has one) and
/// the client's request id.
fn logging_request<T>(
    message: T,
    deadline: Option<Duration>,
    request_id: &str,
) -> tonic::Request<T> {
    let mut request = match deadline {
        Some(deadline) => rpc::request(message, deadline),
        None => tonic::Request::new(message),
    };
    request_id::attach(&mut request, request_id);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_idempotency_key_gives_the_same_id_and_others_differ() {
        let a = Facade::message_id(Some("order-42")).expect("id");
        assert_eq!(a, Facade::message_id(Some("order-42")).expect("id"));
        assert_ne!(a, Facade::message_id(Some("order-43")).expect("id"));
        assert_ne!(
            Facade::message_id(None).expect("id"),
            Facade::message_id(None).expect("id")
        );
        assert!(Facade::message_id(Some("")).is_err());
        assert!(Facade::message_id(Some(&"k".repeat(MAX_IDEMPOTENCY_KEY + 1))).is_err());
    }

    #[test]
    fn cursors_round_trip_and_others_are_refused() {
        assert_eq!(position(&cursor(42)).expect("ours"), 42);
        for forged in [
            "",
            "c",
            "c0",
            "c+5",
            "c-1",
            "42",
            "c1x",
            "C1",
            "c99999999999999999999",
        ] {
            assert!(position(forged).is_err(), "{forged:?}");
        }
    }
}
