//! Seeds the NATS store directly, through its own code, for the growth benchmark
//! (`bench/growth`):
//!
//!     seed NATS_URLS FROM TO [TEXT_BYTES]
//!
//! writes messages FROM..TO (ids `seed-N`, texts of TEXT_BYTES, default 64) into the
//! `MESSAGES` stream as the store does (atomic batches, and what it stored in blocks), then
//! prints `seeded=N seconds=S rate=R stored=M last=L blocks=B`, M and L read back from the
//! stream, B the blocks in `MESSAGES_BLOCKS`.

use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Comma-separated `nats://host:port` URLs of the cluster.
    nats_urls: String,
    /// The first message to write (`seed-FROM`).
    from: usize,
    /// One past the last message to write.
    to: usize,
    /// Bytes of each text.
    #[arg(default_value_t = 64)]
    text_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        nats_urls: urls,
        from,
        to,
        text_bytes: bytes,
    } = Args::parse();
    anyhow::ensure!(from <= to, "FROM ({from}) is past TO ({to})");
    let urls = &urls;
    let started = Instant::now();
    let seeded = e2e::seed_nats(urls, "seed", from..to, |i| {
        let text = format!("message {i:09} ");
        let pad = bytes.saturating_sub(text.len());
        text + &"x".repeat(pad)
    })
    .await
    .len();
    let seconds = started.elapsed().as_secs_f64();
    let servers: Vec<&str> = urls.split(',').collect();
    let jetstream = async_nats::jetstream::new(async_nats::connect(servers.as_slice()).await?);
    let mut stream = jetstream.get_stream("MESSAGES").await?;
    let state = stream.info().await?.state.clone();
    let blocks = match jetstream.get_stream("MESSAGES_BLOCKS").await {
        Ok(mut blocks) => blocks.info().await?.state.messages,
        Err(_) => 0,
    };
    println!(
        "seeded={seeded} seconds={seconds:.1} rate={:.0} stored={} last={} blocks={blocks}",
        seeded as f64 / seconds.max(1e-9),
        state.messages,
        state.last_sequence
    );
    Ok(())
}
