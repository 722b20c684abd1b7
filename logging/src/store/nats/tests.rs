//! The NATS store against real nats-servers: the store contract, atomic batches, reads
//! with and without blocks, several instances, and a cluster losing nodes.

use std::{collections::HashSet, sync::Arc};

use testkit::nats::Nats;

use super::{blocks::Block, *};
use crate::store::contract;

/// A store on `nats`.
async fn store_on(nats: &Nats, write_blocks: bool) -> NatsStore {
    let mut config = NatsConfig::new(vec![nats.urls()]);
    config.write_blocks = write_blocks;
    NatsStore::connect(config, &CancellationToken::new())
        .await
        .expect("connect")
}

/// A fresh single JetStream server (R1) and a store on it.
async fn store() -> (Nats, NatsStore) {
    let nats = Nats::single().await;
    let store = store_on(&nats, true).await;
    (nats, store)
}

fn numbered(range: std::ops::Range<usize>) -> Vec<Message> {
    range
        .map(|i| Message {
            id: format!("n-{i}"),
            text: format!("text {i}"),
        })
        .collect()
}

/// Appends messages `range` in batches of 50, all inserted.
async fn append_batches(store: &NatsStore, range: std::ops::Range<usize>) {
    let messages = numbered(range);
    for chunk in messages.chunks(50) {
        for outcome in store.append_batch(chunk.to_vec()).await {
            assert_eq!(outcome.expect("append"), Appended::Inserted);
        }
    }
}

/// Everything after `after`, as a full read sends it.
async fn read_from(store: &NatsStore, after: u64) -> Vec<Stored> {
    let mut batches = store.stream(after, None).await.expect("stream");
    let mut all = Vec::new();
    while let Some(batch) = batches.receiver.recv().await {
        all.extend(batch.expect("batch"));
    }
    all
}

/// Deletes the blocks stream, as an operator may (it is derived data).
async fn delete_blocks(store: &NatsStore) {
    store
        .jetstream
        .delete_stream(BLOCKS_STREAM)
        .await
        .expect("delete the blocks");
}

/// Appends `messages` in one batch, and again those answered unavailable (as the facade
/// retries, same ids) until every one is stored; returns the ids, each acknowledged
/// (inserted, or already stored by an earlier attempt).
async fn append_until_stored(store: &NatsStore, messages: Vec<Message>) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let mut pending = messages;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "never stored");
        let outcomes = store.append_batch(pending.clone()).await;
        let mut again = Vec::new();
        for (message, outcome) in pending.into_iter().zip(outcomes) {
            match outcome {
                Ok(Appended::Inserted | Appended::Duplicate) => acknowledged.push(message.id),
                Ok(Appended::Conflict) => panic!("conflict for {}", message.id),
                Err(_) => again.push(message),
            }
        }
        pending = again;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    acknowledged
}

