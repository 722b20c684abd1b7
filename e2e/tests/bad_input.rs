//! Hostile input at every entry point of the running binaries. Each must be answered
//! with a clear 4xx / INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND, no process may
//! die, and the messages stored before must be intact afterwards.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use e2e::{curl, curl_post, free_addr, get_messages, wait_serving, Proc, System};
use proto::{
    logging::v1::{logging_client::LoggingClient, AppendRequest},
    registry::v1::{registry_client::RegistryClient, HeartbeatRequest, RegisterRequest},
};
use tonic::Code;

/// Writes `bytes` to `addr` and reads whatever comes back until the peer closes or
/// goes quiet.
fn throw_garbage(addr: SocketAddr, bytes: &[u8]) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        panic!("{addr} refused a connection");
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.write_all(bytes);
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// Deterministic pseudo-random bytes (no extra crate, same every run).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Every case of the hostile-input test, reported together: one failing case does not
/// hide the ones after it.
#[derive(Default)]
struct Cases {
    rows: Vec<(String, String, bool)>,
}

impl Cases {
    /// Records one case: what was thrown, what came back, and whether that was right.
    fn record(&mut self, what: impl Into<String>, got: impl Into<String>, ok: bool) {
        self.rows.push((what.into(), got.into(), ok));
    }

    /// Prints every case and fails the test, naming each wrong answer, if any was.
    fn finish(self) {
        for (what, got, ok) in &self.rows {
            println!("{} {what}: {got}", if *ok { "ok  " } else { "FAIL" });
        }
        let failed: Vec<String> = self
            .rows
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|(what, got, _)| format!("{what}: {got}"))
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} cases failed:\n{}",
            failed.len(),
            self.rows.len(),
            failed.join("\n")
        );
    }
}

