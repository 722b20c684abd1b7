//! The registry core: who is live, for how long, and what changed.
//!
//! Every dynamic instance holds a lease that ends `ttl` after its last heartbeat. The
//! leases are also kept in a set ordered by deadline, so the sweeper can sleep until the
//! earliest one and evict everything due with a few ordered removals, the same shape as
//! mini-redis's key expiry. All state sits behind one short `parking_lot::Mutex` section per
//! call; nothing here awaits, so no guard can be held across an `.await`.
//!
//! Every deadline runs on the time passed in (`now`), so unit tests drive leases with any
//! instants they like, and the sweeper passes tokio's (pausable) clock. The wall-clock
//! times the status page shows (registered, last heartbeat, removed) are read from
//! `SystemTime::now()` here; no decision depends on them.
//!
//! Changes bump a global revision and are announced on a `watch` channel. Heartbeats are
//! not changes: they move a deadline, not membership, so watchers are not woken by them.
//!
//! A registration made on a session stream is held by that session: when the stream
//! ends without a deregister, [`Registry::session_lost`] removes it at once (or, with a
//! grace, moves its deadline to the grace's end and wakes the sweeper). An instance may
//! be held by more than one session at a time (it reached this replica by two addresses,
//! or its new session registered before the old one's end was noticed); it leaves when
//! the last one ends. The last removals, with their reasons, are kept for the status
//! page.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    time::{Duration, SystemTime},
};

use parking_lot::{Mutex, MutexGuard};

use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

pub(crate) use crate::validation::RegistryError;
use crate::validation::{
    validate_address, validate_instance_id, validate_metadata, validate_service,
};

/// Limits on what one registration may claim; each is a flag on the binary.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_instances_per_service: usize,
    pub max_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances_per_service: 10_000,
            max_instances: 50_000,
        }
    }
}

/// How many removals the status page shows.
const REMOVALS_KEPT: usize = 20;

/// Sessions are numbered as they open; a registration remembers the ones holding it.
pub(crate) type SessionId = u64;

/// What keeps a dynamic instance listed besides its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// Nothing: a static entry, or a registration kept by unary heartbeats alone.
    Lease,
    /// Live session streams, the end of the last of which removes the instance.
    Session,
    /// Its last session ended without a deregister; removed when the grace is over,
    /// unless it registers again first.
    Lost,
}

/// Why an instance left the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    Deregistered,
    /// No heartbeat within the TTL.
    Expired,
    /// Its session stream ended without a deregister.
    ConnectionLost,
}

impl Removal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Deregistered => "deregistered",
            Self::Expired => "no heartbeat within the ttl",
            Self::ConnectionLost => "connection lost",
        }
    }
}

/// One past removal, for the status page.
#[derive(Debug, Clone)]
pub(crate) struct Removed {
    pub(crate) instance: Instance,
    pub(crate) reason: Removal,
    pub(crate) at: SystemTime,
}

/// What ending a session did to the instance it held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Removed at once.
    Removed(Instance),
    /// Removed when the grace is over, unless it registers again first.
    Grace(Instance),
    /// Nothing: the session held nothing, or another session or a unary registration
    /// holds the id too.
    NotHeld,
}

/// One registered instance, as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    pub(crate) id: String,
    pub(crate) service: String,
    pub(crate) address: String,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) is_static: bool,
    pub(crate) registered_at: SystemTime,
    pub(crate) last_heartbeat: SystemTime,
    pub(crate) holder: Holder,
}

/// A consistent view of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) service: String,
    pub(crate) instances: Vec<Instance>,
    pub(crate) revision: u64,
}

impl Snapshot {
    /// Whether two snapshots list the same instances (ignoring heartbeat times).
    pub(crate) fn same_members(&self, other: &Snapshot) -> bool {
        self.instances.len() == other.instances.len()
            && self
                .instances
                .iter()
                .zip(&other.instances)
                .all(|(a, b)| a.id == b.id && a.address == b.address && a.metadata == b.metadata)
    }
}

/// The reply to a successful registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) instance_id: String,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) ttl: Duration,
}

