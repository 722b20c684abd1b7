//! The replicated store end to end: real three-node NATS JetStream clusters on free
//! ports, the real binaries, curl and gRPC clients.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use e2e::{
    curl, curl_post, curl_post_keyed, eventually, get_messages, list_instance, try_list_instance,
    Nats, System,
};
use proto::logging::v1::{logging_client::LoggingClient, AppendRequest, ReadRequest};

async fn append(addr: SocketAddr, id: &str, text: &str) -> Result<bool, tonic::Status> {
    let channel = rpc::channel(&addr.to_string()).expect("channel");
    LoggingClient::new(channel)
        .append(AppendRequest {
            id: id.into(),
            text: text.into(),
        })
        .await
        .map(|reply| reply.into_inner().duplicate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_on_the_replicated_store_survives_instances_nodes_and_restarts() {
    let mut nats = Nats::cluster(3).await;
    let mut system = System::start_with_store(3, &[], &nats.urls()).await;

    // Ten messages through random instances.
    let mut sent = Vec::new();
    for i in 1..=10 {
        let (status, reply) = curl_post(system.facade, &format!("msg{i}"));
        assert_eq!(status, 201, "{reply}");
        sent.push((
            reply["id"].as_str().expect("id").to_owned(),
            format!("msg{i}"),
        ));
    }
    // Every instance sees every message, in the same order.
    for (addr, _) in &system.logging {
        assert_eq!(list_instance(*addr).await, sent, "instance {addr}");
    }

    // Stop two of the three instances: GET still shows all ten, in order; POST works.
    let first = system.logging[0].0;
    let third = system.logging[2].0;
    assert!(system.logging_proc(first).terminate().await.success());
    assert!(system.logging_proc(third).terminate().await.success());
    let (status, logs) = get_messages(system.facade);
    assert_eq!(status, 200);
    assert_eq!(logs, sent);
    let (status, reply) = curl_post(system.facade, "msg11");
    assert_eq!(status, 201, "{reply}");
    sent.push((reply["id"].as_str().expect("id").to_owned(), "msg11".into()));

    // Lose one store node (kill -9): two of three are still a quorum. If it led the
    // stream, JetStream elects a new leader first (measured 5.4-7.8 s with nats-server
    // 2.15.1), and a POST in that window may get 503 + Retry-After; the client retries with
    // the same Idempotency-Key, which stores it exactly once.
    nats.kill9(0).await;
    let killed = Instant::now();
    let mut reply = (0, String::new(), String::new());
    eventually(
        Duration::from_secs(30),
        "POST with one store node down",
        || {
            reply = curl_post_keyed(system.facade, "msg12", "msg12");
            assert!(
                reply.0 == 201 || reply.0 == 503,
                "only 201 or 503: {reply:?}"
            );
            std::future::ready(reply.0 == 201)
        },
    )
    .await;
    println!(
        "POST accepted {:?} after kill -9 of a store node",
        killed.elapsed()
    );
    let id = serde_json::from_str::<serde_json::Value>(&reply.2).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    sent.push((id, "msg12".into()));
    eventually(
        Duration::from_secs(30),
        "GET with one store node down",
        || async { get_messages(system.facade) == (200, sent.clone()) },
    )
    .await;

    // Restart the whole cluster (kill -9 of all, same data): nothing is lost. A fresh
    // instance, whose view starts empty, reads everything back from the stream.
    nats.restart_all().await;
    let fresh = system.add_logging().await;
    eventually(
        Duration::from_secs(30),
        "a fresh instance sees all 12",
        || async { try_list_instance(fresh).await.ok().as_ref() == Some(&sent) },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "GET through the facade after the restart",
        || async { get_messages(system.facade) == (200, sent.clone()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_through_two_instances_is_stored_once() {
    let nats = Nats::cluster(3).await;
    let system = System::start_with_store(2, &[], &nats.urls()).await;
    let (a, b) = (system.logging[0].0, system.logging[1].0);
    let duplicate = append(a, "retry-me", "first").await.expect("append");
    assert!(!duplicate, "first append stores");
    let duplicate = append(b, "retry-me", "first").await.expect("append");
    assert!(
        duplicate,
        "the same id through another instance is a duplicate"
    );
    // Another text under the same id is refused, through either instance, and later
    // still: the check is per id, not a time window.
    for addr in [b, a] {
        let refused = append(addr, "retry-me", "second")
            .await
            .expect_err("another text");
        assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused}");
    }
    let duplicate = append(a, "retry-me", "first").await.expect("append");
    assert!(duplicate);
    for addr in [a, b] {
        assert_eq!(
            list_instance(addr).await,
            [("retry-me".to_owned(), "first".to_owned())]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_appends_are_unavailable_promptly_and_the_facade_answers_503() {
    let mut nats = Nats::cluster(3).await;
    let system = System::start_with_store(1, &["--retry-budget", "2s"], &nats.urls()).await;
    let url = format!("http://{}/messages", system.facade);
    let logging = system.logging[0].0;
    let (status, _) = curl_post(system.facade, "before the outage");
    assert_eq!(status, 201);

    // Two of three store nodes down: no quorum.
    nats.kill9(1).await;
    nats.kill9(2).await;
    let started = Instant::now();
    let error = append(logging, "during-outage", "x")
        .await
        .expect_err("no quorum");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    let post_keyed = || curl_post_keyed(system.facade, "retried after the outage", "outage-1");
    let (status, head, body) = post_keyed();
    assert_eq!(status, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");

    // Quorum back: the client's retry with the same key stores the message exactly once,
    // whatever the refused attempts left behind.
    nats.start_node(1);
    nats.start_node(2);
    nats.wait_ready().await;
    let mut answer = (0, String::new(), String::new());
    eventually(Duration::from_secs(30), "POST accepted again", || {
        answer = post_keyed();
        std::future::ready(answer.0 == 201)
    })
    .await;
    let id = serde_json::from_str::<serde_json::Value>(&answer.2).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, _, body) = curl("GET", &url, &[]);
    assert_eq!(status, 200, "{body}");
    let (status, logs) = get_messages(system.facade);
    assert_eq!(status, 200, "{logs:?}");
    assert_eq!(logs.iter().filter(|(i, _)| *i == id).count(), 1, "{logs:?}");

    // The append that timed out without quorum had an unknown outcome: JetStream may
    // commit it once the quorum is back. Retrying the same id settles it: at most once.
    let duplicate = append(logging, "during-outage", "x").await.expect("retry");
    let (status, logs) = get_messages(system.facade);
    assert_eq!(status, 200, "{logs:?}");
    assert_eq!(
        logs.iter().filter(|(i, _)| i == "during-outage").count(),
        1,
        "stored exactly once (duplicate on retry: {duplicate}): {logs:?}"
    );

    // The whole store down: nothing can be written, and nothing half-written appears
    // when it comes back.
    for node in 0..3 {
        nats.kill9(node).await;
    }
    let started = Instant::now();
    let error = append(logging, "total-outage", "x")
        .await
        .expect_err("store down");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let (status, _, _) = curl(
        "POST",
        &url,
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"msg":"lost?"}"#,
        ],
    );
    assert_eq!(status, 503);
    for node in 0..3 {
        nats.start_node(node);
    }
    nats.wait_ready().await;
    let before = logs.len();
    eventually(
        Duration::from_secs(30),
        "GET after the store came back",
        || async {
            let (status, logs) = get_messages(system.facade);
            status == 200 && logs.len() == before
        },
    )
    .await;
    let (_, logs) = get_messages(system.facade);
    assert!(
        !logs
            .iter()
            .any(|(i, m)| i == "total-outage" || m == "lost?"),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_right_after_an_acknowledged_write_sees_it_through_every_instance() {
    let nats = Nats::cluster(3).await;
    let system = System::start_with_store(3, &[], &nats.urls()).await;
    let read_ids = |addr: SocketAddr| async move {
        let channel = rpc::channel(&addr.to_string()).expect("channel");
        LoggingClient::new(channel)
            .read(ReadRequest {
                after: 0,
                limit: 1000,
            })
            .await
            .expect("read")
            .into_inner()
            .messages
            .into_iter()
            .map(|m| m.id)
            .collect::<Vec<_>>()
    };
    for i in 0..30 {
        // Written through one instance, read at once through each: page reads may be
        // answered by any stream replica, and one that lags must not hide the write.
        let id = format!("ryw-{i}");
        let writer = system.logging[i % 3].0;
        assert!(!append(writer, &id, "x").await.expect("append"));
        for (reader, _) in &system.logging {
            let ids = read_ids(*reader).await;
            assert_eq!(ids.len(), i + 1, "through {reader}");
            assert_eq!(ids.last(), Some(&id), "through {reader}");
        }
    }
    // Through the facade too: a page right after a 201 holds that message.
    for i in 0..10 {
        let (status, reply) = curl_post(system.facade, &format!("through the facade {i}"));
        assert_eq!(status, 201, "{reply}");
        let (status, messages) = get_messages(system.facade);
        assert_eq!(status, 200);
        assert_eq!(
            messages.last().map(|(id, _)| id.as_str()),
            reply["id"].as_str()
        );
    }
}

/// A nats-server older than the store needs (2.11, installed by `SETUP_TEST=1
/// scripts/setup`) is refused at start-up: logging exits with an error naming the
/// minimum version and where to get one, instead of failing on the first batch.
#[tokio::test]
async fn logging_refuses_a_nats_server_older_than_2_12_and_says_why() {
    let old = e2e::repo_root().join(".tools/nats-server-2.11.11/nats-server");
    assert!(
        old.is_file(),
        "{} is missing: run SETUP_TEST=1 scripts/setup (scripts/test does)",
        old.display()
    );
    let nats = Nats::single_of(old).await;
    let port = e2e::free_port().to_string();
    let registry = format!("http://127.0.0.1:{}", e2e::free_port());
    let store = nats.urls();
    let mut logging = e2e::Proc::start(
        "logging",
        "logging",
        &[&port, "--store", &store, "--registry", &registry],
    );
    let status = logging.wait_exit(Duration::from_secs(20)).await;
    let output = logging.output();
    assert!(!status.success(), "{status}; output:\n{output}");
    for says in [
        "nats-server 2.11.11",
        "too old",
        "2.12.0 or newer",
        "scripts/setup",
    ] {
        assert!(output.contains(says), "says {says:?}:\n{output}");
    }
}
