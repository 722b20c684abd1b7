//! The `Session` stream: one instance's registration, held by a live connection.
//!
//! The first message registers the instance; heartbeats follow at the pace the reply
//! sets, unanswered (the connection's pings tell the client whether the registry is
//! there); a deregister removes it and ends the stream. When the stream ends any other way
//! (the process died and its kernel closed the connection, or the connection was
//! reset), the instance leaves the registry at once, or after the configured grace,
//! through [`Registry::session_lost`], and watchers hear of it.
//!
//! A process that hangs keeps its connection open, so the session does not end; its
//! lease runs out one TTL after its last heartbeat and the sweeper evicts it, as for the
//! unary calls. If it wakes up, its next heartbeat is answered "register again".
//!
//! When it is the registry that was paused, its clients gave up on it and closed their
//! connections meanwhile; those sessions end the moment it resumes, through no fault of
//! the instances, so each gets one TTL to register again ([`crate::pause`]).
//!
//! The session runs inside the response stream itself (no task or channel of its own),
//! so a heartbeat costs one wake-up of the stream's task; and its end is in `Drop`, so
//! however the stream goes (the client's end, a reset, the server dropping it), the
//! instance it held is let go.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt};
use proto::registry::v1 as pb;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, info};

use crate::{
    convert::{self, status},
    ownership::Caller,
    pause::Pauses,
    registry::{Registry, RegistryError, Removal, SessionEnd, SessionId},
    report,
};

/// The replies of one session, as tonic sends them.
pub(crate) type Replies = Pin<Box<dyn Stream<Item = Result<pb::SessionResponse, Status>> + Send>>;

/// What one message asks of the stream.
enum Step {
    Reply(pb::session_response::Kind),
    /// Nothing to say: a heartbeat that extended the lease.
    Quiet,
    /// End the stream with this status (the client broke the protocol, or the registry
    /// refused the registration).
    Refuse(Status),
    /// The instance deregistered: end the stream.
    End,
}

/// One session, from its first message until its stream is dropped.
pub(crate) struct Session {
    id: SessionId,
    registry: Arc<Registry>,
    pauses: Arc<Pauses>,
    /// Who opened the session: its registration's owner.
    caller: Caller,
    /// The instance this session registered, while it holds one.
    held: Option<String>,
    /// How the stream ended, for the log line when that lets go of an instance.
    why: &'static str,
    /// Its place under the session limits, given back when it ends.
    _pass: rpc::Pass,
}

impl Session {
    pub(crate) fn new(
        id: SessionId,
        caller: Caller,
        registry: Arc<Registry>,
        pauses: Arc<Pauses>,
        pass: rpc::Pass,
    ) -> Self {
        metrics::gauge!("registry_sessions").increment(1.0);
        Self {
            id,
            caller,
            registry,
            pauses,
            held: None,
            why: "the connection closed",
            _pass: pass,
        }
    }

    /// The replies to `inbound`, computed as tonic asks for them, until the stream ends
    /// or `shutdown` (the registry stopping: its whole list goes with it).
    pub(crate) fn replies(
        self,
        inbound: Streaming<pb::SessionRequest>,
        shutdown: CancellationToken,
    ) -> Replies {
        // One wait for the shutdown per session, polled with each message, rather than a
        // new one per message.
        let inbound = Box::pin(inbound.take_until(shutdown.clone().cancelled_owned()));
        let state = Some((self, inbound));
        Box::pin(futures_util::stream::unfold(state, move |state| {
            let shutdown = shutdown.clone();
            async move {
                let (mut session, mut inbound) = state?;
                loop {
                    let request = match inbound.next().await {
                        Some(Ok(request)) => request,
                        None if shutdown.is_cancelled() => {
                            session.held = None;
                            return None;
                        }
                        None => {
                            session.why = "the stream ended without a deregister";
                            return None;
                        }
                        Some(Err(_)) => return None, // the connection closed or was reset
                    };
                    match session.handle(request) {
                        Step::Reply(kind) => {
                            let reply = pb::SessionResponse { kind: Some(kind) };
                            return Some((Ok(reply), Some((session, inbound))));
                        }
                        Step::Quiet => {}
                        Step::Refuse(refused) => return Some((Err(refused), None)),
                        Step::End => return None,
                    }
                }
            }
        }))
    }

    fn handle(&mut self, request: pb::SessionRequest) -> Step {
        use pb::{session_request::Kind, session_response::Kind as Reply};
        match request.kind {
            Some(Kind::Register(register)) => match self.register(register) {
                Ok(lease) => Step::Reply(Reply::Registered(lease)),
                Err(refused) => Step::Refuse(refused),
            },
            Some(Kind::Heartbeat(_)) => {
                let Some(id) = &self.held else {
                    return Step::Refuse(Status::failed_precondition(
                        "heartbeat before register: a session's first message registers",
                    ));
                };
                match self.registry.heartbeat(&self.caller, id, Instant::now()) {
                    Ok(()) => {
                        metrics::counter!("registry_heartbeats_total").increment(1);
                        Step::Quiet
                    }
                    Err(RegistryError::UnknownInstance(_)) => {
                        debug!(
                            instance_id = id,
                            "unknown on a session heartbeat; asking it to register again"
                        );
                        Step::Reply(Reply::RegisterAgain(pb::RegisterAgain {}))
                    }
                    Err(error) => Step::Refuse(status(error)),
                }
            }
            Some(Kind::Deregister(_)) => {
                if let Some(id) = self.held.take() {
                    match self.registry.deregister(&self.caller, &id) {
                        Ok(removed) => {
                            report::removed(&removed, Removal::Deregistered, "on its session");
                        }
                        // Evicted already (a hang); the goodbye still ends the session.
                        Err(error) => debug!(%error, "deregister on a session"),
                    }
                }
                Step::End
            }
            None => Step::Refuse(Status::invalid_argument(
                "empty session message: send register, heartbeat or deregister",
            )),
        }
    }

    /// Registers on this session; a session holds one instance, so a second register
    /// names the same id (or none, meaning the one it holds).
    fn register(
        &mut self,
        mut request: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, Status> {
        let how = match &self.held {
            None => "registered in a session",
            Some(held) if request.instance_id.is_empty() || request.instance_id == *held => {
                request.instance_id.clone_from(held);
                "registered again in its session"
            }
            Some(held) => {
                return Err(Status::invalid_argument(format!(
                    "this session holds instance {held:?}: open another session for {:?}",
                    request.instance_id
                )));
            }
        };
        let lease = convert::register(&self.registry, &self.caller, request, Some(self.id), how)?;
        self.held = Some(lease.instance_id.clone());
        Ok(lease)
    }

    /// The stream ended without a deregister while holding `id`.
    fn lost(&self, id: &str) {
        let now = Instant::now();
        let paused = self.pauses.just_resumed(now);
        let grace = if paused {
            self.registry.ttl()
        } else {
            self.registry.session_grace()
        };
        let why = self.why;
        match self.registry.session_lost(id, self.id, now, grace) {
            SessionEnd::Removed(instance) => {
                report::removed(&instance, Removal::ConnectionLost, why);
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
                "session ended; another session or registration holds the instance too"
            ),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        metrics::gauge!("registry_sessions").decrement(1.0);
        if let Some(id) = self.held.take() {
            self.lost(&id);
        }
    }
}
