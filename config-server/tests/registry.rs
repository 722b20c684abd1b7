//! The config server over real gRPC on 127.0.0.1, in-process, with short TTLs so that
//! eviction takes a fraction of a second. Every wait is on a condition, bounded.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use testkit::eventually;

use ::registry_client::{Registration, RegistryClient};
use config_server::{Limits, RegistryConfig};
use proto::registry::v1::{self as pb, registry_client};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{transport::Channel, Code};
use tonic_health::pb::{health_check_response::ServingStatus, health_client, HealthCheckRequest};

const HEARTBEAT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_millis(400);

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(config: RegistryConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, config)
    }

    fn start_on(listener: TcpListener, config: RegistryConfig) -> Self {
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(config_server::serve(listener, config, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("server ran cleanly");
    }

    async fn client(&self) -> registry_client::RegistryClient<Channel> {
        registry_client::RegistryClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }
}

fn short_ttl() -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval: HEARTBEAT,
        ttl: TTL,
        static_entries: vec![("messages".into(), "127.0.0.1:50060".into())],
        ..RegistryConfig::default()
    }
}

fn register_request(service: &str, address: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        service: service.into(),
        address: address.into(),
        metadata: HashMap::new(),
        instance_id: String::new(),
    }
}

async fn addresses(
    client: &mut registry_client::RegistryClient<Channel>,
    service: &str,
) -> Vec<String> {
    client
        .lookup(pb::LookupRequest {
            service: service.into(),
        })
        .await
        .expect("lookup")
        .into_inner()
        .instances
        .into_iter()
        .map(|instance| instance.address)
        .collect()
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_the_registry_service() {
    let server = Server::start(short_ttl()).await;
    let mut health =
        health_client::HealthClient::new(rpc::channel(&server.addr.to_string()).expect("channel"));
    for service in ["", "registry.v1.Registry"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn an_instance_that_stops_heartbeating_is_evicted_within_its_ttl() {
    let server = Server::start(short_ttl()).await;
    let mut client = server.client().await;
    let lease = client
        .register(register_request("logging", "127.0.0.1:50051"))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(lease.ttl_ms, TTL.as_millis() as u64);
    assert_eq!(lease.heartbeat_interval_ms, HEARTBEAT.as_millis() as u64);
    assert_eq!(addresses(&mut client, "logging").await, ["127.0.0.1:50051"]);

    // Heartbeats keep it alive well past one TTL.
    let kept_until = Instant::now() + TTL * 2;
    let mut last_beat = Instant::now();
    while Instant::now() < kept_until {
        client
            .heartbeat(pb::HeartbeatRequest {
                instance_id: lease.instance_id.clone(),
            })
            .await
            .expect("heartbeat");
        last_beat = Instant::now();
        tokio::time::sleep(HEARTBEAT).await;
    }
    assert_eq!(addresses(&mut client, "logging").await, ["127.0.0.1:50051"]);

    // Then silence: gone once the TTL after the last heartbeat has passed, not before.
    let gone = eventually(TTL * 3, "eviction", || {
        let mut client = client.clone();
        async move { addresses(&mut client, "logging").await.is_empty() }
    })
    .await;
    let silent_for = last_beat.elapsed();
    assert!(
        silent_for >= TTL,
        "evicted after only {silent_for:?} of silence ({gone:?})"
    );

    let status = client
        .heartbeat(pb::HeartbeatRequest {
            instance_id: lease.instance_id,
        })
        .await
        .expect_err("evicted id is unknown");
    assert_eq!(status.code(), Code::NotFound);
    // The static entry is never evicted.
    assert_eq!(
        addresses(&mut client, "messages").await,
        ["127.0.0.1:50060"]
    );
    server.stop().await;
}

#[tokio::test]
async fn deregister_is_immediate() {
    let server = Server::start(RegistryConfig::default()).await;
    let mut client = server.client().await;
    let id = client
        .register(register_request("logging", "127.0.0.1:50051"))
        .await
        .expect("register")
        .into_inner()
        .instance_id;
    client
        .deregister(pb::DeregisterRequest {
            instance_id: id.clone(),
        })
        .await
        .expect("deregister");
    assert!(addresses(&mut client, "logging").await.is_empty());
    let again = client
        .deregister(pb::DeregisterRequest { instance_id: id })
        .await
        .expect_err("second deregister");
    assert_eq!(again.code(), Code::NotFound);
    server.stop().await;
}

/// The next snapshot on a watch stream, which must come within 100 ms.
async fn next(stream: &mut tonic::Streaming<pb::LookupResponse>) -> pb::LookupResponse {
    tokio::time::timeout(Duration::from_millis(100), stream.message())
        .await
        .expect("a change within 100 ms")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test]
async fn watch_sends_the_snapshot_then_each_change_within_100ms() {
    let server = Server::start(short_ttl()).await;
    let mut client = server.client().await;
    let mut stream = RegistryClient::new(&server.addr.to_string())
        .expect("client")
        .watch("logging")
        .await
        .expect("watch");

    let first = next(&mut stream).await;
    assert!(first.instances.is_empty());

    let id = client
        .register(register_request("logging", "127.0.0.1:50051"))
        .await
        .expect("register")
        .into_inner()
        .instance_id;
    let added = next(&mut stream).await;
    assert_eq!(added.instances.len(), 1);
    assert!(added.revision > first.revision);

    // A change to another service is not sent to this watcher.
    client
        .register(register_request("other", "127.0.0.1:1"))
        .await
        .expect("register other");

    client
        .deregister(pb::DeregisterRequest { instance_id: id })
        .await
        .expect("deregister");
    let removed = next(&mut stream).await;
    assert!(removed.instances.is_empty());

    // Eviction is pushed too: measured from the moment the lease ends.
    client
        .register(register_request("logging", "127.0.0.1:50052"))
        .await
        .expect("register");
    let added = next(&mut stream).await;
    assert_eq!(added.instances.len(), 1);
    let evicted = tokio::time::timeout(TTL + Duration::from_millis(100), stream.message())
        .await
        .expect("eviction pushed within ttl + 100 ms")
        .expect("ok")
        .expect("open");
    assert!(evicted.instances.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn registration_heartbeats_re_registers_after_a_restart_and_deregisters_on_stop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server::start_on(listener, short_ttl());
    let registry = RegistryClient::new(&addr.to_string()).expect("client");

    let registration = Registration::start(
        registry.clone(),
        "logging",
        "127.0.0.1:50051",
        HashMap::from([("store".to_owned(), "memory".to_owned())]),
    );
    let first_id = tokio::time::timeout(Duration::from_secs(5), registration.registered())
        .await
        .expect("registered");

    // Heartbeats at the server's pace keep it registered across several TTLs.
    tokio::time::sleep(TTL * 3).await;
    let live = registry.lookup("logging").await.expect("lookup");
    assert_eq!(live.instances.len(), 1);
    assert_eq!(live.instances[0].instance_id, first_id);
    assert_eq!(live.instances[0].metadata["store"], "memory");

    // Restart the registry on the same port: it forgets everything, the registration
    // notices (NOT_FOUND on its next heartbeat) and registers again.
    server.stop().await;
    let listener = TcpListener::bind(addr).await.expect("rebind same port");
    let restarted_at = Instant::now();
    let server = Server::start_on(listener, short_ttl());
    let again = eventually(Duration::from_secs(5), "re-registration", || {
        let registry = registry.clone();
        let first_id = first_id.clone();
        async move {
            registry.lookup("logging").await.is_ok_and(|snapshot| {
                snapshot.instances.len() == 1 && snapshot.instances[0].instance_id == first_id
            })
        }
    })
    .await;
    // The instance chose its id, so it is the same after the restart (and on every
    // replica).
    assert_eq!(registration.id(), first_id);
    assert_eq!(registration.holders(), [addr.to_string()].into());
    // Back within about one heartbeat interval (plus reconnect slack).
    assert!(
        restarted_at.elapsed() < HEARTBEAT * 10,
        "re-registered after {again:?}"
    );

    registration.deregister().await;
    assert!(registry
        .lookup("logging")
        .await
        .expect("lookup")
        .instances
        .is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_registration_keeps_trying_while_the_registry_is_down() {
    // Reserve a port, then release it: nothing listens there yet.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let registry = RegistryClient::new(&addr.to_string()).expect("client");
    let registration = Registration::start(
        registry.clone(),
        "logging",
        "127.0.0.1:50051",
        HashMap::new(),
    );
    // Nobody listens yet: it must not claim to be registered (it keeps retrying).
    let early = tokio::time::timeout(Duration::from_millis(300), registration.registered()).await;
    assert!(early.is_err(), "registered with no registry: {early:?}");
    assert!(registration.holders().is_empty());

    let server = Server::start_on(TcpListener::bind(addr).await.expect("bind"), short_ttl());
    tokio::time::timeout(Duration::from_secs(5), registration.registered())
        .await
        .expect("registered once the registry is up");
    registration.deregister().await;
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_status() {
    let server = Server::start(RegistryConfig {
        limits: Limits {
            max_instances_per_service: 2,
            max_instances: 100,
        },
        ..RegistryConfig::default()
    })
    .await;
    let mut client = server.client().await;

    let cases: Vec<(pb::RegisterRequest, Code, &str)> = vec![
        (
            register_request("", "127.0.0.1:1"),
            Code::InvalidArgument,
            "service name",
        ),
        (
            register_request(&"x".repeat(65), "127.0.0.1:1"),
            Code::InvalidArgument,
            "service name",
        ),
        (
            register_request("logging", "no-port"),
            Code::InvalidArgument,
            "address",
        ),
        (
            register_request("logging", "127.0.0.1:99999"),
            Code::InvalidArgument,
            "address",
        ),
        (
            pb::RegisterRequest {
                metadata: (0..100).map(|i| (i.to_string(), "v".into())).collect(),
                ..register_request("logging", "127.0.0.1:1")
            },
            Code::InvalidArgument,
            "metadata",
        ),
        (
            pb::RegisterRequest {
                metadata: HashMap::from([("k".into(), "v".repeat(100_000))]),
                ..register_request("logging", "127.0.0.1:1")
            },
            Code::InvalidArgument,
            "metadata",
        ),
    ];
    for (request, code, needle) in cases {
        let status = client.register(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(status.message().contains(needle), "{}", status.message());
    }

    for id in ["", "unknown-id"] {
        let status = client
            .heartbeat(pb::HeartbeatRequest {
                instance_id: id.into(),
            })
            .await
            .expect_err("refused");
        let expected = if id.is_empty() {
            Code::InvalidArgument
        } else {
            Code::NotFound
        };
        assert_eq!(status.code(), expected, "{id:?}: {}", status.message());
    }

    client
        .register(register_request("logging", "127.0.0.1:1"))
        .await
        .expect("1");
    client
        .register(register_request("logging", "127.0.0.1:2"))
        .await
        .expect("2");
    let full = client
        .register(register_request("logging", "127.0.0.1:3"))
        .await
        .expect_err("cap");
    assert_eq!(full.code(), Code::ResourceExhausted, "{}", full.message());

    let setting = client
        .get_setting(pb::GetSettingRequest { key: "nope".into() })
        .await
        .expect_err("unknown setting");
    assert_eq!(setting.code(), Code::NotFound);

    // Nothing that was accepted was disturbed by what was refused.
    assert_eq!(
        addresses(&mut client, "logging").await,
        ["127.0.0.1:1", "127.0.0.1:2"]
    );
    server.stop().await;
}

#[tokio::test]
async fn settings_and_list_services() {
    let server = Server::start(RegistryConfig {
        settings: [("logging.store".to_owned(), "memory".to_owned())].into(),
        ..short_ttl()
    })
    .await;
    let registry = RegistryClient::new(&server.addr.to_string()).expect("client");
    assert_eq!(
        registry
            .get_setting("logging.store")
            .await
            .expect("setting"),
        Some("memory".to_owned())
    );
    assert_eq!(registry.get_setting("absent").await.expect("setting"), None);

    let mut client = server.client().await;
    client
        .register(register_request("logging", "127.0.0.1:50051"))
        .await
        .expect("register");
    let list = client
        .list_services(pb::ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    let names: Vec<_> = list.services.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(names, ["logging", "messages"]);
    assert!(list.services[1].instances[0].is_static);
    server.stop().await;
}

#[tokio::test]
async fn with_a_token_registration_calls_need_it_and_reads_only_when_asked() {
    use config_server::Auth;

    for reads_too in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(config_server::serve_with_auth(
            listener,
            short_ttl(),
            Some(Auth::new("let-me-in".into(), reads_too)),
            shutdown.clone(),
        ));

        // No token: registration is refused, and so are reads when asked.
        let anonymous = RegistryClient::new(&addr.to_string()).expect("client");
        let mut raw =
            registry_client::RegistryClient::new(rpc::channel(&addr.to_string()).expect("channel"));
        let refused = raw
            .register(register_request("logging", "127.0.0.1:50051"))
            .await
            .expect_err("no token");
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(
            refused.message().contains("Bearer"),
            "{}",
            refused.message()
        );
        let read = anonymous.lookup("messages").await;
        assert_eq!(read.is_err(), reads_too, "{read:?}");

        // A wrong token is refused too.
        let wrong = RegistryClient::new(&addr.to_string())
            .expect("client")
            .with_token("guess")
            .expect("token");
        let registration = Registration::start(wrong, "logging", "127.0.0.1:50051", HashMap::new());
        let refused =
            tokio::time::timeout(Duration::from_millis(200), registration.registered()).await;
        assert!(
            refused.is_err(),
            "registered with a wrong token: {refused:?}"
        );
        registration.deregister().await;

        // The right token: the whole lifecycle works.
        let client = RegistryClient::new(&addr.to_string())
            .expect("client")
            .with_token("let-me-in")
            .expect("token");
        let registration =
            Registration::start(client.clone(), "logging", "127.0.0.1:50051", HashMap::new());
        tokio::time::timeout(Duration::from_secs(5), registration.registered())
            .await
            .expect("registered with the token");
        assert_eq!(
            client
                .lookup("logging")
                .await
                .expect("lookup")
                .instances
                .len(),
            1
        );
        registration.deregister().await;
        assert!(client
            .lookup("logging")
            .await
            .expect("lookup")
            .instances
            .is_empty());

        shutdown.cancel();
        task.await.expect("join").expect("clean stop");
    }
}

/// A registry without sessions (an older version): unary calls only, counting them.
#[derive(Default, Clone)]
struct UnaryOnly {
    registers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    heartbeats: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl pb::registry_server::Registry for UnaryOnly {
    async fn register(
        &self,
        request: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::RegisterResponse>, tonic::Status> {
        self.registers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(pb::RegisterResponse {
            instance_id: request.into_inner().instance_id,
            heartbeat_interval_ms: 50,
            ttl_ms: 1000,
        }))
    }

    async fn heartbeat(
        &self,
        _: tonic::Request<pb::HeartbeatRequest>,
    ) -> Result<tonic::Response<pb::HeartbeatResponse>, tonic::Status> {
        self.heartbeats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(pb::HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        _: tonic::Request<pb::DeregisterRequest>,
    ) -> Result<tonic::Response<pb::DeregisterResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::DeregisterResponse {}))
    }

    type SessionStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::SessionResponse, tonic::Status>>;

    async fn session(
        &self,
        _: tonic::Request<tonic::Streaming<pb::SessionRequest>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no sessions here"))
    }

    async fn lookup(
        &self,
        request: tonic::Request<pb::LookupRequest>,
    ) -> Result<tonic::Response<pb::LookupResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::LookupResponse {
            service: request.into_inner().service,
            ..Default::default()
        }))
    }

    async fn list_services(
        &self,
        _: tonic::Request<pb::ListServicesRequest>,
    ) -> Result<tonic::Response<pb::ListServicesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn get_setting(
        &self,
        _: tonic::Request<pb::GetSettingRequest>,
    ) -> Result<tonic::Response<pb::GetSettingResponse>, tonic::Status> {
        Err(tonic::Status::not_found("no settings"))
    }

    type WatchStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::LookupResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

#[tokio::test]
async fn against_a_registry_without_sessions_the_client_keeps_its_registration_with_unary_calls() {
    let old = UnaryOnly::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let (routes, _) = rpc::routes().expect("routes");
    let routes = routes.add_service(pb::registry_server::RegistryServer::new(old.clone()));
    let server = tokio::spawn(rpc::serve(
        listener,
        routes,
        rpc::http_router(),
        shutdown.clone(),
    ));

    let client = RegistryClient::new(&addr.to_string()).expect("client");
    let registration = Registration::start(client, "logging", "127.0.0.1:50051", HashMap::new());
    tokio::time::timeout(Duration::from_secs(5), registration.registered())
        .await
        .expect("registered with unary calls");
    eventually(Duration::from_secs(5), "unary heartbeats", || async {
        old.heartbeats.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    assert_eq!(old.registers.load(std::sync::atomic::Ordering::Relaxed), 1);
    registration.deregister().await;
    shutdown.cancel();
    server.await.expect("join").expect("served");
}

/// Watches and Sessions are held up to their limits per peer address and in all; one
/// over is refused RESOURCE_EXHAUSTED, and a stream that ends lets the next one in.
#[tokio::test]
async fn streams_are_held_up_to_their_limits_per_peer_and_in_all() {
    let server = Server::start(RegistryConfig {
        streams: config_server::StreamLimits {
            watches_per_peer: 2,
            watches: 3,
            sessions_per_peer: 1,
            sessions: 2,
        },
        ..short_ttl()
    })
    .await;
    // Two peers: 127.0.0.1, and 127.0.0.2 (loopback too).
    let from = |ip: [u8; 4]| {
        let channel = rpc::endpoint(&server.addr.to_string())
            .expect("endpoint")
            .local_address(Some(std::net::IpAddr::from(ip)))
            .connect_lazy();
        registry_client::RegistryClient::new(channel)
    };
    let (one, two) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let watch = |mut client: registry_client::RegistryClient<Channel>| async move {
        client
            .watch(pb::WatchRequest {
                service: "logging".into(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.code())
    };
    let first = watch(one.clone()).await.expect("first watch");
    let _second = watch(one.clone()).await.expect("second watch");
    assert_eq!(
        watch(one.clone()).await.err(),
        Some(Code::ResourceExhausted),
        "a third from one peer"
    );
    let _third = watch(two.clone()).await.expect("another peer's");
    assert_eq!(
        watch(two.clone()).await.err(),
        Some(Code::ResourceExhausted),
        "a fourth in all"
    );
    drop(first);
    eventually(Duration::from_secs(5), "a Watch let go", || {
        let one = one.clone();
        async move { watch(one).await.is_ok() }
    })
    .await;

    let session = |client: &registry_client::RegistryClient<Channel>, id: &str| {
        let (sender, requests) = tokio::sync::mpsc::channel(4);
        let register = pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Register(pb::RegisterRequest {
                service: "svc".into(),
                address: format!("127.0.0.1:{}", 2000 + id.len()),
                metadata: Default::default(),
                instance_id: id.into(),
            })),
        };
        let mut client = client.clone();
        async move {
            sender.send(register).await.expect("queued");
            let mut replies = client
                .session(tokio_stream::wrappers::ReceiverStream::new(requests))
                .await
                .map_err(|status| status.code())?
                .into_inner();
            let first = replies.message().await.map_err(|status| status.code())?;
            assert!(first.is_some(), "registered");
            Ok::<_, Code>((sender, replies))
        }
    };
    let held = session(&one, "a").await.expect("first session");
    assert_eq!(
        session(&one, "bb").await.err(),
        Some(Code::ResourceExhausted),
        "a second from one peer"
    );
    let _other = session(&two, "ccc").await.expect("another peer's");
    drop(held);
    eventually(Duration::from_secs(5), "a Session let go", || {
        let attempt = session(&one, "dddd");
        async move { attempt.await.is_ok() }
    })
    .await;
    server.stop().await;
}
