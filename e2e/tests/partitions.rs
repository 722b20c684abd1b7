//! The README's three-host layout ("Across machines") on hosts in network namespaces
//! (`testkit::hosts`), under load from a fourth, through network partitions.
//!
//! Hosts a, b and c each run a NATS node (one cluster of three), a registry replica and
//! a logging instance, started with the README's commands, secured as it has them: the
//! certificates and nkeys of `runner certs`, TLS on every port, NATS locked down (its
//! nodes' configuration is the one `runner certs` writes, with this test's ports and
//! folders). Host d runs the facade and four closed-loop clients posting over HTTPS with
//! Idempotency-Keys. Faults, one after the other:
//! a isolated, a cut from b, d cut from c, b crashed (kill -9 of everything on it) and
//! started again. After each: replicas that could not hear an instance dropped it within
//! the TTL and list it again soon after the heal, and the load made progress. At the end
//! nothing acknowledged is lost or stored twice.
//!
//! Needs root for the namespaces; without, it says so in one line and tests nothing.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use e2e::certs::Certs;
use e2e::{
    bin, eventually, get_lab_at, get_messages_at,
    hosts::Hosts,
    load::{audit, post_load, Progress, Target},
    nats::{move_leader_as, until_current_as},
    verdicts::Verdicts,
    wait_serving_over, Proc,
};
use local_nats::{Credentials, Lockdown};
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 4;
/// The README's defaults, which the layout runs with.
const TTL: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a partition lasts.
const CUT: Duration = Duration::from_secs(10);

/// One storage host: its NATS node, registry replica and logging instance.
struct Site {
    name: &'static str,
    nats: Proc,
    registry: Proc,
    logging: Proc,
}

struct Layout {
    hosts: Hosts,
    sites: Vec<Site>,
    data: PathBuf,
    certs: Certs,
    _messages: Proc,
    _facade: Proc,
    facade: SocketAddr,
}

/// What `runner certs --host a=... --host d=...` wrote for the four hosts.
fn make_certs(hosts: &Hosts, data: &std::path::Path) -> Certs {
    let hosts: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| format!("{name}={}", hosts.ip(name)))
        .collect();
    Certs::make(data, &hosts).0
}

/// Host `name`'s node configuration, as `runner certs` writes it.
fn lockdown(certs: &Certs, name: &str) -> Lockdown {
    let public = |seed: &str| Lockdown::public_user(&certs.seed(seed)).expect("nkey");
    runner::certs::lockdown(
        &certs.dir.join(name),
        "partition-route-password".into(),
        public("a/logging.nk"),
        Some(public("admin.nk")),
    )
}

/// The operator, on host d: moves stream leaders, reads stream state.
fn admin(certs: &Certs) -> Credentials {
    Credentials {
        tls: Some((
            certs.ca().into(),
            certs.file("d", "facade.pem").into(),
            certs.file("d", "facade.key").into(),
        )),
        nkey_seed: Some(certs.seed("admin.nk")),
    }
}

