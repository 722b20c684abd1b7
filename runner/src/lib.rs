//! The runner: starts the system as child processes, in order, each only once the one
//! before it answers gRPC health `SERVING`; shows their output with coloured prefixes;
//! reports any child that dies; and on Ctrl+C or SIGTERM stops them in reverse order.
//!
//! Binaries are taken from the directory of the runner's own executable, so
//! `target/release/runner` starts `target/release/config-server` and so on.

pub mod children;
pub mod nats;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use config_server::grpc;
use tokio_util::sync::CancellationToken;

use children::{Child, Supervisor};

/// How long a child may take to report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreMode {
    /// nats when `nats-server` is installed, else memory.
    Auto,
    /// Each logging instance keeps its own messages in memory.
    Memory,
    /// A local three-node NATS JetStream cluster (R3): every instance sees every message.
    Nats,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "runner",
    version,
    about = "Starts the system and stops it on Ctrl+C"
)]
pub struct Config {
    /// The message store the logging instances use.
    #[arg(long, value_enum, default_value_t = StoreMode::Auto)]
    pub store: StoreMode,

    /// How the facade finds instances: `watch` or `per-call`.
    #[arg(long, default_value = "watch")]
    pub discovery: String,

    /// Also start this many logging instances, on --logging-port and up.
    #[arg(long, default_value_t = 0)]
    pub logging: u16,

    #[arg(long, default_value_t = 50050)]
    pub registry_port: u16,
    #[arg(long, default_value_t = 50060)]
    pub messages_port: u16,
    #[arg(long, default_value_t = 8080)]
    pub facade_port: u16,
    #[arg(long, default_value_t = 50051)]
    pub logging_port: u16,
    /// First client port of the NATS cluster (three consecutive ports).
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// First cluster (route) port of the NATS cluster (three consecutive ports).
    #[arg(long, default_value_t = 6222)]
    pub nats_cluster_port: u16,

    /// Where the registry token for this run is written (a fresh one every run; removed
    /// on exit). Services started by hand from the same directory find it there.
    #[arg(long, default_value = config_server::auth::DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,

    /// Where the NATS cluster keeps its data; it survives restarts of the runner.
    #[arg(long, default_value = "data/nats")]
    pub data_dir: PathBuf,

    /// Where the service binaries are [default: the runner's own directory].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

struct Started {
    children: Vec<Child>,
}

impl Started {
    async fn stop_all(self) {
        for child in self.children.into_iter().rev() {
            println!("runner: stopping {}", child.name);
            child.stop().await;
        }
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bin_dir = match &config.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the runner's executable has no directory")?
            .to_path_buf(),
    };
    let nats_server = nats::server_path();
    let use_nats = match (config.store, &nats_server) {
        (StoreMode::Memory, _) => false,
        (StoreMode::Nats, Some(_)) => true,
        (StoreMode::Nats, None) => anyhow::bail!(
            "--store nats needs nats-server: run scripts/setup (or apt-get install nats-server)"
        ),
        (StoreMode::Auto, Some(_)) => true,
        (StoreMode::Auto, None) => {
            println!(
                "runner: WARNING: nats-server is not installed, so using the memory store: each \
                 logging instance keeps only the messages it received and instances do not share \
                 them. Run scripts/setup to install nats-server."
            );
            false
        }
    };

    let mut supervisor = Supervisor::new();
    let mut started = Started {
        children: Vec::new(),
    };
    let store = match (use_nats, nats_server) {
        (true, Some(program)) => {
            let client_ports = consecutive(config.nats_port, 3)?;
            let cluster_ports = consecutive(config.nats_cluster_port, 3)?;
            let nodes = nats::cluster(&client_ports, &cluster_ports, &config.data_dir);
            for node in &nodes {
                std::fs::create_dir_all(&node.data_dir)
                    .with_context(|| format!("cannot create {}", node.data_dir.display()))?;
                match supervisor.spawn(&node.name, &program, &node.args(&nodes)) {
                    Ok(child) => started.children.push(child),
                    Err(error) => {
                        started.stop_all().await;
                        return Err(error);
                    }
                }
            }
            let urls = nats::urls(&nodes);
            let ready = tokio::select! {
                ready = nats::wait_ready(&urls, START_TIMEOUT) => ready,
                () = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted during start-up")),
                Some(exit) = supervisor.exits.recv() => Err(anyhow::anyhow!(
                    "{} exited during start-up; its output above says why (a port already in use?)",
                    exit.name
                )),
            };
            if let Err(error) = ready {
                started.stop_all().await;
                return Err(error);
            }
            println!(
                "runner: NATS JetStream cluster ready ({urls}), data in {}",
                config.data_dir.display()
            );
            urls
        }
        _ => {
            println!(
                "runner: store: memory (each logging instance keeps only the messages it received)"
            );
            "memory".to_owned()
        }
    };

