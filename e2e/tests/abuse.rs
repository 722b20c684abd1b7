//! A hostile client against the whole system (NATS store, three logging instances, every
//! limit at its default), while a well-behaved client goes on.
//!
//! The attacker connects from 127.0.0.2, the well-behaved client from 127.0.0.1: both
//! loopback, two peer addresses, so the per-peer limits tell them apart. The attacker,
//! one thing after another:
//! - opens 5,000 idle TCP connections to each port;
//! - opens 20,000 Watch streams on the config server;
//! - sends HTTP headers one byte a second on 200 connections;
//! - sends a gRPC request message over each service's limit;
//! - floods the facade with 3,000 concurrent POSTs;
//! - runs 64 concurrent full reads of a log of 60 KiB messages.
//!
//! Meanwhile the well-behaved client looks logging up every 20 ms, POSTs every 100 ms and
//! reads a page every 200 ms, on its own thread. Its Lookup p99 must stay within 100 ms,
//! none of its POSTs may fail, nothing stored may be lost, every service must stay up,
//! and every service's RSS stays under the bound asserted here.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use e2e::{curl, curl_post, metric, procfs, verdicts::Verdicts, wait_serving, Nats, System};
use futures_util::future::join_all;
use parking_lot::Mutex;
use proto::{
    facade::v1::{facade_client::FacadeClient, PostRequest},
    logging::v1::{logging_client::LoggingClient, AppendRequest},
    registry::v1::{registry_client::RegistryClient, LookupRequest, RegisterRequest, WatchRequest},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tonic::{transport::Channel, Code};

/// The attacker's address.
const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
/// The defaults the suite expects (rpc::ServeLimits, the services' own).
const CONNECTIONS_PER_PEER: usize = 512;
const WATCHES_PER_PEER: usize = 256;
const FACADE_FULL_READS: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Big messages in the log the full reads read.
const BIG: usize = 300;
const BIG_BYTES: usize = 60 * 1024;
/// No service may grow by more than this while big messages stream (issue target).
const STREAM_GROWTH_MIB: f64 = 64.0;
/// No service's RSS may pass this at any time during the suite.
const RSS_BOUND_MIB: f64 = 160.0;

/// Lets this process hold every connection the attacker opens at once.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    assert!(
        hard >= 6000,
        "the suite needs 6000 open files, the hard limit is {hard}"
    );
}

/// A TCP connection from the attacker's address.
async fn connect_from_attacker(to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ATTACKER, 0))?;
    socket.connect(to).await
}

/// A gRPC channel from the attacker's address.
fn attacker_channel(to: SocketAddr) -> Channel {
    rpc::endpoint(&to.to_string())
        .expect("endpoint")
        .local_address(Some(ATTACKER))
        .connect_lazy()
}

/// Waits until the server closed `stream`, connected at `started` (a read answers
/// end-of-file or an error); how long it was open, or `None` if it is still open after
/// `limit`.
async fn closed_within(
    (mut stream, started): (TcpStream, Instant),
    limit: Duration,
) -> Option<Duration> {
    let mut byte = [0; 1];
    let deadline = tokio::time::Instant::from_std(started + limit);
    match tokio::time::timeout_at(deadline, stream.read(&mut byte)).await {
        Ok(Ok(0) | Err(_)) => Some(started.elapsed()),
        Ok(Ok(_)) => None, // it answered something: not closed
        Err(_) => None,
    }
}

