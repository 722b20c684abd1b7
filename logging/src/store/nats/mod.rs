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
//!   messages, answered by any replica. A full read takes the built blocks of a hundred
//!   messages ([`blocks`]) and then the newest messages, in pieces of a thousand
//!   positions, four pieces at once. A piece asks for one answer of at most
//!   [`READ_BYTES`] (128 KiB, and one message more) at a time, and for the next only
//!   once the reader has taken the last: nothing is gathered whole, so a full read holds
//!   under 2 MiB whatever the log's size or its messages' (see [`crate::store`]). The
//!   process keeps no copy of the log, only how many blocks are built and the streams'
//!   configuration.
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
    collections::{HashMap, VecDeque},
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
use futures_util::future::join_all;
use retry::Retry;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::AbortOnDropHandle,
};
use tracing::{debug, error, info, warn};

pub use self::{
    blocks::STREAM as BLOCKS_STREAM,
    subject::{id_of, subject_for},
};
use self::{
    blocks::{block_of, range_of, Blocks, BLOCK, BLOCKS_PER_GET},
    direct::Raw,
    publish::{Batched, Published},
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
/// Pieces of a full read read at once (each one request at a time).
const READS_IN_FLIGHT: usize = 4;
/// Most bytes one request of a full read asks for (the server sends one message more at
/// most): a thousand short texts, or two of 64 KiB.
const READ_BYTES: usize = 128 * 1024;
/// Messages one request of a full read asks for (fewer over [`READ_BYTES`]), after the
/// built blocks; also the positions of one piece.
const MESSAGES_PER_GET: usize = 1000;

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
    /// Whether this instance builds blocks (see [`blocks`]). Reads use the blocks there
    /// are either way; only tests turn it off, to read a log without them.
    pub build_blocks: bool,
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
            build_blocks: true,
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
    /// Told when an append stored a multiple of [`blocks::BUILD_EVERY`], so the blocks
    /// complete by then are built now.
    completed: mpsc::Sender<()>,
    /// Stops the task that builds blocks when the store goes.
    _building: DropGuard,
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

        Retry::new(format!("store: reaching JetStream at {urls}"), cancel)
            .backoff(Duration::from_millis(200), Duration::from_secs(2))
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
        let mut stream = Retry::new(format!("store: opening stream {STREAM} at {urls}"), cancel)
            .backoff(Duration::from_millis(200), Duration::from_secs(2))
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
        if (
            existing.max_age,
            existing.max_bytes,
            existing.max_messages,
            existing.discard,
        ) != (
            stream_config.max_age,
            stream_config.max_bytes,
            stream_config.max_messages,
            stream_config.discard,
        ) {
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
        let blocks = Retry::new(format!("store: opening stream {BLOCKS_STREAM}"), cancel)
            .backoff(Duration::from_millis(200), Duration::from_secs(2))
            .run(
                || Blocks::open(&client, &jetstream, &stream, &log),
                |_| false,
            )
            .await?;
        let (completed, completions) = mpsc::channel(1);
        let building = CancellationToken::new();
        if config.build_blocks {
            tokio::spawn(blocks::keep_up(
                blocks.clone(),
                completions,
                building.clone(),
            ));
        }
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
            completed,
            _building: building.drop_guard(),
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

    /// Notes that positions `last - count + 1 ..= last` were just stored: when they
    /// complete blocks to build, building starts now.
    fn stored_through(&self, last: u64, count: u64) {
        let first = last.saturating_sub(count) + 1;
        if last / blocks::BUILD_EVERY > (first - 1) / blocks::BUILD_EVERY {
            let _ = self.completed.try_send(());
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
        match self.with_deadline("publish", batch).await {
            Ok(Batched::Stored(last)) => {
                metrics::counter!("logging_store_batches_total", "outcome" => "stored")
                    .increment(1);
                self.stored_through(last, messages.len() as u64);
                messages.iter().map(|_| Ok(Appended::Inserted)).collect()
            }
            Ok(Batched::Full(reason)) => {
                metrics::counter!("logging_store_batches_total", "outcome" => "full").increment(1);
                let error = format!(
                    "the {STREAM} stream is at its size limit (--store-max-bytes): {reason}"
                );
                messages
                    .iter()
                    .map(|_| Err(StoreError::Full(error.clone())))
                    .collect()
            }
            Ok(Batched::Refused(reason)) => {
                metrics::counter!("logging_store_batches_total", "outcome" => "refused")
                    .increment(1);
                debug!(%reason, count = messages.len(), "store: atomic batch refused; appending its messages one by one");
                self.append_each(messages).await
            }
            Err(error) => {
                metrics::counter!("logging_store_batches_total", "outcome" => "unavailable")
                    .increment(1);
                let error = error.to_string();
                messages
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(error.clone())))
                    .collect()
            }
        }
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
                after + 1,
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
        let append = async {
            match publish::one(&self.jetstream, &message).await? {
                Published::Stored(position) => {
                    self.stored_through(position, 1);
                    Ok(Appended::Inserted)
                }
                Published::Refused => self.refused(&message).await,
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

/// One stretch of a full read: built blocks `blocks` for positions `positions`, or
/// messages read as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Blocks {
        blocks: (u64, u64),
        positions: (u64, u64),
    },
    Messages((u64, u64)),
}

/// Positions `start..=until` cut into pieces: those in the first `built` blocks,
/// [`BLOCKS_PER_GET`] blocks a piece, then the rest, [`MESSAGES_PER_GET`] a piece. A
/// piece of short texts is one request; one over [`READ_BYTES`] takes more, in turn.
fn pieces(start: u64, until: u64, built: u64) -> impl Iterator<Item = Piece> {
    let in_blocks = (built * BLOCK).min(until);
    let blocks = (start <= in_blocks)
        .then(|| (block_of(start)..=block_of(in_blocks)).step_by(BLOCKS_PER_GET))
        .into_iter()
        .flatten()
        .map(move |first| {
            let last = (first + BLOCKS_PER_GET as u64 - 1).min(block_of(in_blocks));
            Piece::Blocks {
                blocks: (first, last),
                positions: (
                    range_of(first).0.max(start),
                    range_of(last).1.min(in_blocks),
                ),
            }
        });
    let tail = start.max(in_blocks + 1);
    let messages = (tail..=until)
        .step_by(MESSAGES_PER_GET)
        .map(move |from| Piece::Messages((from, (from + MESSAGES_PER_GET as u64 - 1).min(until))));
    blocks.chain(messages)
}

/// What full reads need, apart from the store: a connection and the blocks.
#[derive(Clone)]
struct Reader {
    client: Client,
    blocks: Blocks,
}

/// Where a piece sends its messages, answer by answer.
type Chunks = mpsc::Sender<Result<Vec<Stored>, StoreError>>;

impl Reader {
    /// Sends the messages at positions `(from, to)` (all stored) to `out`, one answer
    /// of at most [`READ_BYTES`] at a time: the next is asked for only once `out` has
    /// room for it. `false` when the reader went away or a read failed (sent to `out`).
    async fn messages(&self, (from, to): (u64, u64), out: &Chunks) -> bool {
        let mut next = from;
        while next <= to {
            let Ok(room) = out.reserve().await else {
                return false;
            };
            let deadline = Instant::now() + STREAM_STALL;
            let read = direct::chunk(
                &self.client,
                STREAM,
                (next, to),
                MESSAGES_PER_GET,
                READ_BYTES,
                deadline,
            )
            .await;
            match read {
                Ok(answer) => {
                    let Some(newest) = answer.last() else {
                        return true;
                    };
                    next = newest.sequence + 1;
                    room.send(Ok(answer.into_iter().map(Raw::into_stored).collect()));
                }
                Err(error) => {
                    room.send(Err(error));
                    return false;
                }
            }
        }
        true
    }

    /// Sends the messages of `piece` to `out`, in order; a block that cannot be used is
    /// read as messages.
    async fn fetch(self, piece: Piece, out: Chunks) {
        let (blocks, (from, to)) = match piece {
            Piece::Messages(range) => {
                self.messages(range, &out).await;
                return;
            }
            Piece::Blocks { blocks, positions } => (blocks, positions),
        };
        let (mut next, last) = blocks;
        while next <= last {
            let Ok(room) = out.reserve().await else {
                return;
            };
            let found = self
                .blocks
                .read((next, last), Instant::now() + STREAM_STALL)
                .await;
            let mut room = Some(room);
            for (n, block) in found {
                next = n + 1;
                let (first, last) = range_of(n);
                let (first, last) = (first.max(from), last.min(to));
                let messages = match block {
                    Some(block) => block
                        .into_iter()
                        .filter(|m| (first..=last).contains(&m.position))
                        .collect(),
                    None => {
                        drop(room.take());
                        if !self.messages((first, last), &out).await {
                            return;
                        }
                        continue;
                    }
                };
                let sent = match room.take() {
                    Some(room) => {
                        room.send(Ok(messages));
                        true
                    }
                    None => out.send(Ok(messages)).await.is_ok(),
                };
                if !sent {
                    return;
                }
            }
        }
    }

    /// Sends positions `start..=until` in batches, until the reader goes away or a read
    /// fails (sent as the last item). [`READS_IN_FLIGHT`] pieces are read at once, each
    /// holding at most one answer ahead of the reader (see [`Reader::messages`]).
    async fn send(self, start: u64, until: u64, sender: Chunks) {
        let built = self.blocks.known_built();
        let mut pieces = pieces(start, until, built);
        let mut running = VecDeque::with_capacity(READS_IN_FLIGHT);
        loop {
            while running.len() < READS_IN_FLIGHT {
                let Some(piece) = pieces.next() else { break };
                let (out, chunks) = mpsc::channel(1);
                let task = tokio::spawn(self.clone().fetch(piece, out));
                running.push_back((chunks, AbortOnDropHandle::new(task)));
            }
            let Some((mut chunks, _task)) = running.pop_front() else {
                return;
            };
            while let Some(chunk) = chunks.recv().await {
                let messages = match chunk {
                    Ok(messages) => messages,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                };
                if !send_batches(&sender, messages).await {
                    return;
                }
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
