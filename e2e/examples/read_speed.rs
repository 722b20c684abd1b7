//! The bare baselines of the growth benchmark (`bench/growth`), on the same stream as the
//! system it measures:
//!
//! - a full read by a bare ordered consumer (JetStream's own delivery), and through
//!   logging's gRPC `Stream`: where a `GET /messages` spends its time;
//! - page reads by a bare client, 200 times at the middle of the log: one stream-info
//!   request plus 100 pipelined direct gets (how the store reads messages no block holds
//!   yet), and one stream-info request plus direct gets of two blocks at once (how it
//!   reads the rest), each time other blocks of those within 100,000 positions of the
//!   middle.
//!
//!     read_speed NATS_URLS LOGGING_ADDR [PAGE_CONCURRENCY]
//!
//! PAGE_CONCURRENCY (default 128, as the store) is how many gets a page keeps in flight.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures_util::StreamExt;
use proto::logging::v1::{logging_client::LoggingClient, ReadRequest, StreamRequest};

/// Messages per block in `MESSAGES_BLOCKS` (logging's `store::blocks::BLOCK`).
const BLOCK: u64 = 100;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3 || args.len() == 4,
        "usage: read_speed NATS_URLS LOGGING_ADDR [PAGE_CONCURRENCY]"
    );
    let concurrency: usize = args.get(3).map_or(Ok(128), |c| c.parse())?;
    let servers: Vec<&str> = args[1].split(',').collect();
    let jetstream = async_nats::jetstream::new(async_nats::connect(servers.as_slice()).await?);
    let mut stream = jetstream.get_stream("MESSAGES").await?;
    let last = stream.info().await?.state.last_sequence;

    let started = Instant::now();
    let mut messages = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let (mut count, mut bytes) = (0u64, 0usize);
    while let Some(message) = messages.next().await {
        let message = message?;
        count += 1;
        bytes += message.payload.len();
        if message.info().map_err(anyhow::Error::msg)?.stream_sequence >= last {
            break;
        }
    }
    report("ordered consumer", count, bytes, started);

    let started = Instant::now();
    let channel = rpc::channel(&args[2])?;
    let mut batches = LoggingClient::new(channel)
        .stream(StreamRequest { after: 0, until: 0 })
        .await?
        .into_inner();
    let (mut count, mut bytes) = (0u64, 0usize);
    while let Some(batch) = batches.message().await? {
        count += batch.messages.len() as u64;
        bytes += batch.messages.iter().map(|m| m.text.len()).sum::<usize>();
    }
    report("logging Stream (gRPC)", count, bytes, started);

    // Pages as the store reads them, without logging and the facade in the way.
    let middle = last / 2;
    let mut times = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let state = stream.info().await?.state.clone();
        let stop = (middle + 100).min(state.last_sequence);
        let fetched: Vec<_> = futures_util::stream::iter(middle + 1..=stop)
            .map(|sequence| stream.direct_get(sequence))
            .buffered(concurrency)
            .collect()
            .await;
        anyhow::ensure!(fetched.iter().all(Result::is_ok), "a direct get failed");
        times.push(started.elapsed());
    }
    print_percentiles("bare page of 100 at the middle", times);

    let blocks = jetstream.get_stream("MESSAGES_BLOCKS").await?;
    let built = blocks.get_info().await?.state.last_sequence;
    if built > 1 {
        let around = (middle / BLOCK).min(built - 2);
        let span = 1000.min(built - 1);
        let first = around.saturating_sub(span / 2).min(built - 1 - span);
        let mut times = Vec::new();
        for i in 0..200u64 {
            // A page of 100 not aligned to a block is two blocks, fetched at once; in a
            // scattered order (a stride coprime to most spans), not the same again.
            let block = first + (i * 37) % span;
            let started = Instant::now();
            stream.info().await?;
            let (one, two) =
                tokio::join!(blocks.direct_get(block + 1), blocks.direct_get(block + 2));
            one?;
            two?;
            times.push(started.elapsed());
        }
        print_percentiles("bare block page at the middle", times);
    }

    // The same pages through logging's gRPC `Read`, without the facade in the way.
    let mut client = LoggingClient::new(rpc::channel(&args[2])?);
    let span = 100_000.min(last / 2).max(1);
    let mut times = Vec::new();
    for i in 0..200u64 {
        let after = middle.saturating_sub(span / 2) + (i * 7919) % span;
        let started = Instant::now();
        let page = client
            .read(ReadRequest { after, limit: 100 })
            .await?
            .into_inner();
        anyhow::ensure!(!page.messages.is_empty(), "an empty page after {after}");
        times.push(started.elapsed());
    }
    print_percentiles("logging Read page at the middle", times);
    Ok(())
}

fn print_percentiles(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: p50 {:.2} ms, p99 {:.2} ms",
        ms(times[times.len() / 2]),
        ms(times[times.len() * 99 / 100])
    );
}

fn report(what: &str, count: u64, bytes: usize, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{what}: {count} messages, {:.1} MB of text in {seconds:.2} s: {:.0} messages/s, {:.1} MB/s",
        bytes as f64 / 1e6,
        count as f64 / seconds,
        bytes as f64 / 1e6 / seconds
    );
}