/// The largest RSS each process reached since the sampler started.
struct Sampler {
    peaks: Arc<Mutex<Vec<(String, u32, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(processes: Vec<(String, u32)>) -> Self {
        let peaks = Arc::new(Mutex::new(
            processes
                .into_iter()
                .map(|(name, pid)| (name, pid, 0.0_f64))
                .collect::<Vec<_>>(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (peaks, stop) = (Arc::clone(&peaks), Arc::clone(&stop));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    for (_, pid, peak) in peaks.lock().iter_mut() {
                        *peak = peak.max(procfs::rss_mib(*pid));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Self {
            peaks,
            stop,
            thread: Some(thread),
        }
    }

    /// Each process's peak so far, and forgets them (the next phase starts at zero).
    fn take(&self) -> Vec<(String, f64)> {
        let mut peaks = self.peaks.lock();
        let taken = peaks
            .iter()
            .map(|(name, _, peak)| (name.clone(), *peak))
            .collect();
        for (_, _, peak) in peaks.iter_mut() {
            *peak = 0.0;
        }
        taken
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the well-behaved client saw.
#[derive(Default)]
struct Seen {
    lookups: Vec<Duration>,
    lookup_errors: Vec<String>,
    posted: Vec<String>,
    post_errors: Vec<String>,
    pages: usize,
    page_errors: Vec<String>,
}

/// The well-behaved client, on a thread and runtime of its own, until `stop`.
fn well_behaved(
    registry: SocketAddr,
    facade: SocketAddr,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Seen> {
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut seen = Seen::default();
            let mut lookups =
                RegistryClient::new(rpc::channel(&registry.to_string()).expect("channel"));
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let lookup = lookups.lookup(LookupRequest {
                    service: "logging".into(),
                });
                match tokio::time::timeout(Duration::from_secs(5), lookup).await {
                    Ok(Ok(_)) => seen.lookups.push(started.elapsed()),
                    Ok(Err(status)) => seen.lookup_errors.push(format!("{status:?}")),
                    Err(_) => seen.lookup_errors.push("no answer in 5 s".into()),
                }
                if tick.is_multiple_of(5) {
                    let msg = format!("well-behaved {tick}");
                    let (code, body) = tokio::task::spawn_blocking(move || curl_post(facade, &msg))
                        .await
                        .expect("curl");
                    match body["id"].as_str() {
                        Some(id) if code == 201 => seen.posted.push(id.to_owned()),
                        _ => seen.post_errors.push(format!("{code} {body}")),
                    }
                }
                if tick.is_multiple_of(10) {
                    let url = format!("http://{facade}/v1/messages?limit=10");
                    let (code, _, body) =
                        tokio::task::spawn_blocking(move || curl("GET", &url, &[]))
                            .await
                            .expect("curl");
                    if code == 200 {
                        seen.pages += 1;
                    } else {
                        seen.page_errors.push(format!("{code} {body}"));
                    }
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    })
}

/// 5,000 idle connections to `port`: at most the per-peer limit stay open at once, and
/// those are closed after the header timeout. Opening them all may take longer than
/// the header timeout on a loaded machine; a slot freed by a timeout meanwhile may then
/// hold one more, so the refusals expected are counted from the timeouts seen.
async fn idle_connections(verdicts: &mut Verdicts, name: &str, port: SocketAddr) {
    let refused_before = metric(port, "rpc_connections_refused_total").unwrap_or(0.0);
    let timeouts_before = metric(port, "rpc_header_timeouts_total").unwrap_or(0.0);
    let started = Instant::now();
    let mut open = Vec::new();
    for _ in 0..5000 {
        if let Ok(stream) = connect_from_attacker(port).await {
            open.push((stream, Instant::now()));
        }
    }
    let opening = started.elapsed();
    let opened = open.len();
    let refused = metric(port, "rpc_connections_refused_total").unwrap_or(0.0) - refused_before;
    let freed = metric(port, "rpc_header_timeouts_total").unwrap_or(0.0) - timeouts_before;
    verdicts.check(
        format!("5,000 idle connections to {name}"),
        "all but the per-peer limit closed at once",
        opened == 5000 && refused >= (5000 - CONNECTIONS_PER_PEER) as f64 - freed,
        format!(
            "{opened} connected in {opening:.1?}, {refused} refused by the server, {freed} \
             slots freed by header timeouts meanwhile"
        ),
    );
    let closed = join_all(
        open.into_iter()
            .map(|stream| closed_within(stream, HEADER_TIMEOUT + Duration::from_secs(10))),
    )
    .await;
    let still_open = closed.iter().filter(|c| c.is_none()).count();
    let slowest = closed.iter().flatten().max().copied().unwrap_or_default();
    let timed_out = metric(port, "rpc_header_timeouts_total").unwrap_or(0.0) - timeouts_before;
    verdicts.check(
        format!("the held connections to {name}, silent"),
        "closed after the header timeout (10 s), counted",
        still_open == 0
            && slowest >= HEADER_TIMEOUT - Duration::from_secs(1)
            && timed_out >= (5000.0 - refused),
        format!(
            "{still_open} still open; the last closed after {slowest:.1?}; {timed_out} \
             header timeouts counted"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_holds_nothing_that_starves_a_well_behaved_one() {
    raise_fd_limit();
    let nats = Nats::cluster(3).await;
    let system = System::start_with_store(3, &[], &nats.urls()).await;
    let mut verdicts = Verdicts::default();

    // The log the full reads read: 300 messages of 60 KiB, stored through the facade.
    let big: Vec<String> = (0..BIG)
        .map(|i| format!("{i:04}{}", "b".repeat(BIG_BYTES - 4)))
        .collect();
    let facade = system.facade;
    let seeded = tokio::task::spawn_blocking({
        let big = big.clone();
        move || {
            big.iter()
                .filter(|text| curl_post(facade, text).0 == 201)
                .count()
        }
    })
    .await
    .expect("seed");
    assert_eq!(seeded, BIG, "every big message stored");

    let mut processes = vec![
        (
            "config-server".to_owned(),
            system.registry_proc.pid().as_raw() as u32,
        ),
        (
            "messages".to_owned(),
            system.messages_proc.pid().as_raw() as u32,
        ),
        (
            "facade".to_owned(),
            system.facade_proc.pid().as_raw() as u32,
        ),
    ];
    for (i, (_, proc)) in system.logging.iter().enumerate() {
        processes.push((format!("logging {}", i + 1), proc.pid().as_raw() as u32));
    }
    let rss_before: Vec<(String, f64)> = processes
        .iter()
        .map(|(name, pid)| (name.clone(), procfs::rss_mib(*pid)))
        .collect();
    let sampler = Sampler::start(processes.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let client = well_behaved(system.registry, system.facade, Arc::clone(&stop));
    let mut peaks: Vec<(String, f64)> = Vec::new();
    let mut keep_peaks = |phase: Vec<(String, f64)>| {
        for (name, peak) in phase {
            match peaks.iter_mut().find(|(n, _)| *n == name) {
                Some((_, most)) => *most = most.max(peak),
                None => peaks.push((name, peak)),
            }
        }
    };

    // Idle connections, port by port.
    let logging_1 = system.logging[0].0;
    for (name, port) in [
        ("config-server", system.registry),
        ("facade", system.facade),
        ("messages", system.messages),
        ("logging", logging_1),
    ] {
        idle_connections(&mut verdicts, name, port).await;
    }
    keep_peaks(sampler.take());

    // 20,000 Watches over 100 connections: the per-peer limit holds, the rest refused.
    let channels: Vec<Channel> = (0..100)
        .map(|_| attacker_channel(system.registry))
        .collect();
    let watches = join_all((0..20_000).map(|i| {
        let mut client = RegistryClient::new(channels[i % channels.len()].clone());
        async move {
            let opened = client
                .watch(WatchRequest {
                    service: "logging".into(),
                })
                .await;
            match opened {
                Ok(stream) => Ok(stream.into_inner()),
                Err(status) => Err(status.code()),
            }
        }
    }))
    .await;
    let held = watches.iter().filter(|w| w.is_ok()).count();
    let exhausted = watches
        .iter()
        .filter(|w| matches!(w, Err(Code::ResourceExhausted)))
        .count();
    verdicts.check(
        "20,000 Watches from one address",
        "256 held, the rest RESOURCE_EXHAUSTED",
        held == WATCHES_PER_PEER && exhausted == 20_000 - WATCHES_PER_PEER,
        format!("{held} held, {exhausted} RESOURCE_EXHAUSTED"),
    );
    let counted = metric(system.registry, "registry_watches_refused_total").unwrap_or(0.0);
    verdicts.check(
        "the Watch refusals, counted",
        "registry_watches_refused_total",
        counted >= exhausted as f64,
        format!("{counted}"),
    );
    keep_peaks(sampler.take());

    // Slow headers: a byte a second on 200 connections; each closed by the timeout.
    let slow = join_all((0..200).map(|_| async {
        let mut stream = connect_from_attacker(system.facade).await.ok()?;
        let started = Instant::now();
        let request = b"GET /messages HTTP/1.1\r\nHost: facade\r\nX-Slow: ";
        stream.write_all(request).await.ok()?;
        loop {
            if started.elapsed() > HEADER_TIMEOUT + Duration::from_secs(10) {
                return None; // never closed
            }
            tokio::time::sleep(Duration::from_secs(1)).await; // the attack's pace, not a settle
            if stream.write_all(b"x").await.is_err() {
                return Some(started.elapsed());
            }
            let mut byte = [0; 512];
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await {
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => return Some(started.elapsed()), // answered (408): closing
                Err(_) => {}
            }
        }
    }))
    .await;
    let cut = slow.iter().flatten().count();
    let longest = slow.iter().flatten().max().copied().unwrap_or_default();
    verdicts.check(
        "200 connections sending headers a byte a second",
        "each closed by the 10 s header timeout",
        cut == 200 && longest <= HEADER_TIMEOUT + Duration::from_secs(3),
        format!("{cut} closed, the last after {longest:.1?}"),
    );
    drop(watches);
    keep_peaks(sampler.take());

    // Oversized gRPC request messages, to every service with a request to oversize.
    let refused_before: f64 = [system.registry, system.facade, logging_1]
        .iter()
        .map(|addr| metric(*addr, "rpc_request_bytes_refused_total").unwrap_or(0.0))
        .sum();
    let register = RegistryClient::new(attacker_channel(system.registry))
        .register(RegisterRequest {
            service: "x".into(),
            address: "127.0.0.1:1".into(),
            metadata: [("k".to_owned(), "v".repeat(100 * 1024))].into(),
            instance_id: String::new(),
        })
        .await;
    let post = FacadeClient::new(attacker_channel(system.facade))
        .post(PostRequest {
            msg: "p".repeat(1024 * 1024),
            idempotency_key: String::new(),
        })
        .await;
    let append = LoggingClient::new(attacker_channel(logging_1))
        .max_encoding_message_size(usize::MAX)
        .append(AppendRequest {
            id: "x".into(),
            text: "a".repeat(5 * 1024 * 1024),
        })
        .await;
    for (what, got) in [
        ("a 100 KiB Register (limit 64 KiB)", register.map(|_| ())),
        ("a 1 MiB Post (limit 68 KiB)", post.map(|_| ())),
        ("a 5 MiB Append (limit 4 MiB)", append.map(|_| ())),
    ] {
        verdicts.check(
            what,
            "OUT_OF_RANGE, before it is decoded",
            matches!(&got, Err(status) if status.code() == Code::OutOfRange),
            format!("{got:?}"),
        );
    }
    let refused_after: f64 = [system.registry, system.facade, logging_1]
        .iter()
        .map(|addr| metric(*addr, "rpc_request_bytes_refused_total").unwrap_or(0.0))
        .sum();
    verdicts.check(
        "the oversized requests, counted",
        "rpc_request_bytes_refused_total, 3 more",
        refused_after - refused_before >= 3.0,
        format!("{}", refused_after - refused_before),
    );

    // A flood of POSTs over gRPC (h2: many at once on few connections).
    let channels: Vec<Channel> = (0..10).map(|_| attacker_channel(system.facade)).collect();
    let flood = join_all((0..3000).map(|i| {
        let mut client = FacadeClient::new(channels[i % channels.len()].clone());
        async move {
            client
                .post(PostRequest {
                    msg: format!("flood {i}"),
                    idempotency_key: String::new(),
                })
                .await
                .map(|reply| reply.into_inner().id)
                .map_err(|status| (status.code(), status.message().to_owned()))
        }
    }))
    .await;
    let stored = flood.iter().filter(|p| p.is_ok()).count();
    let busy = flood
        .iter()
        .filter(|p| matches!(p, Err((Code::Unavailable, m)) if m.contains("busy")))
        .count();
    verdicts.check(
        "3,000 concurrent POSTs from one address",
        "stored, or refused busy at once (1,024 in progress per peer)",
        stored + busy == 3000 && busy > 0,
        format!("{stored} stored, {busy} busy"),
    );
    keep_peaks(sampler.take());

    // 64 concurrent full reads of the big log, from the attacker's address.
    let rss_at: Vec<(String, f64)> = processes
        .iter()
        .map(|(name, pid)| (name.clone(), procfs::rss_mib(*pid)))
        .collect();
    let reads = join_all((0..64).map(|_| async {
        let mut stream = connect_from_attacker(system.facade).await.ok()?;
        let request = "GET /messages HTTP/1.1\r\nHost: facade\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut answer))
            .await
            .ok()?
            .ok()?;
        let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&answer[..head_end]).to_lowercase();
        let status: u16 = head.get(9..12)?.parse().ok()?;
        Some((
            status,
            head.contains("retry-after"),
            answer.len() - head_end,
        ))
    }))
    .await;
    let whole = reads
        .iter()
        .flatten()
        .filter(|(status, _, body)| *status == 200 && *body >= BIG * BIG_BYTES)
        .count();
    let refused = reads
        .iter()
        .flatten()
        .filter(|(status, retry_after, _)| *status == 503 && *retry_after)
        .count();
    verdicts.check(
        "64 concurrent full reads of 300 messages of 60 KiB",
        "each whole, or 503 with Retry-After (32 at once at most)",
        whole + refused == 64 && whole >= 16 && refused >= 64 - FACADE_FULL_READS,
        format!("{whole} whole, {refused} 503 with Retry-After"),
    );
    let phase = sampler.take();
    for ((name, peak), (_, at)) in phase.iter().zip(&rss_at) {
        verdicts.check(
            format!("{name} while the full reads stream"),
            "grows by 64 MiB at most",
            peak - at <= STREAM_GROWTH_MIB,
            format!("{at:.0} MiB, at most {peak:.0} MiB"),
        );
    }
    keep_peaks(phase);

    stop.store(true, Ordering::Relaxed);
    let seen = client.join().expect("the well-behaved client");
    drop(sampler);

    // The well-behaved client.
    let mut lookups = seen.lookups.clone();
    lookups.sort();
    let p99 = lookups
        .get(lookups.len() * 99 / 100)
        .copied()
        .unwrap_or_default();
    verdicts.check(
        "the well-behaved Lookups",
        "p99 100 ms at most, none failed",
        p99 <= Duration::from_millis(100) && seen.lookup_errors.is_empty() && lookups.len() > 100,
        format!(
            "{} lookups, p99 {p99:.1?}, errors {:?}",
            lookups.len(),
            seen.lookup_errors
        ),
    );
    verdicts.check(
        "the well-behaved POSTs",
        "none failed",
        seen.post_errors.is_empty() && seen.posted.len() > 20,
        format!(
            "{} stored, errors {:?}",
            seen.posted.len(),
            seen.post_errors
        ),
    );
    verdicts.check(
        "the well-behaved page reads",
        "none failed",
        seen.page_errors.is_empty() && seen.pages > 10,
        format!("{} read, errors {:?}", seen.pages, seen.page_errors),
    );

    // Every service is up, nothing stored was lost.
    for (name, addr) in [
        ("config-server", system.registry),
        ("messages", system.messages),
        ("facade", system.facade),
    ] {
        let up = tokio::time::timeout(Duration::from_secs(10), wait_serving(addr))
            .await
            .is_ok();
        verdicts.check(format!("{name} afterwards"), "serving", up, String::new());
    }
    let (code, ids) = tokio::task::spawn_blocking(move || e2e::get_messages(facade))
        .await
        .expect("read");
    let texts: std::collections::HashSet<&str> =
        ids.iter().map(|(_, text)| text.as_str()).collect();
    let ids: std::collections::HashSet<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
    let lost_big = big
        .iter()
        .filter(|text| !texts.contains(text.as_str()))
        .count();
    let lost_posts = seen
        .posted
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .count();
    let lost_flood = flood
        .iter()
        .flatten()
        .filter(|id| !ids.contains(id.as_str()))
        .count();
    verdicts.check(
        "every message stored, read back",
        "none lost",
        code == 200 && lost_big == 0 && lost_posts == 0 && lost_flood == 0,
        format!("{lost_big} big, {lost_posts} well-behaved, {lost_flood} flood lost"),
    );
    for (name, peak) in &peaks {
        let before = rss_before
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, rss)| *rss);
        verdicts.check(
            format!("{name}'s RSS"),
            "under 160 MiB throughout",
            *peak < RSS_BOUND_MIB,
            format!("{before:.0} MiB before, at most {peak:.0} MiB"),
        );
    }
    verdicts.finish();
}
