//! The log in blocks of [`BLOCK`] (100) messages, so a read costs one request per hundred
//! messages, not one per message.
//!
//! JetStream 2.9 (Debian's) answers one message per get and delivers a consumer's
//! messages one at a time, so a page of 100 was 100 gets and a full read of a million ran
//! at one consumer's pace. The store therefore keeps a second stream, `MESSAGES_BLOCKS`,
//! of derived data: block `n` holds the messages at positions `n·100+1 ..= (n+1)·100`
//! as one protobuf message (`repeated logging.v1.Message`), and sits at sequence `n+1`
//! of its stream. A page of 100 anywhere in the log is then one or two gets of about
//! 10 KB each, fetched at once, and a full read takes the blocks through one consumer.
//!
//! - **Written once, in order, with no holes.** A block is published with
//!   `Nats-Expected-Last-Sequence: n`: block `n` lands at sequence `n+1` or not at all,
//!   so two instances building the same block store it once, and the number of blocks
//!   built is the stream's last sequence.
//! - **Built by whoever gets there first.** Block `n` can be built once position
//!   `(n+1)·100` is stored (JetStream assigns sequences in order, so all before it are
//!   stored too). The instance whose append got a position that is a multiple of 1000
//!   builds the blocks complete by then (ten at a time: see [`BUILD_EVERY`]) right after
//!   answering; every instance also looks every few seconds and catches up when the
//!   blocks have stopped moving (the last few blocks when writes pause, after a bulk
//!   import, or after a crash between the two).
//! - **Never trusted blindly.** Every block names its log (the messages stream's
//!   creation time), its size and its number in headers; one that names anything else
//!   is not used, and a blocks stream left from a messages stream since deleted, or
//!   holding blocks of another size, is deleted at start-up and rebuilt.
//! - **A block too big to publish** (a hundred texts of 64 KiB) is kept as an empty marker, so
//!   the numbering goes on; reads of its range fetch messages one by one, as reads of
//!   blocks not built yet do.
//! - **The blocks pages read last, in memory** (`--cache-blocks`, 32 by default, about
//!   10 KB each for short texts and at most 1 MiB): a client walking the log page by page
//!   reads each block from JetStream once, not once for each page that touches it. Full reads
//!   pass them by without keeping them, so one does not push out what pages use.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_nats::{
    jetstream::{
        self,
        context::PublishErrorKind,
        message::PublishMessage,
        stream::{self, StorageType},
    },
    HeaderMap,
};
use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    nats::{self, InOrder},
    StoreError, Stored,
};

/// Messages per block. A hundred, not a thousand: a page of 100 is one or two blocks of
/// about 10 KB, where blocks of a thousand made every page fetch 100 KB, and the
/// garbage that left in the nats-servers (a copy or two per get) made them collect
/// often enough to put a page's p99 at 7-9 ms (measured: see ARCHITECTURE.md).
pub const BLOCK: u64 = 100;
/// Blocks are built ten at a time, when an append stores a position that is a multiple
/// of this: building costs a consumer (a round through the meta leader) and two
/// stream-info requests whatever it reads, which once a block of 100 made the servers'
/// share of a POST grow.
pub const BUILD_EVERY: u64 = 10 * BLOCK;
pub const STREAM: &str = "MESSAGES_BLOCKS";
const SUBJECT_PREFIX: &str = "blocks.";
/// Headers naming a block's log, number and size (blocks of another size, from another
/// version, are blocks of another log).
const LOG_HEADER: &str = "Log";
const BLOCK_HEADER: &str = "Block";
const SIZE_HEADER: &str = "Block-Size";
/// Set on a block kept as a marker because its texts were too big to publish as one.
const SKIPPED_HEADER: &str = "Block-Skipped";
/// How long a read waits for a block before it reads the block's messages instead: a
/// blocks stream without a leader (just after a cluster restart) must not hold up reads.
const GET_WAIT: Duration = Duration::from_millis(250);
/// Blocks a full read's consumer asks for at once: about 160 KB for short texts, 16 MiB
/// at most.
const CONSUMER_BATCH: i64 = 16;
/// How long building waits for the next message of a complete block.
const READ_WAIT: Duration = Duration::from_secs(5);
/// How often an instance looks whether the blocks have fallen behind (jittered, so
/// instances do not all look at once).
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// The block holding `position` (1-based).
pub fn block_of(position: u64) -> u64 {
    (position - 1) / BLOCK
}

