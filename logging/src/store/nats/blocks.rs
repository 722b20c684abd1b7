//! The log in blocks of [`BLOCK`] (100) messages, for full reads: a reply of a batched
//! get costs the servers about the same for one short message as for a block of a
//! hundred, so a full read of a million messages takes ten thousand replies, not a
//! million.
//!
//! Blocks are derived data in a second stream, `MESSAGES_BLOCKS`: block `n` holds the
//! messages at positions `n·100+1 ..= (n+1)·100` as one protobuf message (`repeated
//! logging.v1.Message`), at sequence `n+1` of its stream. Pages do not use them (a page
//! is one batched get of the messages themselves).
//!
//! - **Written once, in order, with no holes.** A block is published with
//!   `Nats-Expected-Last-Sequence: n`: block `n` lands at sequence `n+1` or not at all,
//!   so two instances building the same block store it once, and the number of blocks
//!   built is the stream's last sequence.
//! - **Built from what the leader confirms.** Block `n` is built once the messages
//!   stream's leader says position `(n+1)·100` is stored, from batched gets of its
//!   hundred messages (one for short texts; any replica, and one that is behind is asked
//!   again), and only when
//!   the leader holds the same message at the block's last position as the replica
//!   that answered. Replicas that disagree (nats-server 2.9 could diverge after a
//!   network partition) differ at every position after the fork, so the check at each
//!   block's end refuses to build from a diverged replica: it is logged, and the build
//!   is tried again later.
//! - **Built by whoever gets there first.** The instance whose append stored a position
//!   that is a multiple of [`BUILD_EVERY`] builds the blocks complete by then right
//!   after answering; every instance also looks every few seconds and catches up when
//!   the blocks have stopped moving (after a bulk import, or after a crash between the
//!   two).
//! - **Never trusted blindly.** Every block names its log (the messages stream's
//!   creation time), its size and its number in headers; one that names anything else
//!   is not used, and a blocks stream left from a messages stream since deleted, or
//!   holding blocks of another size, is deleted at start-up and rebuilt.
//! - **Small, or a marker.** A block whose texts hold more than [`BLOCK_MAX_BYTES`]
//!   (64 KiB: a hundred texts of 655 bytes on average) is kept as an empty marker, so the
//!   numbering goes on; full reads read its messages instead, as they do for a block not
//!   built yet. Building stops reading such a block's messages once they pass the cap,
//!   so it holds at most 64 KiB and one answer of a batched get in memory.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
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
    Client, HeaderMap,
};
use prost::Message as _;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::direct::{self, Raw};
use crate::store::{StoreError, Stored};

/// Messages per block. A hundred: a block is about 10 KB of short texts.
pub(super) const BLOCK: u64 = 100;
/// Blocks are built ten at a time, when an append stores a position that is a multiple
/// of this: two stream-info requests for the ten, and for each block batched gets of its
/// messages (one for short texts), a get from the leader to confirm them and a publish.
pub(super) const BUILD_EVERY: u64 = 10 * BLOCK;
pub const STREAM: &str = "MESSAGES_BLOCKS";
const SUBJECT_PREFIX: &str = "blocks.";
/// Headers naming a block's log, number and size (blocks of another size, from another
/// version, are blocks of another log).
const LOG_HEADER: &str = "Log";
const BLOCK_HEADER: &str = "Block";
const SIZE_HEADER: &str = "Block-Size";
/// Set on a block kept as a marker because its texts hold more than [`BLOCK_MAX_BYTES`]
/// or are too big to publish as one.
const SKIPPED_HEADER: &str = "Block-Skipped";
/// Blocks asked for in one batched get, and the bytes it may send (one block more at
/// most): ten blocks of short texts are about 100 KB.
pub(super) const BLOCKS_PER_GET: usize = 10;
const BLOCK_GET_BYTES: usize = super::READ_BYTES;
/// Most bytes of text one block holds: a block whose hundred texts hold more is kept as
/// a marker, and full reads read its messages (blocks pay off for short texts, where a
/// reply per message costs more than its bytes).
pub(super) const BLOCK_MAX_BYTES: usize = 64 * 1024;
/// How long building waits for a complete block's messages.
const BUILD_WAIT: Duration = Duration::from_secs(5);
/// How long a full read waits for blocks it knows are built (a replica a moment behind)
/// before reading their messages instead.
const BLOCKS_WAIT: Duration = Duration::from_millis(250);
/// How often an instance looks whether the blocks have fallen behind (jittered, so
/// instances do not all look at once).
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// The block holding `position` (1-based).
pub(super) fn block_of(position: u64) -> u64 {
    (position - 1) / BLOCK
}

/// The positions block `n` holds.
pub(super) fn range_of(n: u64) -> (u64, u64) {
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

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|value| value.as_str())
}

