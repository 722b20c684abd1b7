//! `runner lab`: the lab's experiment in one command, on a fresh data directory and free
//! ports. It starts the system with three logging instances, POSTs msg1 to msg10,
//! shows which instance stored each (from the instances' own log lines), reads them
//! back, then stops one logging instance with its NATS node and a second with its own,
//! reading all ten again after each, and checks that a POST is refused once the store
//! has no quorum. It ends with a verdict table and exits 0 only if every row passes.
//!
//! The services' output goes to log files in the lab's directory (named at the end), so
//! the terminal shows the experiment. With `--store memory` the same expectations fail,
//! and the rows say why: that store keeps each message on one instance only.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::rt::TokioIo;
use registry_client::RegistryClient;
use retry::{Retry, RetryError};
use tokio_util::sync::CancellationToken;

use crate::{Config, Plan, Running, StoreMode, StorePlan};

/// How long one HTTP call of the lab may take: longer than the facade's retry budget
/// (30 s), which a POST without a store quorum spends before its 503.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the lab waits for the registry or the logs to show what it expects.
const WAIT: Duration = Duration::from_secs(30);
/// How often such a wait looks again.
const POLL: Duration = Duration::from_millis(50);
/// How often a wait says it is still waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
const MESSAGES: usize = 10;

#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// The store: NATS JetStream R3 (auto: when nats-server is installed), or memory, to
    /// see what a store without replication loses.
    #[arg(long, value_enum, default_value_t = StoreMode::Auto)]
    pub store: StoreMode,

    /// Leave the system running after the verdict, to explore with the README, until
    /// Ctrl+C.
    #[arg(long)]
    pub keep: bool,
}

/// One row of the verdict.
struct Row {
    step: String,
    expected: String,
    seen: String,
    pass: bool,
}

