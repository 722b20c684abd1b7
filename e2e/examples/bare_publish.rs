//! The bare JetStream publisher the NATS store is measured against (`bench/run`): an
//! async-nats client publishing to a file stream with as many replicas as URLs (R3 on the
//! runner's cluster), a `Nats-Msg-Id` per message, IN_FLIGHT publishers each waiting for
//! its ack, for SECONDS. Prints `rate p50_ms p99_ms`.
//!
//! With `per-id`, each message goes as the NATS store sends it: its own subject
//! (`<stream>.<id>`) and `Nats-Expected-Last-Subject-Sequence: 0` (stored only if the
//! subject holds nothing: exactly once for good), which is JetStream's cost of that
//! guarantee.
//!
//!     bare_publish NATS_URLS IN_FLIGHT SECONDS [per-id]

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4 || (args.len() == 5 && args[4] == "per-id"),
        "usage: bare_publish NATS_URLS IN_FLIGHT SECONDS [per-id]"
    );
    let per_id = args.len() == 5;
    let servers: Vec<&str> = args[1].split(',').collect();
    let in_flight: usize = args[2].parse()?;
    let seconds: f64 = args[3].parse()?;
    let client = async_nats::connect(servers.as_slice()).await?;
    let jetstream = jetstream::new(client);
    let name = format!("BARE{}", std::process::id());
    jetstream
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            storage: stream::StorageType::File,
            num_replicas: servers.len().clamp(1, 3),
            ..Default::default()
        })
        .await?;
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for publisher in 0..in_flight {
        let jetstream = jetstream.clone();
        let subject = format!("{}.{publisher}", name.to_lowercase());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                let started = Instant::now();
                let id = format!("{publisher}-{n}");
                let mut message = PublishMessage::build()
                    .message_id(&id)
                    .payload("hello from the bare publisher".into());
                let subject = if per_id {
                    message = message.expected_last_subject_sequence(0);
                    format!("{subject}-{id}")
                } else {
                    subject.clone()
                };
                jetstream.send_publish(subject, message).await?.await?;
                latencies.push(started.elapsed());
                n += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    jetstream.delete_stream(&name).await?;
    all.sort();
    let ms = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "{:.0} {:.2} {:.2}",
        all.len() as f64 / seconds,
        ms(0.5),
        ms(0.99)
    );
    Ok(())
}
