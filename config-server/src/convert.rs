//! Between the core's types and protobuf, and from [`RegistryError`] to a gRPC status,
//! each in one place; and a `RegisterRequest` carried out, the same for the unary call
//! and for a session.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proto::registry::v1 as pb;
use tokio::time::Instant;
use tonic::Status;

use crate::{
    ownership::Caller,
    registry::{Holder, Instance, Lease, Registrant, Registry, RegistryError, SessionId, Snapshot},
    report,
};

/// Registers what `request` describes for `caller`, held by `session` if given (else by
/// its lease alone), logs it as `how`, and answers with the lease.
pub(crate) fn register(
    registry: &Registry,
    caller: &Caller,
    request: pb::RegisterRequest,
    session: Option<SessionId>,
    how: &'static str,
) -> Result<pb::RegisterResponse, Status> {
    let pb::RegisterRequest {
        service,
        address,
        metadata,
        instance_id,
    } = request;
    let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
    let chosen = Some(instance_id.as_str()).filter(|id| !id.is_empty());
    let (lease, replaced) = registry
        .register(
            Registrant { caller, session },
            &service,
            &address,
            metadata,
            chosen,
            Instant::now(),
        )
        .map_err(status)?;
    report::registered(how, &service, &address, &lease.instance_id, replaced);
    Ok(lease_to_proto(lease))
}

/// The one place registry errors become gRPC statuses; a refused caller is also logged
/// and counted here (`report::denied`), once for every path that can refuse one.
pub(crate) fn status(error: RegistryError) -> Status {
    let message = error.to_string();
    match error {
        RegistryError::InvalidService(_)
        | RegistryError::InvalidAddress(_)
        | RegistryError::UnspecifiedAddress(_)
        | RegistryError::InvalidMetadata(_)
        | RegistryError::EmptyInstanceId
        | RegistryError::InvalidInstanceId(_) => Status::invalid_argument(message),
        RegistryError::UnknownInstance(_) | RegistryError::UnknownSetting(_) => {
            Status::not_found(message)
        }
        RegistryError::StaticInstance(_) => Status::failed_precondition(message),
        RegistryError::ServiceFull { .. } | RegistryError::RegistryFull { .. } => {
            Status::resource_exhausted(message)
        }
        RegistryError::Denied(denied) => {
            report::denied(&denied);
            Status::permission_denied(message)
        }
    }
}

pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

pub(crate) fn instance_to_proto(instance: &Instance) -> pb::Instance {
    pb::Instance {
        instance_id: instance.id.clone(),
        service: instance.service.clone(),
        address: instance.address.clone(),
        metadata: instance
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        is_static: instance.is_static,
        registered_at_unix_ms: unix_ms(instance.registered_at),
        last_heartbeat_unix_ms: unix_ms(instance.last_heartbeat),
        in_session: instance.holder == Holder::Session,
    }
}

pub(crate) fn snapshot_to_proto(snapshot: &Snapshot) -> pb::LookupResponse {
    pb::LookupResponse {
        service: snapshot.service.clone(),
        instances: snapshot.instances.iter().map(instance_to_proto).collect(),
        revision: snapshot.revision,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn lease_to_proto(lease: Lease) -> pb::RegisterResponse {
    pb::RegisterResponse {
        instance_id: lease.instance_id,
        heartbeat_interval_ms: millis(lease.heartbeat_interval),
        ttl_ms: millis(lease.ttl),
    }
}
