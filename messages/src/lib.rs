//! The messages service: a stub that answers "not implemented yet".
//!
//! It is listed in the registry as a static entry (`--static messages=ADDR`), so it does
//! not register itself; the facade finds it through the registry like anything else.

use std::net::SocketAddr;

use clap::Parser;
use proto::messages::v1::{self as pb, messages_server::MessagesServer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

/// What `Get` answers until the service is built.
pub const TEXT: &str = "not implemented yet";
/// Largest request taken by default: `Get` has no fields.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Parser)]
#[command(name = "messages", version, about = "The messages service (a stub)")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50060")]
    pub addr: SocketAddr,

    #[command(flatten)]
    pub limits: rpc::LimitArgs,

    #[command(flatten)]
    pub tls: rpc::TlsArgs,

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

/// Binds `config.addr` (TLS with client certificates required, when configured) and
/// serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (listener, _) = config
        .tls
        .bind(config.addr, rpc::ClientCerts::Required)
        .await?;
    let listener = listener.with_limits(config.limits.limits(MAX_REQUEST_BYTES));
    serve(listener, shutdown).await
}

/// Serves on a bound listener (a `TcpListener`, or an [`rpc::Listener`] that speaks TLS).
pub async fn serve(
    listener: impl Into<rpc::Listener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = listener.into();
    let addr = listener.local_addr()?;
    let (routes, health) = rpc::routes()?;
    health
        .set_serving::<MessagesServer<MessagesService>>()
        .await;
    let routes = routes.add_service(
        MessagesServer::new(MessagesService)
            .max_decoding_message_size(listener.limits().max_request_bytes),
    );
    info!(%addr, tls = listener.is_tls(), "messages listening");
    let http = rpc::http_router().merge(telemetry::metrics_router());
    rpc::serve(listener, routes, http, shutdown).await?;
    info!("messages stopped");
    Ok(())
}
