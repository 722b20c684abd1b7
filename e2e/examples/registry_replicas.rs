//! Registry replicas: what a replica costs and how fast clients move off a dead one.
//!
//! 1. N simulated instances heartbeating at 1 Hz, first against one config server alone,
//!    then against three replicas (each instance registers and heartbeats with all
//!    three, as `Registration` does): CPU and RSS of each server, in the same run.
//! 2. Failover, repeated: with a client using the facade's lookup deadline (300 ms), the
//!    time from kill -9 (or SIGSTOP) of the replica it asks first to its next successful
//!    lookup through another; and for a Watch, from SIGSTOP of its replica to the next
//!    snapshot from another (the HTTP/2 pings notice the frozen one).
//!
//! `cargo run --release -p e2e --example registry_replicas -- 3000,10000 5` (bench/run
//! does): the sizes to load, then the failover runs.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use e2e::{
    procfs::{cpu_seconds, rss_mib},
    Proc,
};
use nix::sys::signal::Signal;
use proto::registry::v1::{
    registry_client::RegistryClient as RawClient, DeregisterRequest, HeartbeatRequest,
    RegisterRequest,
};
use registry_client::RegistryClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Channels to each server the simulated instances share.
const CHANNELS: usize = 8;
const MEASURE: Duration = Duration::from_secs(8);

