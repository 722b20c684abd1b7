//! The in-memory store: one process, gone when it stops.
//!
//! One `std::sync::Mutex` guards both the id set and the ordered list, so "is it new?"
//! and "append it at the end" happen as one step: a sharded map alone could not keep
//! insertion order consistent with the dedup decision. The critical section is a hash
//! lookup and a push; it never spans an `.await`.

use std::{
    collections::HashSet,
    sync::{Mutex, MutexGuard},
};

use super::{Appended, Message, MessageStore, StoreError};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: HashSet<String>,
    messages: Vec<Message>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each update is a single insert+push, so a poisoned lock holds consistent data.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MessageStore for MemoryStore {
    async fn append(&self, message: Message) -> Result<Appended, StoreError> {
        let mut inner = self.lock();
        if inner.ids.contains(&message.id) {
            return Ok(Appended::Duplicate);
        }
        inner.ids.insert(message.id.clone());
        inner.messages.push(message);
        Ok(Appended::Inserted)
    }

    async fn list(&self) -> Result<Vec<Message>, StoreError> {
        Ok(self.lock().messages.clone())
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
        contract::empty_store_lists_nothing(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn duplicate() {
        contract::insert_then_duplicate_keeps_the_first(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn order() {
        contract::lists_in_insertion_order(&MemoryStore::new()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent() {
        contract::concurrent_writers_lose_nothing(Arc::new(MemoryStore::new())).await;
    }
}
