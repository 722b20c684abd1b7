//! Finding live instances, in one of two modes:
//!
//! - `watch` (the default): a background task per service keeps the list from the
//!   registry's `Watch` stream, so a call costs no registry round trip. While the stream
//!   is down (the registry restarted, say) calls fall back to per-call lookups, and the
//!   task reconnects with backoff.
//! - `per-call` (DESIGN.md's original spec): a registry Lookup before every call, with
//!   the last list seen kept as a fallback for when the registry cannot be reached.
//!   Concurrent calls share lookups, each taking an answer from a lookup that began after
//!   it arrived ([`crate::coalesce`]).
//!
//! [`Discovery::changes`] counts list changes and [`Discovery::listed`] names every
//! address still listed, so the facade's channel pool can forget the others.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::{Mutex, MutexGuard};

use registry_client::RegistryClient;
use tonic::Status;

use crate::coalesce::Coalesced;
use retry::Retry;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use registry_client::DiscoveryMode;

/// The last pushed list of addresses, when it came, and whether the Watch stream is
/// still live.
#[derive(Debug, Clone, Default)]
struct Pushed {
    live: bool,
    addresses: Arc<Vec<String>>,
    at: Option<Instant>,
}

/// The most recent list seen from either source, and when.
type Known = HashMap<String, (Instant, Vec<String>)>;

pub struct Discovery {
    registry: RegistryClient,
    last_known: Mutex<Known>,
    registry_down: AtomicBool,
    pushed: HashMap<String, watch::Receiver<Pushed>>,
    /// Per service: lookups shared by the calls that want them at once.
    lookups: HashMap<String, Coalesced<Result<Vec<String>, Status>>>,
    watchers: Vec<JoinHandle<()>>,
    /// Bumped whenever a list from either source differs from the one before.
    changes: Arc<AtomicU64>,
}

impl Discovery {
    /// Discovery of `services`; in `watch` mode one task per service follows the
    /// registry until `shutdown`.
    pub fn new(
        registry: RegistryClient,
        mode: DiscoveryMode,
        services: &[&str],
        shutdown: &CancellationToken,
    ) -> Self {
        let mut pushed = HashMap::new();
        let mut watchers = Vec::new();
        let changes = Arc::new(AtomicU64::new(0));
        if mode == DiscoveryMode::Watch {
            for service in services {
                let (tx, rx) = watch::channel(Pushed::default());
                pushed.insert((*service).to_owned(), rx);
                watchers.push(tokio::spawn(follow(
                    registry.clone(),
                    (*service).to_owned(),
                    tx,
                    Arc::clone(&changes),
                    shutdown.clone(),
                )));
            }
        }
        let lookups = services
            .iter()
            .map(|service| ((*service).to_owned(), Coalesced::new()))
            .collect();
        Self {
            registry,
            last_known: Mutex::new(HashMap::new()),
            registry_down: AtomicBool::new(false),
            pushed,
            lookups,
            watchers,
            changes,
        }
    }

    /// How many times a list has changed; cheap to read on every call.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Every address calls may still use, for any service: the pushed list where the Watch
    /// stream is live (what calls then read, whatever an earlier lookup saw), else the
    /// lists from either source.
    pub fn listed(&self) -> HashSet<String> {
        let known = self.last_known();
        let mut listed = HashSet::new();
        for (service, pushed) in &self.pushed {
            let pushed = pushed.borrow();
            listed.extend(pushed.addresses.iter().cloned());
            if !pushed.live {
                if let Some((_, addresses)) = known.get(service) {
                    listed.extend(addresses.iter().cloned());
                }
            }
        }
        for (service, (_, addresses)) in known.iter() {
            if !self.pushed.contains_key(service) {
                listed.extend(addresses.iter().cloned());
            }
        }
        listed
    }

    fn last_known(&self) -> MutexGuard<'_, Known> {
        self.last_known.lock()
    }

    /// Addresses of the live instances of `service`.
    pub async fn instances(&self, service: &str) -> Vec<String> {
        if let Some(pushed) = self.pushed.get(service) {
            let Pushed {
                live,
                addresses,
                at,
            } = pushed.borrow().clone();
            if live {
                return addresses.as_ref().clone();
            }
            // The stream is down: look up per call; if the registry is down too, the
            // newest list from either source is the last known one.
            if let Some(at) = at {
                let mut known = self.last_known();
                if known.get(service).is_none_or(|(seen, _)| *seen < at) {
                    known.insert(service.to_owned(), (at, addresses.as_ref().clone()));
                }
            }
        }
        self.lookup(service).await
    }

    /// A registry lookup; when the registry is unreachable, the last list it gave (said
    /// once in the log per outage).
    async fn lookup(&self, service: &str) -> Vec<String> {
        let ask = || async {
            let reply = self.registry.lookup(service).await?;
            Ok(reply
                .instances
                .into_iter()
                .map(|i| i.address)
                .collect::<Vec<String>>())
        };
        let answer = match self.lookups.get(service) {
            Some(shared) => shared.get(ask).await,
            None => ask().await,
        };
        match answer {
            Ok(addresses) => {
                if self.registry_down.swap(false, Ordering::Relaxed) {
                    info!("registry reachable again; using fresh lookups");
                }
                let mut known = self.last_known();
                match known.get_mut(service) {
                    Some((seen, list)) if *list == addresses => *seen = Instant::now(),
                    _ => {
                        known.insert(service.to_owned(), (Instant::now(), addresses.clone()));
                        self.changes.fetch_add(1, Ordering::AcqRel);
                    }
                }
                drop(known);
                addresses
            }
            Err(status) => {
                let fallback = self
                    .last_known()
                    .get(service)
                    .map(|(_, addresses)| addresses.clone())
                    .unwrap_or_default();
                if !self.registry_down.swap(true, Ordering::Relaxed) {
                    warn!(error = status.message(), service, known = ?fallback,
                          "registry unreachable; using the last known instances");
                }
                fallback
            }
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

/// Follows `service` on the registry's Watch stream, reconnecting with backoff, until
/// `shutdown`.
async fn follow(
    registry: RegistryClient,
    service: String,
    pushed: watch::Sender<Pushed>,
    changes: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let watching = Retry::new(
        format!("watching {service} on the registry (per-call lookups meanwhile)"),
        &shutdown,
    );
    loop {
        let opened = watching
            .run(
                || async { registry.watch(&service).await.map_err(rpc::CallError) },
                |_| false,
            )
            .await;
        let Ok(mut stream) = opened else { return }; // shutdown
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = stream.message() => next,
            };
            let Ok(Some(snapshot)) = next else {
                warn!(
                    service,
                    "registry watch ended; using per-call lookups until it is back"
                );
                break;
            };
            let addresses: Vec<String> =
                snapshot.instances.into_iter().map(|i| i.address).collect();
            let changed = *pushed.borrow().addresses != addresses;
            metrics::gauge!("facade_watched_instances", "service" => service.clone())
                .set(addresses.len() as f64);
            pushed.send_replace(Pushed {
                live: true,
                addresses: Arc::new(addresses),
                at: Some(Instant::now()),
            });
            if changed {
                changes.fetch_add(1, Ordering::AcqRel);
            }
        }
        pushed.send_modify(|pushed| pushed.live = false);
    }
}