/// Runs the experiment; `Ok(true)` when every row passed. Everything started is stopped
/// before it returns (with `--keep`, at Ctrl+C), also when it is interrupted.
pub async fn run(args: LabArgs, shutdown: CancellationToken) -> anyhow::Result<bool> {
    let dir = std::env::temp_dir().join(format!("runner-lab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut plan = Plan::new(&config(&args, &dir)?)?;
    plan.logs = Some(dir.clone());
    for service in plan
        .services
        .iter_mut()
        .filter(|s| s.name.starts_with("logging-"))
    {
        service
            .args
            .extend(["--log-format".to_owned(), "json".to_owned()]);
    }
    println!(
        "lab: starting the system on free ports; services log to {}",
        dir.display()
    );
    let mut running = Running::new();
    let outcome = async {
        running.start(&plan, &shutdown).await?;
        let rows = tokio::select! {
            rows = experiment(&plan, &mut running) => rows?,
            () = shutdown.cancelled() => anyhow::bail!("interrupted"),
        };
        print_verdict(&rows);
        let passed = rows.iter().all(|row| row.pass);
        if args.keep {
            plan.print_ready();
            println!(
                "lab: --keep: the system stays up (what was stopped stays stopped) until Ctrl+C"
            );
            running.supervise(&shutdown).await;
        }
        anyhow::Ok(passed)
    }
    .await;
    running.stop().await;
    match &outcome {
        Ok(true) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        _ => println!("lab: the services' logs are kept in {}", dir.display()),
    }
    outcome
}

/// The runner's flags for the lab: free ports, three logging instances, one registry,
/// and every file of the run in `dir`.
fn config(args: &LabArgs, dir: &Path) -> anyhow::Result<Config> {
    let mut ports = FreePorts::default();
    Ok(Config {
        store: args.store,
        discovery: registry_client::DiscoveryMode::Watch,
        logging: 3,
        registries: 1,
        registry_port: ports.take(1)?,
        messages_port: ports.take(1)?,
        facade_port: ports.take(1)?,
        logging_port: ports.take(3)?,
        nats_port: ports.take(3)?,
        nats_cluster_port: ports.take(3)?,
        token_file: dir.join("registry.token"),
        replicas_file: dir.join("registry.replicas"),
        data_dir: dir.join("nats"),
        bin_dir: None,
        tls: None,
        command: None,
    })
}

/// Runs of consecutive free ports on 127.0.0.1, held until all are chosen so that no
/// two runs overlap.
#[derive(Default)]
struct FreePorts(Vec<TcpListener>);

impl FreePorts {
    /// The first of `count` consecutive free ports.
    fn take(&mut self, count: u16) -> anyhow::Result<u16> {
        for _ in 0..100 {
            let first = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let Some(last) = first.checked_add(count - 1) else {
                continue;
            };
            let run: Result<Vec<TcpListener>, _> = (first..=last)
                .map(|port| TcpListener::bind(("127.0.0.1", port)))
                .collect();
            if let Ok(run) = run {
                self.0.extend(run);
                return Ok(first);
            }
        }
        anyhow::bail!("found no {count} consecutive free ports on 127.0.0.1")
    }
}

/// The experiment, row by row; it goes on after a failed row, so the table shows every
/// step.
async fn experiment(plan: &Plan, running: &mut Running) -> anyhow::Result<Vec<Row>> {
    let nats = matches!(plan.store, StorePlan::Nats { .. });
    let registry = RegistryClient::new(&format!("http://{}", plan.replicas[0]))?;
    let logging: Vec<&crate::Service> = plan
        .services
        .iter()
        .filter(|s| s.name.starts_with("logging-"))
        .collect();
    let logs_dir = plan.logs.as_deref().context("the lab keeps logs")?;
    let mut rows = Vec::new();

    let listed = wait_listed(&registry, logging.len()).await;
    rows.push(Row {
        step: "start three logging instances".into(),
        expected: format!(
            "3 listed by the registry; store: {}",
            if nats {
                "NATS JetStream, 3 nodes (R3)"
            } else {
                "memory"
            }
        ),
        seen: format!("{listed} listed"),
        pass: listed == 3,
    });

    println!("lab: POST msg1 to msg10");
    let mut ids = Vec::new();
    let mut statuses = BTreeMap::<u16, usize>::new();
    for i in 1..=MESSAGES {
        let body = format!(r#"{{"msg":"msg{i}"}}"#);
        let (status, reply) = http(&plan.facade, "POST", "/messages", Some(&body)).await?;
        *statuses.entry(status).or_default() += 1;
        let id = serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|reply| reply["id"].as_str().map(str::to_owned));
        if let (201, Some(id)) = (status, id) {
            ids.push((format!("msg{i}"), id));
        }
    }
    rows.push(Row {
        step: "POST msg1 .. msg10".into(),
        expected: "10 x 201".into(),
        seen: counts(&statuses),
        pass: statuses.get(&201) == Some(&MESSAGES),
    });

    let stored = wait_stored(logs_dir, &logging, &ids).await;
    println!("lab: who stored what, as the instances' logs say:");
    for (msg, id) in &ids {
        let by = logging
            .iter()
            .find(|service| stored.get(id) == Some(&service.name))
            .map_or("(no instance reports it)".to_owned(), |service| {
                format!("{} ({})", service.name, service.addr)
            });
        println!("  {msg:<6} {id}  {by}");
    }
    let mut per_instance = BTreeMap::<&str, usize>::new();
    for by in stored.values() {
        *per_instance.entry(by.as_str()).or_default() += 1;
    }
    let spread = per_instance
        .iter()
        .map(|(by, n)| format!("{n} by {by}"))
        .collect::<Vec<_>>()
        .join(", ");
    rows.push(Row {
        step: "each message stored by one instance".into(),
        expected: "10 of 10, reported by the instance that stored it".into(),
        seen: format!("{} of {}: {spread}", stored.len(), ids.len()),
        pass: stored.len() == MESSAGES && ids.len() == MESSAGES,
    });

    rows.push(read_all("GET /messages", &plan.facade, nats).await?);

    for (nth, (instance, node)) in logging.iter().zip(["nats-1", "nats-2"]).enumerate() {
        let mut stopped = vec![instance.name.as_str()];
        if nats {
            stopped.push(node);
        }
        println!("lab: stopping {}", stopped.join(" and "));
        for name in &stopped {
            running.stop_child(name).await;
        }
        wait_listed(&registry, logging.len() - nth - 1).await;
        let step = format!("stop {}; GET /messages", stopped.join(" + "));
        rows.push(read_all(&step, &plan.facade, nats).await?);
    }

    let step = if nats {
        println!(
            "lab: POST msg11 with one store node of three. The store keeps no data it cannot \
             replicate: one node is no quorum, so the facade retries for its retry budget \
             (30 s) and then answers 503. Waiting for that answer."
        );
        "POST msg11 with one store node left"
    } else {
        println!("lab: POST msg11 with one logging instance left");
        "POST msg11 with one instance left"
    };
    let started = Instant::now();
    let (status, _) = with_progress(
        "the facade's answer",
        http(
            &plan.facade,
            "POST",
            "/messages",
            Some(r#"{"msg":"msg11"}"#),
        ),
    )
    .await?;
    rows.push(Row {
        step: step.into(),
        expected: "503: no quorum, nothing stored".into(),
        seen: match status {
            503 => format!("503 after {:.1} s", started.elapsed().as_secs_f64()),
            201 if !nats => "201: the memory store stores without replicating".into(),
            other => other.to_string(),
        },
        pass: status == 503,
    });
    Ok(rows)
}

/// GET /messages as one row: all ten, in order, or what is missing and why.
async fn read_all(step: &str, facade: &str, nats: bool) -> anyhow::Result<Row> {
    println!("lab: {step}");
    let (status, body) =
        with_progress("GET /messages", http(facade, "GET", "/messages", None)).await?;
    let logs: Vec<String> = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::from_value(v["logs"].clone()).ok())
        .unwrap_or_default();
    let expected: Vec<String> = (1..=MESSAGES).map(|i| format!("msg{i}")).collect();
    let pass = status == 200 && logs == expected;
    let seen = if pass {
        "msg1 .. msg10".to_owned()
    } else if status != 200 {
        format!("{status}: {body}")
    } else {
        let why = if nats {
            "messages missing"
        } else {
            "the memory store keeps each message only on the instance that took it"
        };
        format!("{} of 10 ({}): {why}", logs.len(), logs.join(" "))
    };
    Ok(Row {
        step: step.to_owned(),
        expected: "msg1 .. msg10, in order".into(),
        seen,
        pass,
    })
}

/// Waits until the registry lists `count` logging instances (or [`WAIT`] passes);
/// returns how many it lists.
async fn wait_listed(registry: &RegistryClient, count: usize) -> usize {
    let listed = || async {
        registry
            .lookup("logging")
            .await
            .map_or(0, |reply| reply.instances.len())
    };
    wait_until(listed, |seen| *seen == count).await
}

/// Which instance stored each of `ids`, from the "stored" lines of the instances' JSON
/// logs; waits until every id is reported (or [`WAIT`] passes), since log lines are
/// written a moment after the answer.
async fn wait_stored(
    dir: &Path,
    logging: &[&crate::Service],
    ids: &[(String, String)],
) -> BTreeMap<String, String> {
    let reported = || async { stored_by(dir, logging) };
    let mut stored = wait_until(reported, |stored| {
        ids.iter().all(|(_, id)| stored.contains_key(id))
    })
    .await;
    stored.retain(|id, _| ids.iter().any(|(_, ours)| ours == id));
    stored
}

/// Every id the instances' logs say they stored, with the instance's name.
fn stored_by(dir: &Path, logging: &[&crate::Service]) -> BTreeMap<String, String> {
    let mut stored = BTreeMap::new();
    for service in logging {
        let text =
            std::fs::read_to_string(dir.join(format!("{}.log", service.name))).unwrap_or_default();
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if line["message"] == "stored" {
                if let Some(id) = line["id"].as_str() {
                    stored.insert(id.to_owned(), service.name.clone());
                }
            }
        }
    }
    stored
}

/// What a wait saw when it was not yet what it waits for.
struct NotYet<T>(T);

impl<T> std::fmt::Display for NotYet<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not yet")
    }
}

