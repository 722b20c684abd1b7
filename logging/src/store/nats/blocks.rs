//! The log in blocks, for full reads: a reply of a batched get costs the servers about
//! the same for one short message as for a block of hundreds, so a full read of a
//! million messages takes thousands of replies, not a million.
//!
//! A block is messages one instance stored, in position order, as one protobuf message
//! (`repeated logging.v1.Message`) in a second stream, `MESSAGES_BLOCKS`, on the
//! subject `blocks.<first position>`. Pages do not use them (a page is one batched get
//! of the messages themselves).
//!
//! - **Written by the appender, from the leader's answers.** Once the messages stream's
//!   leader acknowledges an append, the instance knows its position (a batch's ack
//!   names its last, and a batch is stored in one piece). It collects what it stored
//!   and publishes it as a block once it holds [`BLOCK_MAX_BYTES`] or [`BLOCK_WAIT`]
//!   after the first (one publish, one Raft proposal, for many batches). Nothing is
//!   read back from a replica: a block is what the leader acknowledged.
//! - **Derived, never needed.** A block holds one instance's messages, with the other
//!   instances' in between, so a full read merges the blocks by position and reads
//!   every position no block holds from the messages stream (see [`super::Reader`]): a
//!   block lost with a crash, written late, or a blocks stream deleted by hand, makes a
//!   read slower, never shorter.
//! - **Small, of small messages.** A block holds at most [`BLOCK_MAX_BYTES`] (64 KiB)
//!   encoded, and messages of at most a quarter of that ([`BLOCKED_MAX_BYTES`]): the
//!   bigger ones are read as they are, which costs a reader about as much.
//! - **Of one log.** The stream's metadata names the log (the messages stream's creation
//!   time) and the blocks' format; a blocks stream naming anything else is deleted at
//!   start-up and created again empty.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_nats::{
    jetstream::{
        self,
        context::PublishErrorKind,
        stream::{self, StorageType},
    },
    Client,
};
use prost::Message as _;
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, warn};

use super::{
    direct::{self, Start},
    STREAM_STALL,
};
use crate::store::{Message, StoreError, Stored};

pub const STREAM: &str = "MESSAGES_BLOCKS";
const SUBJECT_PREFIX: &str = "blocks.";
/// What the stream's metadata says of its blocks: the version of their format.
const FORMAT: &str = "merged-1";
/// Most bytes of one block, encoded (ids, texts and a few bytes each): about a thousand
/// short messages, or one of 64 KiB.
pub(super) const BLOCK_MAX_BYTES: usize = 64 * 1024;
/// The biggest message a block takes (its [`size`]): a block of fewer than four
/// messages would save a full read little, and cost the servers a second copy of them.
const BLOCKED_MAX_BYTES: usize = BLOCK_MAX_BYTES / 4;
/// How long an instance collects what it stored before writing it as a block, when it
/// does not reach [`BLOCK_MAX_BYTES`] first.
pub(super) const BLOCK_WAIT: Duration = Duration::from_secs(1);
/// Bytes of messages an instance may have stored but not yet put in a block; past it
/// (NATS slower than the appends), further messages get no block.
pub(super) const TO_WRITE_BYTES: usize = 1024 * 1024;
/// Blocks asked for in one batched get (fewer over [`SCAN_BYTES`]).
const BLOCKS_PER_GET: usize = 64;
/// Most bytes of blocks one batched get asks for (the server sends one block more at
/// most): four full blocks. One block a request waited on a round trip per 64 KiB.
const SCAN_BYTES: usize = 4 * BLOCK_MAX_BYTES;
/// The wire form of a block: what `logging.v1.Message` already is.
#[derive(Clone, PartialEq, prost::Message)]
struct Encoded {
    #[prost(message, repeated, tag = "1")]
    messages: Vec<proto::logging::v1::Message>,
}

/// A block: messages in position order, never empty.
pub(super) type Block = Vec<Stored>;

pub(super) fn encode(messages: &[Stored]) -> Vec<u8> {
    let messages = messages.iter().cloned().map(Into::into).collect();
    Encoded { messages }.encode_to_vec()
}

/// A block as stored; `None` for anything that is not a block (empty, undecodable, or
/// out of position order).
fn decode(payload: &[u8]) -> Option<Block> {
    let messages = Encoded::decode(payload).ok()?.messages;
    let messages: Block = messages.into_iter().map(Stored::from).collect();
    let ordered = messages
        .windows(2)
        .all(|pair| pair[1].position > pair[0].position);
    (!messages.is_empty() && ordered).then_some(messages)
}