/// The positions block `n` holds.
pub fn range_of(n: u64) -> (u64, u64) {
    (n * BLOCK + 1, (n + 1) * BLOCK)
}

/// The wire form of a block: what `logging.v1.Message` already is.
#[derive(Clone, PartialEq, prost::Message)]
struct Encoded {
    #[prost(message, repeated, tag = "1")]
    messages: Vec<proto::logging::v1::Message>,
}

fn encode(messages: &[Stored]) -> Vec<u8> {
    let encoded = Encoded {
        messages: messages
            .iter()
            .map(|m| proto::logging::v1::Message {
                id: m.id.clone(),
                text: m.text.clone(),
                position: m.position,
            })
            .collect(),
    };
    encoded.encode_to_vec()
}

fn decode(payload: &[u8]) -> Result<Vec<Stored>, prost::DecodeError> {
    Ok(Encoded::decode(payload)?
        .messages
        .into_iter()
        .map(|m| Stored {
            position: m.position,
            id: m.id,
            text: m.text,
        })
        .collect())
}

/// The blocks of one log.
#[derive(Clone)]
pub struct Blocks {
    jetstream: jetstream::Context,
    config: stream::Config,
    stream: stream::Stream,
    direct: bool,
    /// The log the blocks belong to (see [`super::MessageStore::log`]).
    log: String,
    /// The largest block payload the servers accept.
    max_payload: usize,
    kept: Arc<Kept>,
    /// How many blocks this instance knows are built (see [`Blocks::known_built`]).
    known: Arc<AtomicU64>,
}

/// Whether a read keeps the block it fetched in memory: pages do, full reads do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Yes,
    No,
}

/// The blocks read last, newest first: their encoded payloads, decoded at each use
/// (about 0.01 ms for a hundred short messages). A handful of entries, so a scan is the
/// lookup.
struct Kept {
    capacity: usize,
    blocks: Mutex<VecDeque<(u64, Bytes)>>,
}

impl Kept {
    fn get(&self, n: u64) -> Option<Bytes> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let at = blocks.iter().position(|(number, _)| *number == n)?;
        let entry = blocks.remove(at)?;
        let payload = entry.1.clone();
        blocks.push_front(entry);
        Some(payload)
    }

    fn put(&self, n: u64, payload: Bytes) {
        if self.capacity == 0 {
            return;
        }
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        if blocks.iter().any(|(number, _)| *number == n) {
            return;
        }
        blocks.truncate(self.capacity - 1);
        blocks.push_front((n, payload));
    }
}

