//! The logging service: `logging PORT` stores `{id -> text}` and prints what it stores.
//!
//! Start-up order matters: the listener is bound (so connections are accepted) before the
//! instance registers, so nobody is sent to an address that refuses them. Shutdown runs
//! the other way: deregister first (new requests go elsewhere at once), then stop
//! accepting, drain in-flight calls, and exit.

pub mod service;
pub mod store;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use registry_client::{Registration, RegistrationMode, RegistryArgs, RegistryClient};
use retry::{Retry, RetryError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use service::{
    LoggingServer, LoggingService, DEFAULT_MAX_FULL_READS, DEFAULT_MAX_TEXT_BYTES,
    MAX_REQUEST_BYTES,
};
use store::{MemoryLimits, MemoryStore, MessageStore, NatsConfig, NatsStore, Retention};

/// The name instances register under.
pub const SERVICE: &str = "logging";
/// The registry setting that names the store when `--store` is not given.
pub const STORE_SETTING: &str = "logging.store";

#[derive(Debug, Clone, Parser)]
#[command(name = "logging", version, about = "The message log (gRPC)")]
pub struct Config {
    /// Port to listen on, e.g. 50051.
    pub port: u16,

    /// Host to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// The address others reach this instance at, registered with the registry
    /// [default: the address it listens on]. Needed when listening on 0.0.0.0 or [::].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// How this instance keeps its registration: `session` (a crash leaves the registry
    /// at once) or `unary` (heartbeat calls; a crash leaves it after the TTL).
    #[arg(long, value_enum, default_value_t = RegistrationMode::Session)]
    pub registration: RegistrationMode,

    /// The message store: `memory`, or `nats://HOST:PORT,...` (`tls://` too) [default:
    /// the registry's `logging.store` setting, else memory].
    #[arg(long)]
    pub store: Option<String>,

    /// NATS store: the file holding this service's nkey seed, for a cluster that lets in
    /// only its users (`runner certs` writes `logging.nk`). With --tls-*, the store's
    /// connection is TLS with the same certificate.
    #[arg(long, value_name = "FILE")]
    pub store_nkey: Option<PathBuf>,

    /// Longest message text accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,

    /// Full reads (Stream calls, the facade's GET /messages) served at once; more are
    /// refused (RESOURCE_EXHAUSTED, a 503 at the facade).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FULL_READS)]
    pub max_full_reads: usize,

    /// Memory store: most messages held; past it a POST is refused (507), nothing is
    /// evicted.
    #[arg(long, default_value_t = MemoryLimits::default().max_messages)]
    pub max_messages: usize,

    /// Memory store: most bytes of message text held; past it a POST is refused (507).
    #[arg(long, default_value_t = MemoryLimits::default().max_bytes)]
    pub max_bytes: usize,

    /// NATS store: the most bytes the stream may hold on disk (e.g. 1GiB, 500MiB; `none`
    /// for no limit). At it, a POST is refused (507) and nothing stored is dropped.
    /// Applied when this instance creates the stream.
    #[arg(long, value_name = "BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub store_max_bytes: Size,

    /// NATS store: drop messages older than this (e.g. 30d) [default: keep them all].
    /// Applied when this instance creates the stream.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention_max_age: Option<Duration>,

    /// NATS store: keep at most this many bytes, dropping the oldest (instead of
    /// refusing at --store-max-bytes) [default: all].
    #[arg(long)]
    pub retention_max_bytes: Option<u64>,

    /// NATS store: keep at most this many messages, dropping the oldest [default: all].
    #[arg(long)]
    pub retention_max_messages: Option<u64>,

    #[command(flatten)]
    pub limits: rpc::LimitArgs,

    #[command(flatten)]
    pub tls: rpc::TlsArgs,

    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

/// A size in bytes, or none (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub Option<u64>);

/// `1073741824`, `1GiB`, `500MiB`, `64KiB`, or `none`.
fn parse_size(text: &str) -> Result<Size, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") {
        return Ok(Size(None));
    }
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use KiB, MiB, GiB, TiB, or none"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(|bytes| Size(Some(bytes)))
        .ok_or_else(|| format!("expected a size such as 1GiB, got {text:?}"))
}

