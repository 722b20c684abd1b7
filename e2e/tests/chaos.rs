//! The chaos suite: steady POST load from 16 closed-loop clients while logging
//! instances crash and hang, the config server restarts and the stream's leader node
//! dies. Afterwards every acknowledged message must be stored exactly once, no request
//! may have failed, and crashed instances must have left the registry within their TTL.
//!
//! Events are paced by progress (N more acknowledged messages), not by sleeps, so the
//! suite means the same on a fast or a slow machine. It prints a table of what it did and
//! what it saw.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use e2e::{
    eventually, get_messages,
    load::{post_load, Progress},
    Nats, System, TEST_TTL,
};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 16;
/// Acknowledged messages between two events.
const STEP: usize = 150;

async fn after_more_acks(progress: &Progress, what: &str) {
    let target = progress.acked.load(Ordering::Relaxed) + STEP;
    eventually(Duration::from_secs(60), what, || async {
        progress.acked.load(Ordering::Relaxed) >= target
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_load_loses_nothing_duplicates_nothing_and_fails_nothing() {
    let mut nats = Nats::cluster(3).await;
    let mut system = System::start_with_store(3, &[], &nats.urls()).await;
    let mut log: Vec<(String, String)> = Vec::new();

    // Watch the registry: when does each address disappear, and come back?
    let seen_gone: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let monitor_stop = CancellationToken::new();
    let monitor = {
        let registry =
            registry_client::RegistryClient::new(&system.registry.to_string()).expect("client");
        let seen_gone = Arc::clone(&seen_gone);
        let stop = monitor_stop.clone();
        let watched: Vec<String> = system.logging.iter().map(|(a, _)| a.to_string()).collect();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(reply) = registry.lookup("logging").await {
                    let live: Vec<String> =
                        reply.instances.into_iter().map(|i| i.address).collect();
                    let mut gone = seen_gone.lock().expect("lock");
                    for address in &watched {
                        if !live.contains(address) {
                            gone.entry(address.clone()).or_insert_with(Instant::now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let load = tokio::spawn(post_load(
        system.facade,
        CLIENTS,
        Arc::clone(&progress),
        stop.clone(),
    ));
    let started = Instant::now();
    after_more_acks(&progress, "load running").await;

    // 1. kill -9 two of the three logging instances, one after the other.
    let (first, _) = system.logging[0];
    let (second, _) = system.logging[1];
    let (third, _) = system.logging[2];
    system.logging_proc(first).kill9().await;
    let first_killed = Instant::now();
    log.push(("kill -9 logging".into(), first.to_string()));
    after_more_acks(&progress, "load after the first crash").await;
    system.logging_proc(second).kill9().await;
    let second_killed = Instant::now();
    log.push(("kill -9 logging".into(), second.to_string()));
    // Two replacements, so that hanging the third still leaves live instances.
    let fourth = system.add_logging().await;
    let fifth = system.add_logging().await;
    log.push(("start logging".into(), format!("{fourth}, {fifth}")));
    after_more_acks(&progress, "load after the second crash").await;

    // 2. SIGSTOP one (hung, not dead), later SIGCONT.
    system.logging_proc(third).signal(Signal::SIGSTOP);
    log.push(("SIGSTOP logging".into(), third.to_string()));
    after_more_acks(&progress, "load with a hung instance").await;
    system.logging_proc(third).signal(Signal::SIGCONT);
    log.push(("SIGCONT logging".into(), third.to_string()));
    after_more_acks(&progress, "load after SIGCONT").await;

    // 3. Stop and restart the config server.
    system.stop_registry().await;
    log.push(("stop config-server".into(), system.registry.to_string()));
    after_more_acks(&progress, "load without a registry").await;
    system.start_registry().await;
    let live = [third.to_string(), fourth.to_string(), fifth.to_string()];
    let mut sorted_live = live.to_vec();
    sorted_live.sort();
    let repopulated = eventually(Duration::from_secs(10), "registry repopulated", || async {
        system.registered().await == sorted_live
    })
    .await;
    log.push((
        "restart config-server".into(),
        format!("repopulated in {repopulated:?}"),
    ));
    after_more_acks(&progress, "load after the registry restart").await;

    // 4. kill -9 the node leading the stream: the worst single store failure.
    let leader = nats
        .stream_leader("MESSAGES")
        .await
        .expect("a stream leader");
    nats.kill9(leader).await;
    log.push((
        "kill -9 NATS stream leader".into(),
        nats.nodes[leader].name.clone(),
    ));
    after_more_acks(&progress, "load after losing the stream leader").await;

    stop.cancel();
    let report = load.await.expect("load");
    let elapsed = started.elapsed();
    monitor_stop.cancel();
    let _ = monitor.await;

    // Read everything back through the facade.
    let mut stored = Vec::new();
    eventually(
        Duration::from_secs(30),
        "GET /messages answering 200",
        || {
            let (status, logs) = get_messages(system.facade);
            stored = logs;
            std::future::ready(status == 200)
        },
    )
    .await;

    let mut copies: HashMap<&str, usize> = HashMap::new();
    for (_, msg) in &stored {
        *copies.entry(msg.as_str()).or_default() += 1;
    }
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &stored {
        *ids.entry(id.as_str()).or_default() += 1;
    }
    let lost = report
        .acked
        .iter()
        .filter(|(id, msg)| !stored.iter().any(|(i, m)| i == id && m == msg))
        .count();
    let duplicated =
        copies.values().filter(|&&n| n > 1).count() + ids.values().filter(|&&n| n > 1).count();
    let gone = seen_gone.lock().expect("lock").clone();
    let evicted_first = gone
        .get(&first.to_string())
        .map(|t| t.duration_since(first_killed));
    let evicted_second = gone
        .get(&second.to_string())
        .map(|t| t.duration_since(second_killed));

    println!("\nchaos suite: {CLIENTS} closed-loop clients, {elapsed:.1?} under load");
    println!("| step | target |");
    println!("|---|---|");
    for (step, target) in &log {
        println!("| {step} | {target} |");
    }
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| requests sent (with retries) | {} |", report.requests);
    println!("| messages acknowledged | {} |", report.acked.len());
    println!(
        "| 503 answers, retried with the same key | {} |",
        report.retried_503
    );
    println!("| failed messages | {} |", report.failed.len());
    println!("| stored messages | {} |", stored.len());
    println!("| lost (acknowledged, not stored) | {lost} |");
    println!("| duplicated | {duplicated} |");
    println!("| eviction after kill -9 #1 | {evicted_first:?} (ttl {TEST_TTL:?}) |");
    println!("| eviction after kill -9 #2 | {evicted_second:?} (ttl {TEST_TTL:?}) |");
    println!(
        "| registry repopulated after restart | {repopulated:?} (heartbeat {}) |",
        e2e::TEST_HEARTBEAT
    );

    assert!(
        report.failed.is_empty(),
        "failed: {:?}",
        &report.failed[..report.failed.len().min(10)]
    );
    assert_eq!(lost, 0, "acknowledged messages missing");
    assert_eq!(duplicated, 0, "duplicates stored");
    // Every stored message was acknowledged (nothing invented), except perhaps one whose
    // acknowledgement was cut off when the load stopped.
    assert!(stored.len() >= report.acked.len() && stored.len() <= report.acked.len() + CLIENTS);
    let slack = Duration::from_millis(500);
    for (what, evicted) in [("first", evicted_first), ("second", evicted_second)] {
        let evicted = evicted.unwrap_or_else(|| panic!("{what} crashed instance never evicted"));
        assert!(
            evicted <= TEST_TTL + slack,
            "{what} evicted after {evicted:?}"
        );
    }
    assert!(
        repopulated <= Duration::from_millis(250) + slack,
        "repopulated in {repopulated:?}"
    );
}