/// The stored message at `position`, asked of the stream's leader.
async fn leader_get(
    store: &NatsStore,
    position: u64,
) -> async_nats::jetstream::message::StreamMessage {
    store
        .stream
        .get_raw_message(position)
        .await
        .expect("leader get")
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

#[tokio::test]
async fn pages() {
    let (_nats, store) = store().await;
    contract::pages_walk_the_same_log_as_the_stream(&store).await;
}

#[tokio::test]
async fn big_texts() {
    let (_nats, store) = store().await;
    contract::big_texts_are_split_into_small_batches(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent() {
    let (_nats, store) = store().await;
    contract::concurrent_writers_lose_nothing(Arc::new(store)).await;
}

#[test]
fn servers_older_than_2_12_are_refused() {
    for old in [
        "2.9.10", "2.10.27", "2.11.11", "v2.11.0", "1.4.1", "", "garbage",
    ] {
        assert!(!supported(old), "{old}");
    }
    for new in [
        "2.12.0",
        "2.12.0-RC.1",
        "2.15.1",
        "2.15.0-dev",
        "3.0.0",
        "v2.14.6",
    ] {
        assert!(supported(new), "{new}");
    }
}

/// On a cluster, where a message waits for its quorum, an id twice in a refused batch
/// is still answered inserted then duplicate (or conflict), never unavailable: the
/// repeat goes after the first has been stored.
#[tokio::test]
async fn repeats_in_a_refused_batch_are_answered_in_turn_on_a_cluster() {
    let nats = Nats::cluster(3).await;
    let urls = nats.nodes.iter().map(|node| node.url()).collect();
    let config = NatsConfig {
        replicas: 3,
        ..NatsConfig::new(urls)
    };
    let store = NatsStore::connect(config, &CancellationToken::new())
        .await
        .expect("connect");
    for round in 0..5 {
        let (same, other) = (format!("same-{round}"), format!("other-{round}"));
        let message = |id: &str, text: &str| Message {
            id: id.to_owned(),
            text: text.to_owned(),
        };
        let mut batch = numbered(round * 10..round * 10 + 8);
        batch.extend([
            message(&same, "one"),
            message(&other, "first"),
            message(&same, "one"),
            message(&other, "second"),
        ]);
        let outcomes = store.append_batch(batch).await;
        let answered: Vec<Option<Appended>> =
            outcomes.iter().map(|o| o.as_ref().ok().copied()).collect();
        let mut expected = vec![Some(Appended::Inserted); 10];
        expected.extend([Some(Appended::Duplicate), Some(Appended::Conflict)]);
        assert_eq!(answered, expected, "round {round}: {outcomes:?}");
    }
}

/// A batch of AppendBatch is one atomic batch: every message of it carries the same
/// batch id (16 hex digits: the servers store it with each), at consecutive positions;
/// a batch with an id already stored, or twice in it, is refused whole by the server
/// and appended one by one, which answers each.
#[tokio::test]
async fn a_batch_is_one_atomic_publish_and_a_refused_one_is_appended_one_by_one() {
    let (_nats, store) = store().await;
    let outcomes = store.append_batch(numbered(0..50)).await;
    assert!(outcomes.iter().all(|o| matches!(o, Ok(Appended::Inserted))));
    let mut batch_ids = HashSet::new();
    for position in 1..=50 {
        let stored = leader_get(&store, position).await;
        assert_eq!(id_of(&stored.subject), format!("n-{}", position - 1));
        let batch = stored.headers.get("Nats-Batch-Id").map(|v| v.to_string());
        batch_ids.insert(batch.expect("a message of an atomic batch"));
    }
    assert_eq!(batch_ids.len(), 1, "one batch: {batch_ids:?}");
    // Stored with every message: 16 hex digits, not a 32-digit uuid.
    assert!(batch_ids.iter().all(|id| id.len() == 16), "{batch_ids:?}");

    // n-10 is stored; n-60 twice (the same text), n-61 twice (another text).
    let mut mixed = numbered(50..60);
    mixed.extend(numbered(10..11));
    mixed.extend(numbered(60..62));
    mixed.extend(numbered(60..61));
    mixed.push(Message {
        id: "n-61".into(),
        text: "another text".into(),
    });
    let outcomes: Vec<_> = store
        .append_batch(mixed)
        .await
        .into_iter()
        .map(|o| o.expect("answered"))
        .collect();
    let mut expected = vec![Appended::Inserted; 10];
    expected.extend([
        Appended::Duplicate,
        Appended::Inserted,
        Appended::Inserted,
        Appended::Duplicate,
        Appended::Conflict,
    ]);
    // A repeat in the batch is appended after the first of its id, so it meets it stored.
    assert_eq!(outcomes, expected, "{outcomes:?}");
    let all = read_from(&store, 0).await;
    assert_eq!(all.len(), 62);
    let ids: HashSet<_> = all.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 62, "no id twice");
    let original = all.iter().find(|m| m.id == "n-10").expect("n-10");
    assert_eq!(original.text, "text 10", "the stored text kept");
}

/// AppendBatch calls of more than the server's 1000 go as several atomic batches.
#[tokio::test]
async fn a_batch_over_the_servers_limit_is_split() {
    let (_nats, store) = store().await;
    let outcomes = store.append_batch(numbered(0..2500)).await;
    assert_eq!(outcomes.len(), 2500);
    assert!(outcomes.iter().all(|o| matches!(o, Ok(Appended::Inserted))));
    let all = read_from(&store, 0).await;
    let ids: Vec<String> = all.iter().map(|m| m.id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 2500);
}

/// Messages `range` as stored from position 1 on.
fn stored(range: std::ops::Range<usize>) -> Vec<Stored> {
    numbered(range.clone())
        .into_iter()
        .zip(range)
        .map(|(message, i)| Stored {
            position: i as u64 + 1,
            id: message.id,
            text: message.text,
        })
        .collect()
}

/// How many blocks the blocks stream holds.
async fn blocks_stored(store: &NatsStore) -> u64 {
    match store.jetstream.get_stream(BLOCKS_STREAM).await {
        Ok(stream) => stream.cached_info().state.messages,
        Err(_) => 0,
    }
}

/// Every block in the blocks stream, in its order.
async fn every_block(store: &NatsStore) -> Vec<Block> {
    let (found, mut scanned) = mpsc::channel(1);
    tokio::spawn(store.reader.blocks.clone().scan(0, u64::MAX, found));
    let mut all = Vec::new();
    while let Some(blocks) = scanned.recv().await {
        all.extend(blocks);
    }
    all
}

/// Waits until the blocks hold `count` messages (an instance writes what it stored as a
/// block within a second).
async fn wait_for_blocks(store: &NatsStore, count: usize) {
    testkit::eventually(
        Duration::from_secs(10),
        &format!("{count} messages in blocks"),
        || async { every_block(store).await.iter().map(Vec::len).sum::<usize>() >= count },
    )
    .await;
}

/// Publishes a block by hand, as an instance would.
async fn publish_block(store: &NatsStore, block: &[Stored]) {
    store
        .jetstream
        .publish(
            format!("blocks.{}", block[0].position),
            blocks::encode(block).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// What an instance stores, batches and single appends, it writes as blocks: the
/// messages at the positions the leader acknowledged, many appends in one block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_appender_writes_what_it_stored_as_blocks() {
    let (_nats, store) = store().await;
    append_batches(&store, 0..120).await;
    for message in numbered(120..123) {
        assert_eq!(
            store.append(message).await.expect("append"),
            Appended::Inserted
        );
    }
    append_batches(&store, 123..130).await;
    wait_for_blocks(&store, 130).await;
    let blocks = every_block(&store).await;
    assert_eq!(
        blocks.concat(),
        stored(0..130),
        "every message once, in order"
    );
    assert!(
        blocks[0].len() > 50,
        "more than one append in a block: {}",
        blocks[0].len()
    );
}

/// Reads give the same log whichever way they go: with no blocks, with blocks of two
/// instances whose batches alternate, and messages where no block holds them; from
/// inside a block, up to a position inside one, and pages of any size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_agree_with_and_without_blocks() {
    let nats = Nats::single().await;
    let plain = store_on(&nats, false).await;
    append_batches(&plain, 0..1234).await;
    assert_eq!(read_from(&plain, 0).await, stored(0..1234), "no blocks");

    let (one, two) = (store_on(&nats, true).await, store_on(&nats, true).await);
    let messages = numbered(1234..3000);
    for (i, chunk) in messages.chunks(50).enumerate() {
        let writer = if i % 2 == 0 { &one } else { &two };
        writer.append_batch(chunk.to_vec()).await;
    }
    for message in numbered(3000..3010) {
        plain.append(message).await.expect("append");
    }
    append_batches(&one, 3010..3060).await;
    wait_for_blocks(&one, 3060 - 1234 - 10).await;
    let truth = stored(0..3060);
    for store in [&plain, &one] {
        assert_eq!(read_from(store, 0).await, truth, "messages and blocks");
        for after in [1233, 1234, 1235, 2025, 2999, 3005, 3059] {
            assert_eq!(
                read_from(store, after).await,
                truth[after as usize..],
                "from {after}"
            );
        }
        let mut early = store.stream(0, Some(2030)).await.expect("stream");
        let mut sent = Vec::new();
        while let Some(batch) = early.receiver.recv().await {
            sent.extend(batch.expect("batch"));
        }
        assert_eq!(sent, truth[..2030], "up to a position inside a block");
    }
    for limit in [7, 100, MAX_PAGE] {
        assert_eq!(contract::paged(&one, limit).await, truth, "limit {limit}");
    }
}

/// What an instance stored waits for its block in a queue of at most 1 MiB: with the
/// server frozen (the writer stuck on a publish), further messages get no block rather
/// than pile up in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_to_the_block_writer_is_bounded() {
    let (nats, store) = store().await;
    nats.freeze(0);
    let text = "x".repeat(10_000);
    for position in 1..=300 {
        let message = Message {
            id: format!("q-{position}"),
            text: text.clone(),
        };
        store.reader.blocks.write(position, vec![message]);
    }
    let queued = store
        .reader
        .blocks
        .queued
        .load(std::sync::atomic::Ordering::Relaxed);
    nats.resume(0);
    assert!(queued <= blocks::TO_WRITE_BYTES, "{queued} bytes queued");
    assert!(
        queued > blocks::TO_WRITE_BYTES / 2,
        "the writer took {queued} bytes off the queue: it was not stuck, nothing was shown"
    );
}

/// Where no block holds them, a full read asks for several ranges of messages at once,
/// sized by the messages it has seen: a range that holds bigger messages than its size
/// assumed is answered in part, and the rest comes next, before the ranges after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_messages_in_ranges_keep_their_order_as_sizes_change() {
    let nats = Nats::single().await;
    let store = store_on(&nats, false).await;
    let mut messages = numbered(0..2500);
    for (i, message) in messages.iter_mut().enumerate() {
        let repeat = match i {
            1200..1260 => 20_000,
            2000..2010 => 60_000,
            _ => 1,
        };
        message.text = format!("{i} ").repeat(repeat);
    }
    for chunk in messages.chunks(20) {
        for outcome in store.append_batch(chunk.to_vec()).await {
            assert_eq!(outcome.expect("append"), Appended::Inserted);
        }
    }
    let truth: Vec<Stored> = (1..)
        .zip(messages)
        .map(|(position, message)| Stored {
            position,
            id: message.id,
            text: message.text,
        })
        .collect();
    for after in [0, 1199, 1259, 1999] {
        assert_eq!(
            read_from(&store, after).await,
            truth[after as usize..],
            "from {after}"
        );
    }
}