/// The blocks of one log.
#[derive(Clone)]
pub(super) struct Blocks {
    client: Client,
    jetstream: jetstream::Context,
    config: stream::Config,
    stream: stream::Stream,
    /// The messages stream the blocks are built from.
    messages: stream::Stream,
    /// The log the blocks belong to (see [`crate::store::MessageStore::log`]).
    log: String,
    /// The largest block payload the servers accept.
    max_payload: usize,
    /// How many blocks this instance knows are built (see [`Blocks::known_built`]).
    known: Arc<AtomicU64>,
}

impl Blocks {
    /// Opens (creating it if missing) the blocks stream of the log `log` kept in
    /// `messages`, with limits that keep at least as much as the messages stream. A
    /// blocks stream whose blocks name another log is deleted and created again.
    pub(super) async fn open(
        client: &Client,
        jetstream: &jetstream::Context,
        messages: &stream::Stream,
        log: &str,
    ) -> Result<Self, StoreError> {
        let unavailable = |e: &dyn std::fmt::Display| StoreError::unavailable("blocks stream", e);
        let limits = &messages.cached_info().config;
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
                "The {} stream in blocks of {BLOCK} messages, for full reads: derived \
                 data, rebuilt by the logging instances when missing",
                limits.name
            )),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            storage: StorageType::File,
            num_replicas: limits.num_replicas,
            allow_direct: true,
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            max_messages: scaled(limits.max_messages),
            ..Default::default()
        };
        let open = || async {
            jetstream
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| unavailable(&e))
        };
        let mut blocks = Self {
            client: client.clone(),
            jetstream: jetstream.clone(),
            config: config.clone(),
            stream: open().await?,
            messages: messages.clone(),
            log: log.to_owned(),
            max_payload: client.server_info().max_payload,
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
        if !blocks.stream.cached_info().config.allow_direct {
            let mut config = blocks.stream.cached_info().config.clone();
            config.allow_direct = true;
            jetstream
                .update_stream(config)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        Ok(blocks)
    }

    /// Creates the blocks stream again if it was deleted (by hand: it is derived data),
    /// so building goes on; handles to it work again, as they name it.
    pub(super) async fn recreate_if_missing(&self) {
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
        match self.stream.get_raw_message(built).await {
            Ok(newest) => Ok(!self.names_this_log(&newest.headers)),
            Err(error) => Err(StoreError::unavailable("blocks stream", error)),
        }
    }

    /// The same blocks, published as if the servers accepted at most `max_payload`.
    #[cfg(test)]
    pub(super) fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self
    }

    /// How many blocks are built: blocks `0..built` exist. Asks the stream's leader (and
    /// remembers the answer as [`Blocks::known_built`]).
    pub(super) async fn built(&self) -> Result<u64, StoreError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| StoreError::unavailable("blocks stream info", e))?;
        let built = info.state.last_sequence;
        // The leader's count, down too: a blocks stream deleted and created again starts
        // over, and a read must not wait for blocks that are gone.
        self.known.store(built, Ordering::Relaxed);
        Ok(built)
    }

    /// How many blocks were built when this instance last looked (at start-up, every few
    /// seconds, and whenever it builds one), without asking: full reads use only these,
    /// so a read never waits on the blocks stream for a block that cannot be there.
    /// Blocks built by others since are read as messages until the next look.
    pub(super) fn known_built(&self) -> u64 {
        self.known.load(Ordering::Relaxed)
    }

    /// The next blocks of `first..=last` (all known to be built), in order, from
    /// `first` on: one answer of at most [`BLOCKS_PER_GET`] blocks and about
    /// [`BLOCK_GET_BYTES`], each block with its messages, or `None` for one that is not
    /// usable (a marker, another log's). When the blocks cannot be read by `deadline`
    /// (the blocks stream deleted or without a leader), every block of the range is
    /// `None`: the caller reads those blocks' messages instead.
    pub(super) async fn read(
        &self,
        (first, last): (u64, u64),
        deadline: Instant,
    ) -> Vec<(u64, Option<Vec<Stored>>)> {
        let read = direct::chunk(
            &self.client,
            &self.config.name,
            (first + 1, last + 1),
            BLOCKS_PER_GET,
            BLOCK_GET_BYTES,
            deadline.min(Instant::now() + BLOCKS_WAIT),
        )
        .await;
        let found = match read {
            Ok(found) if !found.is_empty() => found,
            other => {
                // Gone (the stream deleted, created again empty) or unreadable: count
                // the blocks again, so later reads do not ask for them.
                let error = other.err().map(|e| e.to_string()).unwrap_or_default();
                debug!(%error, first, last, "store: blocks not there; reading their messages");
                let _ = self.built().await;
                Vec::new()
            }
        };
        // Up to the last block answered; the whole range when none was.
        let upto = found.last().map_or(last, |raw| raw.sequence - 1);
        let mut found = found.into_iter().peekable();
        (first..=upto)
            .map(|n| {
                let block = found
                    .next_if(|raw| raw.sequence == n + 1)
                    .and_then(|raw| self.usable(n, &raw.headers, &raw.payload));
                (n, block)
            })
            .collect()
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

    /// Stores `contents` as block `n`, or a marker when there are none (texts over
    /// [`BLOCK_MAX_BYTES`]) or they are too big to publish. `Ok(false)`: another
    /// instance stored block `n` first.
    async fn publish(&self, n: u64, contents: Option<&[Stored]>) -> Result<bool, StoreError> {
        let mut publish = PublishMessage::build()
            .expected_last_sequence(n)
            .header(LOG_HEADER, self.log.as_str())
            .header(SIZE_HEADER, BLOCK.to_string().as_str())
            .header(BLOCK_HEADER, n.to_string().as_str());
        let payload = contents.map(encode);
        // Headers and subject take well under 1 KiB.
        publish = match payload {
            Some(payload) if payload.len() + 1024 <= self.max_payload => {
                publish.payload(payload.into())
            }
            _ => {
                debug!(
                    block = n,
                    "store: block texts too big for a block; full reads read its messages"
                );
                publish.header(SKIPPED_HEADER, "too big")
            }
        };
        let ack = self
            .jetstream
            .send_publish(format!("{SUBJECT_PREFIX}{n}"), publish)
            .await
            .map_err(|e| StoreError::unavailable("block publish", e))?;
        match ack.await {
            Ok(_) => {
                self.known.fetch_max(n + 1, Ordering::Relaxed);
                Ok(true)
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(error) => Err(StoreError::unavailable("block publish", error)),
        }
    }

    /// The messages of complete block `n`, read answer by answer and checked against
    /// the messages stream's leader (see the module docs); `None` once their texts pass
    /// [`BLOCK_MAX_BYTES`], so building holds at most that (and one answer) in memory.
    async fn contents(&self, n: u64) -> Result<Option<Vec<Stored>>, StoreError> {
        let name = &self.messages.cached_info().config.name;
        let deadline = Instant::now() + BUILD_WAIT;
        let (mut next, last) = range_of(n);
        let (mut read, mut bytes) = (Vec::new(), 0);
        while next <= last {
            let answer = direct::chunk(
                &self.client,
                name,
                (next, last),
                BLOCK as usize,
                BLOCK_GET_BYTES,
                deadline,
            )
            .await?;
            let Some(newest) = answer.last() else { break };
            next = newest.sequence + 1;
            bytes += answer.iter().map(|raw| raw.payload.len()).sum::<usize>();
            if bytes > BLOCK_MAX_BYTES {
                return Ok(None);
            }
            read.extend(answer);
        }
        if let Some(last) = read.last() {
            self.confirm(last).await?;
        }
        Ok(Some(read.into_iter().map(Raw::into_stored).collect()))
    }

    /// Whether the messages stream's leader holds `read` at its position.
    pub(super) async fn confirm(&self, read: &Raw) -> Result<(), StoreError> {
        let leader = self
            .messages
            .get_raw_message(read.sequence)
            .await
            .map_err(|e| StoreError::unavailable("leader get", e))?;
        if leader.subject.as_str() == read.subject && leader.payload == read.payload {
            return Ok(());
        }
        warn!(
            position = read.sequence,
            replica = read.subject,
            leader = %leader.subject,
            "store: the replica that answered and the stream's leader hold different \
             messages at one position; not building blocks from it"
        );
        Err(StoreError::unavailable(
            "build",
            format!("replicas disagree at position {}", read.sequence),
        ))
    }

    /// Builds every complete block not built yet, in order, until none is left (the log
    /// may grow meanwhile); returns how many blocks this call stored and how many are
    /// built.
    pub(super) async fn catch_up(&self) -> Result<(u64, u64), StoreError> {
        let mut stored = 0;
        let mut next = self.built().await?;
        loop {
            let last = self
                .messages
                .get_info()
                .await
                .map_err(|e| StoreError::unavailable("stream info", e))?
                .state
                .last_sequence;
            let complete = last / BLOCK;
            if next >= complete {
                return Ok((stored, next));
            }
            while next < complete {
                let contents = self.contents(next).await?;
                if self.publish(next, contents.as_deref()).await? {
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

/// Keeps the blocks up with the log until `cancel`: catches up at once when `completed`
/// says an append of this instance stored the last position of a block, and every few
/// seconds when the blocks have not moved since this instance last looked (so nobody
/// else is building them: after a bulk import, or when the instance that completed a
/// block died before building it).
pub(super) async fn keep_up(
    blocks: Blocks,
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
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = blocks.catch_up() => result,
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
