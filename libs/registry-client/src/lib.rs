//! The client side of the registry, written once and used by every service.
//!
//! - [`RegistryClient`]: `lookup`, `get_setting` and `watch`, each call with a deadline,
//!   over one lazily connected channel that reconnects by itself.
//! - [`Registration`]: registers an instance, heartbeats at the pace the server sets,
//!   registers again at once when the server answers `NOT_FOUND` (it restarted or evicted
//!   us), keeps trying with capped jittered backoff while the server is unreachable, and
//!   deregisters on shutdown with a short deadline. The service keeps serving throughout:
//!   an unreachable registry only means others cannot find it for a while.
//! - [`RegistryArgs`] and [`DiscoveryMode`]: the flags every service shares.
//! - [`token`]: the bearer-token file the runner writes and both sides read.
//!
//! The registry server itself is the `config-server` crate; no service depends on it.

pub mod token;

use std::{collections::HashMap, path::PathBuf, time::Duration};

use anyhow::Context;

use proto::registry::v1::{self as pb, registry_client};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::Channel,
    Code, Status, Streaming,
};
use tracing::{info, warn};

use retry::Retry;

/// Deadline of one registry call.
pub const CALL_DEADLINE: Duration = Duration::from_millis(1000);
/// Deadline of the goodbye call on shutdown: short, so shutdown is never held up.
pub const DEREGISTER_DEADLINE: Duration = Duration::from_millis(500);
/// The address registries listen on by default.
pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:50050";

/// How a client finds the instances of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryMode {
    /// A registry lookup before every call.
    PerCall,
    /// Keep a pushed view from the registry's Watch stream.
    Watch,
}

impl DiscoveryMode {
    /// The flag value (`per-call` or `watch`), for passing it on to a child process.
    pub fn as_flag(self) -> &'static str {
        match self {
            Self::PerCall => "per-call",
            Self::Watch => "watch",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RegistryClient {
    inner: registry_client::RegistryClient<Channel>,
    deadline: Duration,
    token: Option<MetadataValue<Ascii>>,
}

/// How a service reaches the registry; flattened into each service's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// The config server.
    #[arg(long = "registry", default_value = DEFAULT_REGISTRY)]
    pub url: String,

    /// File holding the registry's bearer token [default: data/registry.token, if it
    /// exists].
    #[arg(long = "registry-token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry at `url`, with no token file given.
    pub fn url(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            token_file: None,
        }
    }

    /// A client for this registry, carrying the token if there is one.
    pub fn client(&self) -> anyhow::Result<RegistryClient> {
        let client = RegistryClient::new(&self.url)
            .with_context(|| format!("invalid registry address {}", self.url))?;
        match token::token_file(self.token_file.as_ref()) {
            Some(path) => client.with_token(&token::read_token(&path)?),
            None => Ok(client),
        }
    }
}

impl RegistryClient {
    /// A client for the registry at `url` (`http://host:port` or `host:port`). Connects on
    /// first use, so it can be made before the registry is up.
    pub fn new(url: &str) -> Result<Self, tonic::transport::Error> {
        Ok(Self {
            inner: registry_client::RegistryClient::new(rpc::channel(url)?),
            deadline: CALL_DEADLINE,
            token: None,
        })
    }

    /// The same client, sending `authorization: Bearer <token>` with every call.
    pub fn with_token(mut self, token: &str) -> anyhow::Result<Self> {
        self.token = Some(token::bearer(token)?);
        Ok(self)
    }

    fn request<T>(&self, message: T, deadline: Option<Duration>) -> tonic::Request<T> {
        let mut request = match deadline {
            Some(deadline) => rpc::request(message, deadline),
            None => tonic::Request::new(message),
        };
        token::attach(&mut request, self.token.as_ref());
        request
    }

