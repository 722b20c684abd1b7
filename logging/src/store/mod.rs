//! Where messages live. The service is generic over [`MessageStore`], so a backend is
//! chosen once at start-up and every call is a direct (not dynamic) call.
//!
//! The contract every backend keeps:
//! - `append` is put-if-absent by id: the first text for an id wins, forever (for as
//!   long as the id is kept); a repeat with the same text stores nothing and answers
//!   [`Appended::Duplicate`], a repeat with another text [`Appended::Conflict`]. This is
//!   what makes the facade's retries exactly-once in effect.
//! - Every message has a position: increasing from 1 in insertion order, never reused.
//!   `read` returns one page after a position, at the same cost at any depth; `stream`
//!   sends everything after a position in batches, up to the end of the log when the
//!   call began.
//! - **A full read's memory is bounded in bytes, whatever the log or message size.** A
//!   batch holds at most [`STREAM_BATCH_BYTES`] (128 KiB) of text, or one message alone;
//!   the channel to the reader holds two. The memory store copies one batch at a time,
//!   so a full read holds three batches: under 600 KiB with 64 KiB texts. The NATS
//!   store holds, besides, one answer of 128 KiB (and one message) for each of its four
//!   requests of messages in flight, and blocks: an answer of 256 KiB (and one block)
//!   being read and one waiting, and those waiting for others (256 KiB, and the answer
//!   that passed it): under 3 MiB in all. The gRPC service adds its own channel of
//!   two batches and the connection's send buffer. `bench/growth big` measures it (one
//!   and sixteen full reads of 3,000 messages of 60 KiB), and `e2e/tests/abuse.rs`
//!   asserts it (no service grows by more than 64 MiB while 64 full reads run).
//! - A backend that cannot reach its data answers [`StoreError::Unavailable`] promptly,
//!   so callers can fail over instead of hanging.

pub mod memory;
pub mod nats;

use std::future::Future;

use futures_util::future::join_all;
use tokio::sync::mpsc;

pub use memory::{MemoryLimits, MemoryStore};
pub use nats::{NatsConfig, NatsStore, Retention};

/// Most messages per batch of a [`MessageStore::stream`].
pub const STREAM_BATCH: usize = 512;
/// The most messages one [`MessageStore::read`] returns.
pub const MAX_PAGE: usize = 1000;
/// Most bytes of text in one page (always at least one message), so a gRPC message
/// stays far below the 4 MiB a peer accepts by default, whatever the texts.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most bytes of text in one batch of a [`MessageStore::stream`] (always at least one
/// message): a full read holds a few batches, so this sets its memory.
pub const STREAM_BATCH_BYTES: usize = 128 * 1024;

/// Takes messages from `messages` while the batch stays under `count` messages and
/// `max_bytes` of text; returns the batch and whether messages were left (still in
/// `messages`, so the next call goes on from there).
fn fill<I: Iterator<Item = Stored>>(
    messages: &mut std::iter::Peekable<I>,
    count: usize,
    max_bytes: usize,
) -> (Vec<Stored>, bool) {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(next) = messages.peek() {
        let full =
            batch.len() >= count || (!batch.is_empty() && bytes + next.text.len() > max_bytes);
        if full {
            return (batch, true);
        }
        bytes += next.text.len();
        batch.extend(messages.next());
    }
    (batch, false)
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub text: String,
}

/// A message as read back, with its position in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub position: u64,
    pub id: String,
    pub text: String,
}

/// A stored message as the gRPC service sends it (and as a NATS block holds it).
impl From<Stored> for proto::logging::v1::Message {
    fn from(Stored { position, id, text }: Stored) -> Self {
        Self { id, text, position }
    }
}

impl From<proto::logging::v1::Message> for Stored {
    fn from(
        proto::logging::v1::Message { id, text, position }: proto::logging::v1::Message,
    ) -> Self {
        Self { position, id, text }
    }
}

/// One page of a [`MessageStore::read`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub messages: Vec<Stored>,
    /// Whether messages were stored after the last one returned.
    pub more: bool,
}

/// The batches of a [`MessageStore::stream`], ending at position `until`. Dropping the
/// receiver stops the reading.
#[derive(Debug)]
pub struct Batches {
    pub until: u64,
    pub receiver: mpsc::Receiver<Result<Vec<Stored>, StoreError>>,
}