fn args(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

fn nodes(hosts: &Hosts, data: &std::path::Path) -> Vec<local_nats::Node> {
    ["a", "b", "c"]
        .iter()
        .map(|name| local_nats::Node {
            name: format!("nats-{name}"),
            host: hosts.ip(name).to_string(),
            client_port: 4222,
            cluster_port: Some(6222),
            data_dir: data.join(name),
        })
        .collect()
}

impl Layout {
    fn ip(&self, name: &str) -> String {
        self.hosts.ip(name).to_string()
    }

    fn store(&self) -> String {
        ["a", "b", "c"]
            .iter()
            .map(|name| format!("tls://{}:4222", self.ip(name)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Everything on host `name`, with the README's commands.
    fn start_site(&self, name: &'static str) -> Site {
        let nodes = nodes(&self.hosts, &self.data);
        let node = nodes
            .iter()
            .find(|node| node.name == format!("nats-{name}"))
            .expect("a node");
        let nats_args = node
            .locked_args(&nodes, &lockdown(&self.certs, name))
            .expect("node config");
        let server = local_nats::server_path().expect("nats-server (scripts/setup installs it)");
        let nats = self
            .hosts
            .spawn(name, &format!("nats-{name}"), &server, &args(&nats_args));
        let me = self.ip(name);
        let replicas = ["a", "b", "c"]
            .iter()
            .map(|host| format!("{}:50050", self.ip(host)))
            .collect::<Vec<_>>()
            .join(",");
        let mut registry_args = vec![
            "--addr".to_owned(),
            format!("{me}:50050"),
            "--replica".into(),
            replicas,
            "--static".into(),
            format!("messages={}:50060", self.ip("a")),
            "--set".into(),
            format!("logging.store={}", self.store()),
        ];
        registry_args.extend(self.certs.flags(name, "config-server"));
        let registry = self.hosts.spawn(
            name,
            &format!("config-server-{name}"),
            &bin("config-server"),
            &args(&registry_args),
        );
        let mut logging_args = vec![
            "50051".to_owned(),
            "--host".into(),
            "0.0.0.0".into(),
            "--advertise".into(),
            format!("{me}:50051"),
            "--registry".into(),
            format!("https://{me}:50050"),
            "--store-nkey".into(),
            self.certs.file(name, "logging.nk"),
        ];
        logging_args.extend(self.certs.flags(name, "logging"));
        let logging = self.hosts.spawn(
            name,
            &format!("logging-{name}"),
            &bin("logging"),
            &args(&logging_args),
        );
        Site {
            name,
            nats,
            registry,
            logging,
        }
    }

    /// The `logging` addresses replica `name` lists, asked on its own host (so a cut
    /// between the test's host and it does not matter); `None` when it does not answer.
    fn listed_by(&self, name: &str) -> Option<Vec<String>> {
        let url = format!("https://{}:50050/v1/services", self.ip(name));
        let (ca, cert, key) = (
            self.certs.ca(),
            self.certs.file(name, "facade.pem"),
            self.certs.file(name, "facade.key"),
        );
        let curl = [
            "-s",
            "--max-time",
            "1",
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            &url,
        ];
        let body = self.hosts.run(name, "curl", &curl).ok()?;
        let status: serde_json::Value = serde_json::from_str(&body).ok()?;
        let mut listed: Vec<String> = status["services"]
            .as_array()?
            .iter()
            .filter(|service| service["service"] == "logging")
            .flat_map(|service| service["instances"].as_array().cloned().unwrap_or_default())
            .filter_map(|instance| instance["address"].as_str().map(str::to_owned))
            .collect();
        listed.sort();
        Some(listed)
    }

    fn logging_of(&self, name: &str) -> String {
        format!("{}:50051", self.ip(name))
    }

    /// Waits until each `(replica, site)` of `pairs` lists (or not) that site's logging
    /// instance.
    async fn until_all(&self, pairs: &[(&str, &str)], listed: bool, limit: Duration) {
        for (replica, site) in pairs {
            self.until_listed(replica, site, listed, limit).await;
        }
    }

    /// Waits until replica `replica` lists (or not) the logging instance of `site`.
    async fn until_listed(
        &self,
        replica: &str,
        site: &str,
        listed: bool,
        limit: Duration,
    ) -> Duration {
        let address = self.logging_of(site);
        let what = format!(
            "replica {replica} {} logging-{site}",
            if listed { "listing" } else { "dropping" }
        );
        eventually(limit, &what, || async {
            self.listed_by(replica)
                .is_some_and(|list| list.contains(&address) == listed)
        })
        .await
    }
}

async fn start(hosts: Hosts) -> Layout {
    let data = std::env::temp_dir().join(format!("partitions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let certs = make_certs(&hosts, &data);
    let facade = SocketAddr::new(hosts.ip("d").into(), 8080);
    let mut messages_args = vec!["--addr".to_owned(), format!("{}:50060", hosts.ip("a"))];
    messages_args.extend(certs.flags("a", "messages"));
    let messages = hosts.spawn("a", "messages", &bin("messages"), &args(&messages_args));
    let registries = format!(
        "https://{}:50050,https://{}:50050",
        hosts.ip("a"),
        hosts.ip("b")
    );
    let mut facade_args = vec![
        "--addr".to_owned(),
        "0.0.0.0:8080".into(),
        "--registry".into(),
        registries,
    ];
    facade_args.extend(certs.flags("d", "facade"));
    let facade_proc = hosts.spawn("d", "facade", &bin("facade"), &args(&facade_args));
    let mut layout = Layout {
        hosts,
        sites: Vec::new(),
        data,
        certs,
        _messages: messages,
        _facade: facade_proc,
        facade,
    };
    for name in ["a", "b", "c"] {
        let site = layout.start_site(name);
        layout.sites.push(site);
    }
    local_nats::wait_ready_as(
        &admin(&layout.certs),
        &layout.store(),
        Duration::from_secs(60),
        &CancellationToken::new(),
    )
    .await
    .expect("the NATS cluster across a, b and c");
    let transport = layout.certs.transport("d", "facade");
    for name in ["a", "b", "c"] {
        let addr = format!("{}:50051", layout.ip(name)).parse().expect("addr");
        wait_serving_over(&transport, addr).await;
    }
    wait_serving_over(&transport, facade).await;
    layout
        .until_all(&EVERYWHERE, true, Duration::from_secs(20))
        .await;
    layout
}

/// Waits for `count` more acknowledged messages.
async fn more_acks(progress: &Progress, count: usize, what: &str) {
    let target = progress.acked.load(Ordering::Relaxed) + count;
    eventually(Duration::from_secs(60), what, || async {
        progress.acked.load(Ordering::Relaxed) >= target
    })
    .await;
}

/// Acknowledged messages and 503 answers so far.
fn window(progress: &Progress) -> (usize, usize) {
    (
        progress.acked.load(Ordering::Relaxed),
        progress.rejected.load(Ordering::Relaxed),
    )
}

/// Every replica with every site: what a whole registry looks like.
const EVERYWHERE: [(&str, &str); 9] = [
    ("a", "a"),
    ("a", "b"),
    ("a", "c"),
    ("b", "a"),
    ("b", "b"),
    ("b", "c"),
    ("c", "a"),
    ("c", "b"),
    ("c", "c"),
];
/// How long a replica may take to drop an instance it cannot hear, and to list it again
/// after a heal, before a wait gives up (the assertions at the end are tighter).
const DROP_LIMIT: Duration = Duration::from_secs(6);
const BACK_LIMIT: Duration = Duration::from_secs(8);

/// One fault's line of the report.
struct Row {
    fault: &'static str,
    acked: usize,
    rejected: usize,
    dropped: Option<Duration>,
    back: Duration,
}

impl Row {
    /// The line of `fault`, from the load's counts before and after it.
    fn new(
        fault: &'static str,
        before: (usize, usize),
        after: (usize, usize),
        dropped: Option<Duration>,
        back: Duration,
    ) -> Self {
        Self {
            fault,
            acked: after.0 - before.0,
            rejected: after.1 - before.1,
            dropped,
            back,
        }
    }
}

#[test]
fn partitions_under_load_lose_nothing_and_fail_nothing_while_a_quorum_is_reachable() {
    let hosts = match Hosts::new(&["a", "b", "c", "d", "e"]) {
        Ok(hosts) => hosts,
        Err(why) => {
            println!("skipped: partitions_under_load_lose_nothing_and_fail_nothing_while_a_quorum_is_reachable (no network namespaces here: {why})");
            return;
        }
    };
    // This thread is host d from here on: the load and every check run from there.
    hosts.enter("d").expect("onto host d");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(hosts));
}

async fn run(hosts: Hosts) {
    let started = Instant::now();
    let mut layout = start(hosts).await;
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let ca = layout.certs.ca();
    let https = Target::https(layout.facade, std::path::Path::new(&ca)).expect("the CA");
    let load = tokio::spawn(post_load(
        vec![https],
        CLIENTS,
        Arc::clone(&progress),
        stop.clone(),
    ));
    more_acks(&progress, 100, "the load under way").await;
    let mut rows = Vec::new();

    // 1. Host a isolated for 10 s, leading the stream (the worst case): b and c elect a
    // new leader and stop hearing logging-a; d writes through them.
    let admin = admin(&layout.certs);
    move_leader_as(&admin, &layout.store(), "MESSAGES", "nats-a").await;
    let before = window(&progress);
    layout.hosts.isolate("a");
    let cut = Instant::now();
    layout
        .until_all(&[("b", "a"), ("c", "a")], false, DROP_LIMIT)
        .await;
    let dropped = cut.elapsed();
    more_acks(&progress, 50, "writes while a is cut off").await;
    tokio::time::sleep(CUT.saturating_sub(cut.elapsed())).await; // the partition under test
    layout.hosts.rejoin("a");
    let healed = Instant::now();
    layout.until_all(&EVERYWHERE, true, BACK_LIMIT).await;
    let back = healed.elapsed();
    // Nothing on the healed host stays wedged: its instance answers, and it writes.
    wait_serving_over(
        &layout.certs.transport("d", "facade"),
        layout.logging_of("a").parse().expect("addr"),
    )
    .await;
    more_acks(&progress, 50, "writes after a is back").await;
    rows.push(Row::new(
        "a isolated for 10 s",
        before,
        window(&progress),
        Some(dropped),
        back,
    ));

    // 2. a cut from b, while d reaches both: each stops hearing the other's instance.
    // Each fault starts on a cluster healed from the one before.
    until_current_as(&admin, &layout.store(), "MESSAGES").await;
    let before = window(&progress);
    layout.hosts.cut("a", "b");
    let cut = Instant::now();
    layout
        .until_all(&[("a", "b"), ("b", "a")], false, DROP_LIMIT)
        .await;
    let dropped = cut.elapsed();
    assert!(
        layout.listed_by("c").is_some_and(|list| list.len() == 3),
        "c hears everyone"
    );
    more_acks(&progress, 50, "writes while a and b are cut apart").await;
    tokio::time::sleep(CUT.saturating_sub(cut.elapsed())).await; // the partition under test
    layout.hosts.heal("a", "b");
    let healed = Instant::now();
    layout
        .until_all(&[("a", "b"), ("b", "a")], true, BACK_LIMIT)
        .await;
    let back = healed.elapsed();
    rows.push(Row::new(
        "a cut from b for 10 s",
        before,
        window(&progress),
        Some(dropped),
        back,
    ));

    // 3. d cut from c: the facade loses logging-c and replica c; nobody else does.
    until_current_as(&admin, &layout.store(), "MESSAGES").await;
    let before = window(&progress);
    layout.hosts.cut("d", "c");
    let cut = Instant::now();
    more_acks(&progress, 200, "writes while d is cut from c").await;
    tokio::time::sleep(CUT.saturating_sub(cut.elapsed())).await; // the partition under test
    for replica in ["a", "b", "c"] {
        assert!(
            layout
                .listed_by(replica)
                .is_some_and(|list| list.len() == 3),
            "replica {replica} lost an instance though only d and c were cut apart"
        );
    }
    layout.hosts.heal("d", "c");
    let healed = Instant::now();
    more_acks(&progress, 50, "writes after d and c are joined").await;
    rows.push(Row::new(
        "d cut from c for 10 s",
        before,
        window(&progress),
        None,
        healed.elapsed(),
    ));

    // 4. b crashes (kill -9 of everything on it) while leading the stream, then starts
    // again.
    move_leader_as(&admin, &layout.store(), "MESSAGES", "nats-b").await;
    let before = window(&progress);
    let b = layout
        .sites
        .iter()
        .position(|site| site.name == "b")
        .expect("site b");
    {
        let site = &mut layout.sites[b];
        site.logging.kill9().await;
        site.registry.kill9().await;
        site.nats.kill9().await;
    }
    let crashed = Instant::now();
    layout
        .until_all(&[("a", "b"), ("c", "b")], false, DROP_LIMIT)
        .await;
    let dropped = crashed.elapsed();
    more_acks(&progress, 100, "writes while b is down").await;
    layout.sites[b] = layout.start_site("b");
    let restarted = Instant::now();
    layout
        .until_all(&EVERYWHERE, true, Duration::from_secs(30))
        .await;
    let back = restarted.elapsed();
    more_acks(&progress, 50, "writes after b is back").await;
    rows.push(Row::new(
        "b crashed, then started again",
        before,
        window(&progress),
        Some(dropped),
        back,
    ));

    stop.cancel();
    let report = load.await.expect("load");
    let base = format!("https://{}", layout.facade);
    let (status, stored) = get_messages_at(&base, &["--cacert", &ca]);
    assert_eq!(status, 200, "pages");
    let (lab_status, lab, _) = get_lab_at(&base, &["--cacert", &ca]);
    assert_eq!(lab_status, 200, "the lab GET");
    let outcome = audit(&report.acked, &stored);
    let attacks = attacks_from_e(&layout);

    println!();
    println!(
        "partitions: {CLIENTS} closed-loop clients on d, {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    println!("| fault | acknowledged | 503 (retried) | instance dropped by the replicas that cannot hear it | every replica lists all again after the heal |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} s |",
            row.fault,
            row.acked,
            row.rejected,
            row.dropped
                .map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
            row.back.as_secs_f64()
        );
    }
    println!(
        "| all | {} | {} | lost {}, duplicated {}, failed {} | |",
        report.acked.len(),
        report.retried_503,
        outcome.lost,
        outcome.duplicated,
        report.failed.len()
    );

    println!();
    println!(
        "attacks from host e, which has none of the layout's keys but a messages certificate:"
    );
    attacks.finish();
    assert!(report.failed.is_empty(), "failed: {:?}", report.failed);
    assert_eq!(outcome.lost, 0, "acknowledged and lost");
    assert_eq!(outcome.duplicated, 0, "stored twice");
    assert_eq!(lab.len(), stored.len(), "the lab GET and the pages agree");
    for row in &rows {
        assert_eq!(
            row.rejected, 0,
            "{}: requests answered 503 while d reached a quorum",
            row.fault
        );
        // A replica that cannot hear an instance drops it within the TTL (its last
        // heartbeat came before the cut; the slack is this test's polling).
        if let Some(dropped) = row.dropped {
            assert!(
                dropped <= TTL + HEARTBEAT / 2,
                "{}: dropped after {dropped:?}",
                row.fault
            );
        }
    }
    // Healed, every replica lists every instance again within the TTL and a heartbeat.
    for row in &rows[..3] {
        assert!(
            row.back <= TTL + HEARTBEAT,
            "{}: back after {:?}",
            row.fault,
            row.back
        );
    }
    let _ = std::fs::remove_dir_all(&layout.data);
}

/// From host e, a fifth host with none of the layout's keys, except one stolen
/// certificate (messages on a): every way in is refused. Runs on a thread of its own
/// inside e's namespace, so every connection and every process it starts is e's.
fn attacks_from_e(layout: &Layout) -> Verdicts {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                layout.hosts.enter("e").expect("onto host e");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(attacks(layout))
            })
            .join()
            .expect("the attacks ran")
    })
}

