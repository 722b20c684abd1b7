//! The chaos suite: steady POST load from 16 closed-loop clients while logging
//! instances crash and hang, the config server restarts and the stream's leader node
//! dies; and again with three registry replicas, one killed, one frozen, one restarted. Afterwards every acknowledged message must be stored exactly once, no request
//! may have failed, and crashed instances must have left the registry within their TTL.
//!
//! Events are paced by progress (N more acknowledged messages), not by sleeps, so the
//! suite means the same on a fast or a slow machine. It prints a table of what it did and
//! what it saw.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use e2e::{
    eventually, free_addr, get_messages,
    load::{audit, post_load, Audit, Progress},
    registered_on, wait_serving, Nats, Proc, System, TEST_HEARTBEAT, TEST_TTL,
};
use nix::sys::signal::Signal;
use registry_client::RegistryClient;
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
        let registry = RegistryClient::new(&system.registry.to_string()).expect("client");
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
        vec![system.facade],
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

    let Audit { lost, duplicated } = audit(&report.acked, &stored);
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

/// Waits until each of `replicas` lists exactly `live` for `logging`; how long it took.
async fn until_listed(replicas: &[SocketAddr], live: &[String], what: &str) -> Duration {
    let mut live = live.to_vec();
    live.sort();
    eventually(Duration::from_secs(10), what, || async {
        for replica in replicas {
            if registered_on(*replica).await.ok().as_ref() != Some(&live) {
                return false;
            }
        }
        true
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_registry_replicas_fails_nothing_loses_nothing_and_evicts_only_the_dead() {
    let nats = Nats::cluster(3).await;
    let mut system = System::start_replicated(3, 3, &[], &nats.urls()).await;
    let replicas = system.replica_addrs();
    // A second facade, looking instances up per call: both discovery modes under fire.
    let per_call = free_addr();
    let _per_call_proc = Proc::start(
        "facade-per-call",
        "facade",
        &[
            "--addr",
            &per_call.to_string(),
            "--registry",
            &system.registry_urls(),
            "--discovery",
            "per-call",
        ],
    );
    wait_serving(per_call).await;
    let mut log: Vec<(String, String)> = Vec::new();

    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let load = tokio::spawn(post_load(
        vec![system.facade, per_call],
        CLIENTS,
        Arc::clone(&progress),
        stop.clone(),
    ));
    let started = Instant::now();
    after_more_acks(&progress, "load running").await;

    // 1. kill -9 the first replica, the one every client asks first. A client with the
    //    facade's lookup deadline finds the instances through another.
    let probe = RegistryClient::new(&system.registry_urls())
        .expect("client")
        .with_deadline(Duration::from_millis(300));
    probe.lookup("logging").await.expect("lookup before");
    system.replica_proc(0).kill9().await;
    let failover = eventually(
        Duration::from_secs(10),
        "a lookup through another replica",
        || async { probe.lookup("logging").await.is_ok() },
    )
    .await;
    log.push(("kill -9 replica".into(), replicas[0].to_string()));
    after_more_acks(&progress, "load after losing a replica").await;

    // 2. With that replica down, a logging crash is evicted by the survivors.
    let survivors = &replicas[1..];
    let (victim, _) = system.logging[0];
    system.logging_proc(victim).kill9().await;
    log.push(("kill -9 logging (replica down)".into(), victim.to_string()));
    let mut live: Vec<String> = system.logging[1..]
        .iter()
        .map(|(a, _)| a.to_string())
        .collect();
    let evicted = until_listed(survivors, &live, "the crashed instance evicted").await;

    // 3. With it still down, a new instance registers with the survivors.
    let newcomer = system.add_logging().await;
    live.push(newcomer.to_string());
    log.push(("start logging (replica down)".into(), newcomer.to_string()));
    until_listed(survivors, &live, "the newcomer on the survivors").await;
    after_more_acks(&progress, "load with a replica down").await;

    // 4. The dead replica, restarted, lists exactly the live instances.
    system.restart_replica(0).await;
    let repopulated = until_listed(&replicas[..1], &live, "the restarted replica complete").await;
    log.push(("restart replica".into(), replicas[0].to_string()));
    after_more_acks(&progress, "load after the restart").await;

    // 5. SIGSTOP a replica for 5 s (the fault is a duration), then resume it: it must
    //    not evict the live instances whose heartbeats it missed while frozen.
    let frozen = replicas[1];
    system.replica_proc(1).signal(Signal::SIGSTOP);
    log.push(("SIGSTOP replica for 5 s".into(), frozen.to_string()));
    tokio::time::sleep(Duration::from_secs(5)).await; // the freeze under test, not a settle
    system.replica_proc(1).signal(Signal::SIGCONT);
    let resumed = Instant::now();
    let mut fewest = usize::MAX;
    while resumed.elapsed() < TEST_TTL * 2 {
        if let Ok(listed) = registered_on(frozen).await {
            fewest = fewest.min(listed.len());
        }
    }
    after_more_acks(&progress, "load after SIGCONT").await;

    stop.cancel();
    let report = load.await.expect("load");
    let elapsed = started.elapsed();
    let mut stored = Vec::new();
    eventually(
        Duration::from_secs(30),
        "GET /v1/messages answering 200",
        || {
            let (status, messages) = get_messages(system.facade);
            stored = messages;
            std::future::ready(status == 200)
        },
    )
    .await;
    let Audit { lost, duplicated } = audit(&report.acked, &stored);

    println!("\nregistry replicas under {CLIENTS} closed-loop clients (half through a per-call facade), {elapsed:.1?}");
    println!("| step | target |\n|---|---|");
    for (step, target) in &log {
        println!("| {step} | {target} |");
    }
    println!("\n| measure | value |\n|---|---|");
    println!("| messages acknowledged | {} |", report.acked.len());
    println!("| failed messages | {} |", report.failed.len());
    println!("| lost | {lost} |\n| duplicated | {duplicated} |");
    println!("| replica kill -9 -> lookup through another | {failover:?} |");
    println!("| logging crash evicted by the survivors | {evicted:?} (ttl {TEST_TTL:?}) |");
    println!("| restarted replica lists every live instance | {repopulated:?} (heartbeat {TEST_HEARTBEAT}) |");
    println!(
        "| fewest listed by the frozen replica after SIGCONT | {fewest} of {} |",
        live.len()
    );

    assert!(
        report.failed.is_empty(),
        "failed: {:?}",
        &report.failed[..report.failed.len().min(10)]
    );
    assert_eq!((lost, duplicated), (0, 0), "lost, duplicated");
    assert!(stored.len() >= report.acked.len() && stored.len() <= report.acked.len() + CLIENTS);
    assert_eq!(
        fewest,
        live.len(),
        "live instances evicted after the freeze"
    );
    // Generous bounds (a shared 2-core machine); bench/ measures the real figures.
    assert!(
        failover < Duration::from_secs(1),
        "failover took {failover:?}"
    );
    assert!(evicted < TEST_TTL * 2, "evicted after {evicted:?}");
    assert!(
        repopulated < Duration::from_secs(2),
        "repopulated after {repopulated:?}"
    );
}
