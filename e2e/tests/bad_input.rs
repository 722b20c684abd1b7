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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_clearly_and_nothing_dies_or_is_lost() {
    let mut system = System::start(1, &[]).await;
    let facade = system.facade;
    let url = format!("http://{facade}/messages");

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
    std::fs::write(
        &ten_mb,
        format!(r#"{{"msg":"{}"}}"#, "x".repeat(10 * 1024 * 1024)),
    )
    .expect("write");
    let non_utf8 = dir.join("non-utf8.json");
    std::fs::write(&non_utf8, b"{\"msg\":\"\xff\xfe\xfd\"}").expect("write");
    let random = dir.join("random.bin");
    std::fs::write(&random, noise(4096, 7)).expect("write");
    let at = |path: &std::path::Path| format!("@{}", path.display());

    let json = "content-type: application/json";
    // (what, content type, body for --data-binary, expected status)
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("empty body", Some(json), String::new(), 400),
        ("truncated JSON", Some(json), r#"{"msg":"hel"#.into(), 400),
        ("non-UTF-8 JSON", Some(json), at(&non_utf8), 400),
        ("random bytes as JSON", Some(json), at(&random), 400),
        ("msg is a number", Some(json), r#"{"msg":1}"#.into(), 400),
        (
            "msg is an array",
            Some(json),
            r#"{"msg":["a"]}"#.into(),
            400,
        ),
        (
            "msg is an object",
            Some(json),
            r#"{"msg":{"a":1}}"#.into(),
            400,
        ),
        ("msg is null", Some(json), r#"{"msg":null}"#.into(), 400),
        ("msg is empty", Some(json), r#"{"msg":""}"#.into(), 400),
        (
            "no msg field",
            Some(json),
            r#"{"message":"hi"}"#.into(),
            400,
        ),
        ("JSON null", Some(json), "null".into(), 400),
        ("JSON array", Some(json), r#"[{"msg":"hi"}]"#.into(), 400),
        ("JSON string", Some(json), r#""hi""#.into(), 400),
        ("10 MB body", Some(json), at(&ten_mb), 413),
        ("no content type", None, r#"{"msg":"hi"}"#.into(), 415),
        (
            "text/plain",
            Some("content-type: text/plain"),
            r#"{"msg":"hi"}"#.into(),
            415,
        ),
        (
            "form encoded",
            Some("content-type: application/x-www-form-urlencoded"),
            "msg=hi".into(),
            415,
        ),
        (
            "bad idempotency key",
            Some(json),
            r#"{"msg":"hi"}"#.into(),
            400,
        ),
    ];
    for (what, content_type, body, expected) in &cases {
        let mut args: Vec<String> = vec![];
        if let Some(content_type) = content_type {
            args.extend(["-H".into(), (*content_type).into()]);
        } else {
            // curl adds a form content type to -d bodies unless told otherwise.
            args.extend(["-H".into(), "content-type:".into()]);
        }
        if *what == "bad idempotency key" {
            args.extend(["-H".into(), format!("Idempotency-Key: {}", "k".repeat(300))]);
        }
        args.extend(["--data-binary".into(), body.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, reply) = curl("POST", &url, &args);
        assert_eq!(status, *expected, "{what}: {reply}");
        let reply: serde_json::Value =
            serde_json::from_str(&reply).unwrap_or_else(|_| panic!("{what}: not JSON: {reply}"));
        assert!(
            reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {reply}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    // --- gRPC: the registry ---------------------------------------------------------
    let mut registry =
        RegistryClient::new(rpc::channel(&system.registry.to_string()).expect("channel"));
    let huge_metadata = RegisterRequest {
        service: "bad".into(),
        address: "127.0.0.1:1".into(),
        metadata: (0..10_000)
            .map(|i| (format!("k{i}"), "v".repeat(10)))
            .collect(),
        instance_id: String::new(),
    };
    let status = registry
        .register(huge_metadata)
        .await
        .expect_err("absurd metadata");
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    for id in ["", "no-such-instance", &"x".repeat(10_000)] {
        let status = registry
            .heartbeat(HeartbeatRequest {
                instance_id: id.into(),
            })
            .await
            .expect_err("unknown id");
        assert!(
            matches!(status.code(), Code::NotFound | Code::InvalidArgument),
            "{status}"
        );
    }

    // --- gRPC: a logging instance ----------------------------------------------------
    let logging = system.logging[0].0;
    let mut client = LoggingClient::new(rpc::channel(&logging.to_string()).expect("channel"));
    let appends = [
        (
            "empty id",
            String::new(),
            "x".to_owned(),
            Code::InvalidArgument,
        ),
        (
            "empty text",
            "id-1".to_owned(),
            String::new(),
            Code::InvalidArgument,
        ),
        (
            "id too long",
            "i".repeat(1000),
            "x".to_owned(),
            Code::InvalidArgument,
        ),
        (
            "text over 64 KiB",
            "id-2".to_owned(),
            "t".repeat(65 * 1024),
            Code::InvalidArgument,
        ),
        (
            "text over the 4 MB gRPC limit",
            "id-3".to_owned(),
            "t".repeat(5 * 1024 * 1024),
            Code::OutOfRange,
        ),
    ];
    for (what, id, text, expected) in appends {
        let status = client
            .append(AppendRequest { id, text })
            .await
            .expect_err(what);
        assert!(
            status.code() == expected || status.code() == Code::ResourceExhausted,
            "{what}: {status}"
        );
    }

    // --- random bytes on every port ---------------------------------------------------
    let ports = [
        ("facade", facade),
        ("config-server", system.registry),
        ("messages", system.messages),
        ("logging", logging),
    ];
    for (seed, (name, addr)) in ports.iter().enumerate() {
        throw_garbage(*addr, &noise(64 * 1024, seed as u64 + 1));
        throw_garbage(
            *addr,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ngarbage after the preface",
        );
        throw_garbage(
            *addr,
            b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999999999999\r\n\r\n",
        );
        assert!(
            rpc::is_serving(&addr.to_string(), "").await,
            "{name} stopped serving after garbage"
        );
    }

    // Nothing died, and what was stored is intact.
    for proc in [
        &mut system.registry_proc,
        &mut system.messages_proc,
        &mut system.facade_proc,
    ] {
        assert!(proc_alive(proc), "{} died", proc.name);
    }
    let (status, stored) = get_messages(system.facade);
    assert_eq!(status, 200);
    let stored: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        stored,
        before.iter().map(String::as_str).collect::<Vec<_>>()
    );
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
