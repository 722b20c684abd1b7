//! Appends: one message, or many as one atomic batch (nats-server 2.12 and newer).
//!
//! Every message is published on its id's subject with
//! `Nats-Expected-Last-Subject-Sequence: 0`: the stream stores it only if that subject
//! holds nothing, so an id is stored once for as long as its message is kept, whoever
//! repeats it and whenever. A repeat is refused with "wrong last sequence"; so is an
//! append while an earlier attempt with the same id still waits for its quorum (the
//! caller tells the two apart by reading the id back).
//!
//! An atomic batch is one Raft proposal for up to [`MAX_BATCH`] messages: every message
//! carries `Nats-Batch-Id` and its `Nats-Batch-Sequence`, those before the last are sent
//! without waiting, and the last adds `Nats-Batch-Commit: 1` and is a request, answered
//! once the whole batch is stored on a quorum (its ack's sequence is the batch's last
//! position) or refused whole: nothing of a refused batch is stored.

use async_nats::{
    jetstream::{self, context::PublishErrorKind, message::PublishMessage},
    Client, HeaderMap,
};

use super::subject::subject_for;
use crate::store::{Message, StoreError};

/// The most messages the server takes in one atomic batch.
pub(super) const MAX_BATCH: usize = 1000;

/// What the stream answered to one append.
#[derive(Debug, PartialEq)]
pub(super) enum Published {
    /// Stored now, at this position.
    Stored(u64),
    /// Refused: its id's subject holds a message, or an earlier attempt is in flight.
    Refused,
}

/// What the stream answered to an atomic batch.
#[derive(Debug, PartialEq)]
pub(super) enum Batched {
    /// All stored, the last at this position (the others right before it, in order).
    Stored(u64),
    /// Refused whole (an id already stored or twice in the batch, too many batches in
    /// flight, ...): nothing of it is stored, and `reason` says why.
    Refused(String),
    /// Refused whole because the stream (or JetStream's storage) is at its size limit.
    Full(String),
}

/// Whether the stream refused a publish because it is at its size limit (`DiscardNew`),
/// or JetStream has no storage left.
fn is_full(error: &jetstream::context::PublishError) -> bool {
    let text = error.to_string();
    [
        "maximum bytes exceeded",
        "maximum messages exceeded",
        "insufficient resources",
    ]
    .iter()
    .any(|full| text.contains(full))
}

/// Publishes `message` on its id's subject, unless the subject holds one.
pub(super) async fn one(
    jetstream: &jetstream::Context,
    message: &Message,
) -> Result<Published, StoreError> {
    let publish = PublishMessage::build()
        .expected_last_subject_sequence(0)
        .payload(message.text.clone().into());
    let ack = jetstream
        .send_publish(subject_for(&message.id), publish)
        .await
        .map_err(|e| StoreError::unavailable("publish", e))?;
    match ack.await {
        Ok(ack) => Ok(Published::Stored(ack.sequence)),
        Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(Published::Refused),
        Err(error) if is_full(&error) => Err(StoreError::Full(format!(
            "the {} stream is at its size limit (--store-max-bytes): {error}",
            super::STREAM
        ))),
        Err(error) => Err(StoreError::unavailable(
            "no acknowledgement from JetStream",
            error,
        )),
    }
}

/// Publishes `messages` (2 to [`MAX_BATCH`]) as one atomic batch, each on its id's
/// subject, unless a subject holds one.
pub(super) async fn batch(
    client: &Client,
    jetstream: &jetstream::Context,
    messages: &[Message],
) -> Result<Batched, StoreError> {
    let Some((last, rest)) = messages.split_last() else {
        return Ok(Batched::Stored(0));
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let headers = |sequence: usize| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers
    };
    for (i, message) in rest.iter().enumerate() {
        client
            .publish_with_headers(
                subject_for(&message.id),
                headers(i + 1),
                message.text.clone().into(),
            )
            .await
            .map_err(|e| StoreError::unavailable("publish", e))?;
    }
    let commit = PublishMessage::build()
        .headers(headers(messages.len()))
        .header("Nats-Batch-Commit", "1")
        .payload(last.text.clone().into());
    let ack = jetstream
        .send_publish(subject_for(&last.id), commit)
        .await
        .map_err(|e| StoreError::unavailable("publish", e))?;
    batched(ack.await)
}

/// What the commit's answer says of the batch.
fn batched(
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<Batched, StoreError> {
    match ack {
        Ok(ack) => Ok(Batched::Stored(ack.sequence)),
        Err(error) if is_full(&error) => Ok(Batched::Full(error.to_string())),
        // The server answered, and refused the batch: nothing of it is stored.
        Err(error)
            if matches!(
                error.kind(),
                PublishErrorKind::WrongLastSequence
                    | PublishErrorKind::WrongLastMessageId
                    | PublishErrorKind::Other
            ) =>
        {
            Ok(Batched::Refused(error.to_string()))
        }
        // No answer in time, no stream, no connection: whether it is stored is unknown.
        Err(error) => Err(StoreError::unavailable(
            "no acknowledgement from JetStream",
            error,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::{context::PublishError, publish::PublishAck};

    #[test]
    fn a_batch_answered_is_stored_or_refused_and_one_unanswered_is_unavailable() {
        let stored = PublishAck {
            sequence: 42,
            ..PublishAck::default()
        };
        assert_eq!(batched(Ok(stored)).ok(), Some(Batched::Stored(42)));
        for kind in [PublishErrorKind::WrongLastSequence, PublishErrorKind::Other] {
            let refused = batched(Err(PublishError::new(kind)));
            assert!(matches!(refused, Ok(Batched::Refused(_))), "{refused:?}");
        }
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
        ] {
            let unknown = batched(Err(PublishError::new(kind)));
            assert!(
                matches!(unknown, Err(StoreError::Unavailable(_))),
                "{unknown:?}"
            );
        }
    }
}