/// A full read takes messages from the blocks that hold them, and starts reading blocks
/// at the first one written once the message it starts at was stored, without reading
/// the ones before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_takes_the_blocks_and_finds_them_from_inside_the_log() {
    let nats = Nats::single().await;
    let store = store_on(&nats, false).await;
    // Ten positions at a time, each followed by its block, by hand, with texts that are
    // not the stored ones (which no instance writes), so a read shows where each
    // message came from; none for positions 1561..=1570.
    let from_blocks: Vec<Stored> = stored(0..2000)
        .into_iter()
        .map(|m| Stored {
            text: format!("from a block {}", m.position),
            ..m
        })
        .collect();
    for (k, block) in from_blocks.chunks(10).enumerate() {
        append_batches(&store, 10 * k..10 * k + 10).await;
        if k != 156 {
            publish_block(&store, block).await;
        }
    }
    // Where a read from `position` starts, and the requests it took to find it.
    let store = &store;
    let seek = |position| async move {
        let requests = || {
            store
                .client
                .statistics()
                .out_messages
                .load(Ordering::Relaxed)
        };
        let before = requests();
        let start = store.reader.blocks.seek(position).await;
        (start, requests() - before)
    };
    // Block k (sequence k + 1, and k for those after the one left out) holds positions
    // 10k + 1 ..= 10k + 10.
    assert_eq!(seek(1).await, (Some(1), 0), "the first, at once");
    assert_eq!(seek(1556).await, (Some(156), 2), "the block of 1551..=1560");
    assert_eq!(seek(1565).await, (Some(157), 2), "the next, 1571..=1580");
    assert_eq!(seek(1991).await, (Some(199), 2), "the last");
    append_batches(store, 2000..2010).await;
    assert_eq!(seek(2005).await, (None, 2), "none written since");

    let read = read_from(store, 1550).await;
    assert_eq!(read[..10], from_blocks[1550..1560], "from the blocks");
    assert_eq!(read[10..20], stored(1560..1570), "from the messages");
    assert_eq!(read[20..450], from_blocks[1570..], "from the blocks again");
    assert_eq!(read[450..], stored(2000..2010), "from the messages again");
}

