//! The runner: starts the system as child processes, in order, each only once the one
//! before it answers gRPC health `SERVING`; shows their output with coloured prefixes;
//! reports any child that dies; and on Ctrl+C or SIGTERM stops them in reverse order.
//!
//! [`run`] reads as what it does: make a [`Plan`] from the flags (every name, port and
//! command line, before anything starts), start it step by step ([`Running::start`]),
//! supervise, and stop everything through one path ([`Running::stop`]), however the run
//! ends.
//!
//! Binaries are taken from the directory of the runner's own executable, so
//! `target/release/runner` starts `target/release/config-server` and so on.

pub mod certs;
mod children;
pub mod lab;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use local_nats::Node;
use nix::sys::signal::Signal;
use registry_client::{token::DEFAULT_TOKEN_FILE, DiscoveryMode, DEFAULT_REPLICAS_FILE};
use retry::{Retry, RetryError};
use tokio_util::sync::CancellationToken;

use children::{Child, Output, Supervisor};

pub use children::STOP_GRACE;

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

    /// How the facade finds instances.
    #[arg(long, value_enum, default_value_t = DiscoveryMode::Watch)]
    pub discovery: DiscoveryMode,

    /// Also start this many logging instances, on --logging-port and up.
    #[arg(long, default_value_t = 0)]
    pub logging: u16,

    /// Registry replicas to start: the first on --registry-port, the others 100 ports
    /// apart (50150, 50250, ...). Every service registers with all of them, and lookups
    /// move to another when one dies.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub registries: u16,

    /// Port of the first registry replica.
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
    #[arg(long, default_value = DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,

    /// Where the registry replicas of this run are listed, one a line (removed on exit),
    /// so services started by hand find every replica, even with the first one down.
    #[arg(long, default_value = DEFAULT_REPLICAS_FILE)]
    pub replicas_file: PathBuf,

    /// Where the NATS cluster keeps its data and its nodes' logs; the data survives
    /// restarts of the runner.
    #[arg(long, default_value = "data/nats")]
    pub data_dir: PathBuf,

    /// Where the service binaries are [default: the runner's own directory].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,

    /// Secured: a host's folder from `runner certs` (e.g. certs/local). Every service
    /// gets its certificate from it and speaks only TLS, and the NATS cluster is locked
    /// down (TLS, route password, logging's nkey as its one user).
    #[arg(long, value_name = "DIR")]
    pub tls: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the runner does instead of starting the system.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Writes a CA and a certificate for every service on every host, for --tls-cert,
    /// --tls-key and --tls-ca.
    Certs(certs::CertsArgs),
    /// The lab's experiment in one command, on free ports and a fresh data directory:
    /// three logging instances, msg1 to msg10, who stored what, then instances and store
    /// nodes stopped one pair at a time, with a verdict table (exit 0 only if it passes).
    Lab(lab::LabArgs),
}

/// Everything the run will start, decided from the flags before anything starts.
struct Plan {
    store: StorePlan,
    /// The host folder of `--tls`.
    tls: Option<PathBuf>,
    /// In start order.
    services: Vec<Service>,
    token_file: PathBuf,
    /// The registry replicas (`host:port`) and the file that lists them.
    replicas: Vec<String>,
    replicas_file: PathBuf,
    facade: String,
    /// Where the services' output goes, a file each; to the terminal when `None`.
    logs: Option<PathBuf>,
}

enum StorePlan {
    Memory,
    Nats {
        program: PathBuf,
        nodes: Vec<Node>,
        urls: String,
        /// With `--tls`: how the nodes are locked, and how logging (and the runner's
        /// readiness check) gets in.
        locked: Option<Box<(local_nats::Lockdown, local_nats::Credentials)>>,
    },
}

/// One service: a binary of ours, its command line, and where it answers health.
struct Service {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    addr: String,
}