/// Which store backs this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    Memory,
    Nats(Vec<String>),
}

impl StoreChoice {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if text == "memory" {
            return Ok(Self::Memory);
        }
        let is_nats = |url: &str| url.starts_with("nats://") || url.starts_with("tls://");
        if is_nats(text) {
            let urls: Vec<String> = text
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect();
            anyhow::ensure!(
                urls.iter().all(|url| is_nats(url)),
                "every store URL must start with nats:// or tls://, got {text:?}"
            );
            return Ok(Self::Nats(urls));
        }
        anyhow::bail!("unknown store {text:?}: use `memory` or `nats://HOST:PORT,...`")
    }
}

/// How long a bare `logging PORT` waits for the registry to say which store to use.
const SETTING_WAIT: Duration = Duration::from_secs(5);

/// `--store`, else the registry's setting, else memory; `None` when `shutdown` came
/// first.
async fn choose_store(
    config: &Config,
    registry: &RegistryClient,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<StoreChoice>> {
    if let Some(store) = &config.store {
        return StoreChoice::parse(store).map(Some);
    }
    let reading = Retry::new(
        format!("reading the registry's {STORE_SETTING} setting"),
        shutdown,
    )
    .backoff(Duration::from_millis(100), Duration::from_secs(1))
    .budget(SETTING_WAIT);
    let setting = reading
        .run(
            || async {
                registry
                    .get_setting(STORE_SETTING)
                    .await
                    .map_err(rpc::CallError)
            },
            |_| false,
        )
        .await;
    match setting {
        Ok(Some(value)) => {
            info!(
                store = value,
                "store chosen by the registry's {STORE_SETTING} setting"
            );
            StoreChoice::parse(&value).map(Some)
        }
        Ok(None) => Ok(Some(StoreChoice::Memory)),
        Err(RetryError::Cancelled) => Ok(None),
        Err(error) => {
            warn!(%error, "cannot read {STORE_SETTING} from the registry; using the memory store");
            Ok(Some(StoreChoice::Memory))
        }
    }
}

/// Binds the port, chooses and connects the store, and serves until `shutdown`. Every
/// wait before serving (the registry's setting, the store) stops on `shutdown` too.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", config.host, config.port)
        .parse()
        .with_context(|| format!("invalid listen address {}:{}", config.host, config.port))?;
    anyhow::ensure!(
        config.advertise.is_some() || !addr.ip().is_unspecified(),
        "logging would listen on {addr}, which is no address others can connect to: pass \
         --advertise HOST:PORT, the address they should use (this machine's name or IP, and \
         port {})",
        config.port
    );
    let options = ServeOptions {
        max_text_bytes: config.max_text_bytes,
        max_full_reads: config.max_full_reads,
        advertise: config.advertise.clone(),
    };
    let (listener, transport) = config.tls.bind(addr, rpc::ClientCerts::Required).await?;
    let listener = listener.with_limits(config.limits.limits(MAX_REQUEST_BYTES));
    let registry = config
        .registry
        .client(&transport)?
        .with_registration(config.registration);
    let Some(choice) = choose_store(&config, &registry, &shutdown).await? else {
        info!("logging stopped before it was ready");
        return Ok(());
    };
    match choice {
        StoreChoice::Memory => {
            let store = Arc::new(MemoryStore::new(MemoryLimits {
                max_messages: config.max_messages,
                max_bytes: config.max_bytes,
            }));
            serve(listener, store, registry, options, shutdown).await
        }
        StoreChoice::Nats(urls) => {
            let mut nats = NatsConfig::new(urls);
            nats.credentials = store_credentials(&config)?;
            nats.retention = Retention {
                max_age: config.retention_max_age,
                max_bytes: config.retention_max_bytes,
                max_messages: config.retention_max_messages,
            };
            nats.max_bytes = config.store_max_bytes.0;
            let store = match NatsStore::connect(nats, &shutdown).await {
                Ok(store) => Arc::new(store),
                Err(_) if shutdown.is_cancelled() => {
                    info!("logging stopped before its store was ready");
                    return Ok(());
                }
                Err(error) => return Err(error),
            };
            serve(listener, store, registry, options, shutdown).await
        }
    }
}

