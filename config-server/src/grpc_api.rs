//! The `registry.v1.Registry` gRPC service over the [`Registry`] core.
//!
//! This layer converts between protobuf and the core's types, logs one line per change,
//! and maps [`RegistryError`] to a gRPC status in exactly one function.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use proto::registry::v1 as pb;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    auth::{Access, Auth},
    registry::{Instance, Registry, RegistryError, Snapshot},
};

pub(crate) use pb::registry_server::RegistryServer;

pub(crate) struct RegistryService {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    auth: Option<Auth>,
}

impl RegistryService {
    pub(crate) fn new(
        registry: Arc<Registry>,
        shutdown: CancellationToken,
        auth: Option<Auth>,
    ) -> Self {
        Self {
            registry,
            shutdown,
            auth,
        }
    }

    fn authorize<T>(&self, request: &Request<T>, access: Access) -> Result<(), Status> {
        match &self.auth {
            Some(auth) => auth.check(request, access),
            None => Ok(()),
        }
    }
}

/// The one place registry errors become gRPC statuses.
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
    }
}

fn unix_ms(time: SystemTime) -> u64 {
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
    }
}

pub(crate) fn snapshot_to_proto(snapshot: &Snapshot) -> pb::LookupResponse {
    pb::LookupResponse {
        service: snapshot.service.clone(),
        instances: snapshot.instances.iter().map(instance_to_proto).collect(),
        revision: snapshot.revision,
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let pb::RegisterRequest {
            service,
            address,
            metadata,
            instance_id,
        } = request.into_inner();
        let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
        let chosen = Some(instance_id.as_str()).filter(|id| !id.is_empty());
        let (lease, replaced) = self
            .registry
            .register(&service, &address, metadata, chosen, Instant::now())
            .map_err(status)?;
        if let Some(old) = replaced.filter(|old| old.id != lease.instance_id) {
            info!(service, address, instance_id = %old.id, "replaced by a new registration");
        }
        metrics::counter!("registry_registrations_total").increment(1);
        info!(service, address, instance_id = %lease.instance_id, "registered");
        Ok(Response::new(pb::RegisterResponse {
            instance_id: lease.instance_id,
            heartbeat_interval_ms: millis(lease.heartbeat_interval),
            ttl_ms: millis(lease.ttl),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let id = request.into_inner().instance_id;
        self.registry
            .heartbeat(&id, Instant::now())
            .map_err(status)?;
        metrics::counter!("registry_heartbeats_total").increment(1);
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let id = request.into_inner().instance_id;
        let removed = self.registry.deregister(&id).map_err(status)?;
        metrics::counter!("registry_deregistrations_total").increment(1);
        info!(
            service = removed.service,
            address = removed.address,
            instance_id = %removed.id,
            "deregistered"
        );
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let service = request.into_inner().service;
        let snapshot = self.registry.lookup(&service).map_err(status)?;
        Ok(Response::new(snapshot_to_proto(&snapshot)))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let (services, revision) = self.registry.list_services();
        Ok(Response::new(pb::ListServicesResponse {
            services: services.iter().map(snapshot_to_proto).collect(),
            revision,
        }))
    }

    async fn get_setting(
        &self,
        request: Request<pb::GetSettingRequest>,
    ) -> Result<Response<pb::GetSettingResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let key = request.into_inner().key;
        let value = self.registry.setting(&key).map_err(status)?;
        Ok(Response::new(pb::GetSettingResponse { value }))
    }

    type WatchStream = ReceiverStream<Result<pb::LookupResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&request, Access::Read)?;
        let service = request.into_inner().service;
        // Subscribe before the first lookup, so no change can fall between the two.
        let mut changes = self.registry.subscribe();
        let mut last = self.registry.lookup(&service).map_err(status)?;
        let (tx, rx) = mpsc::channel(16);
        let registry = Arc::clone(&self.registry);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if tx.send(Ok(snapshot_to_proto(&last))).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => break,
                }
                let snapshot = match registry.lookup(&service) {
                    Ok(snapshot) => snapshot,
                    Err(error) => {
                        warn!(%error, "watch stopped");
                        break;
                    }
                };
                if !snapshot.same_members(&last) {
                    if tx.send(Ok(snapshot_to_proto(&snapshot))).await.is_err() {
                        break;
                    }
                    last = snapshot;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