/// A message's size in a block: its id, text and position, and their tags.
fn size(message: &Stored) -> usize {
    message.id.len() + message.text.len() + 24
}

/// The blocks of one log.
#[derive(Clone)]
pub(super) struct Blocks {
    client: Client,
    /// To this instance's block writer ([`write_blocks`]): what it stored.
    stored: mpsc::UnboundedSender<Vec<Stored>>,
    /// What `stored` holds, in bytes as [`size`] counts them (at most [`TO_WRITE_BYTES`]).
    pub(super) queued: Arc<AtomicUsize>,
}

impl Blocks {
    /// Opens (creating it if missing) the blocks stream of the log `log` kept in
    /// `messages`, with limits that keep at least as much as the messages stream. A
    /// blocks stream of another log or format is deleted and created again.
    pub(super) async fn open(
        client: &Client,
        jetstream: &jetstream::Context,
        messages: &stream::Stream,
        log: &str,
    ) -> Result<Self, StoreError> {
        let unavailable = |e: &dyn std::fmt::Display| StoreError::unavailable("blocks stream", e);
        let limits = &messages.cached_info().config;
        let config = stream::Config {
            name: STREAM.to_owned(),
            description: Some(format!(
                "What the logging instances stored in the {} stream, in blocks, for full \
                 reads: derived data, written by each instance as it appends",
                limits.name
            )),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            storage: StorageType::File,
            num_replicas: limits.num_replicas,
            allow_direct: true,
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            max_messages: limits.max_messages,
            metadata: HashMap::from([
                ("log".to_owned(), log.to_owned()),
                ("format".to_owned(), FORMAT.to_owned()),
            ]),
            ..Default::default()
        };
        let open = || async {
            jetstream
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| unavailable(&e))
        };
        let stream = open().await?;
        let existing = &stream.cached_info().config;
        // The servers add keys of their own (`_nats.*`): only ours are compared.
        let ours = config
            .metadata
            .iter()
            .all(|(key, value)| existing.metadata.get(key) == Some(value));
        if !ours || !existing.allow_direct {
            warn!(
                stream = STREAM,
                "store: the blocks stream belongs to a messages stream since deleted, or \
                 holds blocks of another format; deleting it (full reads read the messages \
                 until new appends write blocks)"
            );
            // Another instance may delete it first, or create it again: both are fine.
            let _ = jetstream.delete_stream(STREAM).await;
            open().await?;
        }
        let (stored, to_write) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = write_blocks(jetstream.clone(), config, to_write, Arc::clone(&queued));
        tokio::spawn(writer);
        Ok(Self {
            client: client.clone(),
            stored,
            queued,
        })
    }

    /// Hands `messages`, just stored at positions up to `last`, to the block writer,
    /// but for those over [`BLOCKED_MAX_BYTES`]; when it is [`TO_WRITE_BYTES`] behind,
    /// they get no block.
    pub(super) fn write(&self, last: u64, messages: Vec<Message>) {
        let first = last + 1 - messages.len() as u64;
        let stored: Vec<Stored> = (first..)
            .zip(messages)
            .map(|(position, message)| Stored {
                position,
                id: message.id,
                text: message.text,
            })
            .filter(|message| size(message) <= BLOCKED_MAX_BYTES)
            .collect();
        let bytes = stored.iter().map(size).sum();
        if bytes == 0 {
            return;
        }
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > TO_WRITE_BYTES {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            return;
        }
        let _ = self.stored.send(stored);
    }

    /// Where in the blocks stream a full read from `position` on starts: at the first
    /// block written once the message at `position` was stored, as every block holding
    /// it or a later one was (an instance writes a block after the leader acknowledged
    /// what it holds). Two requests, whatever the log's length. A blocks stream's leader
    /// whose clock is behind the messages stream's may make it miss a block: its
    /// messages are read as they are, slower, never fewer. The first block, at once,
    /// from position 1, and when the message's time cannot be read; `None` when no block
    /// was written since or the blocks stream cannot be read.
    pub(super) async fn seek(&self, position: u64) -> Option<u64> {
        if position <= 1 {
            return Some(1);
        }
        let Some(time) = direct::stored_at(&self.client, super::STREAM, position).await else {
            return Some(1);
        };
        let since = Start::Since(time);
        let answer = direct::batch(&self.client, STREAM, since, 1, 1, STREAM_STALL).await;
        answer.ok()?.messages.first().map(|block| block.sequence)
    }

    /// Sends the blocks that hold positions after `after`, in the blocks stream's order
    /// from where [`Blocks::seek`] says, one answer of at most [`SCAN_BYTES`] and a
    /// block more at a time: the next is asked for only once `out` has room. Stops after
    /// a block past `until`, at the stream's end, or when it cannot be read (the reader
    /// reads messages then).
    pub(super) async fn scan(self, after: u64, until: u64, out: mpsc::Sender<Vec<Block>>) {
        let Some(mut next) = self.seek(after + 1).await else {
            return;
        };
        loop {
            let Ok(room) = out.reserve().await else {
                return;
            };
            let read = direct::batch(
                &self.client,
                STREAM,
                Start::At(next),
                BLOCKS_PER_GET,
                SCAN_BYTES,
                STREAM_STALL,
            )
            .await;
            let answer = match read {
                Ok(answer) => answer,
                Err(error) => {
                    debug!(%error, "store: blocks unreadable; reading their messages");
                    return;
                }
            };
            let Some(newest) = answer.messages.last() else {
                return;
            };
            next = newest.sequence + 1;
            let blocks: Vec<Block> = answer
                .messages
                .iter()
                .filter_map(|raw| decode(&raw.payload))
                .filter(|block| block.last().is_some_and(|m| m.position > after))
                .collect();
            let past = blocks.iter().any(|block| block[0].position > until);
            room.send(blocks);
            if past || answer.pending == 0 {
                return;
            }
        }
    }
}