/// TLS (this instance's own certificate) and the nkey, for a locked-down NATS cluster.
fn store_credentials(config: &Config) -> anyhow::Result<local_nats::Credentials> {
    let tls = config
        .tls
        .paths()
        .map(|(cert, key, ca)| (ca.to_owned(), cert.to_owned(), key.to_owned()));
    let nkey_seed = config
        .store_nkey
        .as_ref()
        .map(|path| {
            rpc::tls::check_private(path)?;
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the nkey file {}", path.display()))?;
            anyhow::Ok(seed.trim().to_owned())
        })
        .transpose()?;
    Ok(local_nats::Credentials { tls, nkey_seed })
}

/// How an instance serves, beyond its listener and store.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest message text accepted, in bytes.
    pub max_text_bytes: usize,
    /// Full reads served at once.
    pub max_full_reads: usize,
    /// The address registered; the listener's own address when `None`.
    pub advertise: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            max_full_reads: DEFAULT_MAX_FULL_READS,
            advertise: None,
        }
    }
}

/// Serves on a bound listener (a `TcpListener`, or an [`rpc::Listener`] that speaks TLS)
/// with the given store, registered with `registry`.
pub async fn serve<S: MessageStore>(
    listener: impl Into<rpc::Listener>,
    store: Arc<S>,
    registry: RegistryClient,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = listener.into();
    let addr = listener.local_addr()?;
    let (max_text_bytes, max_full_reads) = (options.max_text_bytes, options.max_full_reads);
    let max_request_bytes = listener.limits().max_request_bytes;
    let advertise = options.advertise.unwrap_or_else(|| addr.to_string());
    let (routes, health) = rpc::routes()?;
    health
        .set_serving::<LoggingServer<LoggingService<S>>>()
        .await;
    let kind = store.kind();
    let routes = routes.add_service(
        LoggingServer::new(LoggingService::new(store, max_text_bytes, max_full_reads))
            .max_decoding_message_size(max_request_bytes),
    );
    let tls = listener.is_tls();
    let server_stop = CancellationToken::new();
    let mut server = tokio::spawn(rpc::serve(
        listener,
        routes,
        rpc::http_router().merge(telemetry::metrics_router()),
        server_stop.clone(),
    ));
    info!(%addr, advertise, store = kind, tls = tls, "logging listening");

    // The listener already accepts connections, so it is safe to be found now.
    let registration = Registration::start(
        registry,
        SERVICE,
        advertise.clone(),
        HashMap::from([("store".to_owned(), kind.to_owned())]),
    );

    tokio::select! {
        () = shutdown.cancelled() => {}
        result = &mut server => {
            registration.deregister().await;
            result??;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
    }
    registration.deregister().await;
    health
        .set_not_serving::<LoggingServer<LoggingService<S>>>()
        .await;
    server_stop.cancel();
    server.await??;
    info!("logging stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_choices_parse_or_say_why_not() {
        assert_eq!(
            StoreChoice::parse("memory").expect("memory"),
            StoreChoice::Memory
        );
        assert_eq!(
            StoreChoice::parse("nats://127.0.0.1:4222, nats://127.0.0.1:4223").expect("nats"),
            StoreChoice::Nats(vec![
                "nats://127.0.0.1:4222".into(),
                "nats://127.0.0.1:4223".into()
            ])
        );
        let error = StoreChoice::parse("redis://x")
            .expect_err("unknown")
            .to_string();
        assert!(error.contains("unknown store"), "{error}");
        assert!(StoreChoice::parse("nats://a,http://b").is_err());
        assert_eq!(parse_size("1GiB"), Ok(Size(Some(1 << 30))));
        assert_eq!(parse_size("500MiB"), Ok(Size(Some(500 << 20))));
        assert_eq!(parse_size("4096"), Ok(Size(Some(4096))));
        assert_eq!(parse_size("none"), Ok(Size(None)));
        assert!(parse_size("1GB").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!(
            StoreChoice::parse("tls://a:4222,nats://b:4222").expect("nats"),
            StoreChoice::Nats(vec!["tls://a:4222".into(), "nats://b:4222".into()])
        );
    }
}
