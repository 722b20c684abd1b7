//! The naive chain the facade is measured against (`bench/run`): what the design itself
//! costs, with no failover, metrics, request ids or printing.
//!
//!     bare_chain store ADDR                      a store: Append into a map, nothing else
//!     bare_chain front ADDR --registry URL       axum POST -> one Lookup -> one Append
//!     bare_chain front ADDR --store ADDR         axum POST -> one Append (no lookup hop)
//!
//! With `--registry`, every POST asks the registry for `logging` (the store is a static
//! entry there) and appends to the first instance listed, over a channel kept per
//! address; that is the three-hop chain of the lab's card.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use parking_lot::Mutex;

use axum::{extract::State, http::StatusCode, routing::post, serve::ListenerExt, Json, Router};
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: bare_chain store ADDR | bare_chain front ADDR (--registry URL | --store ADDR)";
    let (role, addr) = match (args.get(1), args.get(2)) {
        (Some(role), Some(addr)) => (role.as_str(), addr.parse::<SocketAddr>()?),
        _ => anyhow::bail!("{usage}"),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = match role {
        "store" => Routes::new(LoggingServer::new(BareStore::default())).into_axum_router(),
        "front" => {
            let (registry, store) = match (args.get(3).map(String::as_str), args.get(4)) {
                (Some("--registry"), Some(url)) => {
                    let channel = Channel::from_shared(url.clone())?
                        .tcp_nodelay(true)
                        .connect_lazy();
                    (Some(RegistryClient::new(channel)), None)
                }
                (Some("--store"), Some(store)) => (None, Some(store.clone())),
                _ => anyhow::bail!("{usage}"),
            };
            let front = Front {
                registry,
                store,
                channels: Arc::default(),
            };
            Router::new()
                .route("/messages", post(handle))
                .with_state(front)
        }
        _ => anyhow::bail!("{usage}"),
    };
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