async fn attacks(layout: &Layout) -> Verdicts {
    let mut attacks = Verdicts::default();
    let mut record = |what: String, refused: bool, seen: String| {
        attacks.check(what, "refused", refused, seen);
    };
    let grpcurl = |flags: &[&str], addr: &str, method: &str, body: Option<&str>| {
        let mut command = std::process::Command::new(e2e::grpcurl_path());
        command
            .args(flags)
            .args(["-connect-timeout", "2", "-max-time", "5"]);
        if let Some(body) = body {
            command.args(["-d", body]);
        }
        let output = command
            .arg(addr)
            .arg(method)
            .output()
            .expect("grpcurl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    let ca = layout.certs.ca();
    let internal = [
        ("config-server on a", format!("{}:50050", layout.ip("a"))),
        ("logging on a", format!("{}:50051", layout.ip("a"))),
        ("messages on a", format!("{}:50060", layout.ip("a"))),
    ];
    let health = "grpc.health.v1.Health/Check";
    for (name, addr) in &internal {
        let (ok, seen) = grpcurl(&["-plaintext"], addr, health, None);
        record(format!("plaintext gRPC to {name}"), !ok, seen);
        let (ok, seen) = grpcurl(&["-cacert", &ca], addr, health, None);
        record(
            format!("TLS without a client certificate to {name}"),
            !ok,
            seen,
        );
    }
    let facade = layout.facade.to_string();
    let (ok, seen) = grpcurl(&["-plaintext"], &facade, health, None);
    record("plaintext gRPC to the facade".into(), !ok, seen);
    let code = e2e::http_code(
        &format!("http://{facade}/messages"),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"msg":"from e"}"#,
        ],
    );
    record("plain-HTTP POST to the facade".into(), code == "000", code);

    // A stolen messages certificate, used on the registry.
    let registry = format!("{}:50050", layout.ip("a"));
    let stolen = [
        "-cacert".to_owned(),
        ca.clone(),
        "-cert".into(),
        layout.certs.file("a", "messages.pem"),
        "-key".into(),
        layout.certs.file("a", "messages.key"),
    ];
    let stolen: Vec<&str> = stolen.iter().map(String::as_str).collect();
    let (_, listed) = grpcurl(
        &stolen,
        &registry,
        "registry.v1.Registry/Lookup",
        Some(r#"{"service":"logging"}"#),
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
    let victim = listed["instances"]
        .as_array()
        .and_then(|instances| {
            instances
                .iter()
                .find(|i| i["address"] == layout.logging_of("a").as_str())
        })
        .and_then(|instance| instance["instanceId"].as_str())
        .unwrap_or("logging-a's id unknown")
        .to_owned();
    let denied = |(ok, seen): (bool, String)| (!ok && seen.contains("PermissionDenied"), seen);
    let steal = format!(
        r#"{{"service":"logging","address":"{}:50051","instanceId":"{victim}"}}"#,
        layout.ip("e")
    );
    let (refused, seen) = denied(grpcurl(
        &stolen,
        &registry,
        "registry.v1.Registry/Register",
        Some(&steal),
    ));
    record(
        "messages' certificate registers logging-a's id".into(),
        refused,
        seen,
    );
    let (refused, seen) = denied(grpcurl(
        &stolen,
        &registry,
        "registry.v1.Registry/Register",
        Some(&format!(
            r#"{{"service":"config-server","address":"{}:50050"}}"#,
            layout.ip("e")
        )),
    ));
    record(
        "messages' certificate registers config-server".into(),
        refused,
        seen,
    );
    let (refused, seen) = denied(grpcurl(
        &stolen,
        &registry,
        "registry.v1.Registry/Deregister",
        Some(&format!(r#"{{"instanceId":"{victim}"}}"#)),
    ));
    record(
        "messages' certificate deregisters logging-a".into(),
        refused,
        seen,
    );

    // NATS: no user, and a node of its own routed at the cluster.
    let nats = format!("tls://{}:4222", layout.ip("a"));
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone().into())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(2))
        .connect(nats.as_str())
        .await;
    record(
        "anonymous NATS connect to a".into(),
        anonymous.is_err(),
        format!("{:?}", anonymous.err()),
    );
    let logging = Credentials {
        tls: Some((
            ca.clone().into(),
            layout.certs.file("a", "logging.pem").into(),
            layout.certs.file("a", "logging.key").into(),
        )),
        nkey_seed: Some(layout.certs.seed("a/logging.nk")),
    };
    match logging
        .options()
        .connection_timeout(Duration::from_secs(2))
        .connect(nats.as_str())
        .await
    {
        Ok(client) => {
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                client.request("$JS.API.STREAM.DELETE.MESSAGES", "{}".into()),
            )
            .await;
            let kept = async_nats::jetstream::new(client)
                .get_stream("MESSAGES")
                .await
                .map(|stream| stream.cached_info().state.messages);
            record(
                "logging's own user deletes the stream".into(),
                !matches!(answer, Ok(Ok(_))) && kept.as_ref().is_ok_and(|count| *count > 0),
                format!("answer {answer:?}; messages after: {kept:?}"),
            );
        }
        Err(error) => record(
            "logging's own user deletes the stream".into(),
            false,
            format!("could not even connect: {error}"),
        ),
    }
    let routes = e2e::rogue_routes(
        &layout.ip("e"),
        4222,
        &format!("{}:6222", layout.ip("a")),
        &layout.data.join("rogue"),
    )
    .await;
    record(
        "a rogue nats-server on e joining the routes".into(),
        routes == 0,
        format!("num_routes {routes}"),
    );
    attacks
}