/// How the registry is set up; built from flags and the config file.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub heartbeat_interval: Duration,
    pub ttl: Duration,
    /// How long an instance whose session broke stays listed, waiting for it to register
    /// again; zero removes it at once.
    pub session_grace: Duration,
    pub limits: Limits,
    /// `(service, address)` pairs that are always listed and never evicted.
    pub static_entries: Vec<(String, String)>,
    pub settings: BTreeMap<String, String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            ttl: Duration::from_secs(3),
            session_grace: Duration::ZERO,
            limits: Limits::default(),
            static_entries: Vec::new(),
            settings: BTreeMap::new(),
        }
    }
}

pub(crate) struct Registry {
    config: RegistryConfig,
    state: Mutex<State>,
    /// The global revision, announced after every change.
    changes: watch::Sender<u64>,
    /// Woken when a deadline moves earlier (a session lost with a grace), which only
    /// the sweeper cares about.
    sooner: Notify,
}

#[derive(Default)]
struct State {
    revision: u64,
    services: BTreeMap<String, Service>,
    /// Every instance's service and lease deadline (none for static entries), by id.
    index: HashMap<String, Entry>,
    /// The dynamic instances' deadlines, ordered, for the sweeper.
    expirations: BTreeSet<(Instant, String)>,
    dynamic: usize,
    /// The last removals, newest last.
    removals: VecDeque<Removed>,
}

struct Entry {
    service: String,
    deadline: Option<Instant>,
    /// The sessions holding the registration (none for static entries and unary ones).
    sessions: Vec<SessionId>,
}

#[derive(Default)]
struct Service {
    revision: u64,
    instances: BTreeMap<String, Instance>,
}

impl Service {
    /// The instances ordered by address (then id), so listings read well and are stable.
    /// A dynamic registration at a static entry's address is the same endpoint, so it is
    /// listed once, as the static entry (which outlives any lease); its lease still works.
    fn snapshot(&self, name: &str) -> Snapshot {
        let statics: HashSet<&str> = self
            .instances
            .values()
            .filter(|instance| instance.is_static)
            .map(|instance| instance.address.as_str())
            .collect();
        let mut instances: Vec<Instance> = self
            .instances
            .values()
            .filter(|instance| instance.is_static || !statics.contains(instance.address.as_str()))
            .cloned()
            .collect();
        instances.sort_by(|a, b| (&a.address, &a.id).cmp(&(&b.address, &b.id)));
        Snapshot {
            service: name.to_owned(),
            instances,
            revision: self.revision,
        }
    }
}

impl State {
    fn bump(&mut self, service: &str) -> u64 {
        self.revision += 1;
        if let Some(entry) = self.services.get_mut(service) {
            entry.revision = self.revision;
        }
        self.revision
    }

    fn insert(&mut self, instance: Instance, deadline: Option<Instant>, sessions: Vec<SessionId>) {
        if let Some(deadline) = deadline {
            self.expirations.insert((deadline, instance.id.clone()));
            self.dynamic += 1;
        }
        self.index.insert(
            instance.id.clone(),
            Entry {
                service: instance.service.clone(),
                deadline,
                sessions,
            },
        );
        self.services
            .entry(instance.service.clone())
            .or_default()
            .instances
            .insert(instance.id.clone(), instance);
    }

    /// Removes an instance from every index; drops its service when it was the last.
    fn remove(&mut self, id: &str) -> Option<Instance> {
        let entry = self.index.remove(id)?;
        if let Some(deadline) = entry.deadline {
            self.expirations.remove(&(deadline, id.to_owned()));
            self.dynamic -= 1;
        }
        let service = self.services.get_mut(&entry.service)?;
        let removed = service.instances.remove(id);
        if service.instances.is_empty() {
            self.services.remove(&entry.service);
        }
        removed
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Instance> {
        let entry = self.index.get(id)?;
        self.services.get_mut(&entry.service)?.instances.get_mut(id)
    }

    /// Moves a dynamic instance's deadline (a static entry has none to move).
    fn move_deadline(&mut self, id: &str, deadline: Instant) {
        let Some(entry) = self.index.get_mut(id) else {
            return;
        };
        let Some(old) = entry.deadline else {
            return;
        };
        entry.deadline = Some(deadline);
        self.expirations.remove(&(old, id.to_owned()));
        self.expirations.insert((deadline, id.to_owned()));
    }

    /// Removes an instance for `reason`, bumps the revision and remembers the removal.
    fn remove_for(&mut self, id: &str, reason: Removal) -> Option<Instance> {
        let removed = self.remove(id)?;
        self.bump(&removed.service);
        if self.removals.len() == REMOVALS_KEPT {
            self.removals.pop_front();
        }
        self.removals.push_back(Removed {
            instance: removed.clone(),
            reason,
            at: SystemTime::now(),
        });
        Some(removed)
    }
}

impl Registry {
    /// Builds a registry holding the static entries of `config`, which must be valid.
    pub(crate) fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let mut state = State::default();
        let now = SystemTime::now();
        for (index, (service, address)) in config.static_entries.iter().enumerate() {
            validate_service(service)?;
            validate_address(address)?;
            let instance = Instance {
                id: format!("static-{service}-{index}"),
                service: service.clone(),
                address: address.clone(),
                metadata: BTreeMap::new(),
                is_static: true,
                registered_at: now,
                last_heartbeat: now,
                holder: Holder::Lease,
            };
            state.insert(instance, None, Vec::new());
            state.bump(service);
        }
        let (changes, _) = watch::channel(state.revision);
        Ok(Self {
            config,
            state: Mutex::new(state),
            changes,
            sooner: Notify::new(),
        })
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat_interval
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.config.ttl
    }