    let token_file = TokenFile::write(&config.token_file)?;
    let token_arg = token_file.0.display().to_string();
    let registry = format!("127.0.0.1:{}", config.registry_port);
    let registry_url = format!("http://{registry}");
    let messages = format!("127.0.0.1:{}", config.messages_port);
    let facade = format!("127.0.0.1:{}", config.facade_port);

    let mut plan: Vec<(String, &str, Vec<String>, String)> = vec![
        (
            "config-server".into(),
            "config-server",
            vec![
                "--addr".into(),
                registry.clone(),
                "--static".into(),
                format!("messages={messages}"),
                "--set".into(),
                format!("logging.store={store}"),
                "--token-file".into(),
                token_arg.clone(),
            ],
            registry.clone(),
        ),
        (
            "messages".into(),
            "messages",
            vec!["--addr".into(), messages.clone()],
            messages.clone(),
        ),
        (
            "facade".into(),
            "facade",
            vec![
                "--addr".into(),
                facade.clone(),
                "--registry".into(),
                registry_url.clone(),
                "--discovery".into(),
                config.discovery.clone(),
                "--registry-token-file".into(),
                token_arg.clone(),
            ],
            facade.clone(),
        ),
    ];
    for port in consecutive(config.logging_port, config.logging)? {
        plan.push((
            format!("logging-{port}"),
            "logging",
            vec![
                port.to_string(),
                "--registry".into(),
                registry_url.clone(),
                "--registry-token-file".into(),
                token_arg.clone(),
            ],
            format!("127.0.0.1:{port}"),
        ));
    }

    for (name, binary, args, addr) in plan {
        let program = bin_dir.join(binary);
        let child = match supervisor.spawn(&name, &program, &args) {
            Ok(child) => child,
            Err(error) => {
                started.stop_all().await;
                return Err(error.context("build the binaries first: cargo build --release"));
            }
        };
        started.children.push(child);
        let ready = tokio::select! {
            ready = wait_ready(&name, &addr, &mut supervisor) => ready,
            () = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted during start-up")),
        };
        if let Err(error) = ready {
            started.stop_all().await;
            return Err(error);
        }
        println!("runner: {name} is SERVING on {addr}");
    }

    println!(
        "runner: ready. Try:\n  curl -s -X POST http://{facade}/messages -H 'content-type: application/json' -d '{{\"msg\":\"hello\"}}'\n  curl -s http://{facade}/messages\n  logging PORT (e.g. `target/release/logging 50051`) starts a logging instance\nPress Ctrl+C to stop everything."
    );

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(exit) = supervisor.exits.recv() => {
                let status = match &exit.status {
                    Ok(status) => status.to_string(),
                    Err(error) => error.to_string(),
                };
                println!("runner: !!! {} exited unexpectedly ({status}); the others keep running", exit.name);
                started.children.retain(|child| child.name != exit.name);
            }
        }
    }
    started.stop_all().await;
    drop(token_file);
    println!("runner: all stopped");
    Ok(())
}

/// The registry token of this run, removed when the runner ends, however it ends.
struct TokenFile(PathBuf);

impl TokenFile {
    fn write(path: &std::path::Path) -> anyhow::Result<Self> {
        write_token(path).map(Self)
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a fresh random registry token to `path` (readable by the owner only).
fn write_token(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write the registry token to {}", path.display()))?;
    writeln!(file, "{token}")?;
    println!("runner: registry token for this run in {}", path.display());
    Ok(path.to_path_buf())
}

/// `count` consecutive ports from `first`.
fn consecutive(first: u16, count: u16) -> anyhow::Result<Vec<u16>> {
    (0..count)
        .map(|i| first.checked_add(i).context("ports run past 65535"))
        .collect()
}

/// Waits until `addr` reports SERVING; fails at once if the child exits first.
async fn wait_ready(name: &str, addr: &str, supervisor: &mut Supervisor) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if grpc::is_serving(addr, "").await {
            return Ok(());
        }
        if let Ok(exit) = supervisor.exits.try_recv() {
            let status = match exit.status {
                Ok(status) => status.to_string(),
                Err(error) => error.to_string(),
            };
            anyhow::bail!(
                "{} exited during start-up ({status}); its output above says why (a port already in use?)",
                exit.name
            );
        }
        anyhow::ensure!(
            started.elapsed() < START_TIMEOUT,
            "{name} did not report SERVING on {addr} within {START_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
