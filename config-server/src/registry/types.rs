//! The registry's types: what an instance is, what a lookup answers, what a removal
//! and a lease are, and how the registry is set up.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use crate::ownership::Caller;

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

/// Limits on the streams clients hold open: Watches and Sessions, per peer address and
/// in all. Each is a flag on the binary; over one, the stream is refused with
/// `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub watches_per_peer: usize,
    pub watches: usize,
    pub sessions_per_peer: usize,
    pub sessions: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            watches_per_peer: 256,
            watches: 4096,
            sessions_per_peer: 1024,
            sessions: 16_384,
        }
    }
}

/// Sessions are numbered as they open; a registration remembers the ones holding it.
pub(crate) type SessionId = u64;

/// Who registers ([`crate::ownership`]), and on which session (none for a unary call).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Registrant<'a> {
    pub(crate) caller: &'a Caller,
    pub(crate) session: Option<SessionId>,
}

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
    pub streams: StreamLimits,
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
            streams: StreamLimits::default(),
            static_entries: Vec::new(),
            settings: BTreeMap::new(),
        }
    }
}
