//! Serving and calling gRPC, the same way in every service.
//!
//! Serving: [`routes`] starts a gRPC route table with the standard health service and
//! reflection (v1 and v1alpha, since grpcurl 1.8 asks v1alpha); a service adds its own
//! server and calls [`serve`] with its HTTP routes, which start from [`http_router`].
//! HTTP/1.1 and HTTP/2 share the port: axum's server detects the protocol per
//! connection, and each request goes to tonic when its content type is
//! `application/grpc*`, else to the HTTP router. Routing in front of both (rather than
//! merging routers) lets the HTTP side keep its own JSON 404, so curl on a wrong path
//! never gets gRPC's "200 + grpc-status" answer.
//!
//! Calling: [`channel`] makes a lazily connected, reusable channel, and [`call`] puts a
//! deadline on one request, both in the header (so the server can give up too) and
//! locally (so a hung peer cannot hang us). [`request_id`] carries one id per client
//! request through every service's log lines.
//!
//! Security: [`tls`] holds the TLS flags and the [`Transport`] whose channels speak it;
//! the plaintext shorthands [`channel`] and [`endpoint`] are for loopback, tests and
//! tools. The [`Listener`] speaks TLS when configured, and [`limits`] bounds what one
//! client can make a server hold: connections, time, request bytes, and (through a
//! [`Gate`]) whatever a service holds open for it.

pub mod limits;
pub mod request_id;
mod server;
pub mod tls;

pub use limits::{Gate, LimitArgs, Pass, Refusals, ServeLimits};
pub use server::Listener;
pub use tls::{peer, peer_ip, AddressError, ClientCerts, Identity, Peer, Tls, TlsArgs, Transport};

use std::{future::Future, io, time::Duration};

use axum::{
    extract::Request,
    http::{header::CONTENT_TYPE, StatusCode},
    response::IntoResponse,
    Json, Router,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{Channel, Endpoint},
    Status,
};
use tonic_health::{
    pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest},
    server::HealthReporter,
};
use tower::ServiceExt;

/// How long to wait for a TCP connection before calling a peer unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Largest request the health and reflection services take: a service or symbol name.
const CONTROL_REQUEST_BYTES: usize = 16 * 1024;

/// A route table holding health and reflection, and the health reporter to flip. A
/// service adds its own server with `max_decoding_message_size` set to its
/// [`ServeLimits::max_request_bytes`].
pub fn routes() -> anyhow::Result<(Routes, HealthReporter)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let health = health.max_decoding_message_size(CONTROL_REQUEST_BYTES);
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(CONTROL_REQUEST_BYTES);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?
        .max_decoding_message_size(CONTROL_REQUEST_BYTES);
    let routes = Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((routes, reporter))
}

/// An HTTP router whose unknown paths answer a JSON 404. Every service's HTTP side
/// starts from it, so that layers added to the whole router (the facade's request ids
/// and metrics) also see the 404s.
pub fn http_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().fallback(not_found)
}

/// Serves gRPC `routes` and the `http` router (made with [`http_router`]) on `listener`
/// (a `TcpListener`, or a [`Listener`] that speaks TLS, under its [`ServeLimits`]) until
/// `shutdown` is cancelled, then stops accepting and waits for in-flight requests to
/// finish. Handlers find the connection's [`Peer`] in their request's extensions.
pub async fn serve(
    listener: impl Into<Listener>,
    routes: Routes,
    http: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let grpc = routes.into_axum_router();
    let app = Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let route = if is_grpc(&request) {
            grpc.clone()
        } else {
            http.clone()
        };
        route.oneshot(request)
    }));
    server::serve(listener.into(), app, shutdown).await
}

fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

async fn not_found(request: Request) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({
            "error": format!("no such resource: {} {}", request.method(), request.uri().path())
        })),
    )
}

/// Whether the gRPC server at `address` reports health `SERVING` for `service` (`""` is
/// the server as a whole). Any failure, including no answer within 500 ms, is `false`.
pub async fn is_serving(address: &str, service: &str) -> bool {
    is_serving_over(&Transport::plaintext(), address, service).await
}

/// [`is_serving`], over `transport` (TLS, for a server that speaks only TLS).
pub async fn is_serving_over(transport: &Transport, address: &str, service: &str) -> bool {
    let Ok(channel) = transport.channel(address) else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    matches!(
        tokio::time::timeout(Duration::from_millis(500), check).await,
        Ok(Ok(reply)) if reply.get_ref().status == ServingStatus::Serving as i32
    )
}

/// A lazily connected plaintext channel to `host:port` (or an `http://` URL). Cheap to
/// clone; it reconnects by itself after the peer comes back.
pub fn channel(address: &str) -> Result<Channel, tls::AddressError> {
    Transport::plaintext().channel(address)
}

/// The plaintext endpoint [`channel`] connects to, for callers that tune it further.
pub fn endpoint(address: &str) -> Result<Endpoint, tls::AddressError> {
    Transport::plaintext().endpoint(address)
}

/// A request carrying `deadline` in its `grpc-timeout` header.
pub fn request<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// Runs one call, giving up with `DEADLINE_EXCEEDED` after `deadline`.
pub async fn call<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {}",
            humantime::format_duration(deadline)
        ))),
    }
}

/// A failed call as a log line shows it: the code and the message, without the metadata
/// dump of `Status`'s own `Display`.
#[derive(Debug)]
pub struct CallError(pub Status);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for CallError {}