/// `count` release config servers listing each other as replicas.
async fn start_replicas(count: usize) -> anyhow::Result<Vec<(SocketAddr, Proc, Vec<String>)>> {
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/config-server");
    anyhow::ensure!(binary.exists(), "build first: cargo build --release");
    let addrs: Vec<SocketAddr> = (0..count).map(|_| e2e::free_addr()).collect();
    let listed = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut servers = Vec::new();
    for addr in &addrs {
        let mut args: Vec<String> = [
            "--addr",
            &addr.to_string(),
            "--max-instances-per-service",
            "100000",
            "--max-instances",
            "100000",
            // Every session comes from this one address.
            "--max-sessions-per-peer",
            "100000",
            "--max-sessions",
            "100000",
        ]
        .map(str::to_owned)
        .to_vec();
        if count > 1 {
            args.extend(["--replica".to_owned(), listed.clone()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.push((*addr, Proc::spawn("config-server", &binary, &argv), args));
    }
    for addr in &addrs {
        e2e::wait_serving(*addr).await;
    }
    Ok(servers)
}

/// One server under load: CPU share of one core, RSS MiB, heartbeats answered a second.
struct Figures {
    cpu: f64,
    rss: f64,
    rate: f64,
}

/// [`Figures`] of each of `replicas` servers under `instances` simulated instances, each
/// heartbeating every server once a second.
async fn load(instances: usize, replicas: usize) -> anyhow::Result<Vec<Figures>> {
    let servers = start_replicas(replicas).await?;
    let channels: Vec<Vec<Channel>> = servers
        .iter()
        .map(|(addr, _, _)| {
            (0..CHANNELS)
                .map(|_| rpc::channel(&addr.to_string()))
                .collect::<Result<_, _>>()
        })
        .collect::<Result<_, _>>()?;
    let stop = CancellationToken::new();
    let registered = Arc::new(AtomicUsize::new(0));
    let answered: Arc<Vec<AtomicUsize>> =
        Arc::new((0..replicas).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for i in 0..instances {
        let clients: Vec<RawClient<Channel>> = channels
            .iter()
            .map(|per_server| RawClient::new(per_server[i % CHANNELS].clone()))
            .collect();
        let (stop, registered) = (stop.clone(), Arc::clone(&registered));
        let answered = Arc::clone(&answered);
        tasks.push(tokio::spawn(async move {
            let id = format!("sim-{i}");
            for mut client in clients.clone() {
                let request = RegisterRequest {
                    service: format!("sim-{}", i % 10),
                    address: format!("10.{}.{}.{}:{}", (i >> 16) & 255, (i >> 8) & 255, i & 255, 1000 + i % 50000),
                    metadata: HashMap::new(),
                    instance_id: id.clone(),
                };
                if client.register(request).await.is_err() {
                    return;
                }
            }
            registered.fetch_add(1, Ordering::Relaxed);
            // Spread the heartbeats over the second, as independent processes would be.
            tokio::time::sleep(Duration::from_millis((i * 7919 % 1000) as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let beats = clients.iter().enumerate().map(|(server, client)| {
                            let mut client = client.clone();
                            let instance_id = id.clone();
                            let answered = Arc::clone(&answered);
                            async move {
                                if client.heartbeat(HeartbeatRequest { instance_id }).await.is_ok() {
                                    answered[server].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                        futures_util::future::join_all(beats).await;
                    }
                }
            }
            for mut client in clients {
                let _ = client
                    .deregister(DeregisterRequest {
                        instance_id: id.clone(),
                    })
                    .await;
            }
        }));
    }
    while registered.load(Ordering::Relaxed) < instances {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // the steady pace
    let pids: Vec<u32> = servers
        .iter()
        .map(|(_, proc, _)| proc.pid().as_raw() as u32)
        .collect();
    let before: Vec<(f64, usize)> = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| (cpu_seconds(pid), answered[i].load(Ordering::Relaxed)))
        .collect();
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let elapsed = started.elapsed().as_secs_f64();
    let figures = pids
        .iter()
        .enumerate()
        .zip(before)
        .map(|((i, &pid), (cpu, beats))| Figures {
            cpu: (cpu_seconds(pid) - cpu) / elapsed,
            rss: rss_mib(pid),
            rate: (answered[i].load(Ordering::Relaxed) - beats) as f64 / elapsed,
        })
        .collect();
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    Ok(figures)
}

/// Time from a fault of the replica a client asks first to its next good lookup.
async fn lookup_failover(signal: Signal) -> anyhow::Result<Duration> {
    let mut servers = start_replicas(3).await?;
    let urls = servers
        .iter()
        .map(|(addr, _, _)| format!("http://{addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let client = RegistryClient::new(&urls)?.with_deadline(Duration::from_millis(300));
    client.lookup("logging").await?; // warm: the first replica answers
    let faulted = Instant::now();
    match signal {
        Signal::SIGKILL => servers[0].1.kill9().await,
        other => servers[0].1.signal(other),
    }
    let mut took = None;
    while faulted.elapsed() < Duration::from_secs(30) {
        if client.lookup("logging").await.is_ok() {
            took = Some(faulted.elapsed());
            break;
        }
    }
    if signal == Signal::SIGSTOP {
        servers[0].1.signal(Signal::SIGCONT);
    }
    took.ok_or_else(|| anyhow::anyhow!("no lookup succeeded within 30 s"))
}

/// Time from SIGSTOP of a Watch's replica to the next snapshot from another.
async fn watch_failover() -> anyhow::Result<Duration> {
    let servers = start_replicas(3).await?;
    let urls = servers
        .iter()
        .map(|(addr, _, _)| format!("http://{addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let client = RegistryClient::new(&urls)?;
    let mut stream = client.watch("logging").await?;
    stream.message().await?; // the first snapshot, from the first replica
    let frozen = Instant::now();
    servers[0].1.signal(Signal::SIGSTOP);
    let ended = stream.message().await;
    anyhow::ensure!(
        !matches!(ended, Ok(Some(_))),
        "a frozen replica sent a snapshot"
    );
    let mut stream = client.watch("logging").await?;
    stream.message().await?;
    let took = frozen.elapsed();
    servers[0].1.signal(Signal::SIGCONT);
    Ok(took)
}

fn spread(mut runs: Vec<Duration>) -> String {
    runs.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.0} / {:.0} / {:.0}",
        ms(&runs[0]),
        ms(&runs[runs.len() / 2]),
        ms(runs.last().expect("runs"))
    )
}

#[derive(Parser)]
struct Args {
    /// Comma-separated numbers of simulated instances, one load run each.
    #[arg(value_parser = sizes, default_value = "10000")]
    sizes: Sizes,
    /// Failover runs of each kind.
    #[arg(default_value_t = 5)]
    runs: usize,
}

/// The sizes to load (an alias, so that clap takes them as one argument, not several).
type Sizes = Vec<usize>;

fn sizes(text: &str) -> Result<Sizes, std::num::ParseIntError> {
    text.split(',').map(str::parse).collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { sizes, runs } = Args::parse();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    println!("Registry replicas: simulated instances heartbeating each server at 1 Hz (the load generator shares the {cores}-core machine, so read the heartbeats each server answered, and CPU per heartbeat):");
    println!();
    println!("| instances | servers | heartbeats answered a second, each | CPU of one core, each | CPU per 10k heartbeats/s, each | RSS MiB, each | CPU per heartbeat vs one server alone |");
    println!("|---|---|---|---|---|---|---|");
    for instances in sizes {
        let alone = load(instances, 1).await?;
        let per_call = |f: &Figures| f.cpu / f.rate.max(1.0);
        let alone_per_call = per_call(&alone[0]);
        for (count, figures) in [(1, alone), (3, load(instances, 3).await?)] {
            let each = |text: &dyn Fn(&Figures) -> String| {
                figures.iter().map(text).collect::<Vec<_>>().join(", ")
            };
            let mean = figures.iter().map(per_call).sum::<f64>() / figures.len() as f64;
            println!(
                "| {instances} | {count} | {} | {} | {} | {} | {:.2}x |",
                each(&|f| format!("{:.0}", f.rate)),
                each(&|f| format!("{:.1}%", f.cpu * 100.0)),
                each(&|f| format!("{:.1}%", per_call(f) * 10_000.0 * 100.0)),
                each(&|f| format!("{:.1}", f.rss)),
                mean / alone_per_call
            );
        }
    }
    println!();
    println!("Failover over {runs} runs (min / median / max ms), three replicas, the client asking the faulted one first:");
    println!();
    println!("| fault | what | min / median / max ms |");
    println!("|---|---|---|");
    let mut killed = Vec::new();
    let mut stopped = Vec::new();
    let mut watched = Vec::new();
    for _ in 0..runs {
        killed.push(lookup_failover(Signal::SIGKILL).await?);
        stopped.push(lookup_failover(Signal::SIGSTOP).await?);
        watched.push(watch_failover().await?);
    }
    println!(
        "| kill -9 | next good lookup (300 ms deadline, as the facade) | {} |",
        spread(killed)
    );
    println!(
        "| SIGSTOP | next good lookup (300 ms deadline, as the facade) | {} |",
        spread(stopped)
    );
    println!(
        "| SIGSTOP | Watch ended and reopened on another replica | {} |",
        spread(watched)
    );
    Ok(())
}
