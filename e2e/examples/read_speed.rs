//! The bare baselines of the growth benchmark (`bench/growth`), on the same stream as the
//! system it measures:
//!
//! - a full read by a bare ordered consumer (JetStream's own delivery), and through
//!   logging's gRPC `Stream`: where a `GET /messages` spends its time;
//! - pages of 100 at 1000 spots around the middle of the log: a bare batched direct get
//!   of 100 messages (one request, as the store reads a page), and logging's gRPC `Read`
//!   of the same page right after it, without the facade in the way;
//! - full reads from inside the log, as a facade resumes one: logging's `Stream` from
//!   100 of those spots, timed to its first batch.
//!
//!     read_speed NATS_URLS LOGGING_ADDR

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use clap::Parser;
use futures_util::StreamExt;
use proto::logging::v1::{logging_client::LoggingClient, ReadRequest, StreamRequest};

#[derive(Parser)]
struct Args {
    /// Comma-separated `nats://host:port` URLs of the cluster.
    nats_urls: String,
    /// A logging instance on that cluster (`host:port`).
    logging: String,
}

/// A bare batched direct get of `count` messages of `stream` from position `from`:
/// one request, a reply per message and an end-of-batch status. Returns how many
/// messages came.
async fn batched_get(
    client: &async_nats::Client,
    stream: &str,
    from: u64,
    count: usize,
) -> anyhow::Result<usize> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let request = serde_json::json!({ "seq": from, "batch": count });
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            request.to_string().into(),
        )
        .await?;
    let mut received = 0;
    while let Some(reply) = replies.next().await {
        match reply.status {
            None => received += 1,
            Some(_) => return Ok(received), // 204 EOB (or 404: nothing there)
        }
    }
    anyhow::bail!("the connection closed")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let servers: Vec<&str> = args.nats_urls.split(',').collect();
    let client = async_nats::connect(servers.as_slice()).await?;
    let jetstream = async_nats::jetstream::new(client.clone());
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
    let channel = rpc::channel(&args.logging)?;
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

    // Pages at the same spots: the bare batched get, then logging's Read of the same
    // page, alternating so both meet the same state of the machine.
    let middle = last / 2;
    let mut logging = LoggingClient::new(rpc::channel(&args.logging)?);
    let span = 100_000.min(last / 2).max(1);
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for i in 0..1000u64 {
        let after = middle.saturating_sub(span / 2) + (i * 7919) % span;
        let started = Instant::now();
        let received = batched_get(&client, "MESSAGES", after + 1, 100).await?;
        bare.push(started.elapsed());
        anyhow::ensure!(received > 0, "a bare get after {after} found nothing");
        let started = Instant::now();
        let page = logging
            .read(ReadRequest { after, limit: 100 })
            .await?
            .into_inner();
        ours.push(started.elapsed());
        anyhow::ensure!(!page.messages.is_empty(), "an empty page after {after}");
    }
    print_percentiles("bare batched get of 100 at the middle", bare);
    print_percentiles("logging Read page at the middle", ours);

    let mut first_batches = Vec::new();
    for i in 0..100u64 {
        let after = middle.saturating_sub(span / 2) + (i * 7919) % span;
        let started = Instant::now();
        let mut batches = logging
            .stream(StreamRequest { after, until: 0 })
            .await?
            .into_inner();
        let batch = batches.message().await?;
        first_batches.push(started.elapsed());
        anyhow::ensure!(
            batch.is_some_and(|batch| !batch.messages.is_empty()),
            "a full read after {after} sent nothing"
        );
    }
    print_percentiles("logging Stream from the middle, first batch", first_batches);
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
