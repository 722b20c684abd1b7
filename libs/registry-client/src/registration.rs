//! One instance's presence in the registry: registered and heartbeating with every
//! replica, under an id the instance chose, so every replica lists it the same way.
//!
//! A supervisor task keeps one keeper per known replica and asks for the list of
//! replicas every [`REFRESH`]. Each keeper holds a `Session` stream with its replica
//! ([`RegistrationMode::Session`], the default): it registers as the stream's first
//! message, heartbeats on it at the pace the replica sets, registers again on it when
//! the replica asks (it evicted us after a hang), and deregisters on it on shutdown,
//! with a short deadline. If this process dies, its connection closes and every replica
//! drops the instance at once. When a session breaks while we live (a reset connection,
//! a replica restart), the keeper opens a new one at once, and then with capped jittered
//! backoff while the replica is unreachable.
//!
//! With [`RegistrationMode::Unary`], or against a replica without sessions, the keeper
//! uses the unary calls instead: Register, a Heartbeat call per interval, registering
//! again when a heartbeat answers `NOT_FOUND`, and Deregister on shutdown; a crash is
//! then noticed only after the TTL.
//!
//! The instance counts as registered while any replica holds it, and keeps serving
//! throughout: an unreachable registry only means others cannot find it for a while.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use proto::registry::v1 as pb;
use retry::{Retry, RetryError};
use tokio::{sync::watch, task::JoinHandle, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{debug, info, warn};

use crate::{
    replicas::REFRESH, session_message, OpenSession, RegistrationMode, RegistryClient,
    DEREGISTER_DEADLINE,
};

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

/// How a session ended.
enum SessionEnd {
    /// The stream broke or the replica ended it: open a new one.
    Broken(String),
    /// Shutdown: deregister on it.
    Stopped(Box<OpenSession>),
}

/// How a registered instance's heartbeats ended.
enum Heartbeats {
    /// The replica no longer knows the instance: register again.
    Forgotten,
    /// Shutdown.
    Stopped,
}

impl Keeper {
    /// Keeps the instance registered with this keeper's replica until `stop`, then
    /// deregisters. Returns whether it deregistered.
    async fn run(self, stop: CancellationToken) -> bool {
        if self.client.registration == RegistrationMode::Unary {
            return self.run_unary(stop).await;
        }
        self.run_sessions(stop).await
    }

    fn register_request(&self) -> pb::RegisterRequest {
        let instance = &self.instance;
        pb::RegisterRequest {
            service: instance.service.clone(),
            address: instance.address.clone(),
            metadata: instance.metadata.clone(),
            instance_id: instance.id.clone(),
        }
    }

    /// The retry loop that registers with this keeper's replica, waiting at most `cap`
    /// between attempts.
    fn registering(&self, stop: &CancellationToken, cap: Duration) -> Retry {
        let instance = &self.instance;
        Retry::new(
            format!(
                "registering {} at {} with registry replica {}",
                instance.service, instance.address, self.replica
            ),
            stop,
        )
        .backoff(RETRY_BASE.min(cap), cap)
    }

    fn join_holders(&self, lease: &pb::RegisterResponse, again: bool) {
        let instance = &self.instance;
        let mut first = false;
        self.holders.send_modify(|holders| {
            first = holders.is_empty();
            holders.insert(self.replica.clone());
        });
        if first || again {
            info!(
                service = instance.service,
                address = instance.address,
                instance_id = instance.id,
                replica = self.replica,
                heartbeat_interval = %humantime::format_duration(Duration::from_millis(lease.heartbeat_interval_ms)),
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
    }

    /// Opens a session (retrying until the replica accepts one), holds it until it
    /// breaks, and again; on `stop`, deregisters on it.
    async fn run_sessions(self, stop: CancellationToken) -> bool {
        let instance = &self.instance;
        // Once registered, retries come at least once per heartbeat interval, as unary
        // heartbeats would: back within an interval of the replica's return, well inside
        // the TTL a paused replica allows after it resumes.
        let mut cap = RETRY_CAP;
        let mut again = false;
        let deregistered = loop {
            let session = self
                .registering(&stop, cap)
                .run(
                    || async {
                        self.client
                            .open_session(self.register_request())
                            .await
                            .map_err(rpc::CallError)
                    },
                    // An older registry: no sessions there, so unary calls it is.
                    |error| error.0.code() == Code::Unimplemented,
                )
                .await;
            let session = match session {
                Ok(session) => session,
                Err(RetryError::Permanent(_)) => {
                    info!(
                        replica = self.replica,
                        "registry replica has no Session call; keeping the registration with unary heartbeats"
                    );
                    return self.run_unary(stop).await;
                }
                Err(_) => break false, // only cancellation ends the retry
            };
            self.join_holders(&session.lease, again);
            cap = RETRY_CAP.min(Duration::from_millis(
                session.lease.heartbeat_interval_ms.max(1),
            ));
            match self.hold(session, &stop).await {
                SessionEnd::Broken(why) => {
                    self.leave_holders();
                    warn!(
                        service = instance.service,
                        instance_id = instance.id,
                        replica = self.replica,
                        why,
                        "registry session broke; opening a new one"
                    );
                    again = true;
                }
                SessionEnd::Stopped(session) => break self.deregister_session(*session).await,
            }
        };
        self.leave_holders();
        deregistered
    }

    /// Heartbeats on the session every interval and reads the replica's answers, until
    /// the stream breaks or `stop` fires.
    async fn hold(&self, session: OpenSession, stop: &CancellationToken) -> SessionEnd {
        use pb::{session_request::Kind as Message, session_response::Kind};
        let OpenSession {
            requests,
            mut replies,
            lease,
        } = session;
        let interval = Duration::from_millis(lease.heartbeat_interval_ms.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let heartbeat = || session_message(Message::Heartbeat(pb::SessionHeartbeat {}));
        loop {
            let reply = tokio::select! {
                () = stop.cancelled() => {
                    return SessionEnd::Stopped(Box::new(OpenSession { requests, replies, lease }));
                }
                _ = tick.tick() => {
                    if requests.send(heartbeat()).await.is_err() {
                        return SessionEnd::Broken("the stream closed".to_owned());
                    }
                    continue;
                }
                reply = replies.message() => reply,
            };
            match reply.map(|reply| reply.and_then(|reply| reply.kind)) {
                Ok(Some(Kind::RegisterAgain(_))) => {
                    self.leave_holders();
                    info!(
                        service = self.instance.service,
                        instance_id = self.instance.id,
                        replica = self.replica,
                        "registry replica no longer holds this instance (it missed heartbeats for the ttl); registering again"
                    );
                    let register = session_message(Message::Register(self.register_request()));
                    if requests.send(register).await.is_err() {
                        return SessionEnd::Broken("the stream closed".to_owned());
                    }
                }
                Ok(Some(Kind::Registered(lease))) => self.join_holders(&lease, true),
                Ok(None) => return SessionEnd::Broken("the replica ended the session".to_owned()),
                Err(status) => return SessionEnd::Broken(rpc::CallError(status).to_string()),
            }
        }
    }

    /// Deregisters on the session and waits for the replica to end it. Ending the
    /// stream without that would remove the instance too, as a lost connection.
    async fn deregister_session(&self, session: OpenSession) -> bool {
        let OpenSession {
            requests,
            mut replies,
            ..
        } = session;
        let goodbye = session_message(pb::session_request::Kind::Deregister(
            pb::SessionDeregister {},
        ));
        let ended = async {
            requests.send(goodbye).await.ok()?;
            // The replica ends the stream once the instance is removed.
            while replies.message().await.ok()?.is_some() {}
            Some(())
        };
        match tokio::time::timeout(DEREGISTER_DEADLINE, ended).await {
            Ok(Some(())) => true,
            _ => {
                warn!(
                    service = self.instance.service,
                    instance_id = self.instance.id,
                    replica = self.replica,
                    "no answer to the deregistration; closing the session removes the instance anyway"
                );
                false
            }
        }
    }

    /// Register (retrying until accepted), heartbeat until the replica forgets us,
    /// again; on `stop`, deregister. Returns whether it deregistered.
    async fn run_unary(self, stop: CancellationToken) -> bool {
        let register = self.registering(&stop, RETRY_CAP);
        let request = self.register_request();
        let mut forgotten = false;
        let mut deregistered = false;
        loop {
            let lease = register
                .run(
                    || async { self.client.register(&request).await.map_err(rpc::CallError) },
                    |_| false, // a refusal (full, bad name) may be lifted later: keep asking
                )
                .await;
            let Ok(lease) = lease else { break }; // only cancellation ends the retry
            let interval = Duration::from_millis(lease.heartbeat_interval_ms.max(1));
            self.join_holders(&lease, forgotten);
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
