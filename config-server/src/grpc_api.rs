//! The `registry.v1.Registry` gRPC service over the [`Registry`] core.
//!
//! This layer checks the token, names the caller (`ownership`), calls the core, logs
//! one line per change, and converts with [`crate::convert`]. The `Session` stream's own
//! loop is in [`crate::session`].

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use proto::registry::v1 as pb;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use crate::{
    auth::{Access, Auth},
    convert::{self, snapshot_to_proto, status},
    ownership::Caller,
    pause::Pauses,
    registry::{Registry, Removal, StreamLimits},
    report,
    session::{Replies, Session},
};

pub(crate) use pb::registry_server::RegistryServer;

pub(crate) struct RegistryService {
    registry: Arc<Registry>,
    pauses: Arc<Pauses>,
    shutdown: CancellationToken,
    auth: Option<Auth>,
    /// The number of the next session.
    session_numbers: AtomicU64,
    /// Open Watch and Session streams, per peer address and in all.
    watches: Arc<rpc::Gate>,
    sessions: Arc<rpc::Gate>,
}

impl RegistryService {
    pub(crate) fn new(
        registry: Arc<Registry>,
        pauses: Arc<Pauses>,
        shutdown: CancellationToken,
        auth: Option<Auth>,
        limits: StreamLimits,
    ) -> Self {
        Self {
            registry,
            pauses,
            shutdown,
            auth,
            session_numbers: AtomicU64::new(0),
            watches: rpc::Gate::new(
                "watches",
                Some((limits.watches_per_peer, "--max-watches-per-peer")),
                Some((limits.watches, "--max-watches")),
                "registry_watches_refused_total",
            ),
            sessions: rpc::Gate::new(
                "sessions",
                Some((limits.sessions_per_peer, "--max-sessions-per-peer")),
                Some((limits.sessions, "--max-sessions")),
                "registry_sessions_refused_total",
            ),
        }
    }

    /// A place for one more stream of `request`'s peer under `gate`, or
    /// `RESOURCE_EXHAUSTED` saying which limit it met.
    fn hold<T>(gate: &Arc<rpc::Gate>, request: &Request<T>) -> Result<rpc::Pass, Status> {
        gate.enter(rpc::peer_ip(request))
            .map_err(|refused| Status::resource_exhausted(format!("too many streams: {refused}")))
    }

    fn authorize<T>(&self, request: &Request<T>, access: Access) -> Result<(), Status> {
        match &self.auth {
            Some(auth) => auth.check(request, access),
            None => Ok(()),
        }
    }

    /// Admits a write and names its caller, who owns what it registers.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.authorize(request, Access::Write)?;
        Ok(Caller::of(request, self.auth.as_ref()))
    }
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = self.caller(&request)?;
        let lease = convert::register(
            &self.registry,
            &caller,
            request.into_inner(),
            None,
            "registered",
        )?;
        Ok(Response::new(lease))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().instance_id;
        self.registry
            .heartbeat(&caller, &id, Instant::now())
            .map_err(status)?;
        metrics::counter!("registry_heartbeats_total").increment(1);
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let caller = self.caller(&request)?;
        let id = request.into_inner().instance_id;
        let removed = self.registry.deregister(&caller, &id).map_err(status)?;
        report::removed(&removed, Removal::Deregistered, "by a Deregister call");
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

    type SessionStream = Replies;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = self.caller(&request)?;
        let pass = Self::hold(&self.sessions, &request)?;
        let session = Session::new(
            self.session_numbers.fetch_add(1, Ordering::Relaxed),
            caller,
            Arc::clone(&self.registry),
            Arc::clone(&self.pauses),
            pass,
        );
        let replies = session.replies(request.into_inner(), self.shutdown.clone());
        Ok(Response::new(replies))
    }

    type WatchStream = ReceiverStream<Result<pb::LookupResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&request, Access::Read)?;
        let pass = Self::hold(&self.watches, &request)?;
        let service = request.into_inner().service;
        // Subscribe before the first lookup, so no change can fall between the two.
        let mut changes = self.registry.subscribe();
        let mut last = self.registry.lookup(&service).map_err(status)?;
        let (tx, rx) = mpsc::channel(16);
        let registry = Arc::clone(&self.registry);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _pass = pass;
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
