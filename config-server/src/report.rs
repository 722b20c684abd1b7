//! The log line and the counter for each change of the registry, written once for every
//! path that makes it (unary calls, sessions, the sweeper).

use tracing::{info, warn};

use crate::{
    ownership::Denied,
    registry::{Instance, Removal},
};

/// An instance registered (`how`: "registered" or "registered in a session"), and the
/// entry it replaced, if another.
pub(crate) fn registered(
    how: &'static str,
    service: &str,
    address: &str,
    instance_id: &str,
    replaced: Option<Instance>,
) {
    if let Some(old) = replaced.filter(|old| old.id != instance_id) {
        info!(service, address, instance_id = %old.id, "replaced by a new registration");
    }
    metrics::counter!("registry_registrations_total").increment(1);
    info!(service, address, instance_id, "{how}");
}

/// An instance removed for `reason`; `detail` says more (the TTL, the grace, how the
/// connection ended).
pub(crate) fn removed(instance: &Instance, reason: Removal, detail: &str) {
    let (counter, what) = match reason {
        Removal::Deregistered => ("registry_deregistrations_total", "deregistered"),
        Removal::Expired => (
            "registry_evictions_total",
            "evicted: no heartbeat within the ttl",
        ),
        Removal::ConnectionLost => (
            "registry_connections_lost_total",
            "removed: connection lost (its session ended without a deregister)",
        ),
    };
    metrics::counter!(counter).increment(1);
    info!(
        service = instance.service,
        address = instance.address,
        instance_id = %instance.id,
        detail,
        "{what}"
    );
}

/// A call refused because its caller may not make it ([`crate::ownership`]).
pub(crate) fn denied(denied: &Denied) {
    metrics::counter!("registry_permission_denied_total").increment(1);
    match denied {
        Denied::Service { caller, service } => {
            warn!(%caller, service, "refused: may not register this service");
        }
        Denied::NotOwner { caller, id } => {
            warn!(%caller, instance_id = %id, "refused: the instance belongs to someone else");
        }
    }
}
