//! The whole system on free ports, for the end-to-end tests: [`System`] starts the real
//! binaries in order and waits on them; [`load`] is a closed-loop HTTP load generator.
//! Everything a single crate's tests need too (ports, processes, waits, grpcurl, curl,
//! NATS nodes) is the `testkit` crate, re-exported here.

use std::{net::SocketAddr, time::Duration};

pub use testkit::{nats::Nats, *};

pub mod load;

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
        let client = registry_client::RegistryClient::new(&self.registry.to_string())
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
    let channel =
        rpc::channel(&addr.to_string()).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
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
