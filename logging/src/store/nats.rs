//! The replicated store: NATS JetStream.
//!
//! Messages live in one stream, `MESSAGES`, on subjects `messages.<id>`, replicated over
//! the cluster (R3 on three nodes) with file storage, so every logging instance sees every
//! message, losing instances loses nothing, and a restart of the whole cluster keeps all.
//!
//! - **Exactly once, for good.** Each append publishes with the header
//!   `Nats-Expected-Last-Subject-Sequence: 0`: JetStream stores it only if its subject
//!   (that is, its id) has never been written, and refuses a repeat with "wrong last
//!   sequence", at any later time. `Nats-Msg-Id` is set too, so a repeat inside the dedup
//!   window is answered `duplicate` without even reaching that check. An append is
//!   acknowledged to the caller only after JetStream acknowledged it (stored on a quorum).
//! - **Throughput from concurrency.** Every request publishes and awaits its own ack;
//!   there is no lock around the store, so concurrent requests pipeline on the connection.
//! - **List from a local view.** A background task tails the stream with an ordered
//!   consumer into memory. `list` asks the stream for its last sequence and waits until
//!   the view has caught up with it, so a read sees every write acknowledged before it
//!   (through any instance), and costs one small API call plus a copy.
//! - **Unavailable, never hung.** Every call to the cluster has a deadline; a store that
//!   lost quorum or connection answers [`StoreError::Unavailable`] promptly.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, StorageType},
};
use futures_util::StreamExt;
use retry::Retry;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Appended, Message, MessageStore, StoreError};

pub const STREAM: &str = "MESSAGES";
/// How long a reader waits for the tail before fetching what the view lacks itself.
const TAIL_GRACE: Duration = Duration::from_millis(50);
const SUBJECT_PREFIX: &str = "messages.";

/// How the store connects.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` seed URLs of the cluster.
    pub urls: Vec<String>,
    /// Copies of each message (1 for a single server, 3 on a three-node cluster).
    pub replicas: usize,
    /// Deadline of every call to the cluster.
    pub timeout: Duration,
}

impl NatsConfig {
    /// One replica per URL given, up to three (JetStream's usual ceiling).
    pub fn new(urls: Vec<String>) -> Self {
        let replicas = urls.len().clamp(1, 3);
        Self {
            urls,
            replicas,
            // Under the facade's 1 s attempt deadline, so a store without quorum answers
            // UNAVAILABLE before the caller gives up on this instance.
            timeout: Duration::from_millis(900),
        }
    }
}

pub struct NatsStore {
    jetstream: jetstream::Context,
    stream: stream::Stream,
    view: Arc<View>,
    tail: JoinHandle<()>,
    /// Stops the tail (when the store is dropped, or the process shuts down).
    stop: CancellationToken,
    timeout: Duration,
}

/// The local copy of the stream, in stream order.
struct View {
    state: Mutex<ViewState>,
    /// The last stream sequence applied, for readers waiting to catch up.
    applied: watch::Sender<u64>,
}

impl Default for View {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            applied: watch::channel(0).0,
        }
    }
}

#[derive(Default)]
struct ViewState {
    messages: Vec<Message>,
    applied: u64,
}

impl View {
    fn lock(&self) -> MutexGuard<'_, ViewState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds the message at stream `sequence`, unless the view already has it (the tail
    /// and a reader filling a gap may both bring the same message).
    fn apply(
        &self,
        sequence: u64,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) {
        let id = headers
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .map(|value| value.as_str().to_owned())
            .unwrap_or_else(|| subject.trim_start_matches(SUBJECT_PREFIX).to_owned());
        let text = String::from_utf8_lossy(payload).into_owned();
        let mut state = self.lock();
        if sequence <= state.applied {
            return;
        }
        state.messages.push(Message { id, text });
        state.applied = sequence;
        drop(state);
        self.applied.send_replace(sequence);
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {error}"))
}

/// Ids become one subject token: kept as they are when they are plain
/// (`[A-Za-z0-9-]`, as uuids are), hex-encoded behind `_` otherwise. No plain id
/// contains `_`, so two ids never share a token.
pub fn subject_for(id: &str) -> String {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if plain {
        format!("{SUBJECT_PREFIX}{id}")
    } else {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{SUBJECT_PREFIX}_{hex}")
    }
}

impl NatsStore {
    /// Connects, creates the stream if it is missing (safe when several instances start
    /// at once: creating an identical stream is idempotent), and starts the local view.
    /// Keeps trying, with backoff and a log line now and then, until the cluster answers
    /// or `cancel` fires (then it returns an error at once).
    pub async fn connect(config: NatsConfig, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let was_disconnected = Arc::new(AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .name("logging")
            .connection_timeout(config.timeout)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let was_disconnected = Arc::clone(&was_disconnected);
                async move { report(event, &was_disconnected) }
            })
            .connect(config.urls.as_slice())
            .await?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.timeout)
            .max_ack_inflight(4096)
            .backpressure_on_inflight(true)
            .build(client);

