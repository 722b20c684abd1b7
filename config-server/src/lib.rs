//! The config server: a registry of live service instances, kept honest by heartbeats
//! and live connections.
//!
//! Services register on start-up, heartbeat at the pace the server sets, and deregister
//! on shutdown; an instance that stops heartbeating is evicted once its TTL has passed,
//! and one whose session stream ends without a deregister is removed at once, so
//! lookups list only live instances. Static entries and settings come from the config
//! file or the command line.
//!
//! This crate is the server alone. The client side every service uses (registration,
//! lookup, watch, token files) is the `registry-client` crate.
//!
//! - `registry`: the core, a state machine on the time it is given (leases, sessions,
//!   static entries, revisions); `validation`: what it refuses, and why.
//! - `sweeper`: evicts expired leases, sleeping until the next deadline.
//! - `pause`: notices that the whole process was paused, for lost sessions.
//! - `grpc_api`: `registry.v1.Registry` over the core; `convert`: its types to protobuf;
//!   `report`: the log line and counter of each change.
//! - `session`: the `Session` stream, a registration held by a live connection.
//! - `status_page`: the live HTML page and `/v1/services`.
//! - `peers`: the other replicas (`--replica`), health-checked for the status page.
//! - `auth`: the bearer-token check; `ownership`: who may change a registration;
//!   `config`: flags and the TOML file.

mod auth;
mod config;
mod convert;
mod grpc_api;
mod ownership;
mod pause;
mod peers;
mod registry;
mod report;
mod session;
mod status_page;
mod sweeper;
mod validation;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use auth::Auth;
pub use config::Config;
pub use registry::{Limits, RegistryConfig, StreamLimits};

use grpc_api::{RegistryServer, RegistryService};
use registry::Registry;

/// Largest request the registry takes by default: a Register with every metadata entry
/// at its longest is under 40 KB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Binds `config.addr` (TLS with client certificates required, when configured) and
/// serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let registry_config = config.registry_config()?;
    let auth = config.auth()?;
    let tls = config.tls()?;
    let (listener, transport) = tls.bind(config.addr, rpc::ClientCerts::Required).await?;
    let listener = listener.with_limits(config.limits.limits(MAX_REQUEST_BYTES));
    serve_secured(listener, registry_config, auth, transport, shutdown).await
}

/// Serves the registry on an already bound listener (tests bind `127.0.0.1:0`).
pub async fn serve(
    listener: TcpListener,
    config: RegistryConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_auth(listener, config, None, shutdown).await
}

/// [`serve`], with registration calls (and optionally reads) requiring a bearer token.
pub async fn serve_with_auth(
    listener: TcpListener,
    config: RegistryConfig,
    auth: Option<Auth>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let transport = rpc::Transport::plaintext();
    serve_secured(listener.into(), config, auth, transport, shutdown).await
}

/// [`serve_with_auth`] on a listener that may speak TLS, probing the other replicas
/// over `transport`.
async fn serve_secured(
    listener: rpc::Listener,
    config: RegistryConfig,
    auth: Option<Auth>,
    transport: rpc::Transport,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let max_request_bytes = listener.limits().max_request_bytes;
    let streams = config.streams;
    let static_entries = config
        .static_entries
        .iter()
        .map(|(service, address)| format!("{service}={address}"))
        .collect::<Vec<_>>()
        .join(", ");
    let replicas: Vec<String> = config
        .static_entries
        .iter()
        .filter(|(service, _)| service == registry_client::REGISTRY_SERVICE)
        .map(|(_, address)| address.clone())
        .collect();
    let peers = peers::Peers::new(&replicas, &addr.to_string());
    let registry = Arc::new(Registry::new(config).context("invalid static entry")?);
    info!(
        %addr,
        heartbeat_interval = %humantime::format_duration(registry.heartbeat_interval()),
        ttl = %humantime::format_duration(registry.ttl()),
        auth = if auth.is_some() { "token for registration" } else { "none" },
        tls = listener.is_tls(),
        static_entries,
        "config server listening"
    );

    let sweeper = tokio::spawn(sweeper::run(Arc::clone(&registry), shutdown.clone()));
    let pauses = Arc::new(pause::Pauses::new());
    let ticker = tokio::spawn({
        let pauses = Arc::clone(&pauses);
        let shutdown = shutdown.clone();
        async move { pauses.run(shutdown).await }
    });
    let probe = tokio::spawn(peers.clone().probe(transport, shutdown.clone()));
    let (routes, health) = rpc::routes()?;
    health
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    let http = status_page::router(Arc::clone(&registry), peers, auth.clone())
        .merge(telemetry::metrics_router());
    let routes = routes.add_service(
        RegistryServer::new(RegistryService::new(
            registry,
            pauses,
            shutdown.clone(),
            auth,
            streams,
        ))
        .max_decoding_message_size(max_request_bytes),
    );
    rpc::serve(listener, routes, http, shutdown).await?;
    sweeper.await?;
    ticker.await?;
    probe.await?;
    info!("config server stopped");
    Ok(())
}