/// Looks with `look` every [`POLL`] (the system's one retry loop) until `done` holds for
/// what it sees or [`WAIT`] passes; returns what it saw last. Ctrl+C ends the whole
/// experiment (see [`run`]), so the wait has no token of its own.
async fn wait_until<T, F, Fut>(look: F, done: impl Fn(&T) -> bool) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let waiting = Retry::new("lab: waiting", &CancellationToken::new())
        .backoff(POLL, POLL)
        .budget(WAIT)
        .quiet();
    let seen = waiting
        .run(
            || {
                let (seen, done) = (look(), &done);
                async move {
                    let seen = seen.await;
                    if done(&seen) {
                        Ok(seen)
                    } else {
                        Err(NotYet(seen))
                    }
                }
            },
            |_| false,
        )
        .await;
    match seen {
        Ok(seen)
        | Err(RetryError::Exhausted {
            last: NotYet(seen), ..
        })
        | Err(RetryError::Permanent(NotYet(seen))) => seen,
        Err(RetryError::Cancelled) => unreachable!("the token is never cancelled"),
    }
}

/// `call`, saying every few seconds that it is still waiting for `what`.
async fn with_progress<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    tokio::pin!(call);
    loop {
        tokio::select! {
            result = &mut call => return result,
            () = tokio::time::sleep(PROGRESS_EVERY) => {
                println!("lab:   still waiting for {what} ({} s)", started.elapsed().as_secs());
            }
        }
    }
}

