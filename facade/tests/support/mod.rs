//! An in-process stack around the real logging service (memory store) with its
//! `AppendBatch` changed by the test: a registry that lists it as a static entry, and a
//! facade.

use std::{net::SocketAddr, sync::Arc};

use config_server::RegistryConfig;
use logging::{
    service::{LoggingServer, LoggingService},
    store::MemoryStore,
};
use proto::logging::v1::{
    logging_server::Logging, AppendBatchRequest, AppendBatchResponse, AppendRequest,
    AppendResponse, ReadRequest, ReadResponse, StreamRequest,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// What a test makes of `AppendBatch`, given the real service.
#[tonic::async_trait]
pub(crate) trait AppendBatch: Send + Sync + 'static {
    async fn append_batch(
        &self,
        real: &LoggingService<MemoryStore>,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status>;
}

/// The real logging service over `store`, except for `AppendBatch`, which goes to `batch`.
pub(crate) struct Wrapped<B> {
    pub(crate) real: LoggingService<MemoryStore>,
    pub(crate) batch: B,
}

impl<B> Wrapped<B> {
    pub(crate) fn new(store: &Arc<MemoryStore>, batch: B) -> Arc<Self> {
        Arc::new(Self {
            real: LoggingService::new(Arc::clone(store), 64 * 1024, 16),
            batch,
        })
    }
}

#[tonic::async_trait]
impl<B: AppendBatch> Logging for Wrapped<B> {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        self.real.append(request).await
    }

    async fn append_batch(
        &self,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchResponse>, Status> {
        self.batch.append_batch(&self.real, request).await
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        self.real.read(request).await
    }

    type StreamStream = <LoggingService<MemoryStore> as Logging>::StreamStream;

    async fn stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        self.real.stream(request).await
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Serves `logging` (with health and reflection, as every service), a registry listing
/// it, and a facade with the defaults changed by `configure`; returns the facade's
/// address once it answers SERVING. Everything stops when `shutdown` fires.
pub(crate) async fn facade_over<B: AppendBatch>(
    logging: &Arc<Wrapped<B>>,
    shutdown: &CancellationToken,
    configure: impl FnOnce(&mut facade::Config),
) -> SocketAddr {
    let (logging_listener, logging_addr) = bind().await;
    let (routes, _health) = rpc::routes().expect("routes");
    let routes = routes.add_service(LoggingServer::from_arc(Arc::clone(logging)));
    tokio::spawn(rpc::serve(
        logging_listener,
        routes,
        rpc::http_router(),
        shutdown.clone(),
    ));
    let (registry_listener, registry) = bind().await;
    let registry_config = RegistryConfig {
        static_entries: vec![("logging".into(), logging_addr.to_string())],
        ..RegistryConfig::default()
    };
    tokio::spawn(config_server::serve(
        registry_listener,
        registry_config,
        shutdown.clone(),
    ));
    let (facade_listener, facade) = bind().await;
    let mut config = facade::Config::new(facade, &registry.to_string());
    configure(&mut config);
    tokio::spawn(facade::serve(facade_listener, config, shutdown.clone()));
    testkit::wait_serving(facade).await;
    facade
}
