//! The replicated store: NATS JetStream, on nats-server 2.12 or newer (tested on
//! 2.15.1, which `scripts/setup` installs).
//!
//! Messages live in one stream, `MESSAGES`, one subject per id ([`subject_for`]),
//! replicated over the cluster (R3 on three nodes) with file storage, so every logging
//! instance sees every message, losing instances loses nothing, and a restart of the
//! whole cluster keeps all. A message's position is its stream sequence.
//!
//! - **Exactly once, for as long as the id is kept** ([`publish`]): the stream refuses a
//!   second message on an id's subject. A refused append reads the id back from the
//!   stream's leader: the same text is a duplicate, another a conflict, none yet an
//!   earlier attempt still waiting for its quorum (unavailable: the caller retries). An
//!   append is acknowledged only after JetStream stored it on a quorum. With retention
//!   limits, an id is kept as long as its message is.
//! - **Many appends, one proposal.** An [`MessageStore::append_batch`] (the facade's
//!   group commit) is one atomic batch publish of up to 1000 messages: one Raft
//!   proposal, stored whole or refused whole. A batch refused because one of its ids is
//!   stored (or twice in it) is appended again message by message, which tells the new
//!   ones from the repeats and conflicts (a repeat of an id goes after the append before
//!   it).
//! - **Every read a batched direct get** ([`direct`]). A page is one request for its
//!   messages, answered by any replica. A full read merges the blocks the instances
//!   wrote of what they stored ([`blocks`]: one reply holds hundreds of messages) and
//!   reads every position no block holds from the messages stream, up to a thousand at
//!   a time and [`GETS_AHEAD`] (four) requests at once. Each request asks for one answer
//!   of at most [`READ_BYTES`] (128 KiB) of messages or 256 KiB of blocks (and one
//!   more); blocks are asked for one answer ahead of the reader, and [`WINDOW_BYTES`]
//!   (256 KiB) of them at most wait for others before it takes another answer: nothing
//!   is gathered whole, so a full read holds under 3 MiB whatever the log's size or its
//!   messages' (see [`crate::store`]). The process keeps no copy of the log, only the
//!   streams' configuration and what it stored but has not yet written in a block (at
//!   most 1 MiB queued and one block of 64 KiB).
//! - **Bounded on disk.** The stream is created with a size limit
//!   ([`DEFAULT_MAX_BYTES`], 1 GiB, `--store-max-bytes`) and discard-new: at the limit an
//!   append is refused ([`StoreError::Full`]) and nothing stored is dropped. Retention
//!   limits (`--retention-*`) drop the oldest instead.
//! - **Read-your-writes through any instance.** A read that reaches the end of what the
//!   answering replica holds asks the stream's leader where the log ends; a replica
//!   behind it is asked again, so a read sees every write acknowledged before it began.
//! - **Unavailable, never hung.** Every call to the cluster has a deadline; a store that
//!   lost quorum or connection answers [`StoreError::Unavailable`] promptly.

mod blocks;
mod direct;
mod publish;
mod subject;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use async_nats::{
    jetstream::{
        self,
        stream::{self, LastRawMessageErrorKind, StorageType},
    },
    Client,
};
use futures_util::{future::join_all, stream::FuturesOrdered, StreamExt};
use retry::Retry;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tracing::{debug, error, info, warn};

use self::{blocks::Blocks, direct::Raw, publish::Published};
pub use self::{
    blocks::STREAM as BLOCKS_STREAM,
    subject::{id_of, subject_for},
};
use super::{
    fill, Appended, Batches, Message, MessageStore, Page, StoreError, Stored, MAX_BATCH_BYTES,
    MAX_PAGE, STREAM_BATCH, STREAM_BATCH_BYTES,
};

