//! The registry's state behind its one lock: services and their instances, the id
//! index with who owns each id, the leases, and the last removals.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    time::SystemTime,
};

use tokio::time::Instant;

use super::types::{Instance, Removal, Removed, SessionId, Snapshot};
use crate::ownership::Caller;

/// How many removals the status page shows.
const REMOVALS_KEPT: usize = 20;

#[derive(Default)]
pub(super) struct State {
    pub(super) revision: u64,
    pub(super) services: BTreeMap<String, Service>,
    /// Every instance's service, holders and owner, by id.
    pub(super) index: HashMap<String, Entry>,
    pub(super) leases: Leases,
    /// The last removals, newest last.
    pub(super) removals: VecDeque<Removed>,
}

pub(super) struct Entry {
    pub(super) service: String,
    /// The sessions holding the registration (none for static entries and unary ones).
    pub(super) sessions: Vec<SessionId>,
    /// Who registered it (`None` for static entries, which nobody may change).
    pub(super) owner: Option<Caller>,
}

/// Every dynamic instance's lease deadline: the one place deadlines live, by id for
/// heartbeats and in order for the sweeper.
#[derive(Default)]
pub(super) struct Leases {
    by_id: HashMap<String, Instant>,
    in_order: BTreeSet<(Instant, String)>,
}

impl Leases {
    /// How many instances hold a lease (every dynamic one).
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(super) fn deadline(&self, id: &str) -> Option<Instant> {
        self.by_id.get(id).copied()
    }

    /// Sets `id`'s deadline, whether it held a lease before or not.
    pub(super) fn set(&mut self, id: &str, deadline: Instant) {
        if let Some(old) = self.by_id.insert(id.to_owned(), deadline) {
            self.in_order.remove(&(old, id.to_owned()));
        }
        self.in_order.insert((deadline, id.to_owned()));
    }

    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.in_order.remove(&(old, id.to_owned()));
        }
    }

    /// The earliest deadline, with its instance.
    pub(super) fn first(&self) -> Option<(Instant, String)> {
        self.in_order.first().cloned()
    }

    /// Moves every deadline to `deadline`; returns how many there were.
    pub(super) fn renew_all(&mut self, deadline: Instant) -> usize {
        for held in self.by_id.values_mut() {
            *held = deadline;
        }
        self.in_order = self.by_id.keys().map(|id| (deadline, id.clone())).collect();
        self.by_id.len()
    }
}

#[derive(Default)]
pub(super) struct Service {
    pub(super) revision: u64,
    pub(super) instances: BTreeMap<String, Instance>,
}

impl Service {
    /// The instances ordered by address (then id), so listings read well and are stable.
    /// A dynamic registration at a static entry's address is the same endpoint, so it is
    /// listed once, as the static entry (which outlives any lease); its lease still works.
    pub(super) fn snapshot(&self, name: &str) -> Snapshot {
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
    pub(super) fn bump(&mut self, service: &str) -> u64 {
        self.revision += 1;
        if let Some(entry) = self.services.get_mut(service) {
            entry.revision = self.revision;
        }
        self.revision
    }

    /// Adds an instance; a dynamic one (with a `deadline`) holds a lease until then.
    pub(super) fn insert(
        &mut self,
        instance: Instance,
        deadline: Option<Instant>,
        sessions: Vec<SessionId>,
        owner: Option<Caller>,
    ) {
        if let Some(deadline) = deadline {
            self.leases.set(&instance.id, deadline);
        }
        self.index.insert(
            instance.id.clone(),
            Entry {
                service: instance.service.clone(),
                sessions,
                owner,
            },
        );
        self.services
            .entry(instance.service.clone())
            .or_default()
            .instances
            .insert(instance.id.clone(), instance);
    }

    /// Removes an instance from every index; drops its service when it was the last.
    pub(super) fn remove(&mut self, id: &str) -> Option<Instance> {
        let entry = self.index.remove(id)?;
        self.leases.remove(id);
        let service = self.services.get_mut(&entry.service)?;
        let removed = service.instances.remove(id);
        if service.instances.is_empty() {
            self.services.remove(&entry.service);
        }
        removed
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Instance> {
        let entry = self.index.get(id)?;
        self.services.get_mut(&entry.service)?.instances.get_mut(id)
    }

    /// Removes an instance for `reason`, bumps the revision and remembers the removal.
    pub(super) fn remove_for(&mut self, id: &str, reason: Removal) -> Option<Instance> {
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