impl Batches {
    /// Nothing to send: an empty log, or a reader already at `until`.
    fn empty(until: u64) -> Self {
        Self {
            until,
            receiver: mpsc::channel(1).1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Inserted,
    /// The id was already stored with the same text: nothing changed.
    Duplicate,
    /// The id was already stored with another text: nothing changed.
    Conflict,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("message store unavailable: {0}")]
    Unavailable(String),
    /// The store is at one of its limits; nothing was stored and nothing was evicted.
    #[error("message store full: {0}")]
    Full(String),
    /// A position past the end of the log: no reader was ever given it.
    #[error("position {after} is past the end of the log ({last})")]
    PastTheEnd { after: u64, last: u64 },
}

impl StoreError {
    /// The store could not do `what`, for `reason`.
    pub fn unavailable(what: &str, reason: impl std::fmt::Display) -> Self {
        Self::Unavailable(format!("{what}: {reason}"))
    }
}

pub trait MessageStore: Send + Sync + 'static {
    /// Stores `message` unless its id is already stored.
    fn append(&self, message: Message)
        -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// Stores each of `messages` as [`MessageStore::append`] would, and answers each on
    /// its own, in order. By default they are appended concurrently; a backend that can
    /// store many at once (the NATS store's atomic batches) does so.
    fn append_batch(
        &self,
        messages: Vec<Message>,
    ) -> impl Future<Output = Vec<Result<Appended, StoreError>>> + Send {
        join_all(messages.into_iter().map(|message| self.append(message)))
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) messages after position `after`; fewer when
    /// they hold more than [`MAX_BATCH_BYTES`] of text (`more` then says so).
    fn read(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Every message after `after` up to `until` (`None`: the end of the log now), in
    /// batches of up to [`STREAM_BATCH`] messages and [`STREAM_BATCH_BYTES`] of text.
    fn stream(
        &self,
        after: u64,
        until: Option<u64>,
    ) -> impl Future<Output = Result<Batches, StoreError>> + Send;

    /// Which log this is: the same for every instance on one shared store, different
    /// for every memory store.
    fn log(&self) -> &str;

    /// A short name for logs and metadata: `memory`, `nats`.
    fn kind(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filling_batches_by_bytes_loses_nothing() {
        let big = |position: u64| Stored {
            position,
            id: position.to_string(),
            text: "x".repeat(400 * 1024),
        };
        let mut messages = (1..=7).map(big).peekable();
        let mut sizes = Vec::new();
        let mut positions = Vec::new();
        while messages.peek().is_some() {
            let (batch, _) = fill(&mut messages, STREAM_BATCH, MAX_BATCH_BYTES);
            sizes.push(batch.len());
            positions.extend(batch.iter().map(|m| m.position));
        }
        assert_eq!(sizes, [2, 2, 2, 1], "1 MiB holds two texts of 400 KiB");
        assert_eq!(positions, (1..=7).collect::<Vec<_>>());
        // One text over the cap still goes, alone.
        let huge = Stored {
            position: 1,
            id: "1".into(),
            text: "x".repeat(2 * MAX_BATCH_BYTES),
        };
        let (batch, more) = fill(&mut vec![huge].into_iter().peekable(), 10, MAX_BATCH_BYTES);
        assert_eq!((batch.len(), more), (1, false));
    }
}

/// The store contract, run against any backend: one suite, every backend.
#[cfg(test)]
pub(crate) mod contract {
    use std::{collections::HashSet, sync::Arc};

    use super::*;

    /// Everything a store streams from the start, in its order.
    pub(crate) async fn streamed<S: MessageStore>(store: &S) -> Vec<Stored> {
        let mut batches = store.stream(0, None).await.expect("stream");
        let mut all = Vec::new();
        while let Some(batch) = batches.receiver.recv().await {
            let batch = batch.expect("batch");
            assert!(!batch.is_empty() && batch.len() <= STREAM_BATCH);
            all.extend(batch);
        }
        assert_eq!(all.last().map_or(0, |m| m.position), batches.until);
        all
    }

    /// The ids a store streams, in its order.
    pub(crate) async fn listed_ids<S: MessageStore>(store: &S) -> Vec<String> {
        streamed(store).await.into_iter().map(|m| m.id).collect()
    }

    /// Every message, read page by page.
    pub(crate) async fn paged<S: MessageStore>(store: &S, limit: usize) -> Vec<Stored> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = store.read(after, limit).await.expect("read");
            assert!(page.messages.len() <= limit);
            if let Some(last) = page.messages.last() {
                after = last.position;
            }
            all.extend(page.messages);
            if !page.more {
                return all;
            }
        }
    }

    fn message(id: &str, text: &str) -> Message {
        Message {
            id: id.to_owned(),
            text: text.to_owned(),
        }
    }

    pub(crate) async fn empty_store_lists_nothing<S: MessageStore>(store: &S) {
        assert!(streamed(store).await.is_empty());
        assert_eq!(store.read(0, 10).await.expect("read"), Page::default());
    }

    pub(crate) async fn insert_then_duplicate_keeps_the_first<S: MessageStore>(store: &S) {
        assert_eq!(
            store.append(message("a", "first")).await.expect("append"),
            Appended::Inserted
        );
        assert_eq!(
            store.append(message("a", "first")).await.expect("append"),
            Appended::Duplicate
        );
        assert_eq!(
            store.append(message("a", "second")).await.expect("append"),
            Appended::Conflict
        );
        let stored = streamed(store).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(
            (stored[0].id.as_str(), stored[0].text.as_str()),
            ("a", "first")
        );
    }