    pub(crate) fn session_grace(&self) -> Duration {
        self.config.session_grace
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn announce(&self, revision: u64) {
        self.changes.send_replace(revision);
    }

    /// Subscribes to changes: the receiver sees the global revision after each one.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Resolves when a deadline has moved earlier since the last time it resolved.
    pub(crate) async fn deadline_moved_earlier(&self) {
        self.sooner.notified().await;
    }

    /// Registers an instance under `id` (the instance's own choice, so it is the same on
    /// every replica) or, when `id` is `None`, under a new uuid. An address already live
    /// for the service is replaced, and so is an instance registering its id again. A
    /// registration made on a session (`session`) is removed when
    /// [`Registry::session_lost`] says the last session holding it ended; a unary one
    /// (`None`) is held by its lease alone.
    pub(crate) fn register(
        &self,
        session: Option<SessionId>,
        service: &str,
        address: &str,
        metadata: BTreeMap<String, String>,
        id: Option<&str>,
        now: Instant,
    ) -> Result<(Lease, Option<Instance>), RegistryError> {
        validate_service(service)?;
        validate_address(address)?;
        validate_metadata(&metadata)?;
        if let Some(id) = id {
            validate_instance_id(id)?;
        }

        let mut state = self.lock();
        let same_address = state.services.get(service).and_then(|entry| {
            entry
                .instances
                .values()
                .find(|instance| !instance.is_static && instance.address == address)
                .map(|instance| instance.id.clone())
        });
        let same_id = id.filter(|id| state.index.contains_key(*id));
        // Sessions still holding the id keep holding it, with this one.
        let mut sessions: Vec<SessionId> = match (session, same_id) {
            (Some(_), Some(same_id)) => state
                .index
                .get(same_id)
                .map(|entry| entry.sessions.clone())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if let Some(session) = session.filter(|session| !sessions.contains(session)) {
            sessions.push(session);
        }
        let mut replaced = same_address.and_then(|old| state.remove(&old));
        if let Some(same_id) = same_id {
            // Its own earlier registration (a retry whose reply was lost, or a move).
            replaced = state.remove(same_id).or(replaced);
        }
        if replaced.is_none() {
            let limits = &self.config.limits;
            if state.dynamic >= limits.max_instances {
                return Err(RegistryError::RegistryFull {
                    limit: limits.max_instances,
                });
            }
            let in_service = state
                .services
                .get(service)
                .map_or(0, |entry| entry.instances.len());
            if in_service >= limits.max_instances_per_service {
                return Err(RegistryError::ServiceFull {
                    service: service.to_owned(),
                    limit: limits.max_instances_per_service,
                });
            }
        }

        let id = id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let wall = SystemTime::now();
        state.insert(
            Instance {
                id: id.clone(),
                service: service.to_owned(),
                address: address.to_owned(),
                metadata,
                is_static: false,
                registered_at: wall,
                last_heartbeat: wall,
                holder: if sessions.is_empty() {
                    Holder::Lease
                } else {
                    Holder::Session
                },
            },
            Some(now + self.config.ttl),
            sessions,
        );
        let revision = state.bump(service);
        drop(state);
        self.announce(revision);
        Ok((
            Lease {
                instance_id: id,
                heartbeat_interval: self.config.heartbeat_interval,
                ttl: self.config.ttl,
            },
            replaced,
        ))
    }

    /// Extends an instance's lease to `now + ttl`. Static entries need no heartbeat and
    /// accept one. A unary heartbeat for an instance whose session was lost keeps it by
    /// heartbeats from then on.
    pub(crate) fn heartbeat(&self, id: &str, now: Instant) -> Result<(), RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::EmptyInstanceId);
        }
        let mut state = self.lock();
        let Some(entry) = state.index.get(id) else {
            return Err(RegistryError::UnknownInstance(id.to_owned()));
        };
        if entry.deadline.is_none() {
            return Ok(()); // a static entry: nothing to extend
        }
        state.move_deadline(id, now + self.config.ttl);
        if let Some(instance) = state.get_mut(id) {
            instance.last_heartbeat = SystemTime::now();
            if instance.holder == Holder::Lost {
                instance.holder = Holder::Lease;
            }
        }
        Ok(())
    }

    /// The session `session` ended without a deregister. If it was the last session
    /// holding `id`, the instance is removed at once, or with a `grace` (normally
    /// [`Registry::session_grace`]) its deadline moves to the grace's end (never later
    /// than it was).
    pub(crate) fn session_lost(
        &self,
        id: &str,
        session: SessionId,
        now: Instant,
        grace: Duration,
    ) -> SessionEnd {
        let mut state = self.lock();
        let Some(entry) = state.index.get_mut(id) else {
            return SessionEnd::NotHeld;
        };
        let before = entry.sessions.len();
        entry.sessions.retain(|held| *held != session);
        if entry.sessions.len() == before || !entry.sessions.is_empty() {
            return SessionEnd::NotHeld;
        }
        let deadline = entry.deadline;
        let Some(instance) = state.get_mut(id) else {
            return SessionEnd::NotHeld;
        };
        if !grace.is_zero() {
            instance.holder = Holder::Lost;
            let instance = instance.clone();
            let end = now + grace;
            if deadline > Some(end) {
                state.move_deadline(id, end);
                self.sooner.notify_one();
            }
            return SessionEnd::Grace(instance);
        }
        match state.remove_for(id, Removal::ConnectionLost) {
            Some(removed) => {
                let revision = state.revision;
                drop(state);
                self.announce(revision);
                SessionEnd::Removed(removed)
            }
            None => SessionEnd::NotHeld,
        }
    }

    /// Removes an instance at once.
    pub(crate) fn deregister(&self, id: &str) -> Result<Instance, RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::EmptyInstanceId);
        }
        let mut state = self.lock();
        match state.index.get(id) {
            None => return Err(RegistryError::UnknownInstance(id.to_owned())),
            Some(entry) if entry.deadline.is_none() => {
                return Err(RegistryError::StaticInstance(id.to_owned()))
            }
            Some(_) => {}
        }
        let removed = state
            .remove_for(id, Removal::Deregistered)
            .ok_or_else(|| RegistryError::UnknownInstance(id.to_owned()))?;
        let revision = state.revision;
        drop(state);
        self.announce(revision);
        Ok(removed)
    }

    /// Evicts every instance whose lease ended at or before `now`, or whose session's
    /// grace did, with the reason.
    pub(crate) fn evict_expired(&self, now: Instant) -> Vec<(Instance, Removal)> {
        let mut state = self.lock();
        let mut evicted = Vec::new();
        while let Some((deadline, id)) = state.expirations.first().cloned() {
            if deadline > now {
                break;
            }
            let reason = match state.get_mut(&id).map(|instance| instance.holder) {
                Some(Holder::Lost) => Removal::ConnectionLost,
                _ => Removal::Expired,
            };
            match state.remove_for(&id, reason) {
                Some(instance) => evicted.push((instance, reason)),
                // Unreachable while the indexes agree; never loop on a stray entry.
                None => {
                    state.expirations.remove(&(deadline, id));
                }
            }
        }
        let revision = state.revision;
        drop(state);
        if !evicted.is_empty() {
            self.announce(revision);
        }
        evicted
    }

    /// After the process was frozen (SIGSTOP, a paused VM), restarts every lease at
    /// `now + ttl`: heartbeats sent while the registry could not run were lost through no
    /// fault of the instances. Every lease ended at most one ttl after its last heartbeat,
    /// so this extends each by at least the time lost, and an instance that really died
    /// is still evicted within one ttl of the resume. Returns how many were renewed.
    pub(crate) fn renew_all(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let deadline = now + self.config.ttl;
        let ids: Vec<String> = state.expirations.iter().map(|(_, id)| id.clone()).collect();
        state.expirations = ids.iter().map(|id| (deadline, id.clone())).collect();
        for id in &ids {
            if let Some(entry) = state.index.get_mut(id) {
                entry.deadline = Some(deadline);
            }
        }
        ids.len()
    }

    /// The earliest lease deadline, if any instance holds a lease.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .expirations
            .first()
            .map(|(deadline, _)| *deadline)
    }

    /// Live instances of one service. A service nobody registered is empty, with the
    /// global revision (so revisions a client sees never go backwards).
    pub(crate) fn lookup(&self, service: &str) -> Result<Snapshot, RegistryError> {
        validate_service(service)?;
        let state = self.lock();
        Ok(match state.services.get(service) {
            Some(entry) => entry.snapshot(service),
            None => Snapshot {
                service: service.to_owned(),
                instances: Vec::new(),
                revision: state.revision,
            },
        })
    }

    /// Every service with its instances, sorted by name, and the global revision.
    pub(crate) fn list_services(&self) -> (Vec<Snapshot>, u64) {
        let state = self.lock();
        let services = state
            .services
            .iter()
            .map(|(name, entry)| entry.snapshot(name))
            .collect();
        (services, state.revision)
    }

    /// How many instances are registered, static entries included.
    pub(crate) fn len(&self) -> usize {
        self.lock().index.len()
    }

    /// The last removals, newest first.
    pub(crate) fn removals(&self) -> Vec<Removed> {
        self.lock().removals.iter().rev().cloned().collect()
    }

    pub(crate) fn setting(&self, key: &str) -> Result<String, RegistryError> {
        self.config
            .settings
            .get(key)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownSetting(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn registry() -> Registry {
        registry_with(Vec::new(), Limits::default())
    }

    fn registry_with(static_entries: Vec<(String, String)>, limits: Limits) -> Registry {
        Registry::new(RegistryConfig {
            ttl: TTL,
            static_entries,
            limits,
            ..RegistryConfig::default()
        })
        .expect("valid config")
    }

    fn register(registry: &Registry, service: &str, address: &str, now: Instant) -> String {
        registry
            .register(None, service, address, BTreeMap::new(), None, now)
            .expect("register")
            .0
            .instance_id
    }

    fn addresses(registry: &Registry, service: &str) -> Vec<String> {
        registry
            .lookup(service)
            .expect("lookup")
            .instances
            .into_iter()
            .map(|instance| instance.address)
            .collect()
    }

    #[test]
    fn evicts_exactly_when_the_ttl_has_passed() {
        let registry = registry();
        let t0 = Instant::now();
        register(&registry, "logging", "127.0.0.1:50051", t0);

        let just_before = t0 + TTL - Duration::from_millis(1);
        assert!(registry.evict_expired(just_before).is_empty());
        assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);

        let evicted = registry.evict_expired(t0 + TTL);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0.address, "127.0.0.1:50051");
        assert_eq!(evicted[0].1, Removal::Expired);
        assert!(addresses(&registry, "logging").is_empty());
        assert_eq!(registry.next_deadline(), None);
    }

    #[test]
    fn heartbeat_extends_the_lease() {
        let registry = registry();
        let t0 = Instant::now();
        let id = register(&registry, "logging", "127.0.0.1:50051", t0);

        let t1 = t0 + Duration::from_secs(2);
        registry.heartbeat(&id, t1).expect("heartbeat");
        assert!(registry.evict_expired(t0 + TTL).is_empty(), "extended");
        assert_eq!(registry.next_deadline(), Some(t1 + TTL));
        assert_eq!(registry.evict_expired(t1 + TTL).len(), 1);
    }

    #[test]
    fn heartbeat_for_an_unknown_or_evicted_id_is_not_found() {
        let registry = registry();
        let t0 = Instant::now();
        assert_eq!(
            registry.heartbeat("nope", t0),
            Err(RegistryError::UnknownInstance("nope".into()))
        );
        let id = register(&registry, "logging", "127.0.0.1:50051", t0);
        registry.evict_expired(t0 + TTL);
        assert_eq!(
            registry.heartbeat(&id, t0 + TTL),
            Err(RegistryError::UnknownInstance(id))
        );
    }

    #[test]
    fn registering_a_live_address_again_replaces_the_old_entry() {
        let registry = registry();
        let t0 = Instant::now();
        let old = register(&registry, "logging", "127.0.0.1:50051", t0);
        let (lease, replaced) = registry
            .register(
                None,
                "logging",
                "127.0.0.1:50051",
                BTreeMap::new(),
                None,
                t0,
            )
            .expect("register");
        assert_eq!(replaced.map(|instance| instance.id), Some(old.clone()));
        let snapshot = registry.lookup("logging").expect("lookup");
        assert_eq!(snapshot.instances.len(), 1);
        assert_eq!(snapshot.instances[0].id, lease.instance_id);
        assert!(registry.heartbeat(&old, t0).is_err(), "old id is gone");
        // The old lease no longer evicts anything early or twice.
        assert_eq!(registry.evict_expired(t0 + TTL).len(), 1);
    }

    #[test]
    fn an_instance_keeps_the_id_it_chose_and_registering_it_again_replaces_it() {
        let registry = registry();
        let t0 = Instant::now();
        let chosen = "logging-7f3a";
        let register_as = |address: &str, at: Instant| {
            registry
                .register(None, "logging", address, BTreeMap::new(), Some(chosen), at)
                .expect("register")
                .0
        };
        assert_eq!(register_as("127.0.0.1:50051", t0).instance_id, chosen);
        // Again (a retry whose reply was lost), later, from another address: one entry.
        let t1 = t0 + Duration::from_secs(2);
        register_as("127.0.0.1:50052", t1);
        assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50052"]);
        assert!(
            registry.evict_expired(t0 + TTL).is_empty(),
            "the new lease counts"
        );
        registry
            .heartbeat(chosen, t1)
            .expect("heartbeat by the chosen id");
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn chosen_ids_must_be_printable_short_and_not_a_static_entrys() {
        let registry = registry_with(
            vec![("messages".into(), "127.0.0.1:50060".into())],
            Limits::default(),
        );
        let t0 = Instant::now();
        for bad in ["static-messages-0", "a b", "x\u{0}", &"i".repeat(129)] {
            let result = registry.register(
                None,
                "logging",
                "127.0.0.1:1",
                BTreeMap::new(),
                Some(bad),
                t0,
            );
            assert!(
                matches!(result, Err(RegistryError::InvalidInstanceId(_))),
                "{bad:?}: {result:?}"
            );
        }
        assert_eq!(addresses(&registry, "messages"), ["127.0.0.1:50060"]);
    }

    #[test]
    fn static_entries_survive_every_sweep_and_cannot_be_deregistered() {
        let registry = registry_with(
            vec![("messages".into(), "127.0.0.1:50060".into())],
            Limits::default(),
        );
        let far = Instant::now() + Duration::from_secs(3600);
        assert!(registry.evict_expired(far).is_empty());
        let snapshot = registry.lookup("messages").expect("lookup");
        assert_eq!(snapshot.instances.len(), 1);
        assert!(snapshot.instances[0].is_static);
        let id = snapshot.instances[0].id.clone();
        assert_eq!(
            registry.deregister(&id),
            Err(RegistryError::StaticInstance(id.clone()))
        );
        assert_eq!(registry.heartbeat(&id, far), Ok(()));
    }

    #[test]
    fn unspecified_addresses_are_refused() {
        let registry = registry();
        for address in ["0.0.0.0:50051", "[::]:50051", "[0:0:0:0:0:0:0:0]:50051"] {
            let refused = registry
                .register(
                    None,
                    "logging",
                    address,
                    BTreeMap::new(),
                    None,
                    Instant::now(),
                )
                .expect_err(address);
            assert!(
                matches!(refused, RegistryError::UnspecifiedAddress(_)),
                "{address}: {refused}"
            );
            assert!(refused.to_string().contains("--advertise"));
        }
        for address in ["127.0.0.1:50051", "[::1]:50051", "logging-1.internal:50051"] {
            assert!(validate_address(address).is_ok(), "{address}");
        }
    }

    #[test]
    fn a_registration_at_a_static_entrys_address_is_listed_once() {
        let registry = registry_with(
            vec![("messages".into(), "127.0.0.1:50060".into())],
            Limits::default(),
        );
        let now = Instant::now();
        let id = register(&registry, "messages", "127.0.0.1:50060", now);
        let other = register(&registry, "messages", "127.0.0.1:50061", now);
        assert_eq!(
            addresses(&registry, "messages"),
            ["127.0.0.1:50060", "127.0.0.1:50061"]
        );
        let listed = registry.lookup("messages").expect("lookup").instances;
        assert!(
            listed[0].is_static,
            "the static entry stands for the address"
        );
        let (services, _) = registry.list_services();
        assert_eq!(
            services[0].instances.len(),
            2,
            "the status page lists it once too"
        );
        // The registration itself is real: it heartbeats, and deregistering or evicting
        // it leaves the static entry listed.
        assert_eq!(registry.heartbeat(&id, now), Ok(()));
        assert!(registry.deregister(&id).is_ok());
        registry.evict_expired(now + registry.ttl());
        assert!(registry.heartbeat(&other, now).is_err(), "evicted");
        assert_eq!(addresses(&registry, "messages"), ["127.0.0.1:50060"]);
    }

    #[test]
    fn revision_increases_on_every_change_and_only_then() {
        let registry = registry();
        let t0 = Instant::now();
        let changes = registry.subscribe();
        let r0 = *changes.borrow();

        let a = register(&registry, "logging", "127.0.0.1:50051", t0);
        let r1 = registry.lookup("logging").expect("lookup").revision;
        register(&registry, "logging", "127.0.0.1:50052", t0);
        let r2 = registry.lookup("logging").expect("lookup").revision;
        registry.heartbeat(&a, t0).expect("heartbeat");
        let r3 = registry.lookup("logging").expect("lookup").revision;
        registry.deregister(&a).expect("deregister");
        let r4 = registry.lookup("logging").expect("lookup").revision;
        registry.evict_expired(t0 + TTL);
        let r5 = registry.lookup("logging").expect("lookup").revision;

        assert!(r0 < r1 && r1 < r2, "{r0} {r1} {r2}");
        assert_eq!(r2, r3, "a heartbeat is not a change");
        assert!(r3 < r4 && r4 < r5, "{r3} {r4} {r5}");
        assert_eq!(*changes.borrow(), r5);
    }

    #[test]
    fn deregister_is_immediate_and_unknown_ids_are_not_found() {
        let registry = registry();
        let t0 = Instant::now();
        let id = register(&registry, "logging", "127.0.0.1:50051", t0);
        registry.deregister(&id).expect("deregister");
        assert!(addresses(&registry, "logging").is_empty());
        assert_eq!(registry.next_deadline(), None);
        assert_eq!(
            registry.deregister(&id),
            Err(RegistryError::UnknownInstance(id))
        );
        assert_eq!(registry.deregister(""), Err(RegistryError::EmptyInstanceId));
    }

    #[test]
    fn caps_per_service_and_in_total() {
        let registry = registry_with(
            Vec::new(),
            Limits {
                max_instances_per_service: 2,
                max_instances: 3,
            },
        );
        let t0 = Instant::now();
        register(&registry, "a", "h:1", t0);
        register(&registry, "a", "h:2", t0);
        assert!(matches!(
            registry.register(None, "a", "h:3", BTreeMap::new(), None, t0),
            Err(RegistryError::ServiceFull { limit: 2, .. })
        ));
        // Replacing a live address is not growth.
        register(&registry, "a", "h:2", t0);
        register(&registry, "b", "h:1", t0);
        assert!(matches!(
            registry.register(None, "c", "h:1", BTreeMap::new(), None, t0),
            Err(RegistryError::RegistryFull { limit: 3 })
        ));
    }

    fn registry_with_grace(grace: Duration) -> Registry {
        Registry::new(RegistryConfig {
            ttl: TTL,
            session_grace: grace,
            ..RegistryConfig::default()
        })
        .expect("valid config")
    }

    fn register_in(registry: &Registry, session: SessionId, address: &str, now: Instant) {
        registry
            .register(
                Some(session),
                "logging",
                address,
                BTreeMap::new(),
                Some("logging-1"),
                now,
            )
            .expect("register");
    }

    #[test]
    fn a_lost_session_removes_its_instance_at_once_and_says_why() {
        let registry = registry();
        let t0 = Instant::now();
        register_in(&registry, 7, "127.0.0.1:50051", t0);
        let before = registry.lookup("logging").expect("lookup").revision;

        let end = registry.session_lost("logging-1", 7, t0, registry.session_grace());
        assert!(
            matches!(end, SessionEnd::Removed(ref gone) if gone.id == "logging-1"),
            "{end:?}"
        );
        let after = registry.lookup("logging").expect("lookup");
        assert!(after.instances.is_empty());
        assert!(after.revision > before, "watchers hear of it");
        assert_eq!(registry.next_deadline(), None);
        let removals = registry.removals();
        assert_eq!(removals[0].reason, Removal::ConnectionLost);
        assert_eq!(removals[0].instance.address, "127.0.0.1:50051");
    }

    #[test]
    fn an_instance_held_by_two_sessions_leaves_when_the_last_one_ends() {
        let registry = registry();
        let t0 = Instant::now();
        register_in(&registry, 1, "127.0.0.1:50051", t0);
        // A blip: the instance opened session 2 and registered again before the
        // registry noticed that session 1 had broken.
        register_in(&registry, 2, "127.0.0.1:50051", t0);
        assert_eq!(
            registry.session_lost("logging-1", 1, t0, registry.session_grace()),
            SessionEnd::NotHeld
        );
        assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);
        assert_eq!(
            registry.session_lost("logging-1", 1, t0, registry.session_grace()),
            SessionEnd::NotHeld,
            "ending twice changes nothing"
        );
        assert!(matches!(
            registry.session_lost("logging-1", 2, t0, registry.session_grace()),
            SessionEnd::Removed(_)
        ));
        assert!(addresses(&registry, "logging").is_empty());
    }

    #[test]
    fn a_lost_session_leaves_a_registration_it_no_longer_holds() {
        let registry = registry();
        let t0 = Instant::now();
        register_in(&registry, 1, "127.0.0.1:50051", t0);
        // A unary registration of the id is held by heartbeats alone.
        registry
            .register(
                None,
                "logging",
                "127.0.0.1:50051",
                BTreeMap::new(),
                Some("logging-1"),
                t0,
            )
            .expect("register");
        assert_eq!(
            registry.session_lost("logging-1", 1, t0, registry.session_grace()),
            SessionEnd::NotHeld
        );
        assert_eq!(registry.len(), 1);
        assert_eq!(
            registry.session_lost("nobody", 1, t0, registry.session_grace()),
            SessionEnd::NotHeld
        );
    }

    #[test]
    fn with_a_grace_a_lost_session_is_removed_when_the_grace_ends_unless_it_comes_back() {
        let grace = Duration::from_millis(500);
        let registry = registry_with_grace(grace);
        let t0 = Instant::now();
        register_in(&registry, 1, "127.0.0.1:50051", t0);
        assert!(matches!(
            registry.session_lost("logging-1", 1, t0, registry.session_grace()),
            SessionEnd::Grace(_)
        ));
        assert_eq!(registry.next_deadline(), Some(t0 + grace), "moved earlier");
        assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);
        let evicted = registry.evict_expired(t0 + grace);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].1, Removal::ConnectionLost);

        // Back within the grace: a new session holds it, and the old deadline is gone.
        register_in(&registry, 2, "127.0.0.1:50051", t0);
        registry.session_lost("logging-1", 2, t0, registry.session_grace());
        register_in(&registry, 3, "127.0.0.1:50051", t0 + grace / 2);
        assert!(registry.evict_expired(t0 + grace).is_empty());
        assert_eq!(registry.next_deadline(), Some(t0 + grace / 2 + TTL));
    }

    #[test]
    fn a_session_whose_lease_ran_out_is_evicted_by_the_ttl_and_may_register_again() {
        let registry = registry();
        let t0 = Instant::now();
        register_in(&registry, 1, "127.0.0.1:50051", t0);
        // A hang: the session stays open, but no heartbeat comes.
        let evicted = registry.evict_expired(t0 + TTL);
        assert_eq!(evicted[0].1, Removal::Expired);
        assert_eq!(
            registry.heartbeat("logging-1", t0 + TTL),
            Err(RegistryError::UnknownInstance("logging-1".into()))
        );
        register_in(&registry, 1, "127.0.0.1:50051", t0 + TTL);
        assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);
    }

    #[test]
    fn lookup_of_an_unknown_service_is_empty_and_revisions_never_go_back() {
        let registry = registry();
        let t0 = Instant::now();
        let id = register(&registry, "logging", "127.0.0.1:50051", t0);
        let before = registry.lookup("logging").expect("lookup").revision;
        registry.deregister(&id).expect("deregister");
        let after = registry.lookup("logging").expect("lookup");
        assert!(after.instances.is_empty());
        assert!(after.revision > before);
    }
}
