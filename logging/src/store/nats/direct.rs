//! Batched direct gets: many messages of a stream in one request (nats-server 2.11 and
//! newer).
//!
//! A request `{"seq": S, "batch": N, "max_bytes": B}` on `$JS.API.DIRECT.GET.<stream>`
//! is answered by one replica of the stream (any of them, off the JetStream API queue):
//! the messages from position `S` on, one reply each, stopping after `N` messages or once
//! `B` bytes are sent, then an end-of-batch status (`204 EOB`) saying how many messages
//! that replica holds after the last one sent. Nothing at or after `S` is a `404`.
//!
//! A replica answers from what it has applied, which may be a little behind what the
//! stream's leader acknowledged. [`chunk`] knows where its answer must end (the caller
//! asked the leader), so an answer that stops short is a replica behind, asked again.

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use retry::Backoff;
use tokio::time::Instant;

use super::subject::id_of;
use crate::store::{StoreError, Stored};

/// One message as a replica sent it.
#[derive(Debug)]
pub(super) struct Raw {
    pub(super) sequence: u64,
    pub(super) subject: String,
    pub(super) payload: Bytes,
}

impl Raw {
    /// A message of the messages stream, as the store gives it: its id from its
    /// subject, its text from the payload.
    pub(super) fn into_stored(self) -> Stored {
        Stored {
            position: self.sequence,
            id: id_of(&self.subject),
            text: String::from_utf8_lossy(&self.payload).into_owned(),
        }
    }
}

/// What one replica answered to one batched get.
#[derive(Debug, Default)]
pub(super) struct Answer {
    pub(super) messages: Vec<Raw>,
    /// How many messages the replica holds after the last one sent (after the position
    /// asked for, when none was sent).
    pub(super) pending: u64,
}

/// The pauses before asking a replica that is behind again: 1 ms at first, doubling to
/// 50 ms (jittered).
pub(super) fn behind() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(50))
}

/// Where a batched get starts.
#[derive(Debug)]
pub(super) enum Start {
    /// At this position, or the first after it.
    At(u64),
    /// At the first message stored at or after this time (RFC 3339, as a reply's
    /// `Nats-Time-Stamp` gives it).
    Since(String),
}

/// When the message at `position` of `stream` was stored (RFC 3339), as a replica
/// answers; `None` when none answers with it within [`super::STREAM_STALL`].
pub(super) async fn stored_at(client: &Client, stream: &str, position: u64) -> Option<String> {
    let request = serde_json::json!({ "seq": position }).to_string();
    let get = client.request(format!("$JS.API.DIRECT.GET.{stream}"), request.into());
    let reply = tokio::time::timeout(super::STREAM_STALL, get)
        .await
        .ok()?
        .ok()?;
    Some(reply.headers?.get("Nats-Time-Stamp")?.as_str().to_owned())
}

/// Asks for up to `count` messages of `stream` from `from` on, at most about
/// `max_bytes` (always at least one message), within `timeout`.
pub(super) async fn batch(
    client: &Client,
    stream: &str,
    from: Start,
    count: usize,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Answer, StoreError> {
    let unavailable = |reason: &dyn std::fmt::Display| StoreError::unavailable("read", reason);
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| unavailable(&e))?;
    let mut request = serde_json::json!({ "batch": count, "max_bytes": max_bytes });
    match from {
        Start::At(sequence) => request["seq"] = sequence.into(),
        Start::Since(time) => request["start_time"] = time.into(),
    }
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            request.to_string().into(),
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let deadline = Instant::now() + timeout;
    let mut answer = Answer::default();
    loop {
        let reply = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(unavailable(&"the connection closed")),
            Err(_) => return Err(unavailable(&"timed out")),
        };
        let headers = reply.headers.unwrap_or_default();
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.as_str().parse::<u64>().ok())
        };
        match reply.status.map(|status| status.as_u16()) {
            None => {
                let (Some(sequence), Some(subject)) = (
                    number("Nats-Sequence"),
                    headers.get("Nats-Subject").map(|v| v.as_str().to_owned()),
                ) else {
                    return Err(unavailable(&"a reply without its sequence or subject"));
                };
                answer.pending = number("Nats-Num-Pending").unwrap_or(0);
                answer.messages.push(Raw {
                    sequence,
                    subject,
                    payload: reply.payload,
                });
            }
            Some(204) => {
                answer.pending = number("Nats-Num-Pending").unwrap_or(answer.pending);
                return Ok(answer);
            }
            Some(404) => return Ok(answer),
            Some(503) => return Err(unavailable(&"no replica answers direct gets")),
            Some(code) => {
                let description = reply.description.unwrap_or_default();
                return Err(unavailable(&format!("{code} {description}")));
            }
        }
    }
}

/// The next messages `stream` holds at positions `from..=to`, in order: one answer of at
/// most `count` messages and about `max_bytes` (always at least one message), so the
/// caller holds no more than that. Empty when nothing is left in the range. `to` must be
/// stored (the stream's leader said so): an answer with nothing from `from` on comes
/// from a replica that is behind, which is asked again, until `deadline`.
pub(super) async fn chunk(
    client: &Client,
    stream: &str,
    (from, to): (u64, u64),
    count: usize,
    max_bytes: usize,
    deadline: Instant,
) -> Result<Vec<Raw>, StoreError> {
    let mut behind = behind();
    if from > to {
        return Ok(Vec::new());
    }
    loop {
        let count = usize::try_from(to - from + 1).map_or(count, |n| n.min(count));
        let timeout = deadline.saturating_duration_since(Instant::now());
        let answer = batch(client, stream, Start::At(from), count, max_bytes, timeout).await?;
        let past = answer.messages.last().is_some_and(|m| m.sequence > to);
        let mut messages = answer.messages;
        messages.retain(|m| m.sequence <= to);
        if !messages.is_empty() || past {
            return Ok(messages);
        }
        let pause = behind.next_delay();
        if Instant::now() + pause >= deadline {
            return Err(StoreError::unavailable(
                "read",
                format!("the replica answering stays behind position {to}"),
            ));
        }
        tokio::time::sleep(pause).await;
    }
}
