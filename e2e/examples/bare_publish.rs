//! The bare JetStream publishers the NATS store is measured against (`bench/run`): an
//! async-nats client publishing to a file stream with as many replicas as URLs (R3 on the
//! runner's cluster), IN_FLIGHT publishers each waiting for its ack, for SECONDS. Prints
//! `messages_per_second p50_ms p99_ms` (latency of one publish, or of one batch).
//!
//! Each message goes as the NATS store sends the facade's: its own subject
//! (`<stream>.<uuid>`, as long as the store's `messages.<uuid>`), the text of the
//! benchmarks' POSTs, and `Nats-Expected-Last-Subject-Sequence: 0` (stored only if the
//! subject holds nothing: exactly once for good), which is JetStream's cost of that
//! guarantee. With `--atomic N`, each publisher sends atomic batches of N such messages
//! (headers `Nats-Batch-Id`, 16 hex digits as the store's, `Nats-Batch-Sequence`, and
//! `Nats-Batch-Commit: 1` on the last, the only one that waits for an answer), as the
//! store does for the facade's group commit. The servers store every header with its
//! message, so the same sizes are the same work.
//!
//! With `--rate R`, the publishers together send at most R messages a second (each
//! batch waits for its turn), to compare the servers' work at the rate another path
//! reached. Their turns are spread evenly over time, as a steady stream of calls
//! arrives: publishers that all sent at once would hand the servers bursts, which cost
//! them far less per message than the same rate arriving steadily.
//!
//! With `--spread`, the publisher opens one connection per URL and shares the publishers
//! among them, as three logging instances on three servers do: most messages then reach
//! the stream's leader through another server. Without it, one connection to one server
//! (the leader or not, by chance) carries everything.
//!
//! With `--into STREAM`, the publishers add to that existing stream (the store's
//! `MESSAGES`, say) on its subjects, and leave it as it is: the servers then index each
//! new subject among all the stream holds, as they do for the store's appends. Without
//! it, they publish to a stream of their own, created empty and deleted at the end.
//!
//!     bare_publish NATS_URLS IN_FLIGHT SECONDS [--atomic N] [--rate R] [--spread]
//!                  [--into STREAM]

use std::time::{Duration, Instant};

use async_nats::{
    jetstream::{self, message::PublishMessage, stream},
    HeaderMap,
};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Comma-separated `nats://host:port` URLs of the cluster.
    urls: String,
    /// Publishers at once, each waiting for its ack.
    in_flight: usize,
    /// How long to publish.
    seconds: f64,
    /// Messages per atomic batch (1: a publish per message).
    #[arg(long, default_value_t = 1)]
    atomic: usize,
    /// Most messages a second, all publishers together (none: as fast as they go).
    #[arg(long)]
    rate: Option<f64>,
    /// One connection per URL, the publishers shared among them.
    #[arg(long)]
    spread: bool,
    /// An existing stream to add to (its first subject's prefix), instead of a new one.
    #[arg(long)]
    into: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let servers: Vec<&str> = args.urls.split(',').collect();
    let client = async_nats::connect(servers.as_slice()).await?;
    let jetstream = jetstream::new(client.clone());
    let mut clients = vec![client.clone()];
    if args.spread {
        clients.clear();
        for server in &servers {
            clients.push(async_nats::connect(*server).await?);
        }
    }
    let name = format!("BARE{}", std::process::id());
    // The subjects' prefix: `<prefix>.<uuid>`.
    let prefix = match &args.into {
        Some(existing) => {
            let mut stream = jetstream.get_stream(existing).await?;
            let subjects = &stream.info().await?.config.subjects;
            let first = subjects
                .first()
                .map(|s| s.trim_end_matches(".>").to_owned());
            first.ok_or_else(|| anyhow::anyhow!("{existing} has no subjects"))?
        }
        None => {
            jetstream
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{}.>", name.to_lowercase())],
                    storage: stream::StorageType::File,
                    num_replicas: servers.len().clamp(1, 3),
                    allow_atomic_publish: args.atomic > 1,
                    ..Default::default()
                })
                .await?;
            name.to_lowercase()
        }
    };
    let begun = Instant::now();
    let until = begun + Duration::from_secs_f64(args.seconds);
    // Each publisher's pause between the starts of its batches, when paced.
    let every = args
        .rate
        .map(|rate| Duration::from_secs_f64((args.atomic.max(1) * args.in_flight) as f64 / rate));
    let mut tasks = Vec::new();
    for publisher in 0..args.in_flight {
        let client = clients[publisher % clients.len()].clone();
        let jetstream = jetstream::new(client.clone());
        let prefix = prefix.clone();
        let size = args.atomic.max(1);
        let in_flight = args.in_flight;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            // Publishers take their turns in order, spread over the pause, not all at once.
            let mut turn = begun + every.unwrap_or_default() * publisher as u32 / in_flight as u32;
            while Instant::now() < until {
                if let Some(every) = every {
                    tokio::time::sleep_until(turn.into()).await;
                    turn += every;
                }
                let started = Instant::now();
                let batch = format!("{:016x}", rand::random::<u64>());
                for i in 1..=size {
                    let subject = format!("{prefix}.{}", uuid::Uuid::new_v4());
                    let payload = "hello from wrk".into();
                    n += 1;
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
                    if size > 1 {
                        headers.insert("Nats-Batch-Id", batch.as_str());
                        headers.insert("Nats-Batch-Sequence", i.to_string().as_str());
                    }
                    if i < size {
                        client
                            .publish_with_headers(subject, headers, payload)
                            .await?;
                        continue;
                    }
                    let mut last = PublishMessage::build().payload(payload);
                    for (name, values) in headers.iter() {
                        for value in values {
                            last = last.header(name.clone(), value.clone());
                        }
                    }
                    if size > 1 {
                        last = last.header("Nats-Batch-Commit", "1");
                    }
                    jetstream.send_publish(subject, last).await?.await?;
                }
                latencies.push(started.elapsed());
            }
            anyhow::Ok((n, latencies))
        }));
    }
    let (mut messages, mut all) = (0, Vec::new());
    for task in tasks {
        let (n, latencies) = task.await??;
        messages += n;
        all.extend(latencies);
    }
    if args.into.is_none() {
        jetstream.delete_stream(&name).await?;
    }
    all.sort();
    let ms = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "{:.0} {:.2} {:.2}",
        messages as f64 / args.seconds,
        ms(0.5),
        ms(0.99)
    );
    Ok(())
}