/// A full read waits for a block written out of order while the blocks it holds meanwhile
/// stay under [`WINDOW_BYTES`], and reads the position from the messages once they would
/// not. Blocks by hand of ten positions each for positions 2 on, then, last in the
/// blocks stream, a block of position 1 with a text of its own: it is read when it comes
/// after `before` positions' worth of blocks, and position 1 is read from the messages
/// stream when it comes after more than the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_holds_out_of_order_blocks_up_to_its_window() {
    for (before, late_block_read) in [(200, true), (6000, false)] {
        let nats = Nats::single().await;
        let store = store_on(&nats, false).await;
        append_batches(&store, 0..before + 1).await;
        let from_blocks: Vec<Stored> = stored(0..before + 1)
            .into_iter()
            .map(|m| Stored {
                text: format!("from a block {}", m.position),
                ..m
            })
            .collect();
        for block in from_blocks[1..].chunks(10) {
            publish_block(&store, block).await;
        }
        let held: usize = from_blocks[1..].iter().map(weight).sum();
        assert_eq!(held < WINDOW_BYTES, late_block_read, "{held} bytes before");
        let late = Stored {
            text: "from the late block".to_owned(),
            ..from_blocks[0].clone()
        };
        publish_block(&store, std::slice::from_ref(&late)).await;

        let mut expected = vec![if late_block_read {
            late
        } else {
            stored(0..1).remove(0)
        }];
        expected.extend_from_slice(&from_blocks[1..]);
        let read = read_from(&store, 0).await;
        assert_eq!(read, expected, "after {before} positions of blocks");
    }
}

