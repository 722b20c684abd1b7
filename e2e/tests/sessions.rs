//! Registrations held by a live connection, with the real binaries: a crash leaves every
//! replica at once, a hang is still evicted by the TTL, a reset connection of a living
//! instance brings it back, and grpcurl can hold a session too.
//!
//! The replicas here run with a long TTL where only the connection can explain a quick
//! removal.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{
    bin, curl, eventually, free_addr, grpcurl_path, metric, proxy::Proxy, start_replicas,
    wait_serving, Proc,
};
use nix::sys::signal::Signal;

const HEARTBEAT: &str = "250ms";

/// `count` registry replicas listing each other, at the heartbeat of these tests, each
/// started with `flags`.
async fn replicas(count: usize, flags: &[&str]) -> Vec<(SocketAddr, Proc)> {
    let mut flags = flags.to_vec();
    flags.extend(["--heartbeat-interval", HEARTBEAT]);
    start_replicas(&bin("config-server"), count, &flags).await
}

/// A logging instance on the memory store, registered through `registry` (URLs).
async fn logging(registry: &str) -> (SocketAddr, Proc) {
    let addr = free_addr();
    let port = addr.port().to_string();
    let proc = Proc::start(
        &format!("logging-{port}"),
        "logging",
        &[&port, "--registry", registry],
    );
    wait_serving(addr).await;
    (addr, proc)
}

