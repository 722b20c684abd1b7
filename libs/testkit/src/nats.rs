//! Real `nats-server` processes for tests (the `nats` feature).

use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use local_nats::Credentials;
use tokio_util::sync::CancellationToken;

use crate::{free_port, Proc};

/// Real `nats-server` processes with JetStream on free ports, data in a temporary
/// directory removed at the end. Stopped (kill -9) when dropped.
pub struct Nats {
    pub nodes: Vec<local_nats::Node>,
    procs: Vec<Option<Proc>>,
    dir: PathBuf,
    program: PathBuf,
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
        let program =
            local_nats::server_path().expect("nats-server is not installed: run scripts/setup");
        Self::single_of(program).await
    }

    /// One JetStream server (R1) of the binary `program`.
    pub async fn single_of(program: PathBuf) -> Self {
        let dir = Self::data_dir();
        let nodes = vec![local_nats::Node {
            name: "nats-1".into(),
            host: "127.0.0.1".into(),
            client_port: free_port(),
            cluster_port: None,
            data_dir: dir.join("node-1"),
        }];
        Self::start(nodes, dir, program).await
    }

    /// A cluster of `size` nodes (R3 streams need three).
    pub async fn cluster(size: usize) -> Self {
        let program =
            local_nats::server_path().expect("nats-server is not installed: run scripts/setup");
        let dir = Self::data_dir();
        let client: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let cluster: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes = local_nats::cluster(&client, &cluster, &dir);
        Self::start(nodes, dir, program).await
    }

    async fn start(nodes: Vec<local_nats::Node>, dir: PathBuf, program: PathBuf) -> Self {
        let mut nats = Self {
            procs: nodes.iter().map(|_| None).collect(),
            nodes,
            dir,
            program,
        };
        for i in 0..nats.nodes.len() {
            nats.start_node(i);
        }
        nats.wait_ready().await;
        nats
    }

    pub async fn wait_ready(&self) {
        local_nats::wait_ready(
            &self.urls(),
            Duration::from_secs(30),
            &CancellationToken::new(),
        )
        .await
        .expect("JetStream ready");
    }

    /// Starts node `i` (again, after a kill: same ports, same data).
    pub fn start_node(&mut self, i: usize) {
        let node = &self.nodes[i];
        let args = node.args(&self.nodes);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.procs[i] = Some(Proc::spawn(&node.name, &self.program, &args));
    }

    /// kill -9 of node `i`.
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut proc) = self.procs[i].take() {
            proc.kill9().await;
        }
    }

    /// Freezes node `i` (SIGSTOP): its connections stay open and silent, as a host cut
    /// off from the others would look to them.
    pub fn freeze(&self, i: usize) {
        if let Some(proc) = &self.procs[i] {
            proc.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Resumes node `i` after [`Nats::freeze`] (SIGCONT).
    pub fn resume(&self, i: usize) {
        if let Some(proc) = &self.procs[i] {
            proc.signal(nix::sys::signal::Signal::SIGCONT);
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
        local_nats::urls(&self.nodes)
    }

    /// The index of the node that leads `stream`, asked through any running node.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        for (node, proc) in self.nodes.iter().zip(&self.procs) {
            if proc.is_none() {
                continue;
            }
            if let Some((leader, _)) = leader_of(&node.url(), stream).await {
                return self.nodes.iter().position(|n| n.name == leader);
            }
        }
        None
    }
}

/// The server that leads `stream`, and whether every other replica is current (caught
/// up and online), asked through `urls` (any node that answers).
pub async fn leader_of(urls: &str, stream: &str) -> Option<(String, bool)> {
    leader_of_as(&Credentials::default(), urls, stream).await
}

/// [`leader_of`], for a client with `credentials` (a locked-down cluster's admin).
pub async fn leader_of_as(
    credentials: &Credentials,
    urls: &str,
    stream: &str,
) -> Option<(String, bool)> {
    let servers: Vec<&str> = urls.split(',').collect();
    let client = credentials
        .options()
        .connection_timeout(std::time::Duration::from_millis(500))
        .connect(servers.as_slice())
        .await
        .ok()?;
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream.get_stream(stream).await.ok()?;
    let cluster = stream.cached_info().cluster.as_ref()?;
    let current = cluster
        .replicas
        .iter()
        .all(|peer| peer.current && !peer.offline);
    Some((cluster.leader.clone()?, current))
}

/// Waits until every replica of `stream` is current: a cluster healed from one fault,
/// before a test brings the next.
pub async fn until_current(urls: &str, stream: &str) {
    until_current_as(&Credentials::default(), urls, stream).await;
}

/// [`until_current`], for a client with `credentials`.
pub async fn until_current_as(credentials: &Credentials, urls: &str, stream: &str) {
    crate::eventually(
        std::time::Duration::from_secs(60),
        &format!("every replica of {stream} current"),
        || async {
            leader_of_as(credentials, urls, stream)
                .await
                .is_some_and(|(_, current)| current)
        },
    )
    .await;
}

/// Moves the leadership of `stream` to the server named `to` (a step-down with a
/// preferred placement, nats-server 2.11 and newer) and waits until it leads with every
/// replica current: how a test makes sure the node it is about to cut off or kill is the
/// one writes depend on, on a cluster that has healed from whatever came before.
pub async fn move_leader(urls: &str, stream: &str, to: &str) {
    move_leader_as(&Credentials::default(), urls, stream, to).await;
}

/// [`move_leader`], for a client with `credentials`.
pub async fn move_leader_as(credentials: &Credentials, urls: &str, stream: &str, to: &str) {
    until_current_as(credentials, urls, stream).await;
    crate::eventually(
        std::time::Duration::from_secs(30),
        &format!("{to} leading {stream}"),
        || async {
            match leader_of_as(credentials, urls, stream).await {
                Some((leader, true)) if leader == to => return true,
                Some((_, false)) | None => return false,
                Some(_) => {}
            }
            let servers: Vec<&str> = urls.split(',').collect();
            if let Ok(client) = credentials.options().connect(servers.as_slice()).await {
                let request = serde_json::json!({ "placement": { "preferred": to } });
                let _ = client
                    .request(
                        format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                        request.to_string().into(),
                    )
                    .await;
            }
            false
        },
    )
    .await;
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