/// The first 200 characters of a reply, for the report.
fn short(text: &str) -> String {
    text.chars().take(200).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_clearly_and_nothing_dies_or_is_lost() {
    let mut system = System::start(1, &[]).await;
    let facade = system.facade;
    let url = format!("http://{facade}/messages");
    let mut cases = Cases::default();

    let mut before = Vec::new();
    for i in 0..3 {
        let (status, reply) = curl_post(facade, &format!("keep me {i}"));
        assert_eq!(status, 201);
        before.push(reply["id"].as_str().expect("id").to_owned());
    }

    // --- HTTP: bodies and content types --------------------------------------------
    let dir = std::env::temp_dir().join(format!("bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ten_mb = dir.join("ten-mb.json");
    let huge = serde_json::json!({ "msg": "x".repeat(10 * 1024 * 1024) });
    std::fs::write(&ten_mb, huge.to_string()).expect("write");
    let non_utf8 = dir.join("non-utf8.json");
    std::fs::write(&non_utf8, b"{\"msg\":\"\xff\xfe\xfd\"}").expect("write");
    let random = dir.join("random.bin");
    std::fs::write(&random, noise(4096, 7)).expect("write");
    let at = |path: &std::path::Path| format!("@{}", path.display());

    let json = "content-type: application/json";
    let long_key = format!("Idempotency-Key: {}", "k".repeat(300));
    // (what, headers, body for --data-binary, expected status). A header "content-type:"
    // with no value stops curl from adding its form content type to the body.
    let http: Vec<(&str, Vec<&str>, String, u16)> = vec![
        ("empty body", vec![json], String::new(), 400),
        ("truncated JSON", vec![json], r#"{"msg":"hel"#.into(), 400),
        ("non-UTF-8 JSON", vec![json], at(&non_utf8), 400),
        ("random bytes as JSON", vec![json], at(&random), 400),
        ("msg is a number", vec![json], r#"{"msg":1}"#.into(), 400),
        (
            "msg is an array",
            vec![json],
            r#"{"msg":["a"]}"#.into(),
            400,
        ),
        (
            "msg is an object",
            vec![json],
            r#"{"msg":{"a":1}}"#.into(),
            400,
        ),
        ("msg is null", vec![json], r#"{"msg":null}"#.into(), 400),
        ("msg is empty", vec![json], r#"{"msg":""}"#.into(), 400),
        (
            "no msg field",
            vec![json],
            r#"{"message":"hi"}"#.into(),
            400,
        ),
        ("JSON null", vec![json], "null".into(), 400),
        ("JSON array", vec![json], r#"[{"msg":"hi"}]"#.into(), 400),
        ("JSON string", vec![json], r#""hi""#.into(), 400),
        ("10 MB body", vec![json], at(&ten_mb), 413),
        (
            "no content type",
            vec!["content-type:"],
            r#"{"msg":"hi"}"#.into(),
            415,
        ),
        (
            "text/plain",
            vec!["content-type: text/plain"],
            r#"{"msg":"hi"}"#.into(),
            415,
        ),
        (
            "form encoded",
            vec!["content-type: application/x-www-form-urlencoded"],
            "msg=hi".into(),
            415,
        ),
        (
            "a 300-byte Idempotency-Key",
            vec![json, &long_key],
            r#"{"msg":"hi"}"#.into(),
            400,
        ),
    ];
    for (what, headers, body, expected) in &http {
        let mut args: Vec<&str> = headers.iter().flat_map(|h| ["-H", h]).collect();
        args.extend(["--data-binary", body]);
        let (status, _, reply) = curl("POST", &url, &args);
        let error = serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|reply| reply["error"].as_str().map(str::to_owned));
        let ok = status == *expected && error.as_ref().is_some_and(|e| !e.is_empty());
        let got = format!("{status} {}", short(&reply));
        cases.record(
            format!("POST {what} (want {expected} with an error)"),
            got,
            ok,
        );
    }
    // A body declared over the limit is refused before any of it is read: curl, which
    // waits for `100 Continue` before a big body, sends none of it.
    let declared = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}"])
        .args(["-H", json, "-H", "Expect: 100-continue"])
        .args([
            "--expect100-timeout",
            "20",
            "--data-binary",
            &at(&ten_mb),
            &url,
        ])
        .output()
        .expect("curl runs");
    let declared = String::from_utf8_lossy(&declared.stdout).into_owned();
    cases.record(
        "POST 10 MB with Expect: 100-continue (want 413, no byte sent)",
        declared.clone(),
        declared == "413 0",
    );
    let _ = std::fs::remove_dir_all(&dir);

    // --- gRPC: the registry ---------------------------------------------------------
    let mut registry =
        RegistryClient::new(rpc::channel(&system.registry.to_string()).expect("channel"));
    let metadata = |entries: usize| RegisterRequest {
        service: "bad".into(),
        address: "127.0.0.1:1".into(),
        metadata: (0..entries)
            .map(|i| (format!("k{i}"), "v".repeat(10)))
            .collect(),
        instance_id: String::new(),
    };
    let got = registry.register(metadata(40)).await;
    cases.record(
        "Register with 40 metadata entries (want INVALID_ARGUMENT)",
        format!("{got:?}"),
        matches!(&got, Err(status) if status.code() == Code::InvalidArgument),
    );
    // 200 KB: over the registry's largest valid request, refused before it is decoded.
    let got = registry.register(metadata(10_000)).await;
    cases.record(
        "Register of 200 KB, 10,000 metadata entries (want OUT_OF_RANGE: --max-request-bytes)",
        format!("{got:?}"),
        matches!(&got, Err(status) if status.code() == Code::OutOfRange),
    );
    let long_id = "x".repeat(10_000);
    for (what, id) in [
        ("empty", ""),
        ("unknown", "no-such-instance"),
        ("10 KB", &long_id),
    ] {
        let request = HeartbeatRequest {
            instance_id: id.into(),
        };
        let got = registry.heartbeat(request).await;
        cases.record(
            format!("Heartbeat with an {what} id (want NOT_FOUND or INVALID_ARGUMENT)"),
            short(&format!("{got:?}")),
            matches!(&got, Err(status)
                if matches!(status.code(), Code::NotFound | Code::InvalidArgument)),
        );
    }

    // --- gRPC: a logging instance ----------------------------------------------------
    let logging = system.logging[0].0;
    let mut client = LoggingClient::new(rpc::channel(&logging.to_string()).expect("channel"));
    let appends = [
        (
            "an empty id",
            String::new(),
            "x".to_owned(),
            Code::InvalidArgument,
        ),
        (
            "an empty text",
            "id-1".to_owned(),
            String::new(),
            Code::InvalidArgument,
        ),
        (
            "a 1000-byte id",
            "i".repeat(1000),
            "x".to_owned(),
            Code::InvalidArgument,
        ),
        (
            "a text over 64 KiB",
            "id-2".to_owned(),
            "t".repeat(65 * 1024),
            Code::InvalidArgument,
        ),
        (
            "a text over gRPC's 4 MB limit",
            "id-3".to_owned(),
            "t".repeat(5 * 1024 * 1024),
            Code::OutOfRange,
        ),
    ];
    for (what, id, text, expected) in appends {
        let got = client.append(AppendRequest { id, text }).await;
        cases.record(
            format!("Append with {what} (want {expected:?} or ResourceExhausted)"),
            short(&format!("{got:?}")),
            matches!(&got, Err(status)
                if status.code() == expected || status.code() == Code::ResourceExhausted),
        );
    }

    // --- random bytes on every port ---------------------------------------------------
    let ports = [
        ("facade", facade),
        ("config-server", system.registry),
        ("messages", system.messages),
        ("logging", logging),
    ];
    let garbage: [(&str, Vec<u8>); 3] = [
        ("64 KiB of random bytes", noise(64 * 1024, 1)),
        (
            "an HTTP/2 preface and garbage",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ngarbage after the preface".to_vec(),
        ),
        (
            "a content-length past u64",
            b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999999999999\r\n\r\n".to_vec(),
        ),
    ];
    for (name, addr) in ports {
        for (what, bytes) in &garbage {
            throw_garbage(addr, bytes);
            let serving = rpc::is_serving(&addr.to_string(), "").await;
            cases.record(
                format!("{what} on {name}'s port (want it still SERVING)"),
                if serving { "SERVING" } else { "not serving" },
                serving,
            );
        }
    }

    // Nothing died, and what was stored is intact.
    for proc in [
        &mut system.registry_proc,
        &mut system.messages_proc,
        &mut system.facade_proc,
    ] {
        let alive = proc_alive(proc);
        let got = if alive { "alive" } else { "died" };
        cases.record(format!("{} after it all", proc.name), got, alive);
    }
    let (status, stored) = get_messages(system.facade);
    let stored: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
    cases.record(
        "the three messages stored before",
        format!("{status} {stored:?}"),
        status == 200 && stored == before.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    cases.finish();
}

fn proc_alive(proc: &mut Proc) -> bool {
    nix::sys::signal::kill(proc.pid(), None).is_ok()
}

#[tokio::test]
async fn thousands_of_registrations_hit_the_cap_with_resource_exhausted() {
    let addr = free_addr();
    let _server = Proc::start(
        "config-server",
        "config-server",
        &[
            "--addr",
            &addr.to_string(),
            "--max-instances-per-service",
            "2000",
            "--ttl",
            "60s",
        ],
    );
    wait_serving(addr).await;
    let channel = rpc::channel(&addr.to_string()).expect("channel");
    let mut tasks = Vec::new();
    for worker in 0..8u16 {
        let mut client = RegistryClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut codes: HashMap<Code, usize> = HashMap::new();
            for i in 0..375u16 {
                let port = 1 + worker * 375 + i;
                let request = RegisterRequest {
                    service: "crowd".into(),
                    address: format!("127.0.0.1:{port}"),
                    metadata: HashMap::new(),
                    instance_id: String::new(),
                };
                let code = match client.register(request).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                *codes.entry(code).or_default() += 1;
            }
            codes
        }));
    }
    let mut codes: HashMap<Code, usize> = HashMap::new();
    for task in tasks {
        for (code, n) in task.await.expect("worker") {
            *codes.entry(code).or_default() += n;
        }
    }
    assert_eq!(codes.get(&Code::Ok), Some(&2000), "{codes:?}");
    assert_eq!(
        codes.get(&Code::ResourceExhausted),
        Some(&1000),
        "{codes:?}"
    );
    let lookup = RegistryClient::new(channel)
        .lookup(proto::registry::v1::LookupRequest {
            service: "crowd".into(),
        })
        .await
        .expect("lookup");
    assert_eq!(lookup.into_inner().instances.len(), 2000);
}