pub const STREAM: &str = "MESSAGES";
/// The oldest nats-server the store runs on: atomic batch publish came in 2.12 (batched
/// direct gets in 2.11).
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 12, 0);
/// How often the connection asks its server for a sign of life.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long one request of a full read may take before the read is called stalled and
/// fails (so the reader resumes elsewhere). Shorter than the facade's own wait for a
/// batch (3 s), so an instance gives up on its store before the facade gives up on it,
/// and the facade hears why.
pub const STREAM_STALL: Duration = Duration::from_secs(2);
/// Most bytes one request of a full read asks for (the server sends one message more at
/// most): a thousand short texts, or two of 64 KiB.
const READ_BYTES: usize = 128 * 1024;
/// Messages one request of a full read asks for (fewer over [`READ_BYTES`]) where no
/// block holds them.
const MESSAGES_PER_GET: usize = 1000;
/// Requests for messages a full read has in flight at once: one answer waits on a
/// round trip, four keep the connection busy.
const GETS_AHEAD: usize = 4;
/// Blocks a full read holds, in bytes, that do not start at the next position it sends
/// (written out of order), before it reads the positions up to them as messages.
const WINDOW_BYTES: usize = 256 * 1024;

/// The size the stream may reach on disk by default (`--store-max-bytes`): past it,
/// appends are refused ([`StoreError::Full`], a 507 at the facade) and nothing stored is
/// dropped.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// How much of the log the stream keeps. Everything, by default, up to the size limit;
/// a retention limit makes the stream drop its oldest messages instead (and with them
/// their ids: see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub max_messages: Option<u64>,
}

impl Retention {
    /// Sets the stream's limits: the retention limits given, and the size limit
    /// `max_bytes` (`None`: none). Without a retention limit on bytes or messages the
    /// stream refuses appends at its size (discard new); with one, it drops its oldest.
    fn apply(&self, config: &mut stream::Config, max_bytes: Option<u64>) {
        let limit = |value: Option<u64>| value.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        config.max_age = self.max_age.unwrap_or(Duration::ZERO);
        config.max_bytes = limit(self.max_bytes.or(max_bytes));
        config.max_messages = limit(self.max_messages);
        config.discard = if self.max_bytes.is_some() || self.max_messages.is_some() {
            stream::DiscardPolicy::Old
        } else {
            stream::DiscardPolicy::New
        };
    }
}

/// How the store connects.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` seed URLs of the cluster.
    pub urls: Vec<String>,
    /// Copies of each message (1 for a single server, 3 on a three-node cluster).
    pub replicas: usize,
    /// Deadline of every call to the cluster.
    pub timeout: Duration,
    /// Limits given to the stream when this instance creates it.
    pub retention: Retention,
    /// The stream's size limit when this instance creates it (`None`: none).
    pub max_bytes: Option<u64>,
    /// Whether this instance writes what it stores in blocks (see [`blocks`]). Reads use
    /// the blocks there are either way; only tests turn it off, to read a log without
    /// them.
    pub write_blocks: bool,
    /// TLS and the user's nkey, for a locked-down cluster.
    pub credentials: local_nats::Credentials,
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
            retention: Retention::default(),
            max_bytes: Some(DEFAULT_MAX_BYTES),
            write_blocks: true,
            credentials: local_nats::Credentials::default(),
        }
    }
}

pub struct NatsStore {
    client: Client,
    jetstream: jetstream::Context,
    /// The messages stream; its requests (info, gets that are not direct) go to its leader.
    stream: stream::Stream,
    timeout: Duration,
    log: String,
    reader: Reader,
    write_blocks: bool,
}

/// Whether `version` (as a server's INFO gives it: `2.15.1`, `2.12.0-RC.1`) is at least
/// [`MIN_SERVER_VERSION`].
fn supported(version: &str) -> bool {
    let mut numbers = version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|part| part.parse::<u64>().ok());
    match (numbers.next(), numbers.next(), numbers.next()) {
        (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) => {
            (major, minor, patch) >= MIN_SERVER_VERSION
        }
        _ => false,
    }
}

