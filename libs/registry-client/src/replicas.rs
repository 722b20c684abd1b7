//! The registry replicas a client knows, and how a call moves between them.
//!
//! Replicas share nothing: each builds its list from the instances' own registrations (see
//! [`crate::Registration`]), so any live replica answers a lookup as well as another.
//! A call goes to the replica that answered last; when it does not answer (refused,
//! reset, or silent past its share of the deadline) the next one is asked within the
//! same call, and the one that answers becomes the first to ask. A crashed replica costs
//! one refused connection; a frozen one costs one share of the deadline, once.
//!
//! The list starts from the seeds (`--registry URL,URL...` or the runner's replica file)
//! and grows from what any replica lists as the service [`REGISTRY_SERVICE`], refreshed
//! every [`REFRESH`].

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::RwLock;

use anyhow::Context;
use proto::registry::v1::registry_client;
use rpc::{AddressError, Transport};
use tokio::time::Instant;
use tonic::{transport::Channel, Code, Status};
use tracing::{debug, info};

/// The service under which every replica lists all replicas.
pub const REGISTRY_SERVICE: &str = "config-server";
/// Where the runner writes the replicas it started (one `host:port` a line), and where
/// services look when `--registry` is not given.
pub const DEFAULT_REPLICAS_FILE: &str = "data/registry.replicas";
/// How often a client asks for the list of replicas again.
pub const REFRESH: Duration = Duration::from_secs(5);
/// HTTP/2 pings on registry connections: a replica that stops answering them (frozen,
/// or its host gone) has its connection closed, which ends a Watch on it, within about
/// twice this.
const KEEPALIVE: Duration = Duration::from_millis(250);
/// HTTP/2 pings on a session's own connection. A session's stream never closes, so its
/// connection pings all the time, where lookups' connections ping only during a call:
/// once a second, as often as the heartbeats go, still closes a connection to a replica
/// that went silent (frozen, or cut off) within two seconds, so the keeper opens a new
/// one and is back soon after the replica is.
pub const SESSION_KEEPALIVE: Duration = Duration::from_secs(1);

pub(crate) type Client = registry_client::RegistryClient<Channel>;

/// One replica: where it is, and a lazily connected channel to it.
#[derive(Clone)]
pub(crate) struct Replica {
    pub(crate) address: String,
    pub(crate) client: Client,
    transport: Transport,
}

impl Replica {
    /// A client on a connection of its own, for one session: opened afresh for every
    /// session (never a pooled connection that a reset may have broken), and closed
    /// with it.
    pub(crate) fn session_client(&self) -> Result<Client, AddressError> {
        let channel = self
            .transport
            .endpoint(&self.address)?
            .http2_keep_alive_interval(SESSION_KEEPALIVE)
            .keep_alive_timeout(SESSION_KEEPALIVE)
            .connect_lazy();
        Ok(registry_client::RegistryClient::new(channel))
    }

    fn new(address: &str, transport: &Transport) -> Result<Self, AddressError> {
        let channel = transport
            .endpoint(address)?
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .connect_lazy();
        Ok(Self {
            address: address.to_owned(),
            client: registry_client::RegistryClient::new(channel),
            transport: transport.clone(),
        })
    }
}

pub(crate) struct Replicas {
    seeds: Vec<String>,
    transport: Transport,
    known: RwLock<Arc<Vec<Replica>>>,
    /// Index into `known` of the replica to ask first.
    preferred: AtomicUsize,
}

/// `http://host:port` or `host:port` as `host:port`, the way the registry lists it.
pub fn normalize(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.trim_end_matches('/').to_owned()
}

