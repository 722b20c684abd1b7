//! How fast the registry sees an instance die, hang or blip, for both ways of keeping a
//! registration (`--registration session` and `unary`), with the release binaries.
//!
//! Three config-server replicas (default 1 s heartbeat, 3 s TTL) listing each other and a
//! facade watching them. Each round starts a logging instance (memory store), waits until
//! every replica and the facade list it, and then:
//!
//! - kill: `kill -9`, then the time until each replica's Watch stream pushes a list
//!   without it (the registry announces a change after its state has it, so Lookup
//!   answers the same from then on), and until the facade's `facade_watched_instances`
//!   gauge drops (polled every millisecond);
//! - freeze: `SIGSTOP`, then the time until every replica pushes a list without it;
//! - blip (sessions only): a logging instance registered with a replica of its own
//!   through a TCP proxy, which resets its connection; the time until the replica holds
//!   it in a new session and lists it, whether the replica removed it meanwhile, and
//!   whether its watchers saw it leave, with no grace and with a grace of one heartbeat.
//!
//! `cargo run --release -p e2e --example registry_liveness -- --kills 20` (bench/registry
//! does).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::Parser;
use e2e::{free_addr, load::HttpClient, proxy::Proxy, start_replicas, wait_serving, Proc};
use nix::sys::signal::Signal;
use registry_client::RegistryClient;
use tonic::Streaming;

type Snapshots = Streaming<proto::registry::v1::LookupResponse>;

#[derive(Parser)]
struct Args {
    /// kill -9 rounds per registration mode.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// SIGSTOP rounds per registration mode.
    #[arg(long, default_value_t = 3)]
    freezes: usize,
    /// Connection resets per grace.
    #[arg(long, default_value_t = 20)]
    blips: usize,
}

fn release(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name)
}

fn spawn(name: &str, binary: &str, args: &[&str]) -> Proc {
    Proc::spawn(name, &release(binary), args)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// p50 / p99 / max of `times`, in ms.
fn spread(times: &mut [Duration]) -> String {
    times.sort();
    format!(
        "{} / {} / {}",
        ms(percentile(times, 0.5)),
        ms(percentile(times, 0.99)),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    )
}

async fn watch(replica: SocketAddr) -> anyhow::Result<Snapshots> {
    let client = RegistryClient::new(&replica.to_string())?;
    Ok(client.watch("logging").await?)
}

/// Reads `stream` until a snapshot lists `address` (`present`) or does not.
async fn until(stream: &mut Snapshots, address: &str, present: bool) -> anyhow::Result<()> {
    loop {
        let snapshot = stream
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("watch ended"))?;
        if snapshot.instances.iter().any(|i| i.address == address) == present {
            return Ok(());
        }
    }
}

