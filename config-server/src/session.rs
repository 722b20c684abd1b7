//! The `Session` stream: one instance's registration, held by a live connection.
//!
//! The first message registers the instance; heartbeats follow at the pace the reply
//! sets, each acknowledged; a deregister removes it and ends the stream. When the stream
//! ends any other way (the process died and its kernel closed the connection, or the
//! connection was reset), the instance leaves the registry at once, or after the
//! configured grace, through [`Registry::session_lost`], and watchers hear of it.
//!
//! A process that hangs keeps its connection open, so the session does not end; its
//! lease runs out one TTL after its last heartbeat and the sweeper evicts it, as for the
//! unary calls. If it wakes up, its next heartbeat is answered "register again".
//!
//! When it is the registry that was paused, its clients gave up on it and closed their
//! connections meanwhile; those sessions end the moment it resumes, through no fault of
//! the instances, so each gets one TTL to register again ([`crate::pause`]).

use std::{collections::BTreeMap, sync::Arc};

use proto::registry::v1 as pb;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, info};

use crate::{
    convert::{lease_to_proto, status},
    pause::Pauses,
    registry::{Registry, RegistryError, SessionEnd, SessionId},
};

type Replies = mpsc::Sender<Result<pb::SessionResponse, Status>>;

/// What one message did to the session.
enum Step {
    Continue,
    /// The instance deregistered, or the client broke the protocol: end the stream.
    End,
}

/// One session, from its first message until the stream ends or the registry stops.
pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) registry: Arc<Registry>,
    pub(crate) pauses: Arc<Pauses>,
    pub(crate) replies: Replies,
    /// The instance this session registered, while it holds one.
    pub(crate) held: Option<String>,
}

impl Session {
    pub(crate) async fn run(
        mut self,
        mut inbound: Streaming<pb::SessionRequest>,
        shutdown: CancellationToken,
    ) {
        metrics::gauge!("registry_sessions").increment(1.0);
        let why = loop {
            let next = tokio::select! {
                next = inbound.message() => next,
                // The registry is stopping: its whole list goes with it.
                () = shutdown.cancelled() => break None,
                () = self.replies.closed() => Err(Status::cancelled("the client went away")),
            };
            match next {
                Ok(Some(request)) => match self.handle(request).await {
                    Step::Continue => {}
                    Step::End => break None,
                },
                Ok(None) => break Some("the stream ended without a deregister".to_owned()),
                Err(error) => break Some(error.message().to_owned()),
            }
        };
        metrics::gauge!("registry_sessions").decrement(1.0);
        if let (Some(why), Some(id)) = (why, self.held.take()) {
            self.lost(&id, &why);
        }
    }

    fn lost(&self, id: &str, why: &str) {
        let now = Instant::now();
        let paused = self.pauses.just_resumed(now);
        let grace = if paused {
            self.registry.ttl()
        } else {
            self.registry.session_grace()
        };
        match self.registry.session_lost(id, self.id, now, grace) {
            SessionEnd::Removed(instance) => {
                metrics::counter!("registry_connections_lost_total").increment(1);
                info!(
                    service = instance.service,
                    address = instance.address,
                    instance_id = %instance.id,
                    why,
                    "removed: connection lost (its session ended without a deregister)"
                );
            }
            SessionEnd::Grace(instance) => info!(
                service = instance.service,
                address = instance.address,
                instance_id = %instance.id,
                why,
                grace = %humantime::format_duration(grace),
                "{}",
                if paused {
                    "connection lost while this registry was paused; removing the instance unless it registers again within the grace (one ttl)"
                } else {
                    "connection lost; removing the instance unless it registers again within the grace"
                }
            ),
            SessionEnd::NotHeld => debug!(
                instance_id = id,
                "session ended; another registration holds the instance now"
            ),
        }
    }

    async fn reply(&self, reply: Result<pb::session_response::Kind, Status>) -> Step {
        let message = reply.map(|kind| pb::SessionResponse { kind: Some(kind) });
        let refused = message.is_err();
        match self.replies.send(message).await {
            Ok(()) if !refused => Step::Continue,
            _ => Step::End,
        }
    }

    async fn handle(&mut self, request: pb::SessionRequest) -> Step {
        use pb::{session_request::Kind, session_response::Kind as Reply};
        match request.kind {
            Some(Kind::Register(register)) => {
                let reply = self.register(register).map(Reply::Registered);
                self.reply(reply).await
            }
            Some(Kind::Heartbeat(_)) => {
                let Some(id) = &self.held else {
                    let refused = Status::failed_precondition(
                        "heartbeat before register: a session's first message registers",
                    );
                    return self.reply(Err(refused)).await;
                };
                let reply = match self.registry.heartbeat(id, Instant::now()) {
                    Ok(()) => {
                        metrics::counter!("registry_heartbeats_total").increment(1);
                        Ok(Reply::HeartbeatAck(pb::SessionHeartbeatAck {}))
                    }
                    Err(RegistryError::UnknownInstance(_)) => {
                        debug!(
                            instance_id = id,
                            "unknown on a session heartbeat; asking it to register again"
                        );
                        Ok(Reply::RegisterAgain(pb::RegisterAgain {}))
                    }
                    Err(error) => Err(status(error)),
                };
                self.reply(reply).await
            }
            Some(Kind::Deregister(_)) => {
                if let Some(id) = self.held.take() {
                    match self.registry.deregister(&id) {
                        Ok(removed) => {
                            metrics::counter!("registry_deregistrations_total").increment(1);
                            info!(
                                service = removed.service,
                                address = removed.address,
                                instance_id = %removed.id,
                                "deregistered"
                            );
                        }
                        // Evicted already (a hang); the goodbye still ends the session.
                        Err(error) => debug!(%error, "deregister on a session"),
                    }
                }
                Step::End
            }
            None => {
                let refused = Status::invalid_argument(
                    "empty session message: send register, heartbeat or deregister",
                );
                self.reply(Err(refused)).await
            }
        }
    }

    fn register(&mut self, request: pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
        let pb::RegisterRequest {
            service,
            address,
            metadata,
            instance_id,
        } = request;
        let chosen = Some(instance_id.as_str()).filter(|id| !id.is_empty());
        if let (Some(held), Some(chosen)) = (&self.held, chosen) {
            if held != chosen {
                return Err(Status::invalid_argument(format!(
                    "this session holds instance {held:?}: open another session for {chosen:?}"
                )));
            }
        }
        let chosen = chosen.or(self.held.as_deref());
        let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
        let again = self.held.is_some();
        let (lease, replaced) = self
            .registry
            .register_held(
                Some(self.id),
                &service,
                &address,
                metadata,
                chosen,
                Instant::now(),
            )
            .map_err(status)?;
        if let Some(old) = replaced.filter(|old| old.id != lease.instance_id) {
            info!(service, address, instance_id = %old.id, "replaced by a new registration");
        }
        metrics::counter!("registry_registrations_total").increment(1);
        info!(
            service,
            address,
            instance_id = %lease.instance_id,
            again,
            "registered in a session"
        );
        self.held = Some(lease.instance_id.clone());
        Ok(lease_to_proto(lease))
    }
}