/// The blocks stream deleted by hand (it is derived data): full reads give the whole log
/// at once, from the messages, and a block written later creates it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_blocks_slow_reads_down_and_come_back() {
    let (_nats, store) = store().await;
    append_batches(&store, 0..1000).await;
    wait_for_blocks(&store, 1000).await;
    delete_blocks(&store).await;
    let started = Instant::now();
    assert_eq!(
        read_from(&store, 0).await,
        stored(0..1000),
        "read without blocks"
    );
    let took = started.elapsed();
    assert!(
        took < STREAM_STALL,
        "the read waited {took:?} for blocks that are gone"
    );

    let next = std::sync::atomic::AtomicUsize::new(1000);
    testkit::eventually(Duration::from_secs(10), "blocks written again", || async {
        let from = next.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
        append_batches(&store, from..from + 10).await;
        blocks_stored(&store).await > 0
    })
    .await;
    let written = next.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(read_from(&store, 0).await, stored(0..written));
}

/// Blocks hold at most 64 KiB, a text over 16 KiB gets none, and a blocks stream is
/// kept by the instances of its log and replaced by those of another at start-up;
/// reads give every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_texts_and_blocks_kept_or_of_another_log() {
    let (nats, store) = store().await;
    let mut messages = numbered(0..8);
    for (i, message) in messages.iter_mut().enumerate() {
        message.text = format!("{i}").repeat(if i == 4 { 17_000 } else { 15_000 });
    }
    for outcome in store.append_batch(messages.clone()).await {
        assert_eq!(outcome.expect("append"), Appended::Inserted);
    }
    wait_for_blocks(&store, 7).await;
    let positions: Vec<Vec<u64>> = every_block(&store)
        .await
        .iter()
        .map(|block| block.iter().map(|m| m.position).collect())
        .collect();
    assert_eq!(positions, [vec![1, 2, 3, 4], vec![6, 7, 8]]);
    let all = read_from(&store, 0).await;
    let texts: Vec<&str> = all.iter().map(|m| m.text.as_str()).collect();
    let expected: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, expected);

    let blocks = blocks_stored(&store).await;
    store_on(&nats, true).await;
    assert_eq!(
        blocks_stored(&store).await,
        blocks,
        "kept by an instance of the log"
    );
    Blocks::open(
        &store.client,
        &store.jetstream,
        &store.stream,
        "nats:MESSAGES:another",
    )
    .await
    .expect("open");
    assert_eq!(blocks_stored(&store).await, 0, "replaced at start-up");
    assert_eq!(read_from(&store, 0).await, all);
}

