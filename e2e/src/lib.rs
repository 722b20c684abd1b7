//! Test support for driving the real binaries: free ports, child processes that are
//! killed when a test ends (and show their output when it fails), readiness waits on
//! gRPC health, and the real command-line clients (grpcurl, curl).
//!
//! The binaries come from the same target directory as the test; `scripts/test` builds
//! them first (`cargo build --workspace --bins`).

use std::{
    fs::File,
    future::Future,
    io::Read,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

pub mod load;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

/// The path of one of the workspace's binaries, built next to this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which scripts/test does)",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A running child process. Killed when dropped; its output is printed if the test
/// is failing at that moment.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "e2e-{}-{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            name,
        ));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        // An empty working directory of its own: files a service looks for by default
        // (config-server.toml, data/registry.token) never leak between tests.
        let cwd = log.with_extension("cwd");
        std::fs::create_dir_all(&cwd).expect("working directory");
        let child = Command::new(program)
            .args(args)
            .current_dir(&cwd)
            .env(
                "RUST_LOG",
                std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Starts one of the workspace's binaries.
    pub fn start(name: &str, binary: &str, args: &[&str]) -> Self {
        Self::spawn(name, &bin(binary), args)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"))
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send signal");
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}; output:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// SIGKILL: a crash, with no chance to deregister.
    pub async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10)).await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // A stopped process must be continued to die promptly on some kernels.
            let _ = nix::sys::signal::kill(self.pid(), Signal::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.output());
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(self.log.with_extension("cwd"));
    }
}

/// Polls `check` every 20 ms until it holds; panics after `limit`. Returns the time taken.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `addr` reports SERVING (20 s bound: a cold start on a busy 2-core box).
pub async fn wait_serving(addr: SocketAddr) {
    let address = addr.to_string();
    eventually(Duration::from_secs(20), &format!("{addr} SERVING"), || {
        config_server::grpc::is_serving(&address, "")
    })
    .await;
}

/// The grpcurl command: `$GRPCURL`, else the one scripts/setup installs, else PATH.
pub fn grpcurl_path() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let local = repo_root().join(".tools/bin/grpcurl");
    if local.exists() {
        local
    } else {
        PathBuf::from("grpcurl")
    }
}

/// Runs grpcurl in plaintext against `addr`, optionally with a JSON body.
pub fn grpcurl(addr: SocketAddr, method: &str, body: Option<&str>) -> Output {
    let mut command = Command::new(grpcurl_path());
    command.args(["-plaintext", "-max-time", "10"]);
    if let Some(body) = body {
        command.args(["-d", body]);
    }
    command.arg(addr.to_string());
    if !method.is_empty() {
        command.arg(method);
    }
    command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run grpcurl ({}): {e}; run scripts/setup",
            grpcurl_path().display()
        )
    })
}

