//! Local NATS JetStream servers: the command lines of a single node or a cluster, and a
//! readiness check. The runner uses it for `--store nats`; tests use it to start real
//! servers on free ports. Everything listens on 127.0.0.1 only.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use retry::{Retry, RetryError};
use tokio_util::sync::CancellationToken;

/// The `nats-server` binary: `$NATS_SERVER`, else the one scripts/setup installed under
/// `.tools/bin` of the repository (the version the store is tested on), else one on PATH.
pub fn server_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    })
}

/// One server of a JetStream cluster (or a lone server when `cluster_port` is `None`).
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// The address it listens on, for clients and for its cluster peers.
    pub host: String,
    pub client_port: u16,
    pub cluster_port: Option<u16>,
    pub data_dir: PathBuf,
}

impl Node {
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.client_port)
    }

    /// The command line, given every node of the cluster (routes go to the others).
    pub fn args(&self, cluster: &[Node]) -> Vec<String> {
        let mut args = vec![
            "--addr".to_owned(),
            self.host.clone(),
            "--port".to_owned(),
            self.client_port.to_string(),
            "--server_name".to_owned(),
            self.name.clone(),
            "--jetstream".to_owned(),
            "--store_dir".to_owned(),
            self.data_dir.display().to_string(),
        ];
        if let Some(cluster_port) = self.cluster_port {
            let routes: Vec<String> = cluster
                .iter()
                .filter(|peer| peer.name != self.name)
                .filter_map(|peer| Some(format!("nats://{}:{}", peer.host, peer.cluster_port?)))
                .collect();
            args.extend([
                "--cluster_name".to_owned(),
                "messages".to_owned(),
                "--cluster".to_owned(),
                format!("nats://{}:{cluster_port}", self.host),
                "--routes".to_owned(),
                routes.join(","),
            ]);
        }
        args
    }
}

/// A cluster of `client_ports.len()` nodes on 127.0.0.1 with data under
/// `data_root/node-N`.
pub fn cluster(client_ports: &[u16], cluster_ports: &[u16], data_root: &Path) -> Vec<Node> {
    client_ports
        .iter()
        .zip(cluster_ports)
        .enumerate()
        .map(|(i, (&client_port, &cluster_port))| Node {
            name: format!("nats-{}", i + 1),
            host: "127.0.0.1".to_owned(),
            client_port,
            cluster_port: Some(cluster_port),
            data_dir: data_root.join(format!("node-{}", i + 1)),
        })
        .collect()
}

/// The comma-separated URLs of `nodes`, as `logging --store` takes them.
pub fn urls(nodes: &[Node]) -> String {
    nodes.iter().map(Node::url).collect::<Vec<_>>().join(",")
}

/// Waits until JetStream answers an account query through `urls` (for a cluster, that
/// means it has elected a meta leader), up to `limit`, or until `cancel` fires.
pub async fn wait_ready(
    urls: &str,
    limit: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let servers: Vec<&str> = urls.split(',').map(str::trim).collect();
    let attempt = || async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_millis(500))
            .connect(servers.as_slice())
            .await?;
        // The raw account-info request: its JSON answer has an "error" until JetStream
        // (and, in a cluster, its meta leader) is up. Parsed loosely, so any server
        // version will do.
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("$JS.API.INFO", "".into()),
        )
        .await??;
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload)?;
        match reply.get("error") {
            None => anyhow::Ok(()),
            Some(error) => anyhow::bail!("{error}"),
        }
    };
    // Failures are expected while the nodes start and elect; only the last one matters.
    let waiting = Retry::new("waiting for JetStream", cancel)
        .backoff(Duration::from_millis(100), Duration::from_millis(100))
        .budget(limit)
        .quiet();
    match waiting.run(attempt, |_| false).await {
        Ok(()) => Ok(()),
        Err(RetryError::Exhausted { last, .. }) => {
            anyhow::bail!("JetStream at {urls} not ready within {limit:?}: {last}")
        }
        Err(error) => anyhow::bail!("JetStream at {urls} not ready: {error}"),
    }
}