/// One HTTP/1.1 call to `addr`; the status and body.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .with_context(|| format!("{method} {path}: no answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("{method} http://{addr}{path}"))
}

/// "10 x 201", "7 x 201, 3 x 503".
fn counts(statuses: &BTreeMap<u16, usize>) -> String {
    statuses
        .iter()
        .map(|(status, n)| format!("{n} x {status}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_verdict(rows: &[Row]) {
    let width = |column: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|row| column(row).chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let step = width(|row| &row.step, "step");
    let expected = width(|row| &row.expected, "expected");
    let seen = width(|row| &row.seen, "seen");
    println!();
    println!(
        "{:<step$} | {:<expected$} | {:<seen$} | pass",
        "step", "expected", "seen"
    );
    println!("{}", "-".repeat(step + expected + seen + 13));
    for row in rows {
        let pass = if row.pass { "yes" } else { "NO" };
        println!(
            "{:<step$} | {:<expected$} | {:<seen$} | {pass}",
            row.step, row.expected, row.seen
        );
    }
    let failed = rows.iter().filter(|row| !row.pass).count();
    println!();
    if failed == 0 {
        println!("lab: verdict: PASS, all {} steps", rows.len());
    } else {
        println!("lab: verdict: FAIL, {failed} of {} steps", rows.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_runs_do_not_overlap() {
        let mut ports = FreePorts::default();
        let a = ports.take(3).expect("three ports");
        let b = ports.take(3).expect("three more");
        assert!(a + 3 <= b || b + 3 <= a, "{a} and {b} overlap");
    }

    #[test]
    fn statuses_are_counted_in_order() {
        let statuses = BTreeMap::from([(503, 3), (201, 7)]);
        assert_eq!(counts(&statuses), "7 x 201, 3 x 503");
    }
}