/// The facade's `facade_watched_instances{service="logging"}`.
async fn facade_view(client: &mut HttpClient) -> anyhow::Result<u64> {
    let (_, _, body) = client.request("GET", "/metrics", &[], b"").await?;
    let body = String::from_utf8_lossy(&body);
    Ok(body
        .lines()
        .find(|line| line.starts_with("facade_watched_instances{service=\"logging\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |value| value as u64))
}

struct Cluster {
    replicas: Vec<(SocketAddr, Proc)>,
    facade: SocketAddr,
    _facade: Proc,
}

impl Cluster {
    async fn start(grace: &str) -> anyhow::Result<Self> {
        let replicas =
            start_replicas(&release("config-server"), 3, &["--session-grace", grace]).await;
        let addrs: Vec<SocketAddr> = replicas.iter().map(|(addr, _)| *addr).collect();
        let facade = free_addr();
        let facade_proc = spawn(
            "facade",
            "facade",
            &[
                "--addr",
                &facade.to_string(),
                "--registry",
                &Self::urls(&addrs),
            ],
        );
        wait_serving(facade).await;
        Ok(Self {
            replicas,
            facade,
            _facade: facade_proc,
        })
    }

    fn urls(addrs: &[SocketAddr]) -> String {
        addrs
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|(addr, _)| *addr).collect()
    }

    /// A logging instance registered with every replica (and the facade seeing it),
    /// with a watch stream on each replica that has seen it listed.
    async fn logging(&self, mode: &str) -> anyhow::Result<(Proc, String, Vec<Snapshots>)> {
        let addr = free_addr();
        let port = addr.port().to_string();
        let proc = spawn(
            &format!("logging-{port}"),
            "logging",
            &[
                &port,
                "--registry",
                &Self::urls(&self.addrs()),
                "--registration",
                mode,
            ],
        );
        let address = addr.to_string();
        let mut streams = Vec::new();
        for replica in self.addrs() {
            let mut stream = watch(replica).await?;
            until(&mut stream, &address, true).await?;
            streams.push(stream);
        }
        let mut metrics = HttpClient::new(self.facade);
        while facade_view(&mut metrics).await? == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((proc, address, streams))
    }
}

/// Waits a random part of a heartbeat interval, so a fault falls anywhere between two
/// heartbeats, as it would in life (right after registering, a lease is at its longest).
async fn somewhere_in_a_heartbeat() {
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..1000))).await;
}

/// kill -9 rounds: (gone on every replica, gone from the facade's view).
async fn kills(
    cluster: &Cluster,
    mode: &str,
    rounds: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut replicas = Vec::new();
    let mut facade = Vec::new();
    let mut metrics = HttpClient::new(cluster.facade);
    for _ in 0..rounds {
        let (proc, address, streams) = cluster.logging(mode).await?;
        somewhere_in_a_heartbeat().await;
        let killed = Instant::now();
        proc.signal(Signal::SIGKILL);
        let gone = streams.into_iter().map(|mut stream| {
            let address = address.clone();
            tokio::spawn(async move {
                until(&mut stream, &address, false).await?;
                anyhow::Ok(killed.elapsed())
            })
        });
        let seen = async {
            while facade_view(&mut metrics).await? != 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            anyhow::Ok(killed.elapsed())
        };
        let (all, in_facade) = tokio::join!(futures_util::future::join_all(gone), seen);
        let mut slowest = Duration::ZERO;
        for one in all {
            slowest = slowest.max(one??);
        }
        replicas.push(slowest);
        facade.push(in_facade?);
    }
    Ok((replicas, facade))
}

/// SIGSTOP rounds: the time until every replica has evicted the frozen instance.
async fn freezes(cluster: &Cluster, mode: &str, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let (proc, address, streams) = cluster.logging(mode).await?;
        somewhere_in_a_heartbeat().await;
        let stopped = Instant::now();
        proc.signal(Signal::SIGSTOP);
        let mut slowest = Duration::ZERO;
        for mut stream in streams {
            until(&mut stream, &address, false).await?;
            slowest = slowest.max(stopped.elapsed());
        }
        times.push(slowest);
        proc.signal(Signal::SIGCONT);
    }
    Ok(times)
}

/// A counter from the Prometheus page `client` reads (0 until it first counts).
async fn counter(client: &mut HttpClient, name: &str) -> anyhow::Result<f64> {
    let (_, _, body) = client.request("GET", "/metrics", &[], b"").await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0))
}

/// What the blip rounds saw.
struct Blips {
    /// From the reset until the replica held the instance in a new session.
    back: Vec<Duration>,
    /// Rounds in which the replica removed the instance meanwhile.
    removed: usize,
    /// Rounds in which a watcher of the replica was sent a list without it.
    seen_leaving: usize,
}

