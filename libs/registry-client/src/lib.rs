//! The client side of the registry, written once and used by every service.
//!
//! - [`RegistryClient`]: `lookup`, `get_setting` and `watch`, each call with a deadline,
//!   over lazily connected channels to every registry replica it knows; a replica that
//!   does not answer is passed over within the call (see [`replicas`]).
//! - [`Registration`]: registers an instance with every replica under an id it chose,
//!   and keeps it registered, in a session stream per replica or by unary heartbeats
//!   ([`RegistrationMode`]; see [`registration`]).
//! - [`RegistryArgs`] and [`DiscoveryMode`]: the flags every service shares;
//!   [`RegistrationMode`], the flag of those that register.
//! - [`token`]: the bearer-token file the runner writes and both sides read; [`replicas`]
//!   has the replica file it writes next to it.
//!
//! The registry server itself is the `config-server` crate; no service depends on it.

pub mod registration;
pub mod replicas;
pub mod token;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;

use proto::registry::v1 as pb;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{Ascii, MetadataValue},
    Code, Status, Streaming,
};

pub use registration::Registration;
use replicas::Replicas;
pub use replicas::{DEFAULT_REPLICAS_FILE, REGISTRY_SERVICE, SESSION_KEEPALIVE};

/// Deadline of one registry call (shared among the replicas it may try).
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

/// How an instance keeps its registration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RegistrationMode {
    /// A `Session` stream per replica: a crash (the connection closing) removes the
    /// instance at once; heartbeats on the stream still catch a hang within the TTL.
    #[default]
    Session,
    /// Unary Register and Heartbeat calls: a crash is noticed after the TTL. For
    /// registries without sessions (the client also falls back to it by itself there).
    Unary,
}

#[derive(Clone)]
pub struct RegistryClient {
    replicas: Arc<Replicas>,
    deadline: Duration,
    token: Option<MetadataValue<Ascii>>,
    registration: RegistrationMode,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("replicas", &self.replicas.addresses())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// How a service reaches the registry; flattened into each service's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// The config server's replicas, as many as you know; the others are learned from
    /// any one that answers [default: those in data/registry.replicas if it exists,
    /// else http://127.0.0.1:50050].
    #[arg(long = "registry", value_name = "URL[,URL...]", value_delimiter = ',')]
    pub urls: Vec<String>,

    /// File holding the registry's bearer token [default: data/registry.token, if it
    /// exists].
    #[arg(long = "registry-token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry at `url` (or `URL,URL,...`), with no token file given.
    pub fn url(url: &str) -> Self {
        Self {
            urls: url.split(',').map(str::to_owned).collect(),
            token_file: None,
        }
    }

    /// The replicas to start from: those given, else the runner's replica file, else
    /// the default address.
    pub fn seeds(&self) -> anyhow::Result<Vec<String>> {
        if !self.urls.is_empty() {
            return Ok(self.urls.clone());
        }
        match replicas::default_replicas_file() {
            Some(path) => replicas::read_replicas_file(&path),
            None => Ok(vec![DEFAULT_REGISTRY.to_owned()]),
        }
    }

    /// A client for these replicas over `transport`, carrying the token if there is one.
    pub fn client(&self, transport: &rpc::Transport) -> anyhow::Result<RegistryClient> {
        let seeds = self.seeds()?;
        let client = RegistryClient::with_replicas(&seeds, transport)
            .with_context(|| format!("invalid registry address in {}", seeds.join(",")))?;
        match token::token_file(self.token_file.as_ref()) {
            Some(path) => client.with_token(&token::read_token(&path)?),
            None => Ok(client),
        }
    }
}

impl RegistryClient {
    /// A client for the registry at `url` (`http://host:port` or `host:port`; several
    /// replicas separated by commas). Connects on first use, so it can be made before
    /// the registry is up. Plaintext; [`RegistryClient::with_replicas`] takes a transport.
    pub fn new(url: &str) -> Result<Self, rpc::AddressError> {
        let urls: Vec<String> = url.split(',').map(str::to_owned).collect();
        Self::with_replicas(&urls, &rpc::Transport::plaintext())
    }

    /// A client that starts from these replicas, reached over `transport`.
    pub fn with_replicas(
        urls: &[String],
        transport: &rpc::Transport,
    ) -> Result<Self, rpc::AddressError> {
        Ok(Self {
            replicas: Arc::new(Replicas::new(urls, transport)?),
            deadline: CALL_DEADLINE,
            token: None,
            registration: RegistrationMode::Session,
        })
    }

    /// Every known replica with a client for it alone (sharing its channel, this
    /// client's token and deadline).
    pub(crate) fn per_replica(&self) -> Vec<(String, Self)> {
        self.replicas
            .known()
            .iter()
            .map(|replica| {
                let only = Self {
                    replicas: Arc::new(Replicas::of(replica.clone())),
                    deadline: self.deadline,
                    token: self.token.clone(),
                    registration: self.registration,
                };
                (replica.address.clone(), only)
            })
            .collect()
    }

    /// The same client, sending `authorization: Bearer <token>` with every call.
    pub fn with_token(mut self, token: &str) -> anyhow::Result<Self> {
        self.token = Some(token::bearer(token)?);
        Ok(self)
    }

    /// The same client, keeping registrations made with it in `mode`.
    pub fn with_registration(mut self, mode: RegistrationMode) -> Self {
        self.registration = mode;
        self
    }

    /// The same client with another deadline for lookups and settings (default 1 s).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The replicas known now, as `host:port`.
    pub fn replica_addresses(&self) -> Vec<String> {
        self.replicas.addresses()
    }

