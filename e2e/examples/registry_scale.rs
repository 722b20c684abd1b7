//! Registry at scale: N simulated instances heartbeating at 1 Hz against one config
//! server (the release binary), then the server's CPU share and memory, Lookup latency
//! under that load, and how long a change takes to reach a watcher.
//!
//! `cargo run --release -p e2e --example registry_scale -- 1000 10000` (bench/run does).

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use e2e::procfs::{cpu_seconds, rss_mib};
use proto::registry::v1::{
    registry_client::RegistryClient, DeregisterRequest, HeartbeatRequest, LookupRequest,
    RegisterRequest, WatchRequest,
};
use tonic::transport::Channel;

/// Channels the simulated instances share (HTTP/2 multiplexes their calls).
const CHANNELS: usize = 8;
const MEASURE: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn run(instances: usize) -> anyhow::Result<String> {
    let addr = e2e::free_addr();
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/config-server");
    anyhow::ensure!(binary.exists(), "build first: cargo build --release");
    let server = e2e::Proc::spawn(
        "config-server",
        &binary,
        &[
            "--addr",
            &addr.to_string(),
            "--max-instances-per-service",
            "100000",
            "--max-instances",
            "100000",
        ],
    );
    let server_pid = server.pid().as_raw() as u32;
    e2e::wait_serving(addr).await;
    let rss_idle = rss_mib(server_pid);

    let channels: Vec<Channel> = (0..CHANNELS)
        .map(|_| rpc::channel(&addr.to_string()))
        .collect::<Result<_, _>>()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let registered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..instances {
        let mut client = RegistryClient::new(channels[i % CHANNELS].clone());
        let stop = stop.clone();
        let registered = registered.clone();
        tasks.push(tokio::spawn(async move {
            let request = RegisterRequest {
                service: format!("sim-{}", i % 10),
                address: format!("10.{}.{}.{}:{}", (i >> 16) & 255, (i >> 8) & 255, i & 255, 1000 + i % 50000),
                metadata: HashMap::new(),
                instance_id: String::new(),
            };
            let Ok(reply) = client.register(request).await else { return };
            registered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = reply.into_inner().instance_id;
            // Spread the heartbeats over the second, as independent processes would be.
            tokio::time::sleep(Duration::from_millis((i * 7919 % 1000) as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let _ = client.heartbeat(HeartbeatRequest { instance_id: id.clone() }).await;
                    }
                }
            }
            let _ = client.deregister(DeregisterRequest { instance_id: id }).await;
        }));
    }
    while registered.load(std::sync::atomic::Ordering::Relaxed) < instances {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the heartbeats reach their steady pace, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_seconds(server_pid);
    let started = Instant::now();

    // Lookup latency under load: a small service and one with instances/10 entries.
    let mut client = RegistryClient::new(rpc::channel(&addr.to_string())?);
    let mut small = Vec::new();
    let mut big = Vec::new();
    while started.elapsed() < MEASURE {
        let t = Instant::now();
        client
            .lookup(LookupRequest {
                service: "absent".into(),
            })
            .await?;
        small.push(t.elapsed());
        let t = Instant::now();
        client
            .lookup(LookupRequest {
                service: "sim-3".into(),
            })
            .await?;
        big.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = (cpu_seconds(server_pid) - before) / started.elapsed().as_secs_f64();
    let rss = rss_mib(server_pid);

    // A change reaching a watcher: register and deregister a probe, 20 times each.
    let mut stream = client
        .watch(WatchRequest {
            service: "probe".into(),
        })
        .await?
        .into_inner();
    stream.message().await?;
    let mut pushes = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let id = client
            .register(RegisterRequest {
                service: "probe".into(),
                address: format!("127.0.0.1:{}", 2000 + i),
                metadata: HashMap::new(),
                instance_id: String::new(),
            })
            .await?
            .into_inner()
            .instance_id;
        stream.message().await?;
        pushes.push(t.elapsed());
        let t = Instant::now();
        client
            .deregister(DeregisterRequest { instance_id: id })
            .await?;
        stream.message().await?;
        pushes.push(t.elapsed());
    }
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    drop(server);

    small.sort();
    big.sort();
    pushes.sort();
    Ok(format!(
        "| {instances} | {:.1}% | {rss_idle:.1} -> {rss:.1} | {} / {} | {} / {} | {} / {} |",
        cpu * 100.0,
        ms(percentile(&small, 0.5)),
        ms(percentile(&small, 0.99)),
        ms(percentile(&big, 0.5)),
        ms(percentile(&big, 0.99)),
        ms(percentile(&pushes, 0.5)),
        ms(*pushes.last().unwrap_or(&Duration::ZERO)),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    println!("Registry at scale: simulated instances heartbeating at 1 Hz over {CHANNELS} HTTP/2 connections,");
    println!(
        "in 10 services; the load generator shares the machine ({} cores).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| instances | server CPU (of one core) | server RSS MiB (idle -> loaded) | Lookup, empty service p50 / p99 ms | Lookup, instances/10 entries p50 / p99 ms | change -> watcher p50 / max ms |");
    println!("|---|---|---|---|---|---|");
    for size in sizes {
        println!("{}", run(size).await?);
    }
    Ok(())
}