impl NatsStore {
    /// Connects, checks the server's version, creates the stream if it is missing (safe
    /// when several instances start at once: creating an identical stream is idempotent)
    /// or turns on what the store needs in one an older version created, and checks its
    /// limits. Keeps trying, with backoff and a log line now and then, until the cluster
    /// answers or `cancel` fires (then it returns an error at once). A server older than
    /// [`MIN_SERVER_VERSION`] is an error at once.
    pub async fn connect(config: NatsConfig, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let was_disconnected = Arc::new(AtomicBool::new(false));
        if config.credentials.tls.is_none() {
            if let Some(url) = config.urls.iter().find(|url| url.starts_with("tls://")) {
                anyhow::bail!(
                    "the store URL {url} asks for TLS, but no TLS is configured: pass \
                     --tls-cert, --tls-key and --tls-ca"
                );
            }
        }
        let client = config
            .credentials
            .options()
            .name("logging")
            .connection_timeout(config.timeout)
            .retry_on_initial_connect()
            .max_reconnects(None)
            // A server that stops answering (frozen, or cut off with its connection
            // open) is left after two unanswered pings: about 2-3 s, not minutes.
            .ping_interval(PING_INTERVAL)
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
            .build(client.clone());
        let urls = config.urls.join(",");

        let retry = |what: String| {
            Retry::new(what, cancel).backoff(Duration::from_millis(200), Duration::from_secs(2))
        };
        retry(format!("store: reaching JetStream at {urls}"))
            .run(|| jetstream.query_account(), |_| false)
            .await?;
        let version = client.server_info().version;
        if !supported(&version) {
            let (major, minor, patch) = MIN_SERVER_VERSION;
            anyhow::bail!(
                "nats-server {version} at {urls} is too old: the store needs \
                 {major}.{minor}.{patch} or newer (atomic batch publish, batched direct \
                 gets). scripts/setup installs 2.15.1 under .tools/ (the runner uses it); \
                 upgrade your own cluster, or point --store at one that runs it"
            );
        }

        let mut stream_config = stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{}>", subject::SUBJECT_PREFIX)],
            storage: StorageType::File,
            num_replicas: config.replicas,
            // Reads ask any replica (see `direct`).
            allow_direct: true,
            allow_atomic_publish: true,
            ..Default::default()
        };
        config.retention.apply(&mut stream_config, config.max_bytes);
        let mut stream = retry(format!("store: opening stream {STREAM} at {urls}"))
            .run(
                || jetstream.get_or_create_stream(stream_config.clone()),
                |_| false,
            )
            .await?;
        let existing = stream.cached_info().config.clone();
        if !(existing.allow_direct && existing.allow_atomic_publish) {
            info!(
                stream = STREAM,
                "store: turning on direct gets and atomic batches"
            );
            let mut updated = existing.clone();
            updated.allow_direct = true;
            updated.allow_atomic_publish = true;
            jetstream.update_stream(updated).await.with_context(|| {
                format!(
                    "cannot turn on direct gets and atomic batches on {STREAM} \
                     ($JS.API.STREAM.UPDATE.{STREAM}): on a locked-down cluster logging may \
                     not change the stream; have its admin run `nats stream edit {STREAM} \
                     --allow-direct --allow-batch`, or remove it"
                )
            })?;
            stream = jetstream.get_stream(STREAM).await?;
        }
        let limits = |c: &stream::Config| (c.max_age, c.max_bytes, c.max_messages, c.discard);
        if limits(&existing) != limits(&stream_config) {
            warn!(
                stream = STREAM,
                max_age = ?existing.max_age, max_bytes = existing.max_bytes,
                max_messages = existing.max_messages, discard = ?existing.discard,
                "store: the stream already exists with other limits; it keeps its own \
                 (change them with `nats stream edit`, or remove the stream)"
            );
        }
        info!(stream = STREAM, replicas = config.replicas, %urls, server = version, "store: using JetStream");
        // A stream deleted and created again is another log: positions start over.
        let created = stream.cached_info().created.unix_timestamp_nanos();
        let log = format!("nats:{STREAM}:{created}");
        let blocks = retry(format!("store: opening stream {BLOCKS_STREAM}"))
            .run(
                || Blocks::open(&client, &jetstream, &stream, &log),
                |_| false,
            )
            .await?;
        let reader = Reader {
            client: client.clone(),
            blocks,
        };
        Ok(Self {
            client,
            jetstream,
            stream,
            timeout: config.timeout,
            log,
            reader,
            write_blocks: config.write_blocks,
        })
    }

    /// The first and last position the stream holds now (0, 0 when empty), as its
    /// leader says.
    async fn bounds(&self) -> Result<(u64, u64), StoreError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| StoreError::unavailable("stream info", e))?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// What an append of `message` that the stream refused means: the stream's leader
    /// holds its id with the same text (a duplicate), with another (a conflict), or not
    /// yet (an earlier attempt still waits for its quorum: unavailable, so the caller
    /// asks again rather than answer for a message that may never be stored).
    async fn refused(&self, message: &Message) -> Result<Appended, StoreError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&subject_for(&message.id))
            .await
        {
            Ok(stored) if stored.payload == message.text.as_bytes() => Ok(Appended::Duplicate),
            Ok(_) => Ok(Appended::Conflict),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                Err(StoreError::unavailable(
                    "publish",
                    "an earlier attempt with this id is not stored yet (no quorum?)",
                ))
            }
            Err(error) => Err(StoreError::unavailable("read", error)),
        }
    }

    async fn with_deadline<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(StoreError::unavailable(what, "timed out")))
    }

    /// Stores `messages` (2 to [`publish::MAX_BATCH`]) as one atomic batch, or one by one
    /// when the batch is refused.
    async fn append_chunk(&self, messages: Vec<Message>) -> Vec<Result<Appended, StoreError>> {
        let batch = publish::batch(&self.client, &self.jetstream, &messages);
        let each = |answer: Result<Appended, StoreError>| vec![answer; messages.len()];
        let (outcome, answers) = match self.with_deadline("publish", batch).await {
            Ok(Published::Stored(last)) => {
                let answers = each(Ok(Appended::Inserted));
                if self.write_blocks {
                    self.reader.blocks.write(last, messages);
                }
                ("stored", answers)
            }
            Ok(Published::Full(reason)) => ("full", each(Err(full(&reason)))),
            Ok(Published::Refused(reason)) => {
                debug!(%reason, count = messages.len(), "store: atomic batch refused; appending its messages one by one");
                ("refused", self.append_each(messages).await)
            }
            Err(error) => ("unavailable", each(Err(error))),
        };
        metrics::counter!("logging_store_batches_total", "outcome" => outcome).increment(1);
        answers
    }

    /// Appends `messages` one by one and answers each, in order. Different ids go out
    /// together; repeats of an id wait for the append before them, which they would
    /// otherwise meet still waiting for its quorum and be answered unavailable, where
    /// the answer is a duplicate or a conflict.
    async fn append_each(&self, messages: Vec<Message>) -> Vec<Result<Appended, StoreError>> {
        let mut by_id: HashMap<String, Vec<(usize, Message)>> = HashMap::new();
        for (i, message) in messages.into_iter().enumerate() {
            by_id
                .entry(message.id.clone())
                .or_default()
                .push((i, message));
        }
        let in_turn = by_id.into_values().map(|appends| async move {
            let mut answers = Vec::with_capacity(appends.len());
            for (i, message) in appends {
                answers.push((i, self.append(message).await));
            }
            answers
        });
        let mut answers: Vec<_> = join_all(in_turn).await.into_iter().flatten().collect();
        answers.sort_by_key(|(i, _)| *i);
        answers.into_iter().map(|(_, answer)| answer).collect()
    }

    /// The page after `after`: one batched get; where it reaches the end of what the
    /// replica holds, the leader says whether more follows (and a replica behind it is
    /// asked again).
    async fn page(&self, after: u64, limit: usize) -> Result<Page, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut behind = direct::behind();
        loop {
            let answer = direct::batch(
                &self.client,
                STREAM,
                direct::Start::At(after + 1),
                limit,
                MAX_BATCH_BYTES,
                self.timeout,
            )
            .await?;
            let pending = answer.pending;
            let messages: Vec<Stored> = answer.messages.into_iter().map(Raw::into_stored).collect();
            let reached = messages.last().map_or(after, |m| m.position);
            let more = if pending > 0 {
                true
            } else {
                let (_, last) = self.bounds().await?;
                if after > last {
                    return Err(StoreError::PastTheEnd { after, last });
                }
                if reached < last && messages.len() < limit {
                    // The replica that answered is behind the leader: ask again.
                    tokio::time::sleep(behind.next_delay()).await;
                    continue;
                }
                reached < last
            };
            let (messages, cut) = fill(
                &mut messages.into_iter().peekable(),
                MAX_PAGE,
                MAX_BATCH_BYTES,
            );
            return Ok(Page {
                messages,
                more: more || cut,
            });
        }
    }
}