/// Whether another replica might answer where this one failed: it was not reached or
/// did not answer in time. Anything it answered (not found, refused, bad request) any
/// replica would answer the same.
fn worth_another_replica(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

impl Replicas {
    /// The replicas at `urls`, reached over `transport`. A URL whose scheme asks for
    /// what the transport is not (`https://` without TLS, `http://` with it) is an error.
    pub(crate) fn new(urls: &[String], transport: &Transport) -> Result<Self, AddressError> {
        let mut seeds: Vec<String> = Vec::new();
        for url in urls.iter().filter(|url| !url.is_empty()) {
            transport.endpoint(url)?;
            let address = normalize(url);
            if !address.is_empty() && !seeds.contains(&address) {
                seeds.push(address);
            }
        }
        let known = seeds
            .iter()
            .map(|address| Replica::new(address, transport))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            seeds,
            transport: transport.clone(),
            known: RwLock::new(Arc::new(known)),
            preferred: AtomicUsize::new(0),
        })
    }

    /// Just this replica, sharing its channel.
    pub(crate) fn of(replica: Replica) -> Self {
        Self {
            seeds: vec![replica.address.clone()],
            transport: replica.transport.clone(),
            known: RwLock::new(Arc::new(vec![replica])),
            preferred: AtomicUsize::new(0),
        }
    }

    pub(crate) fn known(&self) -> Arc<Vec<Replica>> {
        Arc::clone(&self.known.read())
    }

    pub(crate) fn addresses(&self) -> Vec<String> {
        self.known().iter().map(|r| r.address.clone()).collect()
    }

    /// Runs `call` on the preferred replica and, while replicas fail to answer, on the
    /// next ones, all within `deadline`: each gets an equal share of what is left. The
    /// replica that answers is asked first next time.
    pub(crate) async fn call<T, F, Fut>(&self, deadline: Duration, call: F) -> Result<T, Status>
    where
        F: Fn(Client, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let known = self.known();
        let count = known.len();
        if count == 0 {
            return Err(Status::unavailable("no registry replica is known"));
        }
        let start = Instant::now();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        let mut failure = None;
        for attempt in 0..count {
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(count - attempt).unwrap_or(u32::MAX);
            let index = (first + attempt) % count;
            let replica = &known[index];
            match rpc::call(share, call(replica.client.clone(), share)).await {
                Ok(value) => {
                    if attempt > 0 {
                        self.preferred.store(index, Ordering::Relaxed);
                        info!(replica = replica.address, "registry: now asking this replica first (the one before did not answer)");
                    }
                    return Ok(value);
                }
                Err(status) if worth_another_replica(&status) => {
                    debug!(
                        replica = replica.address,
                        error = status.message(),
                        "registry replica did not answer"
                    );
                    failure = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(failure.unwrap_or_else(|| Status::deadline_exceeded("registry call timed out")))
    }

    /// Takes `listed` (what a replica lists as [`REGISTRY_SERVICE`]) plus the seeds as
    /// the known replicas; returns whether that changed anything.
    pub(crate) fn learn(&self, listed: Vec<String>) -> Result<bool, AddressError> {
        let old = self.known();
        let mut wanted = self.seeds.clone();
        for address in listed {
            if !wanted.contains(&address) {
                wanted.push(address);
            }
        }
        let mut unchanged = old.len() == wanted.len();
        let mut known = Vec::with_capacity(wanted.len());
        for address in &wanted {
            match old.iter().find(|r| &r.address == address) {
                Some(replica) => known.push(replica.clone()),
                None => {
                    unchanged = false;
                    known.push(Replica::new(address, &self.transport)?);
                }
            }
        }
        if unchanged {
            return Ok(false);
        }
        let preferred = old
            .get(self.preferred.load(Ordering::Relaxed) % old.len().max(1))
            .and_then(|p| known.iter().position(|r| r.address == p.address))
            .unwrap_or(0);
        *self.known.write() = Arc::new(known);
        self.preferred.store(preferred, Ordering::Relaxed);
        info!(replicas = ?wanted, "registry replicas");
        Ok(true)
    }
}

/// The replicas in a replica file: one `host:port` (or URL) a line; blank lines and
/// `#` comments are skipped.
pub fn read_replicas_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read replica file {}", path.display()))?;
    let replicas: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(
        !replicas.is_empty(),
        "replica file {} lists no replica",
        path.display()
    );
    Ok(replicas)
}

/// The default replica file, if it exists.
pub fn default_replicas_file() -> Option<PathBuf> {
    let path = PathBuf::from(DEFAULT_REPLICAS_FILE);
    path.exists().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_addresses_name_a_replica_the_same_way() {
        assert_eq!(normalize("http://127.0.0.1:50050"), "127.0.0.1:50050");
        assert_eq!(normalize("http://127.0.0.1:50050/"), "127.0.0.1:50050");
        assert_eq!(normalize("127.0.0.1:50050"), "127.0.0.1:50050");
    }

    #[tokio::test]
    async fn learning_keeps_the_seeds_adds_the_listed_and_keeps_the_preferred() {
        let replicas = Replicas::new(
            &["http://127.0.0.1:1".into(), "127.0.0.1:1".into()],
            &Transport::plaintext(),
        )
        .expect("replicas");
        assert_eq!(replicas.addresses(), ["127.0.0.1:1"], "seeds deduplicated");
        let listed = vec!["127.0.0.1:2".to_owned(), "127.0.0.1:3".to_owned()];
        assert!(replicas.learn(listed.clone()).expect("learn"));
        assert_eq!(
            replicas.addresses(),
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        );
        assert!(!replicas.learn(listed).expect("learn"), "nothing new");
        replicas.preferred.store(2, Ordering::Relaxed);
        assert!(replicas.learn(vec!["127.0.0.1:3".into()]).expect("learn"));
        assert_eq!(replicas.addresses(), ["127.0.0.1:1", "127.0.0.1:3"]);
        assert_eq!(replicas.preferred.load(Ordering::Relaxed), 1, "still :3");
    }

    #[tokio::test]
    async fn a_call_moves_on_from_replicas_that_do_not_answer_and_remembers_who_did() {
        let replicas = Replicas::new(
            &[
                "127.0.0.1:1".into(),
                "127.0.0.1:2".into(),
                "127.0.0.1:3".into(),
            ],
            &Transport::plaintext(),
        )
        .expect("replicas");
        // Every replica refusing: each is asked once, and the last refusal comes back.
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let result = replicas
            .call(Duration::from_secs(1), |_, _| {
                asked.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(Status::unavailable("refused")) }
            })
            .await;
        assert_eq!(result.expect_err("all down").code(), Code::Unavailable);
        assert_eq!(asked.load(Ordering::Relaxed), 3);
        // A refusal that any replica would give is not retried elsewhere.
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let result = replicas
            .call(Duration::from_secs(1), |_, _| {
                asked.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(Status::not_found("no such setting")) }
            })
            .await;
        assert_eq!(result.expect_err("not found").code(), Code::NotFound);
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        // The second of three answers: it is asked first from then on.
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let answer_on_second = |_: Client, _: Duration| {
            let n = asked.fetch_add(1, Ordering::Relaxed);
            async move {
                if n == 0 {
                    Err(Status::unavailable("refused"))
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(
            replicas
                .call(Duration::from_secs(1), answer_on_second)
                .await
                .ok(),
            Some(1)
        );
        assert_eq!(replicas.preferred.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_silent_replica_gets_only_its_share_of_the_deadline() {
        let replicas = Replicas::new(
            &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            &Transport::plaintext(),
        )
        .expect("replicas");
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let start = std::time::Instant::now();
        let result = replicas
            .call(Duration::from_millis(400), |_, share| {
                let n = asked.fetch_add(1, Ordering::Relaxed);
                async move {
                    if n == 0 {
                        std::future::pending::<()>().await; // frozen
                    }
                    Ok(share)
                }
            })
            .await;
        let share = result.expect("the second answers");
        assert!(share <= Duration::from_millis(400), "{share:?}");
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        assert!(
            start.elapsed() >= Duration::from_millis(190),
            "{:?}",
            start.elapsed()
        );
    }
}