#[tokio::test]
async fn ids_that_are_not_subject_safe_are_stored_and_kept_apart() {
    let (_nats, store) = store().await;
    let ids = ["a.b", "a b", "a*b", "_61", "x>y", "ünï"];
    for id in ids {
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
    assert_eq!(contract::listed_ids(&store).await, ids);
}

#[tokio::test]
async fn a_second_store_on_the_same_stream_sees_everything_and_dedups_for_good() {
    let (nats, first) = store().await;
    let second = store_on(&nats, true).await;
    let message = |text: &str| Message {
        id: "same-id".into(),
        text: text.into(),
    };
    assert_eq!(
        first.append(message("one")).await.expect("append"),
        Appended::Inserted
    );
    assert_eq!(
        second.append(message("one")).await.expect("append"),
        Appended::Duplicate
    );
    assert_eq!(
        second.append(message("two")).await.expect("append"),
        Appended::Conflict
    );
    assert_eq!(contract::listed_ids(&second).await, ["same-id"]);
    assert_eq!(first.log(), second.log(), "one shared log");
}

#[tokio::test]
async fn retention_limits_reach_the_stream() {
    let nats = Nats::single().await;
    let mut config = NatsConfig::new(vec![nats.urls()]);
    config.retention = Retention {
        max_age: Some(Duration::from_secs(3600)),
        max_bytes: Some(1 << 20),
        max_messages: Some(3),
    };
    let store = NatsStore::connect(config, &CancellationToken::new())
        .await
        .expect("connect");
    let info = store.stream.get_info().await.expect("info");
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.config.max_bytes, 1 << 20);
    assert_eq!(info.config.max_messages, 3);
    for message in numbered(0..5) {
        store.append(message).await.expect("append");
    }
    // The oldest went; pages and the stream start at the first message kept.
    assert_eq!(contract::listed_ids(&store).await, ["n-2", "n-3", "n-4"]);
    let page = store.read(0, 10).await.expect("read");
    let ids: Vec<&str> = page.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["n-2", "n-3", "n-4"]);
}