impl Plan {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let bin_dir = match &config.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("the runner's executable has no directory")?
                .to_path_buf(),
        };
        let store = StorePlan::new(config)?;
        let store_setting = match &store {
            StorePlan::Memory => "memory".to_owned(),
            StorePlan::Nats { urls, .. } => urls.clone(),
        };
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let secured = |service: &str, mut args: Vec<String>| {
            if let Some(dir) = &config.tls {
                args.extend(certs::flags(dir, service));
            }
            args
        };
        let token = config.token_file.display().to_string();
        let replicas: Vec<String> = (0..config.registries)
            .map(|i| {
                let port = config
                    .registry_port
                    .checked_add(100 * i)
                    .context("registry ports run past 65535")?;
                Ok(format!("127.0.0.1:{port}"))
            })
            .collect::<anyhow::Result<_>>()?;
        let registry_urls = replicas
            .iter()
            .map(|replica| format!("{scheme}://{replica}"))
            .collect::<Vec<_>>()
            .join(",");
        let messages = format!("127.0.0.1:{}", config.messages_port);
        let facade = format!("127.0.0.1:{}", config.facade_port);
        let service = |name: &str, binary: &str, args: Vec<String>, addr: &str| Service {
            name: name.to_owned(),
            program: bin_dir.join(binary),
            args,
            addr: addr.to_owned(),
        };
        let mut services = Vec::new();
        for replica in &replicas {
            let mut args = strings(&[
                "--addr",
                replica,
                "--static",
                &format!("messages={messages}"),
                "--set",
                &format!("logging.store={store_setting}"),
                "--token-file",
                &token,
            ]);
            let name = if replicas.len() == 1 {
                "config-server".to_owned()
            } else {
                args.extend(strings(&["--replica", &replicas.join(",")]));
                let port = replica.rsplit(':').next().unwrap_or_default();
                format!("config-server-{port}")
            };
            let args = secured("config-server", args);
            services.push(service(&name, "config-server", args, replica));
        }
        services.extend([
            service(
                "messages",
                "messages",
                secured("messages", strings(&["--addr", &messages])),
                &messages,
            ),
            service(
                "facade",
                "facade",
                secured(
                    "facade",
                    strings(&[
                        "--addr",
                        &facade,
                        "--registry",
                        &registry_urls,
                        "--discovery",
                        config.discovery.as_flag(),
                        "--registry-token-file",
                        &token,
                    ]),
                ),
                &facade,
            ),
        ]);
        for port in consecutive(config.logging_port, config.logging)? {
            let mut args = strings(&[
                &port.to_string(),
                "--registry",
                &registry_urls,
                "--registry-token-file",
                &token,
            ]);
            if let Some(dir) = &config.tls {
                args.extend([
                    "--store-nkey".to_owned(),
                    certs::host_file(dir, certs::LOGGING_NKEY),
                ]);
            }
            services.push(service(
                &format!("logging-{port}"),
                "logging",
                secured("logging", args),
                &format!("127.0.0.1:{port}"),
            ));
        }
        Ok(Self {
            store,
            tls: config.tls.clone(),
            services,
            token_file: config.token_file.clone(),
            replicas,
            replicas_file: config.replicas_file.clone(),
            facade,
            logs: None,
        })
    }

    /// What the user needs once everything answers: every address, the store, and what
    /// to type next.
    fn print_ready(&self) {
        println!("runner: ready");
        for service in &self.services {
            println!("  {:<14} {}", service.name, service.addr);
        }
        match &self.store {
            StorePlan::Memory => println!("  {:<14} memory (each instance its own)", "store"),
            StorePlan::Nats { urls, nodes, .. } => {
                println!("  {:<14} NATS JetStream R3 {urls}", "store");
                let logs: Vec<String> = nodes
                    .iter()
                    .map(|node| log_file(node).display().to_string())
                    .collect();
                println!("  {:<14} {}", "nats logs", logs.join(" "));
            }
        }
        let (scheme, curl, logging) = match &self.tls {
            Some(dir) => (
                "https",
                format!("curl -s --cacert {}", certs::host_file(dir, "ca.pem")),
                format!(
                    "PORT {} --store-nkey {}",
                    certs::flags(dir, "logging").join(" "),
                    certs::host_file(dir, certs::LOGGING_NKEY)
                ),
            ),
            None => ("http", "curl -s".to_owned(), "PORT".to_owned()),
        };
        let facade = format!("{scheme}://{}", self.facade);
        println!(
            "Try:\n  {curl} -X POST {facade}/messages -H 'content-type: application/json' -d '{{\"msg\":\"hello\"}}'\n  {curl} {facade}/messages\nMore logging instances: target/release/logging {logging}. Ctrl+C stops everything."
        );
        if self.replicas.len() > 1 {
            println!(
                "Registry replicas: {} (listed in {}); any one may die.",
                self.replicas.join(" "),
                self.replicas_file.display()
            );
        }
    }
}

