//! Discovery against a real in-process registry: the pushed (watch) view follows changes
//! within 100 ms, and both modes keep the last known instances when the registry goes.

use std::{collections::HashMap, time::Duration};

use config_server::RegistryConfig;
use facade::discovery::{Discovery, DiscoveryMode};
use registry_client::{Registration, RegistryClient};
use testkit::eventually;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn registry() -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let task = tokio::spawn(config_server::serve(
        listener,
        RegistryConfig::default(),
        stop.clone(),
    ));
    (addr, stop, task)
}

/// Waits until `discovery` lists exactly `expected`; returns how long that took.
async fn until_listed(discovery: &Discovery, expected: &[String]) -> Duration {
    let what = format!("the view to list {expected:?}");
    eventually(Duration::from_secs(5), &what, || async {
        discovery.instances("logging").await == expected
    })
    .await
}

#[tokio::test]
async fn the_watch_view_follows_the_registry_within_100ms_and_outlives_it() {
    let (addr, stop_registry, registry_task) = registry().await;
    let client = RegistryClient::new(&addr).expect("client");
    let shutdown = CancellationToken::new();
    let discovery = Discovery::new(
        client.clone(),
        DiscoveryMode::Watch,
        &["logging"],
        &shutdown,
    );
    until_listed(&discovery, &[]).await;

    let registration =
        Registration::start(client.clone(), "logging", "127.0.0.1:50051", HashMap::new());
    registration.registered().await;
    let added = until_listed(&discovery, &["127.0.0.1:50051".to_owned()]).await;
    assert!(
        added < Duration::from_millis(100),
        "registration seen after {added:?}"
    );

    registration.deregister().await;
    let removed = until_listed(&discovery, &[]).await;
    assert!(
        removed < Duration::from_millis(100),
        "deregistration seen after {removed:?}"
    );

    let again = Registration::start(client, "logging", "127.0.0.1:50052", HashMap::new());
    again.registered().await;
    until_listed(&discovery, &["127.0.0.1:50052".to_owned()]).await;

    // The registry goes away: the stream ends, per-call lookups fail, and the last
    // pushed list is still what the facade uses.
    stop_registry.cancel();
    registry_task
        .await
        .expect("join")
        .expect("registry stopped cleanly");
    for _ in 0..5 {
        assert_eq!(discovery.instances("logging").await, ["127.0.0.1:50052"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    again.deregister().await;
}

#[tokio::test]
async fn per_call_lookups_see_changes_at_once_and_keep_the_last_list_when_the_registry_goes() {
    let (addr, stop_registry, registry_task) = registry().await;
    let client = RegistryClient::new(&addr).expect("client");
    let shutdown = CancellationToken::new();
    let discovery = Discovery::new(
        client.clone(),
        DiscoveryMode::PerCall,
        &["logging"],
        &shutdown,
    );
    assert!(discovery.instances("logging").await.is_empty());
    let registration = Registration::start(client, "logging", "127.0.0.1:50051", HashMap::new());
    registration.registered().await;
    assert_eq!(discovery.instances("logging").await, ["127.0.0.1:50051"]);

    stop_registry.cancel();
    registry_task
        .await
        .expect("join")
        .expect("registry stopped cleanly");
    assert_eq!(discovery.instances("logging").await, ["127.0.0.1:50051"]);
    registration.deregister().await;
}

#[tokio::test]
async fn listed_holds_only_what_calls_use_once_the_watch_is_live() {
    let (addr, stop_registry, registry_task) = registry().await;
    let client = RegistryClient::new(&addr).expect("client");
    let first = Registration::start(client.clone(), "logging", "127.0.0.1:50061", HashMap::new());
    first.registered().await;
    let shutdown = CancellationToken::new();
    let discovery = Discovery::new(
        client.clone(),
        DiscoveryMode::Watch,
        &["logging"],
        &shutdown,
    );
    // Before the watch task has even run (one thread: nothing else ran yet), a call falls
    // back to a lookup, which the discovery remembers as the last known list.
    assert!(!discovery.listed().contains("127.0.0.1:50062"));
    assert_eq!(discovery.instances("logging").await, ["127.0.0.1:50061"]);

    // The instance leaves once the watch is live: the old lookup must not keep it listed.
    let second = Registration::start(client, "logging", "127.0.0.1:50062", HashMap::new());
    second.registered().await;
    first.deregister().await;
    until_listed(&discovery, &["127.0.0.1:50062".to_owned()]).await;
    let listed: Vec<String> = discovery.listed().into_iter().collect();
    assert_eq!(listed, ["127.0.0.1:50062"]);

    second.deregister().await;
    shutdown.cancel();
    stop_registry.cancel();
    registry_task.await.expect("join").expect("registry ran");
}
