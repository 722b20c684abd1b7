//! Where messages live. The service is generic over [`MessageStore`], so a backend is
//! chosen once at start-up and every call is a direct (not dynamic) call.
//!
//! The contract every backend keeps:
//! - `append` is put-if-absent by id: the first text for an id wins, forever; a repeat
//!   stores nothing and answers [`Appended::Duplicate`]. This is what makes the facade's
//!   retries exactly-once in effect.
//! - `list` returns every message in insertion order.
//! - A backend that cannot reach its data answers [`StoreError::Unavailable`] promptly,
//!   so callers can fail over instead of hanging.

pub mod memory;
pub mod nats;

use std::future::Future;

pub use memory::MemoryStore;
pub use nats::{NatsConfig, NatsStore};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Inserted,
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("message store unavailable: {0}")]
    Unavailable(String),
}

pub trait MessageStore: Send + Sync + 'static {
    /// Stores `message` unless its id is already stored.
    fn append(&self, message: Message)
        -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// Every stored message, in insertion order.
    fn list(&self) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;

    /// A short name for logs and metadata: `memory`, `nats`.
    fn kind(&self) -> &'static str;
}

/// The store contract, run against any backend: one suite, every backend.
#[cfg(test)]
pub(crate) mod contract {
    use std::{collections::HashSet, sync::Arc};

    use super::*;

    /// The ids a store lists, in its order.
    pub(crate) async fn listed_ids<S: MessageStore>(store: &S) -> Vec<String> {
        store
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.id)
            .collect()
    }

    fn message(id: &str, text: &str) -> Message {
        Message {
            id: id.to_owned(),
            text: text.to_owned(),
        }
    }

    pub(crate) async fn empty_store_lists_nothing<S: MessageStore>(store: &S) {
        assert!(store.list().await.expect("list").is_empty());
    }

    pub(crate) async fn insert_then_duplicate_keeps_the_first<S: MessageStore>(store: &S) {
        assert_eq!(
            store.append(message("a", "first")).await.expect("append"),
            Appended::Inserted
        );
        assert_eq!(
            store.append(message("a", "second")).await.expect("append"),
            Appended::Duplicate
        );
        assert_eq!(store.list().await.expect("list"), [message("a", "first")]);
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
        let listed = store.list().await.expect("list");
        assert_eq!(listed.len(), WRITERS * EACH + SHARED);
        let unique: HashSet<_> = listed.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(unique.len(), listed.len(), "no duplicates");
    }
}
