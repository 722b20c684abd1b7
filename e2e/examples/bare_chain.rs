//! The naive chain the facade is measured against (`bench/run`): what the design itself
//! costs, with no failover, metrics, request ids or printing.
//!
//!     bare_chain store ADDR                      a store: Append into a map, nothing else
//!     bare_chain front ADDR --registry URL       axum POST -> one Lookup -> one Append
//!     bare_chain front ADDR --store ADDR         axum POST -> one Append (no lookup hop)
//!
//! With `--registry`, every POST asks the registry for `logging` (the store is a static
//! entry there) and appends to the first instance listed, over a channel kept per
//! address; that is the three-hop chain of the lab's specification.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, routing::post, serve::ListenerExt, Json, Router};
use clap::Parser;
use parking_lot::Mutex;
use proto::{
    logging::v1::{
        logging_client::LoggingClient,
        logging_server::{Logging, LoggingServer},
        AppendBatchRequest, AppendBatchResponse, AppendRequest, AppendResponse, ReadRequest,
        ReadResponse, StreamRequest, StreamResponse,
    },
    registry::v1::{registry_client::RegistryClient, LookupRequest},
};
use tonic::{service::Routes, transport::Channel, Request, Response, Status};

#[derive(Default)]
struct BareStore {
    messages: Mutex<HashMap<String, String>>,
}

#[tonic::async_trait]
impl Logging for BareStore {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let AppendRequest { id, text } = request.into_inner();
        let mut messages = self.messages.lock();
        let duplicate = messages.contains_key(&id);
        messages.entry(id).or_insert(text);
        Ok(Response::new(AppendResponse { duplicate }))
    }

    async fn append_batch(
        &self,
        _: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        Err(Status::unimplemented(
            "the bare store appends one at a time",
        ))
    }

    async fn read(&self, _: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        Err(Status::unimplemented("the bare store only appends"))
    }

    type StreamStream = tokio_stream::Empty<Result<StreamResponse, Status>>;

    async fn stream(
        &self,
        _: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Err(Status::unimplemented("the bare store only appends"))
    }
}

#[derive(Clone)]
struct Front {
    registry: Option<RegistryClient<Channel>>,
    store: Option<String>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Front {
    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = Channel::from_shared(format!("http://{address}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    async fn post(&self, text: String) -> Result<String, Status> {
        let address = match (&self.registry, &self.store) {
            (Some(registry), _) => {
                let reply = registry
                    .clone()
                    .lookup(LookupRequest {
                        service: "logging".into(),
                    })
                    .await?
                    .into_inner();
                let first = reply.instances.into_iter().next();
                first
                    .map(|instance| instance.address)
                    .ok_or_else(|| Status::unavailable("no logging instance"))?
            }
            (None, Some(store)) => store.clone(),
            (None, None) => return Err(Status::internal("no store")),
        };
        let id = uuid::Uuid::new_v4().to_string();
        LoggingClient::new(self.channel(&address)?)
            .append(AppendRequest {
                id: id.clone(),
                text,
            })
            .await?;
        Ok(id)
    }
}

async fn handle(
    State(front): State<Front>,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    let text = body["msg"].as_str().unwrap_or_default().to_owned();
    match front.post(text).await {
        Ok(id) => (StatusCode::CREATED, Json(serde_json::json!({ "id": id }))),
        Err(status) => (
            StatusCode::BAD_GATEWAY,
            Json(serde_json::json!({ "error": status.message() })),
        ),
    }
}

#[derive(Parser)]
enum Args {
    /// A store: Append into a map, nothing else.
    Store { addr: SocketAddr },
    /// axum POST -> (one Lookup ->) one Append.
    Front {
        addr: SocketAddr,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// Look `logging` up here before every Append (the registry lists the store).
    #[arg(long)]
    registry: Option<String>,
    /// Append straight to this store, without a lookup.
    #[arg(long)]
    store: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (addr, app) = match Args::parse() {
        Args::Store { addr } => (
            addr,
            Routes::new(LoggingServer::new(BareStore::default())).into_axum_router(),
        ),
        Args::Front { addr, target } => {
            let registry = match target.registry {
                Some(url) => {
                    let channel = Channel::from_shared(url)?.tcp_nodelay(true).connect_lazy();
                    Some(RegistryClient::new(channel))
                }
                None => None,
            };
            let front = Front {
                registry,
                store: target.store,
                channels: Arc::default(),
            };
            let app = Router::new()
                .route("/messages", post(handle))
                .with_state(front);
            (addr, app)
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // Small requests and answers: no Nagle delays, as in the services themselves. Stops on
    // Ctrl+C (a benchmark script's background jobs ignore SIGINT otherwise).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