/// Connection resets of a living instance registered with one replica through a proxy.
async fn blips(grace: &str, rounds: usize) -> anyhow::Result<Blips> {
    let replica = free_addr();
    let _server = spawn(
        "config-server-blip",
        "config-server",
        &["--addr", &replica.to_string(), "--session-grace", grace],
    );
    wait_serving(replica).await;
    let proxy = Proxy::start(replica).await;
    let addr = free_addr();
    let port = addr.port().to_string();
    let _instance = spawn(
        "logging-blip",
        "logging",
        &[&port, "--registry", &format!("http://{}", proxy.addr())],
    );
    let address = addr.to_string();
    let mut stream = watch(replica).await?;
    until(&mut stream, &address, true).await?;
    let client = RegistryClient::new(&replica.to_string())?;
    let mut metrics = HttpClient::new(replica);
    let mut blips = Blips {
        back: Vec::new(),
        removed: 0,
        seen_leaving: 0,
    };
    for _ in 0..rounds {
        let registrations = counter(&mut metrics, "registry_registrations_total").await?;
        let lost = counter(&mut metrics, "registry_connections_lost_total").await?;
        let reset = Instant::now();
        proxy.reset_all();
        // Back: registered in a new session, and listed.
        loop {
            let again =
                counter(&mut metrics, "registry_registrations_total").await? > registrations;
            let listed = client
                .lookup("logging")
                .await?
                .instances
                .iter()
                .any(|i| i.address == address);
            if again && listed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        blips.back.push(reset.elapsed());
        // Whatever watchers were sent for this blip has come by now (pushes take well
        // under a millisecond here); a short wait, since "nothing" has no event.
        let mut left = false;
        while let Ok(pushed) =
            tokio::time::timeout(Duration::from_millis(100), stream.message()).await
        {
            let snapshot = pushed?.ok_or_else(|| anyhow::anyhow!("watch ended"))?;
            left |= !snapshot.instances.iter().any(|i| i.address == address);
        }
        blips.seen_leaving += usize::from(left);
        blips.removed +=
            usize::from(counter(&mut metrics, "registry_connections_lost_total").await? > lost);
    }
    Ok(blips)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        release("config-server").exists(),
        "build first: cargo build --release"
    );
    println!(
        "Registry liveness: 3 replicas (1 s heartbeat, 3 s TTL) and a facade watching them, {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "Times from the signal, p50 / p99 / max ms; kill -9 over {} rounds, SIGSTOP over {}.",
        args.kills, args.freezes
    );
    println!();
    println!("| registration | kill -9 -> gone on every replica | kill -9 -> gone from the facade's view | SIGSTOP -> evicted on every replica |");
    println!("|---|---|---|---|");
    for (mode, grace) in [("session", "0s"), ("unary", "0s"), ("session", "1s")] {
        let cluster = Cluster::start(grace).await?;
        let (mut replicas, mut facade) = kills(&cluster, mode, args.kills).await?;
        let mut frozen = freezes(&cluster, mode, args.freezes).await?;
        let name = match (mode, grace) {
            ("session", "0s") => "session (no grace, the default)".to_owned(),
            (mode, "0s") => mode.to_owned(),
            (mode, grace) => format!("{mode}, --session-grace {grace}"),
        };
        println!(
            "| {name} | {} | {} | {} |",
            spread(&mut replicas),
            spread(&mut facade),
            spread(&mut frozen)
        );
    }
    println!();
    println!(
        "A living instance's connection reset (through a TCP proxy), {} rounds per grace: the time until the \
         replica holds it in a new session and lists it, p50 / p99 / max ms; in how many rounds the replica \
         removed it meanwhile, and a watcher was sent a list without it.",
        args.blips
    );
    println!();
    println!("| --session-grace | reset -> listed again in a new session | rounds removed | rounds a watcher saw it leave |");
    println!("|---|---|---|---|");
    for grace in ["0s", "1s"] {
        let mut blips = blips(grace, args.blips).await?;
        println!(
            "| {grace} | {} | {} of {} | {} of {} |",
            spread(&mut blips.back),
            blips.removed,
            args.blips,
            blips.seen_leaving,
            args.blips
        );
    }
    Ok(())
}