/// The answer to an append the stream refused at its size limit.
fn full(reason: &str) -> StoreError {
    StoreError::Full(format!(
        "the {STREAM} stream is at its size limit (--store-max-bytes): {reason}"
    ))
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
        // The server names the subject: `Permissions Violation for Publish to "..."`.
        Event::ServerError(async_nats::ServerError::Other(refusal))
            if refusal.contains("Permissions Violation") =>
        {
            error!(
                refusal,
                "store: NATS refused a request this user may not make (its permissions \
                 allow appends and reads, never deleting, purging or changing the log)"
            )
        }
        Event::ServerError(async_nats::ServerError::AuthorizationViolation) => error!(
            "store: NATS refused this user: check --store-nkey (and --tls-* for a cluster \
             that requires client certificates)"
        ),
        other => warn!(event = %other, "store: NATS event"),
    }
}

impl MessageStore for NatsStore {
    async fn append(&self, message: Message) -> Result<Appended, StoreError> {
        let append = async move {
            match publish::one(&self.jetstream, &message).await? {
                Published::Stored(position) => {
                    if self.write_blocks {
                        self.reader.blocks.write(position, vec![message]);
                    }
                    Ok(Appended::Inserted)
                }
                Published::Refused(_) => self.refused(&message).await,
                Published::Full(reason) => Err(full(&reason)),
            }
        };
        self.with_deadline("publish", append).await
    }

