//! An in-process stack around one logging service of the test's own making: a registry
//! that lists it as a static entry, and a facade.

use std::net::SocketAddr;

use config_server::RegistryConfig;
use logging::service::LoggingServer;
use proto::logging::v1::logging_server::Logging;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Serves `logging` (with health and reflection, as every service), a registry listing
/// it, and a facade with the defaults changed by `configure`; returns the facade's
/// address once it answers SERVING. Everything stops when `shutdown` fires.
pub(crate) async fn facade_over<L: Logging>(
    logging: LoggingServer<L>,
    shutdown: &CancellationToken,
    configure: impl FnOnce(&mut facade::Config),
) -> SocketAddr {
    let (logging_listener, logging_addr) = bind().await;
    let (routes, _health) = rpc::routes().expect("routes");
    let routes = routes.add_service(logging);
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
