//! The whole system on free ports, for the end-to-end tests: [`System`] starts the real
//! binaries in order and waits on them; [`load`] is a closed-loop HTTP load generator.
//! Everything a single crate's tests need too (ports, processes, waits, grpcurl, curl,
//! NATS nodes) is the `testkit` crate, re-exported here.

use std::{net::SocketAddr, time::Duration};

pub use testkit::{nats::Nats, *};

pub mod certs;
pub mod load;
pub mod verdicts;

/// What a process has used, from `/proc` (for the benchmarks in `examples/`).
pub mod procfs {
    /// CPU time (user + system) `pid` has used so far, in seconds.
    pub fn cpu_seconds(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime is the 12th, stime 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field(11) + field(12)) as f64 / ticks_per_second()
    }

    fn ticks_per_second() -> f64 {
        static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
        *TICKS.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
                .unwrap_or(100.0)
        })
    }

    /// Resident memory of `pid`, in MiB (0 when it is gone).
    pub fn rss_mib(pid: u32) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

/// The system's binaries on free ports, started in order and waited on.
pub struct System {
    registry_args: Vec<String>,
    /// The first registry replica (the only one unless started with replicas).
    pub registry: SocketAddr,
    pub messages: SocketAddr,
    pub facade: SocketAddr,
    pub registry_proc: Proc,
    /// The other registry replicas, with the flags each was started with.
    pub replicas: Vec<(SocketAddr, Proc, Vec<String>)>,
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
        Self::start_replicated(1, logging, facade_args, store).await
    }

    /// `replicas` registry replicas (listing each other with `--replica`), then the rest
    /// as [`start_with_store`](Self::start_with_store); every service is given every
    /// replica.
    pub async fn start_replicated(
        replicas: usize,
        logging: usize,
        facade_args: &[&str],
        store: &str,
    ) -> Self {
        let addrs: Vec<SocketAddr> = (0..replicas.max(1)).map(|_| free_addr()).collect();
        let messages = free_addr();
        let facade = free_addr();
        let listed = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let replica_args = |addr: SocketAddr| {
            let mut args: Vec<String> = vec![
                "--addr".into(),
                addr.to_string(),
                "--static".into(),
                format!("messages={messages}"),
                "--set".into(),
                format!("logging.store={store}"),
                "--heartbeat-interval".into(),
                TEST_HEARTBEAT.into(),
                "--ttl".into(),
                "1s".into(),
            ];
            if replicas > 1 {
                args.extend(["--replica".into(), listed.clone()]);
            }
            args
        };
        let registry = addrs[0];
        let registry_args = replica_args(registry);
        let registry_proc = Proc::start("config-server", "config-server", &as_strs(&registry_args));
        let mut others = Vec::new();
        for (i, addr) in addrs.iter().enumerate().skip(1) {
            let args = replica_args(*addr);
            let proc = Proc::start(
                &format!("config-server-{i}"),
                "config-server",
                &as_strs(&args),
            );
            others.push((*addr, proc, args));
        }
        let messages_proc = Proc::start("messages", "messages", &["--addr", &messages.to_string()]);
        let urls = addrs
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--addr".to_owned(),
            facade.to_string(),
            "--registry".to_owned(),
            urls,
        ];
        args.extend(facade_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let facade_proc = Proc::start("facade", "facade", &args);
        for addr in &addrs {
            wait_serving(*addr).await;
        }
        wait_serving(messages).await;
        wait_serving(facade).await;
        let mut system = Self {
            registry_args,
            registry,
            messages,
            facade,
            registry_proc,
            replicas: others,
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

    /// Every registry replica's address, the first one first.
    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.registry)
            .chain(self.replicas.iter().map(|(addr, _, _)| *addr))
            .collect()
    }

    /// `http://a,http://b,...`: what services are given as `--registry`.
    pub fn registry_urls(&self) -> String {
        self.replica_addrs()
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The process of replica `i` (0 is the first).
    pub fn replica_proc(&mut self, i: usize) -> &mut Proc {
        match i {
            0 => &mut self.registry_proc,
            i => &mut self.replicas[i - 1].1,
        }
    }

    /// Starts replica `i` again, same port and flags, and waits until SERVING.
    pub async fn restart_replica(&mut self, i: usize) {
        if i == 0 {
            return self.start_registry().await;
        }
        let (addr, proc, args) = &mut self.replicas[i - 1];
        *proc = Proc::start(
            &format!("config-server-{i}"),
            "config-server",
            &as_strs(args),
        );
        wait_serving(*addr).await;
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
        self.add_logging_with(&[]).await
    }

    /// [`add_logging`](Self::add_logging) with more flags, e.g. `--max-messages 3`.
    pub async fn add_logging_with(&mut self, flags: &[&str]) -> SocketAddr {
        let addr = free_addr();
        let port = addr.port().to_string();
        let registry = self.registry_urls();
        let mut args = vec![port.as_str(), "--registry", registry.as_str()];
        args.extend_from_slice(flags);
        let proc = Proc::start(&format!("logging-{}", addr.port()), "logging", &args);
        wait_serving(addr).await;
        self.logging.push((addr, proc));
        addr
    }

    /// Addresses the (first) registry lists for `logging`.
    pub async fn registered(&self) -> Vec<String> {
        registered_on(self.registry).await.unwrap_or_default()
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

/// `count` registry replicas of `program` listing each other (one alone lists nobody,
/// so a client knows it only by the address it was given), each started with `flags`
/// and waited on until SERVING.
pub async fn start_replicas(
    program: &std::path::Path,
    count: usize,
    flags: &[&str],
) -> Vec<(SocketAddr, Proc)> {
    let addrs: Vec<SocketAddr> = (0..count).map(|_| free_addr()).collect();
    let listed = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut started = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let addr_arg = addr.to_string();
        let mut args = vec!["--addr", &addr_arg];
        if count > 1 {
            args.extend(["--replica", &listed]);
        }
        args.extend_from_slice(flags);
        let name = format!("config-server-{i}");
        started.push((*addr, Proc::spawn(&name, program, &args)));
    }
    for (addr, _) in &started {
        wait_serving(*addr).await;
    }
    started
}

/// Addresses one registry replica lists for `logging`, sorted; the error when it does
/// not answer.
pub async fn registered_on(replica: SocketAddr) -> Result<Vec<String>, tonic::Status> {
    let client = registry_client::RegistryClient::new(&replica.to_string())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let reply = client.lookup("logging").await?;
    let mut addresses: Vec<String> = reply.instances.into_iter().map(|i| i.address).collect();
    addresses.sort();
    Ok(addresses)
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Every message one logging instance holds, read with its `Stream` call; the error
/// while its store is unavailable.
pub async fn try_list_instance(addr: SocketAddr) -> Result<Vec<(String, String)>, tonic::Status> {
    use proto::logging::v1::{logging_client::LoggingClient, StreamRequest};
    let channel =
        rpc::channel(&addr.to_string()).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = LoggingClient::new(channel)
        .stream(StreamRequest { after: 0, until: 0 })
        .await?
        .into_inner();
    let mut messages = Vec::new();
    while let Some(batch) = stream.message().await? {
        messages.extend(batch.messages.into_iter().map(|m| (m.id, m.text)));
    }
    Ok(messages)
}

/// Every message one logging instance holds, over gRPC (which must succeed).
pub async fn list_instance(addr: SocketAddr) -> Vec<(String, String)> {
    try_list_instance(addr).await.expect("list")
}

/// Every message with its id, through the facade's paged API (`GET /v1/messages`, 1000
/// a page) with curl: (the status of the first failing page, or 200; [(id, msg)]).
pub fn get_messages(facade: SocketAddr) -> (u16, Vec<(String, String)>) {
    get_messages_at(&format!("http://{facade}"), &[])
}

/// [`get_messages`] from the facade at `base` (`https://host:port`), with curl's `args`
/// (`--cacert FILE`).
pub fn get_messages_at(base: &str, args: &[&str]) -> (u16, Vec<(String, String)>) {
    let mut messages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/messages?limit=1000");
        if let Some(cursor) = &after {
            url.push_str(&format!("&after={cursor}"));
        }
        let (status, _, body) = curl("GET", &url, args);
        if status != 200 {
            return (status, messages);
        }
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        for entry in body["messages"].as_array().into_iter().flatten() {
            messages.push((
                entry["id"].as_str().unwrap_or_default().to_owned(),
                entry["msg"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        match body["next"].as_str() {
            Some(cursor) => after = Some(cursor.to_owned()),
            None => return (200, messages),
        }
    }
}

/// The lab's `GET /messages` with curl: (status, the texts in `logs`, the whole body).
pub fn get_lab(facade: SocketAddr) -> (u16, Vec<String>, serde_json::Value) {
    get_lab_at(&format!("http://{facade}"), &[])
}

/// [`get_lab`] from the facade at `base` (`https://host:port`), with curl's `args`.
pub fn get_lab_at(base: &str, args: &[&str]) -> (u16, Vec<String>, serde_json::Value) {
    let (status, _, body) = curl("GET", &format!("{base}/messages"), args);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let logs = body["logs"]
        .as_array()
        .map(|logs| {
            logs.iter()
                .map(|l| l.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    (status, logs, body)
}

/// Writes messages `range` straight into the store's JetStream stream through the NATS
/// store's own code (`NatsStore::append_batch`: atomic batches of up to 1000 messages
/// and 1 MiB, and what it stored in blocks), one batch after another so positions follow
/// `range`: far faster than posting them. Ids are `{prefix}-{i}`, texts come from
/// `text(i)`. Returns (id, text) in order.
pub async fn seed_nats(
    urls: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    text: impl Fn(usize) -> String,
) -> Vec<(String, String)> {
    use logging::store::{Appended, Message, MessageStore, NatsConfig, NatsStore};
    let config = NatsConfig::new(urls.split(',').map(str::to_owned).collect());
    let store = NatsStore::connect(config, &tokio_util::sync::CancellationToken::new())
        .await
        .expect("connect to NATS");
    let sent: Vec<(String, String)> = range.map(|i| (format!("{prefix}-{i}"), text(i))).collect();
    let mut rest = sent.iter().peekable();
    while rest.peek().is_some() {
        let (mut batch, mut bytes) = (Vec::new(), 0);
        while let Some((id, text)) = rest.next_if(|_| batch.len() < 1000 && bytes < 1 << 20) {
            bytes += text.len();
            batch.push(Message {
                id: id.clone(),
                text: text.clone(),
            });
        }
        for outcome in store.append_batch(batch).await {
            assert_eq!(outcome.expect("stored"), Appended::Inserted);
        }
    }
    sent
}

/// A nats-server with none of a locked cluster's keys, on `host` (client port `port`,
/// routes `port + 1`, monitoring `port + 2`), routed at `route` (`host:port` of a
/// cluster node's route port). Waits until its route is refused (the node hangs up on
/// it), then returns how many routes it holds by its own monitoring page: 0 when it
/// could not join.
pub async fn rogue_routes(host: &str, port: u16, route: &str, data: &std::path::Path) -> u64 {
    let server = local_nats::server_path().expect("nats-server (scripts/setup installs it)");
    let rogue = Proc::spawn(
        "rogue-nats",
        &server,
        &[
            "--addr",
            host,
            "--port",
            &port.to_string(),
            "--server_name",
            "rogue",
            "--jetstream",
            "--store_dir",
            &data.display().to_string(),
            "--cluster_name",
            "messages",
            "--cluster",
            &format!("nats://{host}:{}", port + 1),
            "--routes",
            &format!("nats://{route}"),
            "--http_port",
            &(port + 2).to_string(),
        ],
    );
    eventually(
        Duration::from_secs(20),
        "the rogue's route refused",
        || async { rogue.output().contains("Router connection closed") },
    )
    .await;
    let (_, _, page) = curl("GET", &format!("http://{host}:{}/routez", port + 2), &[]);
    let page: serde_json::Value = serde_json::from_str(&page).unwrap_or_default();
    page["num_routes"].as_u64().unwrap_or(u64::MAX)
}
