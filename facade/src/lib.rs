//! The facade: the system's front door, HTTP/JSON (curl) and gRPC (grpcurl) on one port.
//!
//! `POST` gives a message an id and stores it through a randomly chosen live logging
//! instance, failing over and retrying with the same id ([`failover`]), in one call
//! with the POSTs that arrived while the previous call was in flight ([`batch`]); `GET` returns
//! every message plus the messages service's text. Instances are found through the
//! registry ([`discovery`]): by default from a view the registry pushes, or with
//! `--discovery per-call`, a lookup before every call.
//!
//! [`message_path`] is what both APIs do; [`http_api`] and [`grpc_api`] are the two ways
//! to ask for it.

pub mod batch;
mod coalesce;
pub mod discovery;
pub mod failover;
pub mod grpc_api;
pub mod http_api;
pub mod message_path;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{builder::TypedValueParser, Parser};
use registry_client::RegistryArgs;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    discovery::{Discovery, DiscoveryMode},
    failover::{Failover, Policy},
    grpc_api::{FacadeServer, FacadeService},
    message_path::{AppendBatching, Facade},
};

/// How long a registry lookup may take before the last known list is used instead.
const LOOKUP_DEADLINE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Parser)]
#[command(name = "facade", version, about = "The front door: HTTP/JSON and gRPC")]
pub struct Config {
    /// Print the HTTP API's OpenAPI 3.1 document (what `GET /openapi.json` serves) and
    /// exit.
    #[arg(long)]
    pub print_openapi: bool,

    /// Address to listen on (HTTP and gRPC share it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// How to find instances: a view kept from the registry's Watch stream (changes
    /// arrive in well under a millisecond), or a registry lookup per call.
    #[arg(long, value_enum, default_value_t = DiscoveryMode::Watch)]
    pub discovery: DiscoveryMode,

    /// Deadline of one call to one logging instance.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub attempt_deadline: Duration,

    /// Total time a request may spend on attempts and backoff before answering 503.
    /// Long enough for JetStream to elect a new stream leader even when that takes two
    /// or three rounds (usually 5-8 s, 18 s in the worst run measured), so that a POST
    /// made meanwhile waits for the new leader instead of failing.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_budget: Duration,

    /// How long the registry may list no logging instance at all before a request gives
    /// up with 503 (the retry budget applies while instances are listed): about a
    /// heartbeat interval, so an instance that is restarting still gets its chance.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub no_instance_wait: Duration,

    /// Longest message accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Most calls to logging's AppendBatch in flight at once. POSTs that arrive while
    /// all are busy wait for the next free one and go out together in it.
    #[arg(long, env = "FACADE_APPEND_CALLS", default_value_t = AppendBatching::default().calls, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub append_calls: usize,

    /// A call to AppendBatch that has not answered within this stops counting against
    /// --append-calls, so the POSTs behind a slow or hung instance go on in another call.
    #[arg(long, env = "FACADE_APPEND_PATIENCE", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub append_patience: Duration,

    /// Most messages in one AppendBatch call; 1 sends every POST on its own.
    #[arg(long, env = "FACADE_APPEND_BATCH", default_value_t = AppendBatching::default().messages, value_parser = clap::value_parser!(u16).range(1..=1000).map(usize::from))]
    pub append_batch: usize,

    /// Most POSTs waiting for a call to logging; past it a POST is answered 503 with
    /// Retry-After at once.
    #[arg(long, value_name = "N", default_value_t = AppendBatching::default().max_waiting)]
    pub max_queued_posts: usize,

    /// Most bytes of message text waiting for a call to logging; past it a POST is
    /// answered 503 with Retry-After at once.
    #[arg(long, value_name = "BYTES", default_value_t = AppendBatching::default().max_waiting_bytes)]
    pub max_queued_post_bytes: usize,

    /// Most POSTs in progress from one peer address, so one client cannot fill the
    /// queue for everyone; past it its POSTs are answered 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = AppendBatching::default().max_posts_per_peer)]
    pub max_posts_per_peer: usize,

    /// Full reads (GET /messages, gRPC Get) served at once; more are answered 503 with
    /// Retry-After.
    #[arg(long, value_name = "N", default_value_t = message_path::DEFAULT_MAX_FULL_READS)]
    pub max_full_reads: usize,

    #[command(flatten)]
    pub limits: rpc::LimitArgs,

    #[command(flatten)]
    pub tls: rpc::TlsArgs,

    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

impl Config {
    /// Every default, listening on `addr`, using the registry at `registry`.
    pub fn new(addr: SocketAddr, registry: &str) -> Self {
        let mut config = Config::parse_from(["facade"]);
        config.addr = addr;
        config.registry = RegistryArgs::url(registry);
        config
    }
}

/// Binds `config.addr` (TLS when configured: the public port takes a client certificate
/// if offered and needs none) and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (listener, transport) = config
        .tls
        .bind(config.addr, rpc::ClientCerts::Optional)
        .await?;
    let listener = listener.with_limits(
        config
            .limits
            .limits(message_path::max_request_bytes(config.max_message_bytes)),
    );
    serve_over(listener, config, transport, shutdown).await
}

/// Serves on a bound listener (a `TcpListener`, or an [`rpc::Listener`] that speaks TLS).
pub async fn serve(
    listener: impl Into<rpc::Listener>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let transport = config.tls.transport()?;
    serve_over(listener.into(), config, transport, shutdown).await
}

/// [`serve`], calling the registry and the instances over `transport`.
async fn serve_over(
    listener: rpc::Listener,
    config: Config,
    transport: rpc::Transport,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let registry = config
        .registry
        .client(&transport)?
        .with_deadline(LOOKUP_DEADLINE);
    let replicas = registry.replica_addresses();
    let _follow = registry.follow_replicas(&shutdown);
    let failover = Failover::new(
        Policy {
            attempt_deadline: config.attempt_deadline,
            budget: config.retry_budget,
            unlisted_for: config.no_instance_wait,
            ..Policy::default()
        },
        &shutdown,
    );
    let discovery = Discovery::new(
        registry,
        config.discovery,
        &[message_path::LOGGING, message_path::MESSAGES],
        &shutdown,
    );
    let batching = AppendBatching {
        calls: config.append_calls,
        messages: config.append_batch,
        patience: config.append_patience,
        max_waiting: config.max_queued_posts,
        max_waiting_bytes: config.max_queued_post_bytes,
        max_posts_per_peer: config.max_posts_per_peer,
    };
    let facade = Facade::new(
        discovery,
        failover,
        transport,
        config.max_message_bytes,
        batching,
        config.max_full_reads,
    );

    let (routes, health) = rpc::routes()?;
    health.set_serving::<FacadeServer<FacadeService>>().await;
    let max_request_bytes = listener.limits().max_request_bytes;
    let routes = routes.add_service(
        FacadeServer::new(FacadeService::new(Arc::clone(&facade)))
            .max_decoding_message_size(max_request_bytes),
    );
    info!(%addr, registry = ?replicas, discovery = ?config.discovery, tls = listener.is_tls(),
          "facade listening (HTTP and gRPC)");
    rpc::serve(listener, routes, http_api::router(facade), shutdown).await?;
    info!("facade stopped");
    Ok(())
}
