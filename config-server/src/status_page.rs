//! The HTTP side of the config server, on the gRPC port: a live status page at `/`
//! (plain HTML, CSS and JS compiled into the binary; it polls `/v1/services` every
//! second) and `/v1/services`, every service with its instances as JSON (each with what
//! keeps it listed: a session, or heartbeats alone), the registry's replicas with
//! whether each answers, and the last removals with their reasons.

use std::{sync::Arc, time::SystemTime};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;

use crate::{
    auth::{Access, Auth},
    convert::{instance_to_proto, unix_ms},
    peers::Peers,
    registry::{Holder, Registry},
};

const PAGE: &str = include_str!("status_page.html");

/// What the page's handlers read.
#[derive(Clone)]
struct StatusPage {
    registry: Arc<Registry>,
    peers: Peers,
    auth: Option<Auth>,
}

pub(crate) fn router(registry: Arc<Registry>, peers: Peers, auth: Option<Auth>) -> Router {
    rpc::http_router()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/v1/services", get(services))
        .with_state(StatusPage {
            registry,
            peers,
            auth,
        })
}

async fn services(State(page): State<StatusPage>, headers: HeaderMap) -> Response {
    if let Some(auth) = &page.auth {
        // The same rule as the gRPC reads: open unless reads need the token too.
        let mut probe = tonic::Request::new(());
        if let Some(value) = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            probe.metadata_mut().insert("authorization", value);
        }
        if let Err(refused) = auth.check(&probe, Access::Read) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "error": refused.message() })),
            )
                .into_response();
        }
    }
    let (services, revision) = page.registry.list_services();
    let now = unix_ms(SystemTime::now());
    let services: Vec<_> = services
        .iter()
        .map(|snapshot| {
            let instances: Vec<_> = snapshot
                .instances
                .iter()
                .map(|instance| {
                    let pb = instance_to_proto(instance);
                    json!({
                        "instance_id": pb.instance_id,
                        "address": pb.address,
                        "metadata": pb.metadata,
                        "is_static": pb.is_static,
                        "registered_at_unix_ms": pb.registered_at_unix_ms,
                        "last_heartbeat_unix_ms": pb.last_heartbeat_unix_ms,
                        "held_by": match instance.holder {
                            _ if instance.is_static => "configuration",
                            Holder::Lease => "heartbeats",
                            Holder::Session => "session",
                            Holder::Lost => "connection lost",
                        },
                    })
                })
                .collect();
            json!({ "service": snapshot.service, "revision": snapshot.revision, "instances": instances })
        })
        .collect();
    let removed: Vec<_> = page
        .registry
        .removals()
        .iter()
        .map(|removed| {
            json!({
                "service": removed.instance.service,
                "address": removed.instance.address,
                "instance_id": removed.instance.id,
                "reason": removed.reason.as_str(),
                "at_unix_ms": unix_ms(removed.at),
            })
        })
        .collect();
    Json(json!({
        "revision": revision,
        "now_unix_ms": now,
        "heartbeat_interval_ms": page.registry.heartbeat_interval().as_millis(),
        "ttl_ms": page.registry.ttl().as_millis(),
        "services": services,
        "replicas": page.peers.list(),
        "removed": removed,
    }))
    .into_response()
}