        let stream_config = stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            storage: StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        };
        let stream = Retry::new(
            format!(
                "store: opening stream {STREAM} on JetStream at {}",
                config.urls.join(",")
            ),
            cancel,
        )
        .backoff(Duration::from_millis(200), Duration::from_secs(2))
        .run(
            || jetstream.get_or_create_stream(stream_config.clone()),
            |_| false,
        )
        .await?;
        info!(stream = STREAM, replicas = config.replicas, urls = ?config.urls, "store: using JetStream");

        let view = Arc::new(View::default());
        let stop = cancel.child_token();
        let tail = tokio::spawn(tail(stream.clone(), Arc::clone(&view), stop.clone()));
        Ok(Self {
            jetstream,
            stream,
            view,
            tail,
            stop,
            timeout: config.timeout,
        })
    }

    /// Brings the local view up to `sequence`. The tail normally gets there within
    /// milliseconds; after an outage its consumer can take seconds to notice and recreate
    /// itself, so a reader that waited briefly fetches the missing messages directly.
    async fn catch_up(&self, sequence: u64) -> Result<(), StoreError> {
        let mut applied = self.view.applied.subscribe();
        let reached =
            tokio::time::timeout(TAIL_GRACE, applied.wait_for(|applied| *applied >= sequence))
                .await
                .is_ok_and(|waited| waited.is_ok());
        if reached {
            return Ok(());
        }
        loop {
            let next = self.view.lock().applied + 1;
            if next > sequence {
                return Ok(());
            }
            let message = self
                .stream
                .get_raw_message(next)
                .await
                .map_err(|e| unavailable("read", e))?;
            self.view.apply(
                message.sequence,
                &message.subject,
                Some(&message.headers),
                &message.payload,
            );
        }
    }
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tail.abort();
    }
}

/// The NATS client's connection events: trouble at WARN, a reconnection at INFO, the
/// routine ones (connected, closed, each failed reconnection attempt while disconnected)
/// at DEBUG.
fn report(event: async_nats::Event, was_disconnected: &AtomicBool) {
    use async_nats::Event;
    match event {
        Event::Connected if was_disconnected.swap(false, Ordering::Relaxed) => {
            info!("store: reconnected to NATS")
        }
        Event::Disconnected => {
            was_disconnected.store(true, Ordering::Relaxed);
            warn!("store: disconnected from NATS; reconnecting")
        }
        Event::Connected | Event::Closed | Event::Draining | Event::ClientError(_) => {
            debug!(%event, "store: NATS event")
        }
        other => warn!(event = %other, "store: NATS event"),
    }
}

/// Follows the stream from where the view stands, until `stop`.
async fn tail(stream: stream::Stream, view: Arc<View>, stop: CancellationToken) {
    let follow = Retry::new("store: following the stream", &stop);
    loop {
        let applied = view.lock().applied;
        let deliver_policy = if applied == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: applied + 1,
            }
        };
        let subscribe = || async {
            stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy,
                    ..Default::default()
                })
                .await?
                .messages()
                .await
                .map_err(anyhow::Error::from)
        };
        let Ok(mut messages) = follow.run(subscribe, |_| false).await else {
            return; // stopped
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    warn!(%error, "store: stream follower interrupted; resuming");
                    break;
                }
                None => break,
            };
            let Ok(info) = message.info() else { continue };
            view.apply(
                info.stream_sequence,
                &message.subject,
                message.headers.as_ref(),
                &message.payload,
            );
        }
        // A short pause before following again, so a consumer that breaks at once
        // cannot spin.
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