    pub(crate) async fn lists_in_insertion_order<S: MessageStore>(store: &S) {
        let ids: Vec<String> = (0..50).map(|i| format!("id-{}", 50 - i)).collect();
        for id in &ids {
            store
                .append(message(id, &format!("text of {id}")))
                .await
                .expect("append");
        }
        assert_eq!(listed_ids(store).await, ids);
    }

    /// Pages of any size walk the same log the stream sends, positions increase, and a
    /// position past the end is refused.
    pub(crate) async fn pages_walk_the_same_log_as_the_stream<S: MessageStore>(store: &S) {
        for i in 0..1200 {
            store
                .append(message(&format!("p-{i}"), &format!("text {i}")))
                .await
                .expect("append");
        }
        let all = streamed(store).await;
        assert_eq!(all.len(), 1200);
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        for limit in [7, 100, MAX_PAGE] {
            assert_eq!(paged(store, limit).await, all, "limit {limit}");
        }
        let first = store.read(0, 1).await.expect("read");
        assert_eq!(first.messages, all[..1]);
        assert!(first.more);
        // From the middle: the page after a position starts right after it.
        let middle = &all[600];
        let page = store.read(middle.position, 3).await.expect("read");
        assert_eq!(page.messages, all[601..604]);
        let last = all.last().expect("last").position;
        let end = store.read(last, 10).await.expect("read at the end");
        assert_eq!(end, Page::default());
        // A stream at the end sends nothing and says where the log ends, as any other.
        let at_end = store.stream(last, None).await.expect("stream at the end");
        assert_eq!(at_end.until, last, "until at the end of the log");
        assert!(matches!(
            store.read(last + 10, 10).await,
            Err(StoreError::PastTheEnd { .. })
        ));
        // A stream from the middle, and one that stops early.
        let mut rest = store.stream(middle.position, None).await.expect("stream");
        let mut count = 0;
        while let Some(batch) = rest.receiver.recv().await {
            count += batch.expect("batch").len();
        }
        assert_eq!(count, 1200 - 601);
        let mut early = store
            .stream(0, Some(all[9].position))
            .await
            .expect("stream");
        assert_eq!(early.until, all[9].position);
        let batch = early
            .receiver
            .recv()
            .await
            .expect("a batch")
            .expect("batch");
        assert_eq!(batch, all[..10]);
        assert!(early.receiver.recv().await.is_none());
    }

    /// Texts of 60 KiB: batches and pages stay under the byte cap and still hold
    /// everything.
    pub(crate) async fn big_texts_are_split_into_small_batches<S: MessageStore>(store: &S) {
        for i in 0..40 {
            let text = format!("{i:02}{}", "x".repeat(60 * 1024));
            store
                .append(message(&format!("big-{i}"), &text))
                .await
                .expect("append");
        }
        let mut batches = store.stream(0, None).await.expect("stream");
        let mut count = 0;
        while let Some(batch) = batches.receiver.recv().await {
            let batch = batch.expect("batch");
            let bytes: usize = batch.iter().map(|m| m.text.len()).sum();
            assert!(bytes <= STREAM_BATCH_BYTES, "{bytes} bytes in one batch");
            count += batch.len();
        }
        assert_eq!(count, 40);
        let page = store.read(0, MAX_PAGE).await.expect("read");
        assert!(
            page.more && page.messages.len() < 40,
            "a page is cut by bytes"
        );
        assert_eq!(paged(store, MAX_PAGE).await.len(), 40);
    }

    /// 16 writers, each appending its own ids and a shared set of ids: nothing lost,
    /// nothing twice, and every shared id inserted exactly once across all writers.
    pub(crate) async fn concurrent_writers_lose_nothing<S: MessageStore>(store: Arc<S>) {
        const WRITERS: usize = 16;
        const EACH: usize = 50;
        const SHARED: usize = 20;
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut inserted_shared = 0;
                for i in 0..EACH {
                    let id = format!("w{writer}-{i}");
                    assert_eq!(
                        store.append(message(&id, &id)).await.expect("append"),
                        Appended::Inserted
                    );
                    if i < SHARED {
                        let shared = format!("shared-{i}");
                        if store
                            .append(message(&shared, &shared))
                            .await
                            .expect("append")
                            == Appended::Inserted
                        {
                            inserted_shared += 1;
                        }
                    }
                }
                inserted_shared
            }));
        }
        let mut inserted_shared = 0;
        for task in tasks {
            inserted_shared += task.await.expect("writer");
        }
        assert_eq!(
            inserted_shared, SHARED,
            "each shared id inserted exactly once"
        );
        let listed = streamed(&*store).await;
        assert_eq!(listed.len(), WRITERS * EACH + SHARED);
        let unique: HashSet<_> = listed.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(unique.len(), listed.len(), "no duplicates");
    }
}