    /// Asks any replica for the list of replicas and adds the new ones.
    pub async fn refresh_replicas(&self) -> Result<(), Status> {
        let listed = self.lookup(REGISTRY_SERVICE).await?;
        let addresses = listed.instances.into_iter().map(|i| i.address).collect();
        self.replicas.learn(addresses).map_err(|e| {
            Status::invalid_argument(format!("a listed replica has a bad address: {e}"))
        })?;
        Ok(())
    }

    /// Refreshes the list of replicas every few seconds until `shutdown`, so lookups can
    /// move to replicas that were not among the seeds.
    pub fn follow_replicas(&self, shutdown: &CancellationToken) -> JoinHandle<()> {
        let client = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(replicas::REFRESH);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                if let Err(status) = client.refresh_replicas().await {
                    tracing::debug!(
                        error = status.message(),
                        "could not ask for the registry replicas"
                    );
                }
            }
        })
    }

    fn request<T>(&self, message: T, deadline: Option<Duration>) -> tonic::Request<T> {
        let mut request = match deadline {
            Some(deadline) => rpc::request(message, deadline),
            None => tonic::Request::new(message),
        };
        token::attach(&mut request, self.token.as_ref());
        request
    }

    /// Live instances of `service`, static entries included.
    pub async fn lookup(&self, service: &str) -> Result<pb::LookupResponse, Status> {
        self.replicas
            .call(self.deadline, |mut client, share| {
                let request = self.request(
                    pb::LookupRequest {
                        service: service.to_owned(),
                    },
                    Some(share),
                );
                async move { Ok(client.lookup(request).await?.into_inner()) }
            })
            .await
    }

    /// The setting `key`, or `None` when the registry has no such setting.
    pub async fn get_setting(&self, key: &str) -> Result<Option<String>, Status> {
        let result = self
            .replicas
            .call(self.deadline, |mut client, share| {
                let request = self.request(
                    pb::GetSettingRequest {
                        key: key.to_owned(),
                    },
                    Some(share),
                );
                async move { Ok(client.get_setting(request).await?.into_inner()) }
            })
            .await;
        match result {
            Ok(reply) => Ok(Some(reply.value)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// A stream of snapshots of `service` from one replica: the current one first, then
    /// one per change. Only opening the stream has a deadline; the stream lives until
    /// either side ends it, or the replica stops answering pings.
    pub async fn watch(&self, service: &str) -> Result<Streaming<pb::LookupResponse>, Status> {
        self.replicas
            .call(CALL_DEADLINE, |mut client, _| {
                let request = self.request(
                    pb::WatchRequest {
                        service: service.to_owned(),
                    },
                    None,
                );
                async move { Ok(client.watch(request).await?.into_inner()) }
            })
            .await
    }

    pub(crate) async fn register(
        &self,
        register: &pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, Status> {
        self.replicas
            .call(CALL_DEADLINE, |mut client, share| {
                let request = self.request(register.clone(), Some(share));
                async move { Ok(client.register(request).await?.into_inner()) }
            })
            .await
    }

    /// Opens a `Session` stream with the first replica this client knows (a keeper's
    /// client knows one), on a connection of its own, registers on it, and waits for the
    /// registration's reply.
    pub(crate) async fn open_session(
        &self,
        register: pb::RegisterRequest,
    ) -> Result<OpenSession, Status> {
        let Some(replica) = self.replicas.known().first().cloned() else {
            return Err(Status::unavailable("no registry replica is known"));
        };
        let (requests, outbound) = mpsc::channel(4);
        let first = session_message(pb::session_request::Kind::Register(register));
        if requests.try_send(first).is_err() {
            return Err(Status::internal(
                "the new session's queue refused its first message",
            ));
        }
        let request = self.request(ReceiverStream::new(outbound), None);
        let mut client = replica
            .session_client()
            .map_err(|e| Status::invalid_argument(format!("bad replica address: {e}")))?;
        rpc::call(CALL_DEADLINE, async move {
            let mut replies = client.session(request).await?.into_inner();
            match replies.message().await?.and_then(|reply| reply.kind) {
                Some(pb::session_response::Kind::Registered(lease)) => Ok(OpenSession {
                    requests,
                    replies,
                    lease,
                }),
                Some(other) => Err(Status::internal(format!(
                    "the registry answered a registration with {other:?}"
                ))),
                None => Err(Status::unavailable(
                    "the registry ended the session before answering its registration",
                )),
            }
        })
        .await
    }

    pub(crate) async fn heartbeat(
        &self,
        instance_id: &str,
        deadline: Duration,
    ) -> Result<(), Status> {
        self.replicas
            .call(deadline, |mut client, share| {
                let request = self.request(
                    pb::HeartbeatRequest {
                        instance_id: instance_id.to_owned(),
                    },
                    Some(share),
                );
                async move {
                    client.heartbeat(request).await?;
                    Ok(())
                }
            })
            .await
    }

    pub(crate) async fn deregister(&self, instance_id: &str) -> Result<(), Status> {
        self.replicas
            .call(DEREGISTER_DEADLINE, |mut client, share| {
                let request = self.request(
                    pb::DeregisterRequest {
                        instance_id: instance_id.to_owned(),
                    },
                    Some(share),
                );
                async move {
                    client.deregister(request).await?;
                    Ok(())
                }
            })
            .await
    }
}

/// One message of a `Session` stream.
pub(crate) fn session_message(kind: pb::session_request::Kind) -> pb::SessionRequest {
    pb::SessionRequest { kind: Some(kind) }
}

/// A registered `Session` stream: where to send, what the registry answers, and the
/// lease its registration was given.
pub(crate) struct OpenSession {
    pub(crate) requests: mpsc::Sender<pb::SessionRequest>,
    pub(crate) replies: Streaming<pb::SessionResponse>,
    pub(crate) lease: pb::RegisterResponse,
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
