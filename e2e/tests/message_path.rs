//! The whole message path with the real binaries: config server, messages, facade and
//! logging instances (memory store), driven by curl and a gRPC client.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use e2e::{
    curl, curl_post, curl_post_keyed, eventually, get_lab, list_instance, metric, Proc, System,
    TEST_TTL,
};
use nix::sys::signal::Signal;
use proto::facade::v1::{facade_client::FacadeClient, PostRequest};
use tokio::sync::Mutex;

/// Collects what every logging instance holds: id -> how many copies, across instances.
async fn copies(addrs: &[SocketAddr]) -> HashMap<String, usize> {
    let mut copies = HashMap::new();
    for addr in addrs {
        for (id, _) in list_instance(*addr).await {
            *copies.entry(id).or_insert(0) += 1;
        }
    }
    copies
}

#[tokio::test]
async fn ten_posts_spread_over_instances_and_each_is_stored_exactly_once() {
    let system = System::start(3, &[]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, reply) = curl_post(system.facade, &format!("msg{i}"));
        assert_eq!(status, 201, "{reply}");
        ids.push(reply["id"].as_str().expect("id").to_owned());
    }
    let addrs: Vec<SocketAddr> = system.logging.iter().map(|(a, _)| *a).collect();
    let copies = copies(&addrs).await;
    for id in &ids {
        assert_eq!(copies.get(id), Some(&1), "{id} stored exactly once");
    }
    assert_eq!(copies.len(), 10);
    let mut used = 0;
    for (addr, proc) in &system.logging {
        let held = list_instance(*addr).await;
        if !held.is_empty() {
            used += 1;
        }
        // Each instance printed what it stored.
        for (id, text) in held {
            let output = proc.output();
            assert!(
                output.contains(&id) && output.contains(&text),
                "{id} in {}",
                proc.name
            );
        }
    }
    assert!(used >= 2, "10 random picks landed on {used} of 3 instances");

    // GET through the facade (one instance's messages with the memory store) plus the
    // messages service's text.
    // The lab's shape: the texts, without ids.
    let (status, logs, body) = get_lab(system.facade);
    assert_eq!(status, 200);
    assert_eq!(body["message"], "not implemented yet");
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
    assert!(!logs.is_empty());
    let sent: Vec<String> = (0..10).map(|i| format!("msg{i}")).collect();
    assert!(logs.iter().all(|text| sent.contains(text)), "{logs:?}");
    // The /facade alias answers the same way.
    let (status, _, _) = curl("GET", &format!("http://{}/facade", system.facade), &[]);
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sigterm_deregisters_at_once_and_exits_cleanly() {
    let mut system = System::start(2, &[]).await;
    let (victim, _) = system.logging[0];
    let status = system.logging_proc(victim).terminate().await;
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
    // Gone right away, not after the TTL, and because it said goodbye: its session
    // ending would remove it at once too, but as "connection lost".
    let registered = system.registered().await;
    assert!(!registered.contains(&victim.to_string()), "{registered:?}");
    assert_eq!(registered.len(), 1);
    let (_, _, page) = curl(
        "GET",
        &format!("http://{}/v1/services", system.registry),
        &[],
    );
    let page: serde_json::Value = serde_json::from_str(&page).expect("JSON");
    let reasons: Vec<&str> = page["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter(|removed| removed["address"] == victim.to_string().as_str())
        .filter_map(|removed| removed["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["deregistered"], "{page}");
    let (status, _) = curl_post(system.facade, "after sigterm");
    assert_eq!(status, 201);
}

#[tokio::test]
async fn kill_9_during_concurrent_posts_fails_no_request_with_per_call_discovery() {
    kill_9_during_concurrent_posts(&["--discovery", "per-call"]).await;
}

#[tokio::test]
async fn kill_9_during_concurrent_posts_fails_no_request_with_watch_discovery() {
    kill_9_during_concurrent_posts(&["--discovery", "watch"]).await;
}

/// The instances keep their registrations with unary heartbeats, so the registry lists
/// the crashed one until its TTL runs out (with sessions it would drop it at once, and
/// calls would hardly ever reach it): calls do reach the dead instance, and only the
/// facade's failover keeps them from failing.
async fn kill_9_during_concurrent_posts(facade_args: &[&str]) {
    let mut system = System::start(0, facade_args).await;
    for _ in 0..3 {
        system.add_logging_with(&["--registration", "unary"]).await;
    }
    system.wait_registered(3).await;
    let channel = rpc::channel(&system.facade.to_string()).expect("channel");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    const CLIENTS: usize = 8;
    const EACH: usize = 60;

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = FacadeClient::new(channel.clone());
        let acked = Arc::clone(&acked);
        let failures = Arc::clone(&failures);
        clients.push(tokio::spawn(async move {
            for i in 0..EACH {
                let request = PostRequest {
                    msg: format!("client {c} message {i}"),
                    idempotency_key: String::new(),
                };
                match client.post(request).await {
                    Ok(reply) => acked.lock().await.push(reply.into_inner().id),
                    Err(status) => failures.lock().await.push(status.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Let the load get going, then crash one instance mid-stream.
    eventually(
        Duration::from_secs(20),
        "some acknowledged posts",
        || async { acked.lock().await.len() >= 50 },
    )
    .await;
    let (victim, _) = system.logging[1];
    system.logging_proc(victim).kill9().await;
    let crashed_at = Instant::now();
    // While the load goes on, the crashed instance leaves the registry within its TTL
    // (plus a little slack for scheduling on a busy machine).
    let evicted = async {
        eventually(TEST_TTL * 3, "eviction", || async {
            !system.registered().await.contains(&victim.to_string())
        })
        .await;
        crashed_at.elapsed()
    };
    let finished = async {
        for client in clients {
            client.await.expect("client task");
        }
    };
    let (evicted_after, ()) = tokio::join!(evicted, finished);
    assert!(
        evicted_after <= TEST_TTL + Duration::from_millis(500),
        "evicted {evicted_after:?} after the crash; ttl {TEST_TTL:?}"
    );
    let failures = failures.lock().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(acked.lock().await.len(), CLIENTS * EACH);
    // Some calls did go to the dead instance, and moved on.
    let failovers = metric(
        system.facade,
        r#"facade_failovers_total{service="logging"}"#,
    );
    assert!(
        failovers.is_some_and(|n| n >= 1.0),
        "no call failed over ({failovers:?}): the crash was never put to the facade"
    );

    // The survivors hold no id twice (across instances too).
    let survivors: Vec<SocketAddr> = system
        .logging
        .iter()
        .map(|(a, _)| *a)
        .filter(|a| *a != victim)
        .collect();
    let copies = copies(&survivors).await;
    assert!(copies.values().all(|&n| n == 1), "no duplicates");
}

#[tokio::test]
async fn a_hung_instance_costs_at_most_one_deadline_and_no_failure() {
    let mut system = System::start(2, &["--attempt-deadline", "500ms"]).await;
    let (hung, _) = system.logging[0];
    system.logging_proc(hung).signal(Signal::SIGSTOP);
    let mut slowest = Duration::ZERO;
    // 20 random picks: the hung instance is tried at least once (1 - 2^-20).
    for i in 0..20 {
        let started = Instant::now();
        let (status, reply) = curl_post(system.facade, &format!("while hung {i}"));
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 201, "{reply}");
    }
    // At most one attempt deadline (500 ms) lost on the hung instance, plus slack.
    assert!(
        slowest < Duration::from_millis(500 + 700),
        "slowest POST took {slowest:?}"
    );
    let log = system.facade_proc.output();
    assert!(
        log.contains("attempt failed") && log.contains(&hung.to_string()),
        "the hung instance was tried and skipped:\n{log}"
    );
    system.logging_proc(hung).signal(Signal::SIGCONT);
}

#[tokio::test]
async fn with_the_registry_stopped_posts_use_the_last_known_instances() {
    let mut system = System::start(2, &[]).await;
    let (status, _) = curl_post(system.facade, "before");
    assert_eq!(status, 201);
    let exit = system.registry_proc.terminate().await;
    assert!(exit.success());
    for i in 0..5 {
        let (status, reply) = curl_post(system.facade, &format!("registry down {i}"));
        assert_eq!(status, 201, "{reply}");
    }
    assert!(
        system
            .facade_proc
            .output()
            .contains("using the last known instances"),
        "the facade says so in its log"
    );
}

#[tokio::test]
async fn an_idempotency_key_stores_once_and_returns_the_same_id() {
    let system = System::start(1, &[]).await;
    let post = || curl_post_keyed(system.facade, "pay once", "order-7");
    let (first_status, _, first) = post();
    let (second_status, _, second) = post();
    assert_eq!((first_status, second_status), (201, 201));
    assert_eq!(first, second, "same key, same id");
    let held = list_instance(system.logging[0].0).await;
    assert_eq!(held.len(), 1, "stored once: {held:?}");
    assert!(system.logging[0].1.output().contains("duplicate"));
}

#[tokio::test]
async fn no_logging_instance_means_503_with_retry_after() {
    let system = System::start(0, &["--retry-budget", "300ms"]).await;
    let (status, head, body) = curl(
        "POST",
        &format!("http://{}/messages", system.facade),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"msg":"nobody home"}"#,
        ],
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(&body).expect("json error body");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("no logging instance"),
        "{body}"
    );
}

/// The facade's `facade_channels` gauge: how many instance channels its pool holds.
fn pooled_channels(facade: SocketAddr) -> Option<u64> {
    metric(facade, "facade_channels").map(|channels| channels as u64)
}

/// POSTs that arrive while the facade's call to logging is in flight go out together in
/// the next call, each still answered on its own, each stored once. The only instance
/// is frozen so the calls are certainly in flight while the POSTs arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_that_arrive_during_a_call_share_the_next_one_and_each_is_stored_once() {
    // One call at a time; a call that hangs lets the next one go after a second.
    let args = [
        "--append-calls",
        "1",
        "--append-patience",
        "1s",
        "--attempt-deadline",
        "3s",
        "--retry-budget",
        "20s",
    ];
    let mut system = System::start(1, &args).await;
    let (instance, _) = system.logging[0];
    let facade = system.facade;
    assert_eq!(curl_post(facade, "warm-up").0, 201);
    let batched = |what| metric(facade, &format!("facade_append_batch_size_{what}"));
    assert_eq!((batched("count"), batched("sum")), (Some(1.0), Some(1.0)));

    system.logging_proc(instance).signal(Signal::SIGSTOP);
    const POSTS: usize = 20;
    let posts: Vec<_> = (0..POSTS)
        .map(|i| tokio::task::spawn_blocking(move || curl_post(facade, &format!("together {i}"))))
        .collect();
    // Every POST is in a call (the first alone, the others in later calls: one a
    // second while the instance stays frozen).
    eventually(
        Duration::from_secs(15),
        "all POSTs taken into calls",
        || async { batched("sum") == Some(1.0 + POSTS as f64) },
    )
    .await;
    let calls = batched("count").expect("counted") - 1.0;
    system.logging_proc(instance).signal(Signal::SIGCONT);

    let mut ids = Vec::new();
    for post in posts {
        let (status, reply) = post.await.expect("curl");
        assert_eq!(status, 201, "{reply}");
        ids.push(reply["id"].as_str().expect("id").to_owned());
    }
    assert!(
        calls <= 4.0,
        "{POSTS} POSTs that arrived together went out in {calls} calls"
    );
    let copies = copies(&[instance]).await;
    assert_eq!(copies.len(), POSTS + 1);
    for id in &ids {
        assert_eq!(copies.get(id), Some(&1), "{id} stored exactly once");
    }
}

/// logging's AppendBatch answers each append as Append would alone, in order, with
/// grpcurl: a new one, a repeat, another text for a stored id, an empty text.
#[tokio::test]
async fn append_batch_answers_each_append_on_its_own() {
    let system = System::start(1, &[]).await;
    let (instance, _) = system.logging[0];
    let body = serde_json::json!({"appends": [
        {"id": "a", "text": "first", "requestId": "r1"},
        {"id": "a", "text": "first", "requestId": "r2"},
        {"id": "a", "text": "second", "requestId": "r3"},
        {"id": "b", "text": "", "requestId": "r4"},
        {"id": "c", "text": "third", "requestId": "r5"},
    ]});
    let reply = e2e::grpcurl_json(
        instance,
        "logging.v1.Logging/AppendBatch",
        Some(&body.to_string()),
    );
    let results = reply["results"].as_array().expect("results");
    let answered: Vec<(i64, bool)> = results
        .iter()
        .map(|r| {
            (
                r["code"].as_i64().unwrap_or(0),
                r["duplicate"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    // OK, OK duplicate, ALREADY_EXISTS (6), INVALID_ARGUMENT (3), OK.
    assert_eq!(
        answered,
        [(0, false), (0, true), (6, false), (3, false), (0, false)],
        "{reply}"
    );
    assert!(
        results[2]["error"]
            .as_str()
            .unwrap_or("")
            .contains("another text"),
        "{reply}"
    );
    assert_eq!(
        list_instance(instance).await,
        [
            ("a".to_owned(), "first".to_owned()),
            ("c".to_owned(), "third".to_owned())
        ]
    );
    // Each append is printed with the request it belongs to.
    let output = system.logging[0].1.output();
    assert!(
        output
            .lines()
            .any(|l| l.contains("r5") && l.contains("third")),
        "{output}"
    );

    // Too many appends in one call: the call is refused, nothing stored.
    let many: Vec<_> = (0..=logging::service::MAX_BATCH_APPENDS)
        .map(|i| serde_json::json!({"id": format!("m{i}"), "text": "x"}))
        .collect();
    let output = e2e::grpcurl(
        instance,
        "logging.v1.Logging/AppendBatch",
        Some(&serde_json::json!({"appends": many}).to_string()),
    );
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && said.contains("InvalidArgument"),
        "{said}"
    );
    assert_eq!(list_instance(instance).await.len(), 2);
}

#[tokio::test]
async fn the_facade_forgets_channels_to_instances_that_left() {
    let mut system = System::start(1, &[]).await;
    assert_eq!(curl_post(system.facade, "first").0, 201);
    assert_eq!(pooled_channels(system.facade), Some(1));
    // Churn: each round an instance joins and the old one leaves. The pool keeps only
    // what the registry still lists, so it does not grow with every address ever seen.
    for round in 0..3 {
        let old = system.logging[0].0;
        system.add_logging().await;
        let status = system.logging_proc(old).terminate().await;
        assert!(status.success(), "{status}");
        system.logging.retain(|(addr, _)| *addr != old);
        system.wait_registered(1).await;
        eventually(
            Duration::from_secs(10),
            &format!("round {round}: only the live instance's channel is pooled"),
            || async {
                curl_post(system.facade, &format!("round {round}")).0 == 201
                    && pooled_channels(system.facade) == Some(1)
            },
        )
        .await;
    }
}

#[tokio::test]
async fn logging_registers_its_advertised_address_and_never_an_unspecified_one() {
    let mut system = System::start(0, &[]).await;
    let registry = format!("http://{}", system.registry);

    // Listening on every interface without saying where others reach it is refused
    // before anything is bound.
    let mut refused = Proc::start(
        "logging-unspecified",
        "logging",
        &["50099", "--host", "0.0.0.0", "--registry", &registry],
    );
    let status = refused.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert!(
        refused.output().contains("--advertise"),
        "{}",
        refused.output()
    );

    // --advertise is what the registry lists, and the facade reaches the instance by it.
    let port = e2e::free_port();
    let advertised = format!("localhost:{port}");
    let proc = Proc::start(
        "logging-advertised",
        "logging",
        &[
            &port.to_string(),
            "--advertise",
            &advertised,
            "--registry",
            &registry,
        ],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    e2e::wait_serving(addr).await;
    system.logging.push((addr, proc));
    eventually(
        Duration::from_secs(10),
        "the advertised address listed",
        || async { system.registered().await == [advertised.clone()] },
    )
    .await;
    let (status, reply) = curl_post(system.facade, "through localhost");
    assert_eq!(status, 201, "{reply}");
}

/// With no logging instance registered, POST and GET answer 503 with Retry-After within
/// about a heartbeat interval (`--no-instance-wait`, 1 s), not after the 30 s retry
/// budget; an instance started later is used by the next request.
#[tokio::test]
async fn no_instance_registered_is_a_prompt_503() {
    let mut system = System::start(0, &[]).await;
    let url = format!("http://{}/messages", system.facade);
    let body = serde_json::json!({ "msg": "nobody home" }).to_string();
    let post = ["-H", "content-type: application/json", "-d", body.as_str()];
    for (method, args) in [("POST", &post[..]), ("GET", &[][..])] {
        let started = Instant::now();
        let (status, head, reply) = curl(method, &url, args);
        let took = started.elapsed();
        assert_eq!(status, 503, "{method}: {reply}");
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 1"),
            "{method}: {head}"
        );
        assert!(
            reply.contains("no logging instance is registered"),
            "{method}: {reply}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{method} answered after {took:?}"
        );
    }
    system.add_logging().await;
    system.wait_registered(1).await;
    let (status, reply) = curl_post(system.facade, "somebody home");
    assert_eq!(status, 201, "{reply}");
}