/// grpcurl that must succeed; returns its JSON output parsed.
pub fn grpcurl_json(addr: SocketAddr, method: &str, body: Option<&str>) -> serde_json::Value {
    let output = grpcurl(addr, method, body);
    assert!(
        output.status.success(),
        "grpcurl {method} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "grpcurl {method} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Runs curl and returns (HTTP status, headers, body). `args` go before the URL.
pub fn curl(method: &str, url: &str, args: &[&str]) -> (u16, String, String) {
    let output = Command::new("curl")
        .args(["-s", "-S", "-i", "--max-time", "20", "-X", method])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {method} {url} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    // A large body makes curl send `Expect: 100-continue`; skip the interim answer.
    while text.starts_with("HTTP/1.1 100") {
        text = text
            .split_once("\r\n\r\n")
            .map_or_else(String::new, |(_, rest)| rest.to_owned());
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in: {head}"));
    (status, head.to_owned(), body.to_owned())
}

/// POSTs `{"msg": msg}` with curl; returns (status, parsed JSON body).
pub fn curl_post(facade: SocketAddr, msg: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "msg": msg }).to_string();
    let (status, _, reply) = curl(
        "POST",
        &format!("http://{facade}/messages"),
        &["-H", "content-type: application/json", "-d", &body],
    );
    (
        status,
        serde_json::from_str(&reply).unwrap_or(serde_json::Value::Null),
    )
}

/// POSTs `{"msg": msg}` with an `Idempotency-Key`; returns (status, headers, body).
pub fn curl_post_keyed(facade: SocketAddr, msg: &str, key: &str) -> (u16, String, String) {
    let body = serde_json::json!({ "msg": msg }).to_string();
    curl(
        "POST",
        &format!("http://{facade}/messages"),
        &[
            "-H",
            "content-type: application/json",
            "-H",
            &format!("Idempotency-Key: {key}"),
            "-d",
            &body,
        ],
    )
}

/// The system's binaries on free ports, started in order and waited on.
pub struct System {
    registry_args: Vec<String>,
    pub registry: SocketAddr,
    pub messages: SocketAddr,
    pub facade: SocketAddr,
    pub registry_proc: Proc,
    pub messages_proc: Proc,
    pub facade_proc: Proc,
    pub logging: Vec<(SocketAddr, Proc)>,
}

/// Heartbeat and TTL the end-to-end tests use, so evictions take about a second.
pub const TEST_HEARTBEAT: &str = "250ms";
pub const TEST_TTL: Duration = Duration::from_secs(1);

impl System {
    /// Config server (short TTL), messages and facade; then `logging` instances, all on
    /// the memory store.
    pub async fn start(logging: usize, facade_args: &[&str]) -> Self {
        Self::start_with_store(logging, facade_args, "memory").await
    }

    /// The same, with the registry's `logging.store` setting set to `store`.
    pub async fn start_with_store(logging: usize, facade_args: &[&str], store: &str) -> Self {
        let registry = free_addr();
        let messages = free_addr();
        let facade = free_addr();
        let registry_args: Vec<String> = vec![
            "--addr".into(),
            registry.to_string(),
            "--static".into(),
            format!("messages={messages}"),
            "--set".into(),
            format!("logging.store={store}"),
            "--heartbeat-interval".into(),
            TEST_HEARTBEAT.into(),
            "--ttl".into(),
            "1s".into(),
        ];
        let registry_proc = Proc::start("config-server", "config-server", &as_strs(&registry_args));
        let messages_proc = Proc::start("messages", "messages", &["--addr", &messages.to_string()]);
        let mut args = vec![
            "--addr".to_owned(),
            facade.to_string(),
            "--registry".to_owned(),
            format!("http://{registry}"),
        ];
        args.extend(facade_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let facade_proc = Proc::start("facade", "facade", &args);
        wait_serving(registry).await;
        wait_serving(messages).await;
        wait_serving(facade).await;
        let mut system = Self {
            registry_args,
            registry,
            messages,
            facade,
            registry_proc,
            messages_proc,
            facade_proc,
            logging: Vec::new(),
        };
        for _ in 0..logging {
            system.add_logging().await;
        }
        system.wait_registered(logging).await;
        system
    }

    /// SIGTERM to the config server (it must exit cleanly).
    pub async fn stop_registry(&mut self) {
        let status = self.registry_proc.terminate().await;
        assert!(status.success(), "config server exit: {status}");
    }

    /// Starts the config server again, same port and flags, and waits until SERVING.
    pub async fn start_registry(&mut self) {
        self.registry_proc = Proc::start(
            "config-server",
            "config-server",
            &as_strs(&self.registry_args),
        );
        wait_serving(self.registry).await;
    }

    /// Starts one more logging instance and waits until it is SERVING.
    pub async fn add_logging(&mut self) -> SocketAddr {
        let addr = free_addr();
        let proc = Proc::start(
            &format!("logging-{}", addr.port()),
            "logging",
            &[
                &addr.port().to_string(),
                "--registry",
                &format!("http://{}", self.registry),
            ],
        );
        wait_serving(addr).await;
        self.logging.push((addr, proc));
        addr
    }

    /// Addresses the registry lists for `logging`.
    pub async fn registered(&self) -> Vec<String> {
        let client = config_server::client::RegistryClient::new(&self.registry.to_string())
            .expect("registry client");
        let mut addresses: Vec<String> = client
            .lookup("logging")
            .await
            .map(|reply| reply.instances.into_iter().map(|i| i.address).collect())
            .unwrap_or_default();
        addresses.sort();
        addresses
    }

    pub async fn wait_registered(&self, count: usize) -> Duration {
        eventually(
            Duration::from_secs(10),
            &format!("{count} registered logging instances"),
            || async { self.registered().await.len() == count },
        )
        .await
    }

    pub fn logging_proc(&mut self, addr: SocketAddr) -> &mut Proc {
        &mut self
            .logging
            .iter_mut()
            .find(|(a, _)| *a == addr)
            .expect("known logging instance")
            .1
    }
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Every message one logging instance holds, over gRPC; the error while its store is
/// unavailable.
pub async fn try_list_instance(addr: SocketAddr) -> Result<Vec<(String, String)>, tonic::Status> {
    use proto::logging::v1::{logging_client::LoggingClient, ListRequest};
    let channel = config_server::grpc::channel(&addr.to_string())
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(LoggingClient::new(channel)
        .list(ListRequest {})
        .await?
        .into_inner()
        .messages
        .into_iter()
        .map(|m| (m.id, m.text))
        .collect())
}

/// Every message one logging instance holds, over gRPC (which must succeed).
pub async fn list_instance(addr: SocketAddr) -> Vec<(String, String)> {
    try_list_instance(addr).await.expect("list")
}

/// GET /messages through the facade with curl: (status, [(id, msg)]).
pub fn get_messages(facade: SocketAddr) -> (u16, Vec<(String, String)>) {
    let (status, _, body) = curl("GET", &format!("http://{facade}/messages"), &[]);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let logs = body["logs"]
        .as_array()
        .map(|logs| {
            logs.iter()
                .map(|l| {
                    (
                        l["id"].as_str().unwrap_or_default().to_owned(),
                        l["msg"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (status, logs)
}

/// Real `nats-server` processes with JetStream on free ports, data in a temporary
/// directory removed at the end. Stopped (kill -9) when dropped.
pub struct Nats {
    pub nodes: Vec<runner::nats::Node>,
    procs: Vec<Option<Proc>>,
    dir: PathBuf,
}

impl Nats {
    fn data_dir() -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "e2e-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// One JetStream server (R1).
    pub async fn single() -> Self {
        let dir = Self::data_dir();
        let nodes = vec![runner::nats::Node {
            name: "nats-1".into(),
            client_port: free_port(),
            cluster_port: None,
            data_dir: dir.join("node-1"),
        }];
        Self::start(nodes, dir).await
    }

    /// A cluster of `size` nodes (R3 streams need three).
    pub async fn cluster(size: usize) -> Self {
        let dir = Self::data_dir();
        let client: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let cluster: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes = runner::nats::cluster(&client, &cluster, &dir);
        Self::start(nodes, dir).await
    }

    async fn start(nodes: Vec<runner::nats::Node>, dir: PathBuf) -> Self {
        let mut nats = Self {
            procs: nodes.iter().map(|_| None).collect(),
            nodes,
            dir,
        };
        for i in 0..nats.nodes.len() {
            nats.start_node(i);
        }
        nats.wait_ready().await;
        nats
    }

    pub async fn wait_ready(&self) {
        runner::nats::wait_ready(&self.urls(), Duration::from_secs(30))
            .await
            .expect("JetStream ready");
    }

    /// Starts node `i` (again, after a kill: same ports, same data).
    pub fn start_node(&mut self, i: usize) {
        let program =
            runner::nats::server_path().expect("nats-server is not installed: run scripts/setup");
        let node = &self.nodes[i];
        let args = node.args(&self.nodes);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.procs[i] = Some(Proc::spawn(&node.name, &program, &args));
    }

    /// kill -9 of node `i`.
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut proc) = self.procs[i].take() {
            proc.kill9().await;
        }
    }

    /// kill -9 of every node, then all started again on the same ports and data.
    pub async fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i).await;
        }
        for i in 0..self.nodes.len() {
            self.start_node(i);
        }
        self.wait_ready().await;
    }

    pub fn urls(&self) -> String {
        runner::nats::urls(&self.nodes)
    }

    /// The index of the node that leads `stream`, asked through any running node.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if self.procs[i].is_none() {
                continue;
            }
            let Ok(client) = async_nats::connect(node.url()).await else {
                continue;
            };
            let jetstream = async_nats::jetstream::new(client);
            let Ok(stream) = jetstream.get_stream(stream).await else {
                continue;
            };
            let leader = stream.cached_info().cluster.as_ref()?.leader.clone()?;
            return self.nodes.iter().position(|n| n.name == leader);
        }
        None
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
