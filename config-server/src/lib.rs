//! The config server: a registry of live service instances, kept honest by heartbeats.
//!
//! Services register on start-up, heartbeat at the pace the server sets, and deregister
//! on shutdown; an instance that stops heartbeating is evicted once its TTL has passed,
//! so lookups list only live instances. Static entries and settings come from the config
//! file or the command line.
//!
//! This library also holds what every service shares, so each exists once:
//! [`client`] (registration, lookup, watch), [`grpc`] (serving with health and
//! reflection, channels and deadlines), [`shutdown`], [`telemetry`] and [`backoff`].

pub mod auth;
pub mod backoff;
pub mod client;
pub mod config;
pub mod grpc;
pub mod registry;
pub mod request_id;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod sweeper;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;
use registry::{Registry, RegistryConfig};
use service::{RegistryServer, RegistryService};

/// Binds `config.addr` and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let registry_config = config.registry_config()?;
    let auth = config.auth()?;
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    serve_with_auth(listener, registry_config, auth, shutdown).await
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
    auth: Option<auth::Auth>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if auth.is_some() {
        info!("registration calls require a bearer token");
    }
    for (service, address) in &config.static_entries {
        info!(service, address, "static entry");
    }
    let registry = Arc::new(Registry::new(config).context("invalid static entry")?);
    info!(
        %addr,
        heartbeat_interval = %humantime::format_duration(registry.heartbeat_interval()),
        ttl = %humantime::format_duration(registry.ttl()),
        "config server listening"
    );

    let sweeper = tokio::spawn(sweeper::run(Arc::clone(&registry), shutdown.clone()));
    let (routes, health) = grpc::routes()?;
    health
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    let http =
        status::router(Arc::clone(&registry), auth.clone()).merge(telemetry::metrics_router());
    let routes = routes.add_service(RegistryServer::new(RegistryService::new(
        registry,
        shutdown.clone(),
        auth,
    )));
    grpc::serve(listener, routes, http, shutdown).await?;
    sweeper.await?;
    info!("config server stopped");
    Ok(())
}
