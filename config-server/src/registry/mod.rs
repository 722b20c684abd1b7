//! The registry core: who is live, for how long, and what changed.
//!
//! Every dynamic instance holds a lease that ends `ttl` after its last heartbeat. The
//! leases (`state::Leases`, the one place deadlines live) are kept by id and in a set
//! ordered by deadline, so the sweeper can sleep until the earliest one and evict
//! everything due with a few ordered removals, the same shape as mini-redis's key
//! expiry. All state sits behind one short `parking_lot::Mutex` section per call;
//! nothing here awaits, so no guard can be held across an `.await`.
//!
//! Every registration remembers who made it, and every change checks the caller against
//! that owner inside the same lock section ([`crate::ownership`] holds the rules).
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

mod state;
#[cfg(test)]
mod tests;
mod types;

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use parking_lot::{Mutex, MutexGuard};

use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

use state::State;
pub(crate) use types::{
    Holder, Instance, Lease, Registrant, Removal, Removed, SessionEnd, SessionId, Snapshot,
};
pub use types::{Limits, RegistryConfig, StreamLimits};

pub(crate) use crate::validation::RegistryError;
use crate::{
    ownership::Caller,
    validation::{validate_address, validate_instance_id, validate_metadata, validate_service},
};

pub(crate) struct Registry {
    config: RegistryConfig,
    state: Mutex<State>,
    /// The global revision, announced after every change.
    changes: watch::Sender<u64>,
    /// Woken when a deadline moves earlier (a session lost with a grace), which only
    /// the sweeper cares about.
    sooner: Notify,
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
            state.insert(instance, None, Vec::new(), None);
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
    /// (`None`) is held by its lease alone. The caller owns the registration: an id or an
    /// address another caller registered is refused ([`crate::ownership`]).
    pub(crate) fn register(
        &self,
        Registrant { caller, session }: Registrant<'_>,
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
        caller.may_register(service)?;

        let mut state = self.lock();
        let same_address = state.services.get(service).and_then(|entry| {
            entry
                .instances
                .values()
                .find(|instance| !instance.is_static && instance.address == address)
                .map(|instance| instance.id.clone())
        });
        let same_id = id.filter(|id| state.index.contains_key(*id));
        for taken in same_id.iter().copied().chain(same_address.as_deref()) {
            if let Some(owner) = state
                .index
                .get(taken)
                .and_then(|entry| entry.owner.as_ref())
            {
                caller.may_change(taken, owner)?;
            }
        }
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
            if state.leases.len() >= limits.max_instances {
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
            Some(caller.clone()),
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
    /// heartbeats from then on. Only the instance's owner may heartbeat it.
    pub(crate) fn heartbeat(
        &self,
        caller: &Caller,
        id: &str,
        now: Instant,
    ) -> Result<(), RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::EmptyInstanceId);
        }
        let mut state = self.lock();
        let Some(entry) = state.index.get(id) else {
            return Err(RegistryError::UnknownInstance(id.to_owned()));
        };
        let Some(owner) = &entry.owner else {
            return Ok(()); // a static entry: nothing to extend
        };
        caller.may_change(id, owner)?;
        state.leases.set(id, now + self.config.ttl);
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
        let deadline = state.leases.deadline(id);
        let Some(instance) = state.get_mut(id) else {
            return SessionEnd::NotHeld;
        };
        if !grace.is_zero() {
            instance.holder = Holder::Lost;
            let instance = instance.clone();
            let end = now + grace;
            if deadline > Some(end) {
                state.leases.set(id, end);
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

    /// Removes an instance at once, if `caller` owns it.
    pub(crate) fn deregister(&self, caller: &Caller, id: &str) -> Result<Instance, RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::EmptyInstanceId);
        }
        let mut state = self.lock();
        match state.index.get(id).map(|entry| entry.owner.as_ref()) {
            None => return Err(RegistryError::UnknownInstance(id.to_owned())),
            Some(None) => return Err(RegistryError::StaticInstance(id.to_owned())),
            Some(Some(owner)) => caller.may_change(id, owner)?,
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
        while let Some((deadline, id)) = state.leases.first() {
            if deadline > now {
                break;
            }
            let reason = match state.get_mut(&id).map(|instance| instance.holder) {
                Some(Holder::Lost) => Removal::ConnectionLost,
                _ => Removal::Expired,
            };
            match state.remove_for(&id, reason) {
                Some(instance) => evicted.push((instance, reason)),
                // Unreachable while the indexes agree; never loop on a stray lease.
                None => state.leases.remove(&id),
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
        self.lock().leases.renew_all(now + self.config.ttl)
    }

    /// The earliest lease deadline, if any instance holds a lease.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.lock().leases.first().map(|(deadline, _)| deadline)
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