/// A stream at its size limit refuses appends as full, single and batched, and keeps
/// everything it stored; by default the stream is created with a limit.
#[tokio::test]
async fn a_full_stream_refuses_and_keeps_everything() {
    let nats = Nats::single().await;
    let mut config = NatsConfig::new(vec![nats.urls()]);
    assert_eq!(config.max_bytes, Some(DEFAULT_MAX_BYTES));
    config.max_bytes = Some(64 * 1024);
    let store = NatsStore::connect(config, &CancellationToken::new())
        .await
        .expect("connect");
    let info = store.stream.get_info().await.expect("info");
    assert_eq!(info.config.max_bytes, 64 * 1024);
    assert_eq!(info.config.discard, stream::DiscardPolicy::New);
    let big = |i: usize| Message {
        id: format!("big-{i}"),
        text: format!("{i:04}{}", "x".repeat(10 * 1024)),
    };
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..20 {
        match store.append(big(i)).await {
            Ok(Appended::Inserted) => stored.push(format!("big-{i}")),
            Err(StoreError::Full(why)) => {
                refused = Some(why);
                break;
            }
            other => panic!("append {i}: {other:?}"),
        }
    }
    let why = refused.expect("the stream fills up");
    assert!(why.contains("--store-max-bytes"), "{why}");
    assert!(
        stored.len() >= 4,
        "{} stored before the limit",
        stored.len()
    );
    let outcomes = store.append_batch((20..25).map(big).collect()).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(StoreError::Full(_)))),
        "{outcomes:?}"
    );
    // Nothing stored was dropped to make room.
    assert_eq!(contract::listed_ids(&store).await, stored);
}

/// A stream made by an older version of the store (no atomic batches, no direct gets)
/// gets both turned on, and keeps its messages.
#[tokio::test]
async fn a_stream_of_an_older_version_is_brought_up_to_date() {
    let nats = Nats::single().await;
    let client = async_nats::connect(nats.urls()).await.expect("connect");
    let jetstream = jetstream::new(client);
    jetstream
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["messages.>".into()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create");
    let ack = jetstream
        .publish(subject_for("old"), "from before".into())
        .await
        .expect("publish");
    ack.await.expect("ack");
    let store = store_on(&nats, true).await;
    let config = store.stream.get_info().await.expect("info").config;
    assert!(config.allow_atomic_publish && config.allow_direct);
    append_batches(&store, 0..10).await;
    let all = read_from(&store, 0).await;
    assert_eq!(all.len(), 11);
    assert_eq!(
        (all[0].id.as_str(), all[0].text.as_str()),
        ("old", "from before")
    );
}

/// On a three-node cluster: a write acknowledged through one node is in the very next
/// read through every node (pages and full reads), whichever replica answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_every_acknowledged_write_through_every_node() {
    let nats = Nats::cluster(3).await;
    let mut stores = Vec::new();
    for node in &nats.nodes {
        let config = NatsConfig {
            replicas: 3,
            ..NatsConfig::new(vec![node.url()])
        };
        stores.push(
            NatsStore::connect(config, &CancellationToken::new())
                .await
                .expect("connect"),
        );
    }
    for i in 0..60 {
        let writer = &stores[i % 3];
        let batch = numbered(i * 10..i * 10 + 10);
        for outcome in writer.append_batch(batch).await {
            assert_eq!(outcome.expect("append"), Appended::Inserted);
        }
        let end = (i * 10 + 10) as u64;
        for reader in &stores {
            let page = reader.read(end - 10, 100).await.expect("read");
            assert_eq!(page.messages.len(), 10, "batch {i} read at once");
            assert_eq!(page.messages[9].id, format!("n-{}", end - 1));
            assert!(!page.more);
        }
        let reader = &stores[(i + 1) % 3];
        let tail = read_from(reader, end.saturating_sub(25)).await;
        assert_eq!(tail.len(), 25.min(end as usize), "full read of batch {i}");
    }
}