    async fn append_batch(&self, messages: Vec<Message>) -> Vec<Result<Appended, StoreError>> {
        if messages.len() == 1 {
            return join_all(messages.into_iter().map(|message| self.append(message))).await;
        }
        let mut chunks = Vec::new();
        let mut rest = messages.into_iter().peekable();
        while rest.peek().is_some() {
            chunks.push(rest.by_ref().take(publish::MAX_BATCH).collect::<Vec<_>>());
        }
        join_all(chunks.into_iter().map(|chunk| self.append_chunk(chunk)))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn read(&self, after: u64, limit: usize) -> Result<Page, StoreError> {
        self.with_deadline("read", self.page(after, limit)).await
    }

    async fn stream(&self, after: u64, until: Option<u64>) -> Result<Batches, StoreError> {
        let (first, last) = self.with_deadline("read", self.bounds()).await?;
        if after > last {
            return Err(StoreError::PastTheEnd { after, last });
        }
        let end = until.unwrap_or(last).min(last);
        let start = (after + 1).max(first);
        if end == 0 || start > end {
            return Ok(Batches::empty(end));
        }
        let (sender, receiver) = mpsc::channel(2);
        tokio::spawn(self.reader.clone().send(start, end, sender));
        Ok(Batches {
            until: end,
            receiver,
        })
    }

    fn log(&self) -> &str {
        &self.log
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

/// What full reads need, apart from the store: a connection and the blocks.
#[derive(Clone)]
struct Reader {
    client: Client,
    blocks: Blocks,
}

/// Where a full read sends its batches.
type Chunks = mpsc::Sender<Result<Vec<Stored>, StoreError>>;

/// What a message of a block holds in memory, about.
fn weight(message: &Stored) -> usize {
    message.id.len() + message.text.len() + 64
}

impl Reader {
    /// Sends positions `start..=until` (all stored) in batches, in order, until the
    /// reader goes away or a read fails (sent as the last item). The blocks hold each
    /// one instance's messages, so they are merged: the next position comes from the
    /// block that holds it, and where none does, the positions up to the next a block
    /// holds are read from the messages stream. Blocks whose next message is not the
    /// next position wait, up to [`WINDOW_BYTES`], for the blocks that fill the gap.
    async fn send(self, start: u64, until: u64, sender: Chunks) {
        let (found, mut scanned) = mpsc::channel(1);
        let scan = self.blocks.clone().scan(start - 1, until, found);
        let _scan = AbortOnDropHandle::new(tokio::spawn(scan));
        // Blocks by their next message's position (and the order they came in).
        let mut waiting: BTreeMap<(u64, u64), VecDeque<Stored>> = BTreeMap::new();
        let (mut held, mut scanning, mut next, mut count) = (0, true, start, 0);
        // What is ready to send, and its bytes of text: sent once a batch's worth.
        let (mut out, mut out_bytes) = (Vec::new(), 0);
        while next <= until {
            if let Some(entry) = waiting.first_entry().filter(|e| e.key().0 <= next) {
                let mut block = entry.remove();
                while block.front().is_some_and(|m| m.position <= next) {
                    let Some(message) = block.pop_front() else {
                        break;
                    };
                    held -= weight(&message);
                    if message.position == next && next <= until {
                        next += 1;
                        out_bytes += message.text.len();
                        out.push(message);
                    }
                }
                if let Some(head) = block.front() {
                    waiting.insert((head.position, count), block);
                    count += 1;
                }
                if out.len() >= STREAM_BATCH || out_bytes >= STREAM_BATCH_BYTES {
                    out_bytes = 0;
                    if !send_batches(&sender, std::mem::take(&mut out)).await {
                        return;
                    }
                }
                continue;
            }
            if scanning && held < WINDOW_BYTES {
                match scanned.recv().await {
                    Some(blocks) => {
                        for block in blocks {
                            held += block.iter().map(weight).sum::<usize>();
                            waiting.insert((block[0].position, count), block.into());
                            count += 1;
                        }
                    }
                    None => scanning = false,
                }
                continue;
            }
            let to = waiting
                .keys()
                .next()
                .map_or(until, |(head, _)| head - 1)
                .min(until);
            out_bytes = 0;
            if !send_batches(&sender, std::mem::take(&mut out)).await
                || !self.messages((next, to), &sender).await
            {
                return;
            }
            next = to + 1;
        }
        send_batches(&sender, out).await;
    }

    /// Sends the messages at positions `from..=to` (all stored) in batches. Up to
    /// [`GETS_AHEAD`] requests are in flight, each for as many positions as fit in
    /// [`READ_BYTES`] at the size of the messages read so far (one request until the
    /// first answer); what an answer leaves of its positions is asked for next. `false`
    /// when the reader went away or a read failed (sent to it).
    async fn messages(&self, (from, to): (u64, u64), sender: &Chunks) -> bool {
        let get = |(from, to): (u64, u64)| async move {
            let deadline = Instant::now() + STREAM_STALL;
            let read = direct::chunk(
                &self.client,
                STREAM,
                (from, to),
                MESSAGES_PER_GET,
                READ_BYTES,
                deadline,
            );
            (to, read.await)
        };
        let (mut ahead, mut next, mut span) = (FuturesOrdered::new(), from, None);
        loop {
            while next <= to && ahead.len() < span.map_or(1, |_| GETS_AHEAD) {
                let end = to.min(next + span.unwrap_or(MESSAGES_PER_GET as u64) - 1);
                ahead.push_back(get((next, end)));
                next = end + 1;
            }
            let Some((end, read)) = ahead.next().await else {
                return true;
            };
            let answer = match read {
                Ok(answer) => answer,
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return false;
                }
            };
            let Some(newest) = answer.last() else {
                continue;
            };
            if newest.sequence < end {
                ahead.push_front(get((newest.sequence + 1, end)));
            }
            let bytes: usize = answer
                .iter()
                .map(|m| m.subject.len() + m.payload.len())
                .sum();
            let per_message = (bytes / answer.len()).max(1);
            span = Some((READ_BYTES / per_message).clamp(1, MESSAGES_PER_GET) as u64);
            let messages = answer.into_iter().map(Raw::into_stored).collect();
            if !send_batches(sender, messages).await {
                return false;
            }
        }
    }
}

/// Sends `messages` in batches under the count and byte caps; `false` when the reader
/// went away.
async fn send_batches(sender: &Chunks, messages: Vec<Stored>) -> bool {
    let mut rest = messages.into_iter().peekable();
    while rest.peek().is_some() {
        let (batch, _) = fill(&mut rest, STREAM_BATCH, STREAM_BATCH_BYTES);
        if sender.send(Ok(batch)).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests;
