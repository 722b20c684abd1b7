//! Local NATS JetStream servers: the command lines of a single node or a cluster, and a
//! readiness check. The runner uses it for `--store nats`; tests use it to start real
//! servers on free ports. Everything listens on 127.0.0.1 only, unless a node's host
//! says otherwise.
//!
//! A cluster can be locked down ([`Lockdown`], a config file per node): TLS with client
//! certificates on the client and route ports, a password between routes, logging's
//! nkey as a user whose permissions allow what the store does and nothing that would
//! lose the log ([`LOGGING_PUBLISH`]), and optionally an admin's nkey allowed anything.
//! [`Credentials`] is how a client gets in.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;

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

/// What logging may publish on a locked-down cluster: the two streams' subjects, and the
/// JetStream API calls the store makes on them. Everything else is refused, above all
/// deleting, purging or changing `MESSAGES` and any consumer. `MESSAGES_BLOCKS` holds
/// derived data that logging maintains (it rebuilds the stream when it is stale), so
/// logging may delete and update that one.
pub const LOGGING_PUBLISH: &[&str] = &[
    "messages.>",
    "blocks.>",
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.MESSAGES",
    "$JS.API.STREAM.INFO.MESSAGES_BLOCKS",
    "$JS.API.STREAM.CREATE.MESSAGES",
    "$JS.API.STREAM.CREATE.MESSAGES_BLOCKS",
    "$JS.API.STREAM.UPDATE.MESSAGES_BLOCKS",
    "$JS.API.STREAM.DELETE.MESSAGES_BLOCKS",
    "$JS.API.STREAM.MSG.GET.MESSAGES",
    "$JS.API.STREAM.MSG.GET.MESSAGES_BLOCKS",
    "$JS.API.DIRECT.GET.MESSAGES",
    "$JS.API.DIRECT.GET.MESSAGES.>",
    "$JS.API.DIRECT.GET.MESSAGES_BLOCKS",
    "$JS.API.DIRECT.GET.MESSAGES_BLOCKS.>",
];

/// Refused to logging even where an allowed pattern would match, so a later widening of
/// the list above cannot open them by accident.
pub const LOGGING_DENIED: &[&str] = &[
    "$JS.API.STREAM.DELETE.MESSAGES",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.UPDATE.MESSAGES",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.CONSUMER.>",
];

/// A locked-down cluster: each node's certificate, the CA, the password routes present,
/// and the public nkey of the logging user.
#[derive(Debug, Clone)]
pub struct Lockdown {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub route_secret: String,
    /// `U...`: the public half of the seed logging holds.
    pub logging_user: String,
    /// An operator's user, allowed everything (stream edits, leader moves): the public
    /// half of a seed kept off the hosts.
    pub admin_user: Option<String>,
}

impl Lockdown {
    /// The logging user's public key, from its seed (`SU...`).
    pub fn public_user(seed: &str) -> anyhow::Result<String> {
        Ok(nkeys::KeyPair::from_seed(seed.trim())
            .context("not an nkey seed")?
            .public_key())
    }
}

/// JSON strings are valid strings in nats-server's configuration language.
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn quoted_list(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().map(|item| quoted(&item)).collect();
    format!("[{}]", items.join(", "))
}

impl Node {
    /// This node's configuration under `lockdown`, given every node of the cluster.
    pub fn config(&self, cluster: &[Node], lockdown: &Lockdown) -> String {
        let tls = format!(
            "{{ cert_file: {}, key_file: {}, ca_file: {}, verify: true, timeout: 2 }}",
            quoted(&lockdown.cert.display().to_string()),
            quoted(&lockdown.key.display().to_string()),
            quoted(&lockdown.ca.display().to_string()),
        );
        let mut config = format!(
            "server_name: {name}\nlisten: {listen}\njetstream {{ store_dir: {dir} }}\n\
             tls {tls}\n\
             authorization {{\n  users: [\n    {{ nkey: {user}, permissions: {{\n      \
             publish: {{ allow: {allow}, deny: {deny} }},\n      \
             subscribe: {{ allow: [\"_INBOX.>\"] }}\n    }} }}{admin}\n  ]\n}}\n",
            admin = lockdown
                .admin_user
                .as_ref()
                .map(|admin| format!(",\n    {{ nkey: {} }}", quoted(admin)))
                .unwrap_or_default(),
            name = quoted(&self.name),
            listen = quoted(&format!("{}:{}", self.host, self.client_port)),
            dir = quoted(&self.data_dir.display().to_string()),
            user = quoted(&lockdown.logging_user),
            allow = quoted_list(LOGGING_PUBLISH.iter().map(|s| s.to_string())),
            deny = quoted_list(LOGGING_DENIED.iter().map(|s| s.to_string())),
        );
        if let Some(cluster_port) = self.cluster_port {
            let routes = cluster
                .iter()
                .filter(|peer| peer.name != self.name)
                .filter_map(|peer| {
                    Some(format!(
                        "nats-route://route:{}@{}:{}",
                        lockdown.route_secret, peer.host, peer.cluster_port?
                    ))
                });
            config.push_str(&format!(
                "cluster {{\n  name: messages\n  listen: {listen}\n  routes: {routes}\n  \
                 tls {tls}\n  authorization {{ user: route, password: {secret} }}\n}}\n",
                listen = quoted(&format!("{}:{cluster_port}", self.host)),
                routes = quoted_list(routes),
                secret = quoted(&lockdown.route_secret),
            ));
        }
        config
    }

    /// Writes [`Node::config`] next to the node's data (readable by its owner only: it
    /// holds the route password) and returns the command line that uses it.
    pub fn locked_args(
        &self,
        cluster: &[Node],
        lockdown: &Lockdown,
    ) -> anyhow::Result<Vec<String>> {
        let path = self.data_dir.with_extension("conf");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(self.config(cluster, lockdown).as_bytes())?;
        Ok(vec!["--config".to_owned(), path.display().to_string()])
    }
}

/// How a client gets into a cluster: TLS with a client certificate, and an nkey seed,
/// when the cluster is locked down; nothing otherwise.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The CA, the client's certificate and its key.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// The user's nkey seed (`SU...`).
    pub nkey_seed: Option<String>,
}

impl Credentials {
    /// Connect options carrying these credentials (TLS required when there is TLS).
    pub fn options(&self) -> async_nats::ConnectOptions {
        let mut options = async_nats::ConnectOptions::new();
        if let Some((ca, cert, key)) = &self.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(ca.clone())
                .add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        options
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
    wait_ready_as(&Credentials::default(), urls, limit, cancel).await
}

/// [`wait_ready`] for a client with `credentials`.
pub async fn wait_ready_as(
    credentials: &Credentials,
    urls: &str,
    limit: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let servers: Vec<&str> = urls.split(',').map(str::trim).collect();
    let attempt = || async {
        let client = credentials
            .options()
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