/// Batches in flight while the stream's leader is killed: every batch answered stored
/// is stored; one answered unavailable is appended again (as the facade retries) and
/// then every id is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_cut_by_a_leader_kill_are_stored_whole_or_retried_exactly_once() {
    let mut nats = Nats::cluster(3).await;
    let config = NatsConfig::new(nats.nodes.iter().map(|node| node.url()).collect());
    let store = Arc::new(
        NatsStore::connect(config, &CancellationToken::new())
            .await
            .expect("connect"),
    );
    append_batches(&store, 0..100).await;
    let leader = nats.stream_leader(STREAM).await.expect("a leader");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for round in 0..40 {
                    let first = 1000 + (w * 40 + round) * 20;
                    acknowledged
                        .extend(append_until_stored(&store, numbered(first..first + 20)).await);
                }
                acknowledged
            })
        })
        .collect();
    testkit::eventually(Duration::from_secs(20), "batches under way", || async {
        store.bounds().await.is_ok_and(|(_, last)| last >= 600)
    })
    .await;
    nats.kill9(leader).await;
    let mut acknowledged = HashSet::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    assert_eq!(acknowledged.len(), 4 * 40 * 20);
    let all = read_from(&store, 0).await;
    let ids: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no id stored twice");
    for id in &acknowledged {
        assert!(unique.contains(id.as_str()), "{id} acknowledged and lost");
    }
    assert_eq!(ids.len(), 100 + 4 * 40 * 20);
}

/// The stream leader's node frozen (SIGSTOP: cut off, its connections silent) for a few
/// seconds while batches are written, then resumed: writes go on through a new leader,
/// every acknowledged id is stored exactly once, and stores on each of the three nodes
/// read the very same log, position by position, once the frozen node has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_loses_nothing_and_every_node_reads_the_same_log() {
    let nats = Nats::cluster(3).await;
    let urls: Vec<String> = nats.nodes.iter().map(|node| node.url()).collect();
    let connect = |urls: Vec<String>| async move {
        NatsStore::connect(
            NatsConfig {
                replicas: 3,
                ..NatsConfig::new(urls)
            },
            &CancellationToken::new(),
        )
        .await
        .expect("connect")
    };
    let writer = Arc::new(connect(urls.clone()).await);
    append_batches(&writer, 0..100).await;
    let leader = nats.stream_leader(STREAM).await.expect("a leader");
    let writing = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for round in 0..150 {
                let first = 1000 + round * 10;
                acknowledged
                    .extend(append_until_stored(&writer, numbered(first..first + 10)).await);
            }
            acknowledged
        })
    };
    testkit::eventually(Duration::from_secs(20), "batches under way", || async {
        writer.bounds().await.is_ok_and(|(_, last)| last >= 300)
    })
    .await;
    nats.freeze(leader);
    let frozen = Instant::now();
    // Writes go on once the other two have elected a leader among themselves.
    testkit::eventually(
        Duration::from_secs(30),
        "writes through a new leader",
        || async {
            let probe = Message {
                id: format!("probe-{}", frozen.elapsed().as_micros()),
                text: "p".into(),
            };
            writer.append(probe).await.is_ok()
        },
    )
    .await;
    eprintln!(
        "writes went on {:?} after the leader froze",
        frozen.elapsed()
    );
    nats.resume(leader);
    let acknowledged: HashSet<String> = writing.await.expect("writer").into_iter().collect();
    assert_eq!(acknowledged.len(), 1500);

    let mut readers = Vec::new();
    for url in &urls {
        readers.push(connect(vec![url.clone()]).await);
    }
    // The resumed node catches up. Probes that timed out while their connection sat on
    // the frozen node reach the stream when it resumes (a timed-out write's outcome is
    // unknown, not failed), so the log may still grow a little: it is settled when every
    // node reads up to where the leader says it ends.
    testkit::eventually(
        Duration::from_secs(30),
        "every node reading to the log's end",
        || async {
            let Ok((_, last)) = writer.bounds().await else {
                return false;
            };
            for reader in &readers {
                if read_from(reader, 0).await.last().map(|m| m.position) != Some(last) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let mut logs = Vec::new();
    for reader in &readers {
        logs.push(read_from(reader, 0).await);
    }
    assert!(
        logs.windows(2).all(|w| w[0] == w[1]),
        "every node reads the same log"
    );
    let ids: Vec<&str> = logs[0].iter().map(|m| m.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no id stored twice");
    for id in &acknowledged {
        assert!(unique.contains(id.as_str()), "{id} acknowledged and lost");
    }
}