impl StorePlan {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let program = match (config.store, local_nats::server_path()) {
            (StoreMode::Memory, _) => return Ok(Self::Memory),
            (StoreMode::Nats | StoreMode::Auto, Some(program)) => program,
            (StoreMode::Nats, None) => anyhow::bail!(
                "--store nats needs nats-server 2.12 or newer: run scripts/setup (it installs 2.15.1 under .tools/), or set NATS_SERVER"
            ),
            (StoreMode::Auto, None) => {
                println!(
                    "runner: WARNING: nats-server is not installed, so using the memory store: each \
                     logging instance keeps only the messages it received and instances do not share \
                     them. Run scripts/setup to install nats-server."
                );
                return Ok(Self::Memory);
            }
        };
        let nodes = local_nats::cluster(
            &consecutive(config.nats_port, 3)?,
            &consecutive(config.nats_cluster_port, 3)?,
            &config.data_dir,
        );
        let Some(dir) = &config.tls else {
            let urls = local_nats::urls(&nodes);
            return Ok(Self::Nats {
                program,
                nodes,
                urls,
                locked: None,
            });
        };
        let seed_file = dir.join(certs::LOGGING_NKEY);
        let seed = std::fs::read_to_string(&seed_file)
            .with_context(|| format!("cannot read {} (made by runner certs)", seed_file.display()))?
            .trim()
            .to_owned();
        let lockdown = certs::lockdown(
            dir,
            certs::random_secret(),
            local_nats::Lockdown::public_user(&seed)?,
            None,
        );
        let credentials = certs::logging_credentials(dir, seed);
        let urls = nodes
            .iter()
            .map(|node| format!("tls://{}:{}", node.host, node.client_port))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Self::Nats {
            program,
            nodes,
            urls,
            locked: Some(Box::new((lockdown, credentials))),
        })
    }
}

/// What is running, in start order, and the files of this run.
struct Running {
    supervisor: Supervisor,
    children: Vec<Child>,
    /// This run's token and replica files, removed when it ends.
    run_files: Vec<RunFile>,
}

impl Running {
    fn new() -> Self {
        Self {
            supervisor: Supervisor::new(),
            children: Vec::new(),
            run_files: Vec::new(),
        }
    }

    /// The start-up steps: the store, the token, then each service once the one before
    /// it answers. Stops at the first failure, or when `shutdown` fires.
    async fn start(&mut self, plan: &Plan, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.start_store(&plan.store, plan.logs.is_some(), shutdown)
            .await?;
        // The runner checks health with the facade's certificate: any the CA signed will do.
        let transport = match &plan.tls {
            Some(dir) => rpc::TlsArgs::files(
                dir.join("facade.pem"),
                dir.join("facade.key"),
                dir.join("ca.pem"),
            )
            .transport()?,
            None => rpc::Transport::plaintext(),
        };
        self.run_files.push(RunFile::token(&plan.token_file)?);
        let listed = plan.replicas.join("\n") + "\n";
        self.run_files
            .push(RunFile::write(&plan.replicas_file, &listed, 0o644)?);
        println!(
            "runner: registry token for this run in {}, replicas listed in {}",
            plan.token_file.display(),
            plan.replicas_file.display()
        );
        for service in &plan.services {
            let output = match &plan.logs {
                Some(dir) => {
                    Output::problems_after_start(&dir.join(format!("{}.log", service.name)))?
                }
                None => Output::Terminal,
            };
            self.start_service(service, output, &transport, shutdown)
                .await?;
        }
        Ok(())
    }

