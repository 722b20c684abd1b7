//! Reads: a page is one failover call; a full read streams the whole log from one
//! instance and, if that instance fails midway, resumes on another that serves the same
//! log, from the last position received.

use std::{net::IpAddr, sync::Arc, time::Duration};

use proto::logging::v1::{ReadRequest, StreamRequest, StreamResponse};
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};
use tracing::warn;

use super::{
    errors::FacadeError,
    facade::{logging_request, Facade},
    input::{cursor, position},
};
use crate::failover::FailoverError;

/// How long a full read waits for the next batch before it calls the instance hung and
/// resumes elsewhere. Longer than a logging instance waits on its store
/// (`logging::store::nats::STREAM_STALL`), so a stalled store is reported by the
/// instance first.
const READ_STALL: Duration = Duration::from_secs(3);
/// How many times a new full read asks for a stream when the instances it reaches are
/// at their limit of full reads, before it is refused with 503.
const BUSY_ASKS: usize = 3;

/// One stored message, with its id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"id": "0b7e2f44-6f1e-4c3c-9d7a-3a52e4b1f0a1", "msg": "msg1"}))]
pub struct LogEntry {
    /// The message's uuid.
    pub id: String,
    /// The message's text.
    pub msg: String,
}

/// One page of messages, and the cursor of the next one (`None` at the end).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Page {
    /// The page's messages, in insertion order.
    pub messages: Vec<LogEntry>,
    /// The `after` of the next page; `null` at the end of the log.
    #[schema(example = "c100")]
    pub next: Option<String>,
}

impl Facade {
    /// One page: up to `limit` (default [`super::facade::DEFAULT_PAGE`]) messages after the cursor
    /// `after` (from the start without one). Costs the same at any depth of the log.
    pub async fn read_page(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
        request_id: &str,
    ) -> Result<Page, FacadeError> {
        let limit = Self::page_limit(limit)?;
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
    /// Fails (503) if no instance can start, or when the facade (`--max-full-reads`) or
    /// the instances asked (up to [`BUSY_ASKS`]) are at their limit of full reads; after
    /// that, [`FullRead::next`] resumes on another instance if the first one fails.
    pub async fn read_all(
        self: &Arc<Self>,
        request_id: &str,
        peer: Option<IpAddr>,
    ) -> Result<FullRead, FacadeError> {
        let pass = self
            .full_reads
            .enter(peer)
            .map_err(|refused| FacadeError::Busy(format!("full reads: {refused}")))?;
        // An instance at its own limit refuses at once; another may have room, so a new
        // read asks again (the order is random each time) before it is refused.
        let mut asked = 1;
        let opened = loop {
            match self.open_stream(request_id, 0, 0, None).await {
                Err(FailoverError::Rejected(status))
                    if status.code() == Code::ResourceExhausted && asked < BUSY_ASKS =>
                {
                    asked += 1;
                }
                opened => break opened,
            }
        };
        let (stream, first) = opened.map_err(|error| match error {
            FailoverError::Rejected(status) if status.code() == Code::ResourceExhausted => {
                FacadeError::Busy(
                    "the logging instances asked are serving their most full reads".into(),
                )
            }
            error => self.failed("read the log", request_id, error),
        })?;
        let mut read = FullRead {
            _pass: pass,
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
    /// log it reads); with `log`, only an instance that serves that log will do. A read
    /// that resumes (with `log`) waits for an instance busy with full reads as for one
    /// that is down, within the retry budget: a read already begun is not given up for
    /// a moment's load. A new read gets the instance's refusal (`RESOURCE_EXHAUSTED`) as
    /// it is, and [`Facade::read_all`] asks again before it answers 503.
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
                let busy_is_transient = |status: Status| match status.code() {
                    Code::ResourceExhausted if log.is_some() => {
                        Status::unavailable(status.message())
                    }
                    _ => status,
                };
                let mut stream = client
                    .stream(request)
                    .await
                    .map_err(busy_is_transient)?
                    .into_inner();
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
}

/// A read of the whole log, as it stood when it began, batch by batch. Holds one batch
/// at a time; the instance behind it may change, the log may not.
pub struct FullRead {
    /// Its place under the facade's limit of full reads.
    _pass: rpc::Pass,
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

#[cfg(test)]
mod tests {
    use super::READ_STALL;

    /// A logging instance gives up on a stalled store (and says so in its stream's
    /// error) before the facade would give up waiting on that instance.
    #[test]
    fn an_instance_gives_up_on_its_store_before_the_facade_gives_up_on_it() {
        assert!(logging::store::nats::STREAM_STALL < READ_STALL);
    }
}
