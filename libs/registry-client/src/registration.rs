//! One instance's presence in the registry: registered and heartbeating with every
//! replica, under an id the instance chose, so every replica lists it the same way.
//!
//! A supervisor task keeps one keeper per known replica and asks for the list of
//! replicas every [`REFRESH`]. Each keeper registers with its replica (retrying with
//! capped jittered backoff while it is unreachable), heartbeats at the pace the replica
//! sets, registers again at once when the replica answers `NOT_FOUND` (it restarted or
//! evicted us), and deregisters on shutdown with a short deadline. The instance counts as
//! registered while any replica holds it, and keeps serving throughout: an unreachable
//! registry only means others cannot find it for a while.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use retry::Retry;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{debug, info, warn};

use crate::{replicas::REFRESH, RegistryClient};

/// First retry delay while a replica is unreachable.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest retry delay while registering.
const RETRY_CAP: Duration = Duration::from_secs(1);

/// What is registered: the same on every replica.
struct Instance {
    id: String,
    service: String,
    address: String,
    metadata: HashMap<String, String>,
}

/// One instance's presence in the registry, kept up by a background task.
pub struct Registration {
    id: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
    holders: watch::Receiver<BTreeSet<String>>,
}

impl Registration {
    /// Starts registering `service` at `address` with every replica `client` knows or
    /// learns of, and keeping it registered.
    pub fn start(
        client: RegistryClient,
        service: impl Into<String>,
        address: impl Into<String>,
        metadata: HashMap<String, String>,
    ) -> Self {
        let instance = Arc::new(Instance {
            id: uuid::Uuid::new_v4().to_string(),
            service: service.into(),
            address: address.into(),
            metadata,
        });
        let stop = CancellationToken::new();
        let (holders_tx, holders) = watch::channel(BTreeSet::new());
        let id = instance.id.clone();
        let task = tokio::spawn(supervise(client, instance, holders_tx, stop.clone()));
        Self {
            id,
            stop,
            task,
            holders,
        }
    }

    /// The instance id, the same on every replica.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The replicas (`host:port`) that hold this instance now.
    pub fn holders(&self) -> BTreeSet<String> {
        self.holders.borrow().clone()
    }

    /// Waits until a replica has accepted this instance; returns its id.
    pub async fn registered(&self) -> String {
        let mut holders = self.holders.clone();
        if holders.wait_for(|h| !h.is_empty()).await.is_err() {
            // The task ended without registering; nothing will change any more.
            std::future::pending::<()>().await;
        }
        self.id.clone()
    }

    /// Stops heartbeating and deregisters from every replica (each with a short
    /// deadline), so the instance leaves the registry at once instead of after its TTL.
    pub async fn deregister(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            warn!(%error, "registration task failed");
        }
    }
}

/// Keeps one keeper per known replica until `stop`; then every keeper deregisters.
async fn supervise(
    client: RegistryClient,
    instance: Arc<Instance>,
    holders: watch::Sender<BTreeSet<String>>,
    stop: CancellationToken,
) {
    let holders = Arc::new(holders);
    let mut keepers: HashMap<String, (CancellationToken, JoinHandle<bool>)> = HashMap::new();
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = refresh.tick() => {}
        }
        if let Err(status) = client.refresh_replicas().await {
            debug!(
                error = status.message(),
                "could not ask for the registry replicas"
            );
        }
        let known = client.per_replica();
        keepers.retain(|address, (stop, _)| {
            let keep = known.iter().any(|(known, _)| known == address);
            if !keep {
                info!(
                    replica = address,
                    "no longer a registry replica; leaving it"
                );
                stop.cancel();
            }
            keep
        });
        for (address, only) in known {
            if keepers.contains_key(&address) {
                continue;
            }
            let keeper = Keeper {
                client: only,
                replica: address.clone(),
                instance: Arc::clone(&instance),
                holders: Arc::clone(&holders),
            };
            let keeper_stop = stop.child_token();
            let task = tokio::spawn(keeper.run(keeper_stop.clone()));
            keepers.insert(address, (keeper_stop, task));
        }
    }
    let mut left = Vec::new();
    for (replica, (_, task)) in keepers {
        match task.await {
            Ok(true) => left.push(replica),
            Ok(false) => {}
            Err(error) => warn!(%error, "registration keeper failed"),
        }
    }
    if !left.is_empty() {
        left.sort();
        info!(service = instance.service, instance_id = instance.id, replicas = ?left, "deregistered");
    }
}