impl Blocks {
    /// Opens (creating it if missing) the blocks stream of `log`, with limits that keep
    /// at least as much as the messages stream's `config`. A blocks stream whose blocks
    /// name another log is deleted and created again.
    pub async fn open(
        jetstream: &jetstream::Context,
        messages: &stream::Config,
        log: &str,
        kept: usize,
    ) -> Result<Self, StoreError> {
        let scaled = |limit: i64| {
            if limit > 0 {
                (limit as u64).div_ceil(BLOCK) as i64 + 1
            } else {
                limit
            }
        };
        let config = stream::Config {
            name: STREAM.to_owned(),
            description: Some(format!(
                "The {} stream in blocks of {BLOCK} messages, for reads: derived data, \
                 rebuilt by the logging instances when missing",
                nats::STREAM
            )),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            storage: StorageType::File,
            num_replicas: messages.num_replicas,
            allow_direct: true,
            max_age: messages.max_age,
            max_bytes: messages.max_bytes,
            max_messages: scaled(messages.max_messages),
            ..Default::default()
        };
        let open = || async {
            jetstream
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| nats::unavailable("blocks stream", e))
        };
        let mut blocks = Self {
            jetstream: jetstream.clone(),
            config: config.clone(),
            stream: open().await?,
            direct: true,
            log: log.to_owned(),
            max_payload: jetstream.client().max_payload(),
            kept: Arc::new(Kept {
                capacity: kept,
                blocks: Mutex::new(VecDeque::with_capacity(kept)),
            }),
            known: Arc::new(AtomicU64::new(0)),
        };
        if blocks.of_another_log().await? {
            warn!(
                stream = STREAM,
                "store: the blocks stream belongs to a messages stream since deleted, or \
                 holds blocks of another size; deleting it (it is rebuilt from the messages)"
            );
            // Another instance may delete it first, or create it again: both are fine.
            let _ = jetstream.delete_stream(STREAM).await;
            blocks.stream = open().await?;
            blocks.known.store(0, Ordering::Relaxed);
        }
        blocks.direct = blocks
            .stream
            .get_info()
            .await
            .map_err(|e| nats::unavailable("blocks stream", e))?
            .config
            .allow_direct;
        Ok(blocks)
    }

    /// Creates the blocks stream again if it was deleted (by hand: it is derived data),
    /// so building goes on; handles to it work again, as they name it.
    async fn recreate_if_missing(&self) {
        if let Err(error) = self
            .jetstream
            .get_or_create_stream(self.config.clone())
            .await
        {
            debug!(%error, "store: the blocks stream cannot be opened now");
        }
    }

    /// Whether a block's headers name this log, in blocks of this size.
    fn names_this_log(&self, headers: &HeaderMap) -> bool {
        header(headers, LOG_HEADER) == Some(self.log.as_str())
            && header(headers, SIZE_HEADER).and_then(|size| size.parse().ok()) == Some(BLOCK)
    }

    /// Whether the newest block names another log (or another block size).
    async fn of_another_log(&self) -> Result<bool, StoreError> {
        let built = self.built().await?;
        if built == 0 {
            return Ok(false);
        }
        let newest = nats::get_raw(&self.stream, self.direct, built).await?;
        Ok(newest.is_some_and(|m| !self.names_this_log(&m.headers)))
    }

    /// The same blocks, without the ones kept in memory (and keeping none).
    #[cfg(test)]
    pub fn without_kept(&self) -> Self {
        let mut blocks = self.clone();
        blocks.kept = Arc::new(Kept {
            capacity: 0,
            blocks: Mutex::new(VecDeque::new()),
        });
        blocks
    }

    /// The same blocks, published as if the servers accepted at most `max_payload`.
    #[cfg(test)]
    pub fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self
    }

    /// How many blocks are built: blocks `0..built` exist. Asks the stream (and
    /// remembers the answer as [`Blocks::known_built`]).
    pub async fn built(&self) -> Result<u64, StoreError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| nats::unavailable("blocks stream info", e))?;
        let built = info.state.last_sequence;
        self.known.store(built, Ordering::Relaxed);
        Ok(built)
    }

    /// How many blocks were built when this instance last looked (at start-up, every few
    /// seconds, and whenever it builds one), without asking: reads use only these, so a
    /// read never waits on the blocks stream for a block that cannot be there. Blocks
    /// built by others since are read as messages until the next look.
    pub fn known_built(&self) -> u64 {
        self.known.load(Ordering::Relaxed)
    }

    /// The messages of block `n`: from memory when a page read it lately, else from the
    /// stream (kept if `keep` says so). `None` when it is not built, too big to be, or
    /// cannot be read now (the blocks stream deleted, the cluster unreachable): the
    /// caller then reads the messages themselves, which says whether the store is there.
    pub async fn get(&self, n: u64, keep: Keep) -> Option<Vec<Stored>> {
        if let Some(payload) = self.kept.get(n) {
            return decode(&payload).ok();
        }
        if n >= self.known_built() {
            return None;
        }
        let get = tokio::time::timeout(GET_WAIT, nats::get_raw(&self.stream, self.direct, n + 1));
        let message = match get.await {
            Ok(Ok(message)) => message?,
            Ok(Err(error)) => {
                debug!(block = n, %error, "store: a block cannot be read; reading its messages");
                return None;
            }
            Err(_) => {
                debug!(
                    block = n,
                    "store: a block did not come in time; reading its messages"
                );
                return None;
            }
        };
        let messages = self.usable(n, &message.headers, &message.payload)?;
        if keep == Keep::Yes {
            self.kept.put(n, message.payload);
        }
        Some(messages)
    }

    /// The messages of block `n`, as stored with `headers` and `payload`, if it is a
    /// block of this log and number that holds them (not a marker).
    fn usable(&self, n: u64, headers: &HeaderMap, payload: &[u8]) -> Option<Vec<Stored>> {
        let number = n.to_string();
        let ours =
            self.names_this_log(headers) && header(headers, BLOCK_HEADER) == Some(number.as_str());
        if !ours {
            warn!(
                block = n,
                "store: a block of another log or number; not used"
            );
            return None;
        }
        if header(headers, SKIPPED_HEADER).is_some() {
            return None;
        }
        match decode(payload) {
            Ok(messages) => Some(messages),
            Err(error) => {
                warn!(block = n, %error, "store: a block that does not decode; not used");
                None
            }
        }
    }

    /// Reads the blocks from block `from` on, in order, through one ordered consumer
    /// (for full reads: about 0.3 GB/s of blocks here, where a get per block paid a
    /// request each); every wait for a block may take `timeout`.
    pub async fn in_order(
        &self,
        from: u64,
        timeout: Duration,
    ) -> Result<InOrderBlocks, StoreError> {
        Ok(InOrderBlocks {
            blocks: self.clone(),
            messages: nats::Ordered::open(&self.stream, from + 1, timeout, CONSUMER_BATCH).await?,
            carried: None,
        })
    }

    /// Stores `contents` as block `n`. `Ok(false)`: another instance stored block `n`
    /// first.
    async fn publish(&self, n: u64, contents: &[Stored]) -> Result<bool, StoreError> {
        let payload = encode(contents);
        let mut publish = PublishMessage::build()
            .expected_last_sequence(n)
            .header(LOG_HEADER, self.log.as_str())
            .header(SIZE_HEADER, BLOCK.to_string().as_str())
            .header(BLOCK_HEADER, n.to_string().as_str());
        // Headers and subject take well under 1 KiB.
        publish = if payload.len() + 1024 > self.max_payload {
            info!(
                block = n,
                bytes = payload.len(),
                "store: block too big to publish; its messages are read one by one"
            );
            publish.header(SKIPPED_HEADER, "too big")
        } else {
            publish.payload(payload.into())
        };
        let ack = self
            .jetstream
            .send_publish(format!("{SUBJECT_PREFIX}{n}"), publish)
            .await
            .map_err(|e| nats::unavailable("block publish", e))?;
        match ack.await {
            Ok(_) => {
                self.known.fetch_max(n + 1, Ordering::Relaxed);
                Ok(true)
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(error) => Err(nats::unavailable("block publish", error)),
        }
    }

    /// Builds every complete block not built yet, in order, until none is left (the log
    /// may grow meanwhile), reading the messages stream once, in order, with one
    /// consumer per stretch; returns how many blocks this call stored and how many are
    /// built.
    pub async fn catch_up(&self, messages: &stream::Stream) -> Result<(u64, u64), StoreError> {
        let mut stored = 0;
        let mut next = self.built().await?;
        loop {
            let last = messages
                .get_info()
                .await
                .map_err(|e| nats::unavailable("stream info", e))?
                .state
                .last_sequence;
            let complete = last / BLOCK;
            if next >= complete {
                return Ok((stored, next));
            }
            let mut reader = InOrder::open(messages, range_of(next).0, READ_WAIT).await?;
            while next < complete {
                let contents = reader.take_through(range_of(next).1).await?;
                if self.publish(next, &contents).await? {
                    stored += 1;
                    next += 1;
                } else {
                    // Another instance got there first: go on from where it is.
                    next = self.built().await?;
                    break;
                }
            }
        }
    }
}

