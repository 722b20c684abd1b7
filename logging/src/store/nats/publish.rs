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

/// What the stream answered to an append of one message or of an atomic batch.
#[derive(Debug, PartialEq)]
pub(super) enum Published {
    /// Stored, the last message at this position (a batch's others right before it, in
    /// order).
    Stored(u64),
    /// Refused whole because an id in it is already stored (or is in a batch twice), or
    /// an earlier attempt with it is still in flight: nothing of it is stored, and
    /// `reason` says why.
    Refused(String),
    /// Refused whole because the stream (or JetStream's storage) is at its size limit.
    Full(String),
}

/// Whether the stream refused a publish for its expected last sequence: the subject (an
/// id) holds a message. A cluster answers some of these with an error code (10164) the
/// client does not name, so the text is read too.
fn is_wrong_last_sequence(error: &jetstream::context::PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
    ) || error.to_string().contains("wrong last sequence")
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
    published(ack.await)
}

/// Publishes `messages` (2 to [`MAX_BATCH`]) as one atomic batch, each on its id's
/// subject, unless a subject holds one.
pub(super) async fn batch(
    client: &Client,
    jetstream: &jetstream::Context,
    messages: &[Message],
) -> Result<Published, StoreError> {
    let Some((last, rest)) = messages.split_last() else {
        return Ok(Published::Stored(0));
    };
    // Unique among the batches in flight (64 random bits), and short: the servers store
    // it with every message of the batch.
    let id = format!("{:016x}", rand::random::<u64>());
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
    published(ack.await)
}

/// What the answer to an append (a batch's commit) says of it.
fn published(
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<Published, StoreError> {
    match ack {
        Ok(ack) => Ok(Published::Stored(ack.sequence)),
        Err(error) if is_full(&error) => Ok(Published::Full(error.to_string())),
        // The server refused it for an id it holds (or a batch holds twice): nothing of
        // it is stored; reading the id back, or appending a batch's messages one by one,
        // tells why.
        Err(error) if is_wrong_last_sequence(&error) => Ok(Published::Refused(error.to_string())),
        // Anything else (no answer in time, no stream, no connection, an error this store
        // does not know): unavailable, and the caller retries the batch with the same ids.
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
    fn a_batch_is_stored_refused_for_its_ids_or_unavailable() {
        let stored = PublishAck {
            sequence: 42,
            ..PublishAck::default()
        };
        assert_eq!(published(Ok(stored)).ok(), Some(Published::Stored(42)));
        for kind in [
            PublishErrorKind::WrongLastSequence,
            PublishErrorKind::WrongLastMessageId,
        ] {
            let refused = published(Err(PublishError::new(kind)));
            assert!(matches!(refused, Ok(Published::Refused(_))), "{refused:?}");
        }
        // As a cluster answers it: a code the client does not name.
        let clustered = PublishError::with_source(
            PublishErrorKind::Other,
            "wrong last sequence (code 400, error code 10164)",
        );
        assert!(matches!(
            published(Err(clustered)),
            Ok(Published::Refused(_))
        ));
        // An error the store does not recognise is not taken for a refusal of ids: the
        // batch is unavailable (the caller retries it), not appended one by one.
        for kind in [
            PublishErrorKind::Other,
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
        ] {
            let unknown = published(Err(PublishError::new(kind)));
            assert!(
                matches!(unknown, Err(StoreError::Unavailable(_))),
                "{unknown:?}"
            );
        }
    }
}