    async fn start_store(
        &mut self,
        store: &StorePlan,
        quiet: bool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let StorePlan::Nats {
            program,
            nodes,
            urls,
            locked,
        } = store
        else {
            println!(
                "runner: store: memory (each logging instance keeps only the messages it received)"
            );
            return Ok(());
        };
        let mut logs = Vec::new();
        for node in nodes {
            std::fs::create_dir_all(&node.data_dir)
                .with_context(|| format!("cannot create {}", node.data_dir.display()))?;
            let log = log_file(node);
            let output = Output::problems_after_start(&log)?;
            let args = match locked.as_deref() {
                Some((lockdown, _)) => node.locked_args(nodes, lockdown)?,
                None => node.args(nodes),
            };
            let child = self.supervisor.spawn(
                &node.name,
                program,
                &args,
                output,
                Signal::SIGINT, // nats-server exits 0 on SIGINT, 1 on SIGTERM
            )?;
            logs.push(log);
            self.children.push(child);
        }
        println!(
            "runner: starting NATS JetStream ({} nodes, output in {})",
            nodes.len(),
            logs.iter()
                .map(|log| log.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let credentials = locked
            .as_deref()
            .map(|(_, credentials)| credentials.clone())
            .unwrap_or_default();
        let ready = tokio::select! {
            ready = local_nats::wait_ready_as(
                &credentials,
                urls,
                START_TIMEOUT,
                shutdown,
            ) => ready,
            Some(exit) = self.supervisor.exits.recv() => Err(anyhow::anyhow!(
                "{} exited during start-up ({})", exit.name, exit.describe()
            )),
        };
        if let Err(error) = ready {
            if !shutdown.is_cancelled() {
                for log in &logs {
                    children::print_tail(log, 8);
                }
            }
            return Err(error);
        }
        // From now on the nodes' problems reach the terminal, unless the run keeps its
        // output in files (`runner lab`, which stops nodes on purpose).
        if !quiet {
            for child in &self.children {
                child.started();
            }
        }
        println!("runner: NATS JetStream cluster ready ({urls})");
        Ok(())
    }

    async fn start_service(
        &mut self,
        service: &Service,
        output: Output,
        transport: &rpc::Transport,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let child = self
            .supervisor
            .spawn(
                &service.name,
                &service.program,
                &service.args,
                output,
                Signal::SIGTERM,
            )
            .context("build the binaries first: cargo build --release")?;
        self.children.push(child);
        let addr = service.addr.as_str();
        let waiting = Retry::new(format!("waiting for {}", service.name), shutdown)
            .backoff(Duration::from_millis(50), Duration::from_millis(50))
            .budget(START_TIMEOUT)
            .quiet();
        let serving = || async {
            match rpc::is_serving_over(transport, addr, "").await {
                true => Ok(()),
                false => Err("not SERVING yet"),
            }
        };
        tokio::select! {
            ready = waiting.run(serving, |_| false) => match ready {
                Ok(()) => {}
                Err(RetryError::Cancelled) => anyhow::bail!("interrupted during start-up"),
                Err(_) => anyhow::bail!(
                    "{} did not report SERVING on {addr} within {START_TIMEOUT:?}",
                    service.name
                ),
            },
            Some(exit) = self.supervisor.exits.recv() => anyhow::bail!(
                "{} exited during start-up ({}); its output above says why (a port already in use?)",
                exit.name, exit.describe()
            ),
        }
        println!("runner: {} is SERVING on {addr}", service.name);
        Ok(())
    }

    /// Reports children that exit by themselves (the others keep running) until
    /// `shutdown`.
    async fn supervise(&mut self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(exit) = self.supervisor.exits.recv() => {
                    println!(
                        "runner: !!! {} exited unexpectedly ({}); the others keep running",
                        exit.name, exit.describe()
                    );
                    self.children.retain(|child| child.name != exit.name);
                }
            }
        }
    }

    /// Stops the child named `name`, if it runs; the others keep running.
    async fn stop_child(&mut self, name: &str) {
        if let Some(at) = self.children.iter().position(|child| child.name == name) {
            self.children.remove(at).stop().await;
        }
    }

    /// The one stop path: every child in reverse start order, then this run's files.
    async fn stop(mut self) {
        for child in self.children.drain(..).rev() {
            child.stop().await;
        }
        self.run_files.clear();
    }
}

/// Runs the system until `shutdown`; returns the start-up error, if any, after every
/// child that was started has been stopped.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let plan = Plan::new(&config)?;
    let mut running = Running::new();
    let outcome = async {
        running.start(&plan, &shutdown).await?;
        plan.print_ready();
        running.supervise(&shutdown).await;
        anyhow::Ok(())
    }
    .await;
    running.stop().await;
    println!("runner: all stopped");
    outcome
}

/// Where a NATS node's output goes: beside its data directory.
fn log_file(node: &Node) -> PathBuf {
    node.data_dir.with_extension("log")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// A file of this run (the registry token, the replica list), removed when the runner
/// ends, however it ends.
struct RunFile(PathBuf);

impl RunFile {
    /// A fresh random registry token at `path`, readable by the owner only.
    fn token(path: &Path) -> anyhow::Result<Self> {
        let token: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        Self::write(path, &format!("{token}\n"), 0o600)
            .with_context(|| format!("cannot write the registry token to {}", path.display()))
    }

    fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<Self> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes())?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `count` consecutive ports from `first`.
fn consecutive(first: u16, count: u16) -> anyhow::Result<Vec<u16>> {
    (0..count)
        .map(|i| first.checked_add(i).context("ports run past 65535"))
        .collect()
}