fn urls(replicas: &[(SocketAddr, Proc)]) -> String {
    replicas
        .iter()
        .map(|(addr, _)| format!("http://{addr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `/v1/services` of one replica, as JSON.
fn status(replica: SocketAddr) -> serde_json::Value {
    let (code, _, body) = curl("GET", &format!("http://{replica}/v1/services"), &[]);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// One service of a `/v1/services` answer, or null when it is not listed.
fn service(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|service| service["service"] == name)
        .cloned()
        .unwrap_or_default()
}

/// (address, held_by) of every `logging` instance one replica lists.
fn listed(replica: SocketAddr) -> Vec<(String, String)> {
    let logging = service(&status(replica), "logging");
    logging["instances"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|i| {
            (
                i["address"].as_str().unwrap_or_default().to_owned(),
                i["held_by"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn is_listed(replica: SocketAddr, instance: SocketAddr) -> bool {
    listed(replica)
        .iter()
        .any(|(address, _)| *address == instance.to_string())
}

/// The reasons one replica gives for removing `instance`, newest first.
fn removal_reasons(replica: SocketAddr, instance: SocketAddr) -> Vec<String> {
    status(replica)["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter(|r| r["address"] == instance.to_string())
        .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_killed_instance_leaves_every_replica_at_once_not_after_the_ttl() {
    let replicas = replicas(3, &["--ttl", "60s"]).await;
    let registry = urls(&replicas);
    let (dead, mut victim) = logging(&registry).await;
    let (alive, _keep) = logging(&registry).await;
    for (replica, _) in &replicas {
        eventually(
            Duration::from_secs(10),
            "both listed in sessions",
            || async {
                let listed = listed(*replica);
                listed.len() == 2 && listed.iter().all(|(_, held_by)| held_by == "session")
            },
        )
        .await;
    }

    let killed = Instant::now();
    victim.kill9().await;
    for (replica, _) in &replicas {
        // Well inside the 60 s TTL: only the closed connection can explain it.
        eventually(
            Duration::from_secs(5),
            "the killed instance gone",
            || async { !is_listed(*replica, dead) },
        )
        .await;
        assert!(is_listed(*replica, alive), "the living one stays");
        assert_eq!(removal_reasons(*replica, dead), ["connection lost"]);
        assert_eq!(
            metric(*replica, "registry_connections_lost_total"),
            Some(1.0)
        );
    }
    assert!(killed.elapsed() < Duration::from_secs(30), "not the ttl");
}

#[tokio::test]
async fn a_frozen_instance_keeps_its_connection_and_is_evicted_by_the_ttl() {
    let ttl = Duration::from_secs(2);
    let replicas = replicas(1, &["--ttl", "2s"]).await;
    let replica = replicas[0].0;
    let (frozen, instance) = logging(&urls(&replicas)).await;
    eventually(Duration::from_secs(10), "listed", || async {
        is_listed(replica, frozen)
    })
    .await;

    instance.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the frozen instance evicted",
        || async { !is_listed(replica, frozen) },
    )
    .await;
    // Its last heartbeat came at most one interval before the freeze; a removal by the
    // connection would have come within milliseconds.
    assert!(
        stopped.elapsed() >= ttl / 2,
        "evicted {:?} after the freeze, before its ttl could end",
        stopped.elapsed()
    );
    assert_eq!(
        removal_reasons(replica, frozen),
        ["no heartbeat within the ttl"]
    );

    // Woken up, its next heartbeat is answered "register again" on the same session.
    instance.signal(Signal::SIGCONT);
    eventually(Duration::from_secs(10), "listed again", || async {
        is_listed(replica, frozen)
    })
    .await;
    assert!(
        instance.output().contains("registering again"),
        "{}",
        instance.output()
    );
    assert_eq!(
        metric(replica, "registry_connections_lost_total"),
        None,
        "the session lived on"
    );
}

#[tokio::test]
async fn a_reset_connection_of_a_living_instance_registers_it_again() {
    let replicas = replicas(1, &["--ttl", "60s"]).await;
    let replica = replicas[0].0;
    let proxy = Proxy::start(replica).await;
    let (instance, proc) = logging(&format!("http://{}", proxy.addr())).await;
    // Registered from the instance's side too: it has the registry's answer.
    eventually(Duration::from_secs(10), "registered", || async {
        is_listed(replica, instance) && proc.output().contains("registered with the registry")
    })
    .await;
    let id = |replica| {
        service(&status(replica), "logging")["instances"][0]["instance_id"]
            .as_str()
            .map(str::to_owned)
    };
    let before = id(replica);

    proxy.reset_all();
    // The registry saw the session break (and, with no grace, removed the instance)...
    eventually(
        Duration::from_secs(10),
        "the broken session noticed",
        || async { metric(replica, "registry_connections_lost_total") == Some(1.0) },
    )
    .await;
    // ...and the instance, alive, opened a new one under the same id.
    eventually(Duration::from_secs(10), "listed again", || async {
        is_listed(replica, instance)
    })
    .await;
    assert_eq!(id(replica), before, "the same instance id");
    assert!(
        proc.output()
            .contains("registry session broke; opening a new one"),
        "{}",
        proc.output()
    );
}

#[tokio::test]
async fn grpcurl_holds_a_session_and_its_exit_removes_the_instance() {
    let replicas = replicas(1, &["--ttl", "60s"]).await;
    let replica = replicas[0].0;
    let mut grpcurl = Command::new(grpcurl_path())
        .args(["-plaintext", "-d", "@", &replica.to_string()])
        .arg("registry.v1.Registry/Session")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("grpcurl");
    let mut stdin = grpcurl.stdin.take().expect("stdin");
    let mut replies = BufReader::new(grpcurl.stdout.take().expect("stdout"));
    let mut read_until = move |marker: &str| {
        let mut seen = String::new();
        while !seen.contains(marker) {
            let mut line = String::new();
            let read = replies.read_line(&mut line).expect("read grpcurl");
            assert!(read > 0, "grpcurl ended; it printed:\n{seen}");
            seen.push_str(&line);
        }
        seen
    };

    writeln!(
        stdin,
        r#"{{"register": {{"service": "demo", "address": "127.0.0.1:9", "instanceId": "demo-1"}}}}"#
    )
    .expect("send register");
    let registered = read_until("ttlMs");
    assert!(
        registered.contains(r#""instanceId": "demo-1""#),
        "{registered}"
    );
    writeln!(stdin, r#"{{"heartbeat": {{}}}}"#).expect("send heartbeat");
    // Heartbeats are not answered; the registry counts them.
    eventually(Duration::from_secs(5), "the heartbeat counted", || async {
        metric(replica, "registry_heartbeats_total") == Some(1.0)
    })
    .await;
    let status_now = status(replica);
    assert_eq!(
        service(&status_now, "demo")["instances"][0]["held_by"],
        "session"
    );

    grpcurl.kill().expect("kill grpcurl");
    grpcurl.wait().expect("reap grpcurl");
    eventually(
        Duration::from_secs(5),
        "the session's instance removed",
        || async { service(&status(replica), "demo").is_null() },
    )
    .await;
    let removed = &status(replica)["removed"][0];
    assert_eq!(removed["instance_id"], "demo-1");
    assert_eq!(removed["reason"], "connection lost");
}