/// Writes what this instance stored as blocks, until the store goes: collects the
/// messages `stored` sends (`queued` bytes of them) and publishes them, in position
/// order, once they fill a block or [`BLOCK_WAIT`] after the first. A blocks stream
/// deleted by hand is created again (its block is lost: those messages are read as
/// they are).
async fn write_blocks(
    jetstream: jetstream::Context,
    config: stream::Config,
    mut stored: mpsc::UnboundedReceiver<Vec<Stored>>,
    queued: Arc<AtomicUsize>,
) {
    let (mut block, mut bytes, mut due): (Block, usize, Option<Instant>) = (Vec::new(), 0, None);
    loop {
        let wait = async {
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        let messages = tokio::select! {
            received = stored.recv() => received,
            () = wait => {
                publish(&jetstream, &config, std::mem::take(&mut block)).await;
                (bytes, due) = (0, None);
                continue;
            }
        };
        let Some(messages) = messages else {
            publish(&jetstream, &config, block).await;
            return;
        };
        queued.fetch_sub(messages.iter().map(size).sum(), Ordering::Relaxed);
        for message in messages {
            if bytes + size(&message) > BLOCK_MAX_BYTES {
                publish(&jetstream, &config, std::mem::take(&mut block)).await;
                (bytes, due) = (0, None);
            }
            bytes += size(&message);
            block.push(message);
            due.get_or_insert_with(|| Instant::now() + BLOCK_WAIT);
        }
    }
}

/// Publishes `block` (if it holds any message) to the blocks stream, creating the
/// stream again when it is missing.
async fn publish(jetstream: &jetstream::Context, config: &stream::Config, mut block: Block) {
    block.sort_unstable_by_key(|m| m.position);
    let Some(first) = block.first() else { return };
    let subject = format!("{SUBJECT_PREFIX}{}", first.position);
    let stored = match jetstream.publish(subject, encode(&block).into()).await {
        Ok(ack) => ack.await.map(drop),
        Err(error) => Err(error),
    };
    match stored {
        Ok(()) => {}
        Err(error) if error.kind() == PublishErrorKind::StreamNotFound => {
            match jetstream.get_or_create_stream(config.clone()).await {
                Ok(_) => warn!(
                    stream = STREAM,
                    "store: the blocks stream was missing; created it again"
                ),
                Err(error) => debug!(%error, "store: the blocks stream cannot be created now"),
            }
        }
        Err(error) => debug!(%error, "store: a block was not stored; full reads read its messages"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_decodes_to_what_was_encoded() {
        let block: Block = (1..=3)
            .map(|position| Stored {
                position,
                id: format!("id-{position}"),
                text: format!("text ünï {position}"),
            })
            .collect();
        assert_eq!(decode(&encode(&block)), Some(block.clone()));
        assert_eq!(decode(&encode(&[])), None, "empty");
        assert_eq!(decode(b"\xff\xff\xff"), None, "not a block");
        let holes = [block[0].clone(), block[2].clone()];
        assert_eq!(
            decode(&encode(&holes)),
            Some(holes.to_vec()),
            "other instances' between"
        );
        let backwards = [block[1].clone(), block[0].clone()];
        assert_eq!(decode(&encode(&backwards)), None, "out of order");
    }
}