/// Blocks read in order by one ordered consumer (see [`Blocks::in_order`]).
pub struct InOrderBlocks {
    blocks: Blocks,
    messages: nats::Ordered,
    /// A block read past the one asked for (the one asked for is missing), and its number.
    carried: Option<(u64, jetstream::Message)>,
}

impl InOrderBlocks {
    /// Block `n` (asked for in increasing order, and known to be built): `Ok(None)` when
    /// it is missing or not usable (a marker, another log's), so its messages must be
    /// read; an error when the consumer fails or stalls.
    pub async fn take(&mut self, n: u64) -> Result<Option<Vec<Stored>>, StoreError> {
        loop {
            let (block, message) = match self.carried.take() {
                Some(carried) => carried,
                None => {
                    let (position, message) = self.messages.next().await?;
                    (position - 1, message)
                }
            };
            if block < n {
                continue;
            }
            if block > n {
                self.carried = Some((block, message));
                return Ok(None);
            }
            let none = HeaderMap::new();
            let headers = message.headers.as_ref().unwrap_or(&none);
            return Ok(self.blocks.usable(n, headers, &message.payload));
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|value| value.as_str())
}

/// Keeps the blocks up with the log until `cancel`: catches up at once when `completed`
/// says an append of this instance stored the last position of a block, and every few
/// seconds when the blocks have not moved since this instance last looked (so nobody
/// else is building them: after a bulk import, or when the instance that completed a
/// block died before building it).
pub async fn keep_up(
    blocks: Blocks,
    messages: stream::Stream,
    mut completed: mpsc::Receiver<()>,
    cancel: CancellationToken,
) {
    let mut seen = None;
    loop {
        let jitter = LOOK_EVERY.mul_f64(rand::random::<f64>());
        let look = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(()) = completed.recv() => false,
            _ = tokio::time::sleep(LOOK_EVERY + jitter) => true,
        };
        if look {
            let Ok(built) = blocks.built().await else {
                blocks.recreate_if_missing().await;
                continue;
            };
            let moved = seen.is_some_and(|seen| built > seen);
            seen = Some(built);
            if moved {
                continue; // someone else is building them
            }
        }
        let catch_up = blocks.catch_up(&messages);
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = catch_up => result,
        };
        match result {
            Ok((stored, built)) => {
                seen = Some(built);
                if stored > 0 {
                    debug!(stored, built, "store: blocks built");
                }
            }
            Err(error) => {
                debug!(%error, "store: building blocks failed; trying again later");
                blocks.recreate_if_missing().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_a_hundred_positions_each() {
        assert_eq!(block_of(1), 0);
        assert_eq!(block_of(100), 0);
        assert_eq!(block_of(101), 1);
        assert_eq!(range_of(0), (1, 100));
        assert_eq!(range_of(2), (201, 300));
    }

    #[test]
    fn kept_blocks_are_the_last_used_ones() {
        let kept = Kept {
            capacity: 2,
            blocks: Mutex::new(VecDeque::new()),
        };
        let payload = |n: u8| Bytes::from(vec![n]);
        kept.put(1, payload(1));
        kept.put(2, payload(2));
        assert_eq!(kept.get(1), Some(payload(1)), "1 is now the last used");
        kept.put(3, payload(3));
        assert_eq!(kept.get(2), None, "2 went: the least lately used");
        assert_eq!(kept.get(1), Some(payload(1)));
        assert_eq!(kept.get(3), Some(payload(3)));
        let none = Kept {
            capacity: 0,
            blocks: Mutex::new(VecDeque::new()),
        };
        none.put(1, payload(1));
        assert_eq!(none.get(1), None, "a capacity of 0 keeps nothing");
    }

    #[test]
    fn a_block_decodes_to_what_was_encoded() {
        let messages: Vec<Stored> = (1..=3)
            .map(|position| Stored {
                position,
                id: format!("id-{position}"),
                text: format!("text ünï {position}"),
            })
            .collect();
        assert_eq!(decode(&encode(&messages)).expect("decode"), messages);
        assert!(decode(&encode(&[])).expect("decode").is_empty());
        assert!(decode(b"\xff\xff\xff").is_err());
    }
}