    /// The same client with another deadline for lookups and settings (default 1 s).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Live instances of `service`, static entries included.
    pub async fn lookup(&self, service: &str) -> Result<pb::LookupResponse, Status> {
        let mut client = self.inner.clone();
        let deadline = self.deadline;
        let request = self.request(
            pb::LookupRequest {
                service: service.to_owned(),
            },
            Some(deadline),
        );
        rpc::call(deadline, async move {
            Ok(client.lookup(request).await?.into_inner())
        })
        .await
    }

    /// The setting `key`, or `None` when the registry has no such setting.
    pub async fn get_setting(&self, key: &str) -> Result<Option<String>, Status> {
        let mut client = self.inner.clone();
        let deadline = self.deadline;
        let request = self.request(
            pb::GetSettingRequest {
                key: key.to_owned(),
            },
            Some(deadline),
        );
        let result = rpc::call(deadline, async move {
            Ok(client.get_setting(request).await?.into_inner())
        })
        .await;
        match result {
            Ok(reply) => Ok(Some(reply.value)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// A stream of snapshots of `service`: the current one first, then one per change.
    /// Only opening the stream has a deadline; the stream itself lives until either side
    /// ends it.
    pub async fn watch(&self, service: &str) -> Result<Streaming<pb::LookupResponse>, Status> {
        let mut client = self.inner.clone();
        let request = self.request(
            pb::WatchRequest {
                service: service.to_owned(),
            },
            None,
        );
        rpc::call(CALL_DEADLINE, async move {
            Ok(client.watch(request).await?.into_inner())
        })
        .await
    }

    async fn register(
        &self,
        service: &str,
        address: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<pb::RegisterResponse, Status> {
        let mut client = self.inner.clone();
        let request = self.request(
            pb::RegisterRequest {
                service: service.to_owned(),
                address: address.to_owned(),
                metadata: metadata.clone(),
            },
            Some(CALL_DEADLINE),
        );
        rpc::call(CALL_DEADLINE, async move {
            Ok(client.register(request).await?.into_inner())
        })
        .await
    }

    async fn heartbeat(&self, instance_id: &str, deadline: Duration) -> Result<(), Status> {
        let mut client = self.inner.clone();
        let request = self.request(
            pb::HeartbeatRequest {
                instance_id: instance_id.to_owned(),
            },
            Some(deadline),
        );
        rpc::call(deadline, async move {
            client.heartbeat(request).await?;
            Ok(())
        })
        .await
    }

    async fn deregister(&self, instance_id: &str) -> Result<(), Status> {
        let mut client = self.inner.clone();
        let request = self.request(
            pb::DeregisterRequest {
                instance_id: instance_id.to_owned(),
            },
            Some(DEREGISTER_DEADLINE),
        );
        rpc::call(DEREGISTER_DEADLINE, async move {
            client.deregister(request).await?;
            Ok(())
        })
        .await
    }
}

/// Where a [`Registration`] stands; watch it with [`Registration::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not (or no longer) known to the registry; trying.
    Pending,
    /// Registered under this instance id.
    Registered(String),
}

/// One instance's presence in the registry, kept up by a background task.
pub struct Registration {
    stop: CancellationToken,
    task: JoinHandle<()>,
    state: watch::Receiver<RegistrationState>,
}

/// First retry delay while the registry is unreachable.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest retry delay while registering.
const RETRY_CAP: Duration = Duration::from_secs(1);

impl Registration {
    /// Starts registering `service` at `address` and keeping it registered.
    pub fn start(
        client: RegistryClient,
        service: impl Into<String>,
        address: impl Into<String>,
        metadata: HashMap<String, String>,
    ) -> Self {
        let stop = CancellationToken::new();
        let (state_tx, state) = watch::channel(RegistrationState::Pending);
        let keeper = Keeper {
            client,
            service: service.into(),
            address: address.into(),
            metadata,
            state: state_tx,
        };
        let task = tokio::spawn(keeper.run(stop.clone()));
        Self { stop, task, state }
    }

    /// Follows the registration's state (for readiness checks and tests).
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Waits until the registry has accepted this instance; returns its id.
    pub async fn registered(&self) -> String {
        let mut state = self.state.clone();
        loop {
            if let RegistrationState::Registered(id) = &*state.borrow_and_update() {
                return id.clone();
            }
            if state.changed().await.is_err() {
                // The keeper ended without registering; nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops heartbeating and deregisters (with a short deadline), so the instance leaves
    /// the registry at once instead of after its TTL.
    pub async fn deregister(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            warn!(%error, "registration task failed");
        }
    }
}

struct Keeper {
    client: RegistryClient,
    service: String,
    address: String,
    metadata: HashMap<String, String>,
    state: watch::Sender<RegistrationState>,
}

/// How a registered instance's heartbeats ended.
enum Heartbeats {
    /// The registry no longer knows the instance: register again.
    Forgotten,
    /// Shutdown.
    Stopped,
}

impl Keeper {
    /// Register (retrying until accepted), heartbeat until the registry forgets us,
    /// again; on `stop`, deregister.
    async fn run(self, stop: CancellationToken) {
        let register = Retry::new(
            format!("registering {} at {}", self.service, self.address),
            &stop,
        )
        .backoff(RETRY_BASE, RETRY_CAP);
        loop {
            let lease = register
                .run(
                    || async {
                        self.client
                            .register(&self.service, &self.address, &self.metadata)
                            .await
                            .map_err(rpc::CallError)
                    },
                    |_| false, // a refusal (full, bad name) may be lifted later: keep asking
                )
                .await;
            let Ok(lease) = lease else { break }; // only cancellation ends the retry
            let interval = Duration::from_millis(lease.heartbeat_interval_ms.max(1));
            info!(
                service = self.service,
                address = self.address,
                instance_id = lease.instance_id,
                heartbeat_interval = %humantime::format_duration(interval),
                ttl = %humantime::format_duration(Duration::from_millis(lease.ttl_ms)),
                "registered with the registry"
            );
            self.state
                .send_replace(RegistrationState::Registered(lease.instance_id.clone()));
            match self.heartbeat(&lease.instance_id, interval, &stop).await {
                Heartbeats::Forgotten => {
                    self.state.send_replace(RegistrationState::Pending);
                }
                Heartbeats::Stopped => {
                    self.deregister(&lease.instance_id).await;
                    break;
                }
            }
        }
        self.state.send_replace(RegistrationState::Pending);
    }

    /// Heartbeats every `interval` until the registry forgets `id` or `stop` fires. While
    /// the registry is unreachable it keeps the server's pace: a heartbeat per interval is
    /// already gentle, and it brings us back within one interval of the registry's return.
    async fn heartbeat(
        &self,
        id: &str,
        interval: Duration,
        stop: &CancellationToken,
    ) -> Heartbeats {
        let mut unreachable = false;
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return Heartbeats::Stopped,
                result = async {
                    tokio::time::sleep(interval).await;
                    self.client.heartbeat(id, interval).await
                } => result,
            };
            match result {
                Ok(()) if unreachable => {
                    info!(
                        service = self.service,
                        instance_id = id,
                        "registry reachable again"
                    );
                    unreachable = false;
                }
                Ok(()) => {}
                Err(status) if status.code() == Code::NotFound => {
                    info!(service = self.service, instance_id = id,
                          "registry does not know this instance (restarted or evicted it); registering again");
                    return Heartbeats::Forgotten;
                }
                Err(status) => {
                    if !unreachable {
                        warn!(service = self.service, error = %status.message(),
                              "heartbeat failed; still serving, will keep trying");
                        unreachable = true;
                    }
                }
            }
        }
    }

    async fn deregister(&self, id: &str) {
        match self.client.deregister(id).await {
            Ok(()) => info!(service = self.service, instance_id = id, "deregistered"),
            Err(status) => warn!(service = self.service, instance_id = id,
                                 error = %status.message(),
                                 "could not deregister; the registry will evict this instance after its ttl"),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn every_discovery_mode_flag_parses_back_to_its_mode() {
        for mode in DiscoveryMode::value_variants() {
            assert_eq!(DiscoveryMode::from_str(mode.as_flag(), false), Ok(*mode));
        }
    }
}
