//! The in-memory store: one process, gone when it stops, bounded by its limits.
//!
//! One `parking_lot::Mutex` guards the id index and the ordered list, so "is it new?" and
//! "append it at the end" happen as one step: a sharded map alone could not keep
//! insertion order consistent with the dedup decision. Critical sections are a hash
//! lookup and a push, or a copy of one page or batch; none spans an `.await`.
//!
//! A message's position is its index plus one. When the store is at `max_messages` or
//! `max_bytes` of text, an append is refused with [`StoreError::Full`]: nothing is ever
//! evicted behind a client's back.

use std::{collections::HashMap, sync::Arc};

use parking_lot::{Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::{
    fill, Appended, Batches, Message, MessageStore, Page, StoreError, Stored, MAX_BATCH_BYTES,
    MAX_PAGE, STREAM_BATCH, STREAM_BATCH_BYTES,
};

/// How much one memory store may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    pub max_messages: usize,
    /// Bytes of message text (ids and overhead not counted).
    pub max_bytes: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_messages: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    limits: MemoryLimits,
    log: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// id -> index into `messages`.
    ids: HashMap<String, usize>,
    messages: Vec<Message>,
    text_bytes: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(MemoryLimits::default())
    }
}

impl MemoryStore {
    pub fn new(limits: MemoryLimits) -> Self {
        Self {
            inner: Arc::default(),
            limits,
            log: format!("memory:{}", uuid::Uuid::new_v4()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }
}

/// Copies a batch from index `from` (below `to`) of at most `count` messages and
/// `max_bytes` of text (at least one message), with their positions; and whether it
/// stopped before `to`.
fn copy(
    inner: &Inner,
    (from, to): (usize, usize),
    count: usize,
    max_bytes: usize,
) -> (Vec<Stored>, bool) {
    let mut messages = inner.messages[from..to]
        .iter()
        .zip(from + 1..)
        .map(|(message, position)| Stored {
            position: position as u64,
            id: message.id.clone(),
            text: message.text.clone(),
        })
        .peekable();
    fill(&mut messages, count, max_bytes)
}

impl MessageStore for MemoryStore {
    async fn append(&self, message: Message) -> Result<Appended, StoreError> {
        let mut inner = self.lock();
        if let Some(&index) = inner.ids.get(&message.id) {
            return Ok(if inner.messages[index].text == message.text {
                Appended::Duplicate
            } else {
                Appended::Conflict
            });
        }
        if inner.messages.len() >= self.limits.max_messages {
            return Err(StoreError::Full(format!(
                "it holds {} messages, the most allowed (--max-messages)",
                self.limits.max_messages
            )));
        }
        if inner.text_bytes + message.text.len() > self.limits.max_bytes {
            return Err(StoreError::Full(format!(
                "it holds {} bytes of text, and at most {} are allowed (--max-bytes)",
                inner.text_bytes, self.limits.max_bytes
            )));
        }
        let index = inner.messages.len();
        inner.text_bytes += message.text.len();
        inner.ids.insert(message.id.clone(), index);
        inner.messages.push(message);
        Ok(Appended::Inserted)
    }

    async fn read(&self, after: u64, limit: usize) -> Result<Page, StoreError> {
        let inner = self.lock();
        let len = inner.messages.len();
        let from = usize::try_from(after).unwrap_or(usize::MAX);
        if from > len {
            return Err(StoreError::PastTheEnd {
                after,
                last: len as u64,
            });
        }
        let (messages, more) = copy(&inner, (from, len), limit.min(MAX_PAGE), MAX_BATCH_BYTES);
        Ok(Page { messages, more })
    }

    async fn stream(&self, after: u64, until: Option<u64>) -> Result<Batches, StoreError> {
        let len = self.lock().messages.len() as u64;
        if after > len {
            return Err(StoreError::PastTheEnd { after, last: len });
        }
        let until = until.unwrap_or(len).min(len);
        if after >= until {
            return Ok(Batches::empty(until));
        }
        let (sender, receiver) = mpsc::channel(2);
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let (mut from, to) = (after as usize, until as usize);
            while from < to {
                let (batch, _) = copy(&inner.lock(), (from, to), STREAM_BATCH, STREAM_BATCH_BYTES);
                from += batch.len();
                if sender.send(Ok(batch)).await.is_err() {
                    return; // the reader went away
                }
            }
        });
        Ok(Batches { until, receiver })
    }

    fn log(&self) -> &str {
        &self.log
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::contract;

    #[tokio::test]
    async fn empty() {
        contract::empty_store_lists_nothing(&MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn duplicate() {
        contract::insert_then_duplicate_keeps_the_first(&MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn order() {
        contract::lists_in_insertion_order(&MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn pages() {
        contract::pages_walk_the_same_log_as_the_stream(&MemoryStore::default()).await;
    }

    #[tokio::test]
    async fn big_texts() {
        contract::big_texts_are_split_into_small_batches(&MemoryStore::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent() {
        contract::concurrent_writers_lose_nothing(Arc::new(MemoryStore::default())).await;
    }

    #[tokio::test]
    async fn a_full_store_refuses_and_keeps_everything() {
        let store = MemoryStore::new(MemoryLimits {
            max_messages: 2,
            max_bytes: 10,
        });
        let message = |id: &str, text: &str| Message {
            id: id.into(),
            text: text.into(),
        };
        assert_eq!(
            store.append(message("a", "12345")).await.ok(),
            Some(Appended::Inserted)
        );
        // Over the byte limit, then over the count limit.
        assert!(matches!(
            store.append(message("b", "123456")).await,
            Err(StoreError::Full(_))
        ));
        assert_eq!(
            store.append(message("b", "123")).await.ok(),
            Some(Appended::Inserted)
        );
        assert!(matches!(
            store.append(message("c", "1")).await,
            Err(StoreError::Full(_))
        ));
        // A repeat is still answered: it stores nothing.
        assert_eq!(
            store.append(message("a", "12345")).await.ok(),
            Some(Appended::Duplicate)
        );
        assert_eq!(contract::listed_ids(&store).await, ["a", "b"]);
    }
}