struct Keeper {
    client: RegistryClient,
    replica: String,
    instance: Arc<Instance>,
    holders: Arc<watch::Sender<BTreeSet<String>>>,
}

/// How a registered instance's heartbeats ended.
enum Heartbeats {
    /// The replica no longer knows the instance: register again.
    Forgotten,
    /// Shutdown.
    Stopped,
}

impl Keeper {
    /// Register (retrying until accepted), heartbeat until the replica forgets us,
    /// again; on `stop`, deregister. Returns whether it deregistered.
    async fn run(self, stop: CancellationToken) -> bool {
        let instance = &self.instance;
        let register = Retry::new(
            format!(
                "registering {} at {} with registry replica {}",
                instance.service, instance.address, self.replica
            ),
            &stop,
        )
        .backoff(RETRY_BASE, RETRY_CAP);
        let mut forgotten = false;
        let mut deregistered = false;
        loop {
            let lease = register
                .run(
                    || async {
                        self.client
                            .register(
                                &instance.service,
                                &instance.address,
                                &instance.metadata,
                                &instance.id,
                            )
                            .await
                            .map_err(rpc::CallError)
                    },
                    |_| false, // a refusal (full, bad name) may be lifted later: keep asking
                )
                .await;
            let Ok(lease) = lease else { break }; // only cancellation ends the retry
            let interval = Duration::from_millis(lease.heartbeat_interval_ms.max(1));
            let mut first = false;
            self.holders.send_modify(|holders| {
                first = holders.is_empty();
                holders.insert(self.replica.clone());
            });
            if first || forgotten {
                info!(
                    service = instance.service,
                    address = instance.address,
                    instance_id = instance.id,
                    replica = self.replica,
                    heartbeat_interval = %humantime::format_duration(interval),
                    ttl = %humantime::format_duration(Duration::from_millis(lease.ttl_ms)),
                    "registered with the registry"
                );
            } else {
                debug!(
                    instance_id = instance.id,
                    replica = self.replica,
                    "registered with another replica"
                );
            }
            match self.heartbeat(interval, &stop).await {
                Heartbeats::Forgotten => {
                    self.leave_holders();
                    forgotten = true;
                }
                Heartbeats::Stopped => {
                    deregistered = self.deregister().await;
                    break;
                }
            }
        }
        self.leave_holders();
        deregistered
    }

    fn leave_holders(&self) {
        self.holders
            .send_if_modified(|holders| holders.remove(&self.replica));
    }

    /// Heartbeats every `interval` until the replica forgets us or `stop` fires. While
    /// the replica is unreachable it keeps the pace: a heartbeat per interval is already
    /// gentle, and it brings us back within one interval of the replica's return.
    async fn heartbeat(&self, interval: Duration, stop: &CancellationToken) -> Heartbeats {
        let id = &self.instance.id;
        let service = &self.instance.service;
        let mut unreachable = false;
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return Heartbeats::Stopped,
                result = async {
                    tokio::time::sleep(interval).await;
                    self.client.heartbeat(id, interval).await
                } => result,
            };
            match result {
                Ok(()) if unreachable => {
                    info!(
                        service,
                        instance_id = id,
                        replica = self.replica,
                        "registry replica reachable again"
                    );
                    unreachable = false;
                }
                Ok(()) => {}
                Err(status) if status.code() == Code::NotFound => {
                    info!(service, instance_id = id, replica = self.replica,
                          "registry replica does not know this instance (restarted or evicted it); registering again");
                    return Heartbeats::Forgotten;
                }
                Err(status) => {
                    if !unreachable {
                        warn!(service, replica = self.replica, error = %status.message(),
                              "heartbeat failed; still serving, will keep trying");
                        unreachable = true;
                    }
                }
            }
        }
    }

    async fn deregister(&self) -> bool {
        let (id, service) = (&self.instance.id, &self.instance.service);
        match self.client.deregister(id).await {
            Ok(()) => true,
            Err(status) => {
                warn!(service, instance_id = id, replica = self.replica,
                      error = %status.message(),
                      "could not deregister; the replica will evict this instance after its ttl");
                false
            }
        }
    }
}