impl MessageStore for NatsStore {
    async fn append(&self, message: Message) -> Result<Appended, StoreError> {
        let subject = subject_for(&message.id);
        let publish = PublishMessage::build()
            .message_id(&message.id)
            .expected_last_subject_sequence(0)
            .payload(message.text.into());
        let publish = async {
            let ack = self
                .jetstream
                .send_publish(subject, publish)
                .await
                .map_err(|e| unavailable("publish", e))?;
            match ack.await {
                Ok(ack) if ack.duplicate => Ok(Appended::Duplicate),
                Ok(_) => Ok(Appended::Inserted),
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    Ok(Appended::Duplicate)
                }
                Err(error) => Err(unavailable("no acknowledgement from JetStream", error)),
            }
        };
        tokio::time::timeout(self.timeout, publish)
            .await
            .unwrap_or_else(|_| Err(unavailable("publish", "timed out")))
    }

    async fn list(&self) -> Result<Vec<Message>, StoreError> {
        let read = async {
            let info = self
                .stream
                .get_info()
                .await
                .map_err(|e| unavailable("stream info", e))?;
            self.catch_up(info.state.last_sequence).await?;
            // Everything acknowledged before this request is in the view (and perhaps a
            // few messages stored since), in stream order.
            Ok(self.view.lock().messages.clone())
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .unwrap_or_else(|_| Err(unavailable("list", "timed out")))
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use testkit::nats::Nats;

    use super::*;
    use crate::store::contract;

    /// A fresh single JetStream server (R1) and a store on it.
    async fn store() -> (Nats, NatsStore) {
        let nats = Nats::single().await;
        let urls = vec![nats.urls()];
        let store = NatsStore::connect(NatsConfig::new(urls), &CancellationToken::new())
            .await
            .expect("connect");
        (nats, store)
    }

    #[tokio::test]
    async fn empty() {
        let (_nats, store) = store().await;
        contract::empty_store_lists_nothing(&store).await;
    }

    #[tokio::test]
    async fn duplicate() {
        let (_nats, store) = store().await;
        contract::insert_then_duplicate_keeps_the_first(&store).await;
    }

    #[tokio::test]
    async fn order() {
        let (_nats, store) = store().await;
        contract::lists_in_insertion_order(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent() {
        let (_nats, store) = store().await;
        contract::concurrent_writers_lose_nothing(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn ids_that_are_not_subject_safe_are_stored_and_kept_apart() {
        let (_nats, store) = store().await;
        for id in ["a.b", "a b", "a*b", "_61", "x>y", "ünï"] {
            let message = Message {
                id: id.to_owned(),
                text: format!("text of {id}"),
            };
            assert_eq!(
                store.append(message).await.expect("append"),
                Appended::Inserted,
                "{id}"
            );
        }
        assert_eq!(
            contract::listed_ids(&store).await,
            ["a.b", "a b", "a*b", "_61", "x>y", "ünï"]
        );
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_stream_sees_everything_and_dedups_for_good() {
        let (nats, first) = store().await;
        let second = NatsStore::connect(
            NatsConfig::new(vec![nats.urls()]),
            &CancellationToken::new(),
        )
        .await
        .expect("connect");
        let message = |text: &str| Message {
            id: "same-id".into(),
            text: text.into(),
        };
        assert_eq!(
            first.append(message("one")).await.expect("append"),
            Appended::Inserted
        );
        assert_eq!(
            second.append(message("two")).await.expect("append"),
            Appended::Duplicate
        );
        assert_eq!(second.list().await.expect("list"), [message("one")]);
    }

    #[test]
    fn subjects_are_one_token_and_never_collide() {
        assert_eq!(subject_for("0b1c-9f"), "messages.0b1c-9f");
        assert_eq!(subject_for("a.b"), "messages._612e62");
        assert_ne!(subject_for("_61"), subject_for("a"));
        for id in ["a.b", "a b", "a*b", "x>y", "ünï", "_61"] {
            let token = subject_for(id)
                .trim_start_matches(SUBJECT_PREFIX)
                .to_owned();
            assert!(!token.contains(['.', '*', '>', ' ']), "{id} -> {token}");
        }
    }
}
