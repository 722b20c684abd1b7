//! Registry at scale: N simulated instances heartbeating at 1 Hz against one config
//! server (the release binary), then the server's CPU share and memory, Lookup latency
//! under that load, and how long a change takes to reach a watcher. Each size runs
//! twice: instances holding Session streams (a hundred streams a connection, pinged
//! every second as the registry client pings a session's connection), and instances
//! making unary Register and Heartbeat calls (over eight connections).
//!
//! `cargo run --release -p e2e --example registry_scale -- 1000 10000` (bench/registry
//! does).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use clap::Parser;
use e2e::procfs::{cpu_seconds, rss_mib};
use proto::registry::v1::{
    registry_client::RegistryClient, session_request, DeregisterRequest, HeartbeatRequest,
    LookupRequest, RegisterRequest, SessionDeregister, SessionHeartbeat, SessionRequest,
    WatchRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Connections the unary instances share (HTTP/2 multiplexes their calls).
const UNARY_CHANNELS: usize = 8;
const MEASURE: Duration = Duration::from_secs(5);

#[derive(Parser)]
struct Args {
    /// How many instances, one row each [default: 1000 10000].
    sizes: Vec<usize>,
    /// Which registrations to simulate.
    #[arg(long, value_enum, default_value = "both")]
    kept_by: Which,
    /// Session streams per connection (the server allows 200 at once on one); 1 is how
    /// real instances connect, each pinging its connection every second.
    #[arg(long, default_value_t = 100)]
    sessions_per_connection: usize,
    /// The config-server binary to measure (another build, to compare).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/config-server"))]
    server: std::path::PathBuf,
    /// Everything over TLS with client certificates, from a folder made by
    /// `runner certs --host bench=127.0.0.1 --services config-server --client
    /// sim-0@bench ... --client sim-9@bench --client probe@bench`: the server's, and one
    /// for each simulated service (a certificate registers only its own service).
    #[arg(long, value_name = "DIR")]
    tls: Option<std::path::PathBuf>,
}

/// How the simulated instances of `service` (and the server) speak: plaintext, or TLS
/// with `service`'s client certificate from `--tls`.
fn transport(args: &Args, service: &str) -> anyhow::Result<rpc::Transport> {
    let Some(dir) = &args.tls else {
        return Ok(rpc::Transport::plaintext());
    };
    let client = dir.join("clients").join(format!("{service}-at-bench"));
    Ok(rpc::Tls::load(
        &client.with_extension("pem"),
        &client.with_extension("key"),
        &dir.join("ca.pem"),
    )?
    .transport())
}

/// The config server's TLS flags under `--tls`.
fn server_tls(args: &Args) -> Vec<String> {
    let Some(dir) = &args.tls else {
        return Vec::new();
    };
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        "--tls-cert".into(),
        file("bench/config-server.pem"),
        "--tls-key".into(),
        file("bench/config-server.key"),
        "--tls-ca".into(),
        file("ca.pem"),
    ]
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Which {
    Both,
    Session,
    Unary,
}

#[derive(Clone, Copy, PartialEq)]
enum KeptBy {
    Session,
    Unary,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn run(instances: usize, kept_by: KeptBy, args: &Args) -> anyhow::Result<String> {
    let binary = args.server.as_path();
    let addr = e2e::free_addr();
    anyhow::ensure!(binary.exists(), "build first: cargo build --release");
    let mut flags = vec![
        "--addr".to_owned(),
        addr.to_string(),
        "--max-instances-per-service".into(),
        "100000".into(),
        "--max-instances".into(),
        "100000".into(),
    ];
    // Every session comes from this one address: lift the per-peer limits (a build
    // without them does not know the flags).
    let help = std::process::Command::new(binary).arg("--help").output()?;
    if String::from_utf8_lossy(&help.stdout).contains("--max-sessions-per-peer") {
        flags.extend(
            [
                "--max-sessions-per-peer",
                "100000",
                "--max-sessions",
                "100000",
            ]
            .map(String::from),
        );
    }
    flags.extend(server_tls(args));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = e2e::Proc::spawn("config-server", binary, &flags);
    let server_pid = server.pid().as_raw() as u32;
    let probe = transport(args, "probe")?;
    e2e::wait_serving_over(&probe, addr).await;
    let rss_idle = rss_mib(server_pid);

    let connections = match kept_by {
        KeptBy::Session => instances.div_ceil(args.sessions_per_connection.max(1)),
        KeptBy::Unary => UNARY_CHANNELS,
    };
    // Instance i is of service sim-(i % 10) and uses connection i % connections: with a
    // multiple of ten connections, each connection carries one service, and so one
    // certificate.
    anyhow::ensure!(
        args.tls.is_none() || connections % 10 == 0,
        "with --tls, the connections ({connections}) must be a multiple of 10"
    );
    // Sessions ping their connections as the registry client's do.
    let channels: Vec<Channel> = (0..connections)
        .map(|c| {
            let endpoint =
                transport(args, &format!("sim-{}", c % 10))?.endpoint(&addr.to_string())?;
            Ok(match kept_by {
                KeptBy::Session => endpoint
                    .http2_keep_alive_interval(registry_client::SESSION_KEEPALIVE)
                    .keep_alive_timeout(registry_client::SESSION_KEEPALIVE)
                    .connect_lazy(),
                KeptBy::Unary => endpoint.connect_lazy(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let registered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..instances {
        let client = RegistryClient::new(channels[i % connections].clone());
        let request = RegisterRequest {
            service: format!("sim-{}", i % 10),
            address: format!(
                "10.{}.{}.{}:{}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255,
                1000 + i % 50000
            ),
            metadata: HashMap::new(),
            instance_id: String::new(),
        };
        // Spread the heartbeats over the second, as independent processes would be.
        let offset = Duration::from_millis((i * 7919 % 1000) as u64);
        let simulated = Simulated {
            client,
            stop: stop.clone(),
            registered: registered.clone(),
        };
        tasks.push(tokio::spawn(async move {
            match kept_by {
                KeptBy::Session => simulated.session(request, offset).await,
                KeptBy::Unary => simulated.unary(request, offset).await,
            }
        }));
    }
    while registered.load(std::sync::atomic::Ordering::Relaxed) < instances {
        if let Some(failed) = tasks.iter().position(tokio::task::JoinHandle::is_finished) {
            let error = match tasks.swap_remove(failed).await {
                Ok(Err(error)) => error,
                Ok(Ok(())) => anyhow::anyhow!("stopped before registering"),
                Err(panicked) => panicked.into(),
            };
            anyhow::bail!("a simulated instance failed: {error:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the heartbeats reach their steady pace, then measure what keeping the
    // instances costs: the server's CPU while they heartbeat and nothing else happens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_seconds(server_pid);
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let cpu = (cpu_seconds(server_pid) - before) / started.elapsed().as_secs_f64();
    let rss = rss_mib(server_pid);

    // Lookup latency under that load: a small service and one with instances/10 entries.
    let started = Instant::now();
    let mut client = RegistryClient::new(probe.channel(&addr.to_string())?);
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
        "| {instances} | {} | {:.1}% | {rss_idle:.1} -> {rss:.1} | {} / {} | {} / {} | {} / {} |",
        match kept_by {
            KeptBy::Session => format!(
                "sessions ({connections} connections){}",
                if args.tls.is_some() { ", TLS" } else { "" }
            ),
            KeptBy::Unary => format!(
                "unary calls ({connections} connections){}",
                if args.tls.is_some() { ", TLS" } else { "" }
            ),
        },
        cpu * 100.0,
        ms(percentile(&small, 0.5)),
        ms(percentile(&small, 0.99)),
        ms(percentile(&big, 0.5)),
        ms(percentile(&big, 0.99)),
        ms(percentile(&pushes, 0.5)),
        ms(*pushes.last().unwrap_or(&Duration::ZERO)),
    ))
}

/// Waits `offset`, then runs `beat` once a second until `stop`; the first error ends it.
async fn every_second<F, Fut>(
    stop: &CancellationToken,
    offset: Duration,
    mut beat: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => beat().await?,
        }
    }
}

/// One simulated instance.
struct Simulated {
    client: RegistryClient<Channel>,
    stop: CancellationToken,
    registered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Simulated {
    fn counted(&self) {
        self.registered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Registers, heartbeats every second with a unary call each, deregisters on stop.
    async fn unary(mut self, request: RegisterRequest, offset: Duration) -> anyhow::Result<()> {
        let id = self
            .client
            .register(request)
            .await?
            .into_inner()
            .instance_id;
        self.counted();
        let client = self.client.clone();
        every_second(&self.stop, offset, || {
            let (mut client, instance_id) = (client.clone(), id.clone());
            async move {
                let _ = client.heartbeat(HeartbeatRequest { instance_id }).await;
                Ok(())
            }
        })
        .await?;
        self.client
            .deregister(DeregisterRequest { instance_id: id })
            .await?;
        Ok(())
    }

    /// Opens a session, registers on it, heartbeats on it every second, and deregisters
    /// on it on stop.
    async fn session(mut self, request: RegisterRequest, offset: Duration) -> anyhow::Result<()> {
        let message = |kind| SessionRequest { kind: Some(kind) };
        let (requests, outbound) = mpsc::channel(4);
        requests
            .send(message(session_request::Kind::Register(request)))
            .await?;
        let mut replies = self
            .client
            .session(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        replies.message().await?;
        self.counted();
        every_second(&self.stop, offset, || {
            let heartbeat = message(session_request::Kind::Heartbeat(SessionHeartbeat {}));
            let requests = &requests;
            async move { Ok(requests.send(heartbeat).await?) }
        })
        .await?;
        requests
            .send(message(session_request::Kind::Deregister(
                SessionDeregister {},
            )))
            .await?;
        while replies.message().await?.is_some() {}
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = if args.sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        args.sizes.clone()
    };
    println!("Registry at scale: simulated instances heartbeating at 1 Hz, in 10 services, in sessions or");
    println!(
        "with unary calls; the load generator shares the machine ({} cores).",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| instances | kept by | server CPU, heartbeats alone (of one core) | server RSS MiB (idle -> loaded) | Lookup, empty service p50 / p99 ms | Lookup, instances/10 entries p50 / p99 ms | change -> watcher p50 / max ms |");
    println!("|---|---|---|---|---|---|---|");
    for size in sizes {
        for kept_by in [KeptBy::Session, KeptBy::Unary] {
            let wanted = match kept_by {
                KeptBy::Session => args.kept_by != Which::Unary,
                KeptBy::Unary => args.kept_by != Which::Session,
            };
            if wanted {
                println!("{}", run(size, kept_by, &args).await?);
            }
        }
    }
    Ok(())
}
