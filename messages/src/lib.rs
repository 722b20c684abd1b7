//! The messages service: a stub that answers "not implemented yet".
//!
//! It is listed in the registry as a static entry (`--static messages=ADDR`), so it does
//! not register itself; the facade finds it through the registry like anything else.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use proto::messages::v1::{self as pb, messages_server::MessagesServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

/// What `Get` answers until the service is built.
pub const TEXT: &str = "not implemented yet";

#[derive(Debug, Clone, Parser)]
#[command(name = "messages", version, about = "The messages service (a stub)")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50060")]
    pub addr: SocketAddr,

    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

#[derive(Debug, Default)]
pub struct MessagesService;

#[tonic::async_trait]
impl pb::messages_server::Messages for MessagesService {
    async fn get(
        &self,
        _request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(pb::GetResponse {
            text: TEXT.to_owned(),
        }))
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    serve(listener, shutdown).await
}

pub async fn serve(listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let (routes, health) = rpc::routes()?;
    health
        .set_serving::<MessagesServer<MessagesService>>()
        .await;
    let routes = routes.add_service(MessagesServer::new(MessagesService));
    info!(%addr, "messages listening");
    let http = rpc::http_router().merge(telemetry::metrics_router());
    rpc::serve(listener, routes, http, shutdown).await?;
    info!("messages stopped");
    Ok(())
}
