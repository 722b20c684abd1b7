//! Messages at any volume: the lab's GET past gRPC's 4 MiB message limit, streamed and
//! complete; pages that walk the same log; a full read that resumes on another instance
//! after a kill -9 midway (NATS), or is aborted, never cut short, when it cannot (memory);
//! the memory store's limit answered 507.

use std::{net::SocketAddr, time::Duration};

use e2e::{curl_post, eventually, get_lab, get_messages, seed_nats, Nats, System};
use proto::{
    facade::v1::{facade_client::FacadeClient, GetRequest},
    logging::v1::{logging_client::LoggingClient, AppendRequest},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// A `GET /messages` read slowly over a raw connection with a small receive buffer, so
/// the facade is held midway through the log while the test does something.
struct SlowGet {
    stream: TcpStream,
    received: Vec<u8>,
}

impl SlowGet {
    /// Sends the request and reads until `at_least` bytes (headers included) arrived.
    async fn start(facade: SocketAddr, request_id: &str, at_least: usize) -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(8 * 1024).expect("small buffer");
        let mut stream = socket.connect(facade).await.expect("connect");
        let request = format!(
            "GET /messages HTTP/1.1\r\nhost: {facade}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut get = Self {
            stream,
            received: Vec::new(),
        };
        let mut buffer = vec![0; 8 * 1024];
        while get.received.len() < at_least {
            let n = tokio::time::timeout(Duration::from_secs(30), get.stream.read(&mut buffer))
                .await
                .expect("the answer starts")
                .expect("read");
            assert!(n > 0, "the connection closed early");
            get.received.extend_from_slice(&buffer[..n]);
        }
        get
    }

    /// Reads the rest; returns the status, whether the chunked body was complete (its
    /// last, empty chunk arrived), and the body.
    async fn finish(mut self) -> (u16, bool, Vec<u8>) {
        tokio::time::timeout(
            Duration::from_secs(120),
            self.stream.read_to_end(&mut self.received),
        )
        .await
        .expect("the answer ends")
        .ok(); // an aborted connection may end in a reset
        let text = &self.received;
        let split = text
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("headers");
        let head = String::from_utf8_lossy(&text[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let (complete, body) = dechunk(&text[split + 4..]);
        (status, complete, body)
    }
}

/// Decodes a chunked body; `true` when it ended with the last (empty) chunk.
fn dechunk(mut rest: &[u8]) -> (bool, Vec<u8>) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (false, body);
        };
        let Ok(size) = usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
        else {
            return (false, body);
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (rest.starts_with(b"\r\n"), body);
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..rest.len().min(size)]);
            return (false, body);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// The logging instance that logged the start of a full read for `request_id`.
fn serving_instance(system: &System, request_id: &str) -> Option<SocketAddr> {
    let needle = format!("request_id=\"{request_id}\"");
    system.logging.iter().find_map(|(addr, proc)| {
        proc.output()
            .lines()
            .any(|line| line.contains("streaming the log") && line.contains(&needle))
            .then_some(*addr)
    })
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    e2e::metric(addr, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_get_past_4_mib_is_complete_and_pages_walk_the_same_log() {
    let nats = Nats::cluster(3).await;
    let system = System::start_with_store(2, &[], &nats.urls()).await;
    // 60,000 short messages: about 5 MiB of JSON, past gRPC's 4 MiB default message
    // limit, which would turn this GET into a 502 were the log sent as one message.
    let sent = seed_nats(&nats.urls(), "lab", 0..60_000, |i| {
        format!(
            "message number {i:06} of the lab's log: short, as the lab's messages are, but many"
        )
    })
    .await;
    let texts: Vec<String> = sent.iter().map(|(_, text)| text.clone()).collect();

    let (status, logs, body) = get_lab(system.facade);
    assert_eq!(status, 200);
    assert_eq!(body["message"], "not implemented yet");
    assert!(body.to_string().len() > 4 * 1024 * 1024);
    assert_eq!(logs.len(), texts.len());
    assert!(logs == texts, "every text, in order");

    // Pages of 1000 with ids walk the same log.
    let (status, paged) = get_messages(system.facade);
    assert_eq!(status, 200);
    assert!(paged == sent, "pages hold the same ids and texts, in order");

    // The facade's gRPC Get streams the same texts.
    let channel = rpc::channel(&system.facade.to_string()).expect("channel");
    let mut stream = FacadeClient::new(channel)
        .get(GetRequest {})
        .await
        .expect("get")
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(batch) = stream.message().await.expect("a complete stream") {
        streamed.extend(batch.logs);
    }
    assert!(streamed == texts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_resumes_on_another_instance_after_a_kill_mid_stream() {
    let nats = Nats::cluster(3).await;
    let mut system = System::start_with_store(2, &[], &nats.urls()).await;
    // About 36 MiB: far more than every buffer between the instance and this client.
    let sent = seed_nats(&nats.urls(), "big", 0..600, |i| {
        format!("{i:05} {}", "y".repeat(60 * 1024))
    })
    .await;
    let request_id = "resume-after-kill";
    let get = SlowGet::start(system.facade, request_id, 256 * 1024).await;
    let serving = serving_instance(&system, request_id).expect("an instance serves the read");
    system.logging_proc(serving).kill9().await;

    let (status, complete, body) = get.finish().await;
    assert_eq!(status, 200);
    assert!(complete, "the answer ends properly");
    let body: serde_json::Value = serde_json::from_slice(&body).expect("one complete JSON answer");
    let logs: Vec<&str> = body["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|l| l.as_str().unwrap_or_default())
        .collect();
    let texts: Vec<&str> = sent.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(logs.len(), texts.len());
    assert!(
        logs == texts,
        "every text once, in order, across the resume"
    );
    assert_eq!(body["message"], "not implemented yet");
    assert!(
        metric(system.facade, "facade_read_resumes_total") >= 1.0,
        "the read did resume (it was not already buffered whole)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_that_cannot_resume_is_aborted_never_cut_short() {
    // The memory store: the one instance holds the only copy, so nothing can resume.
    let mut system = System::start(1, &["--retry-budget", "1s"]).await;
    let logging = system.logging[0].0;
    let channel = rpc::channel(&logging.to_string()).expect("channel");
    let mut appends = Vec::new();
    for writer in 0..8 {
        let mut client = LoggingClient::new(channel.clone());
        appends.push(tokio::spawn(async move {
            for i in 0..40 {
                let request = AppendRequest {
                    id: format!("w{writer}-{i}"),
                    text: format!("{writer}-{i} {}", "z".repeat(60 * 1024)),
                };
                client.append(request).await.expect("append");
            }
        }));
    }
    for append in appends {
        append.await.expect("writer");
    }
    let request_id = "cannot-resume";
    let get = SlowGet::start(system.facade, request_id, 256 * 1024).await;
    eventually(Duration::from_secs(10), "the read started", || async {
        serving_instance(&system, request_id) == Some(logging)
    })
    .await;
    system.logging_proc(logging).kill9().await;

    let (status, complete, body) = get.finish().await;
    assert_eq!(status, 200, "the answer had started");
    assert!(!complete, "the connection is aborted: no last chunk");
    assert!(
        serde_json::from_slice::<serde_json::Value>(&body).is_err(),
        "what arrived does not parse as a whole answer"
    );
    assert!(metric(system.facade, "facade_read_broken_total") >= 1.0);
}

#[tokio::test]
async fn a_full_memory_store_answers_507_and_keeps_what_it_has() {
    let mut system = System::start(0, &[]).await;
    system.add_logging_with(&["--max-messages", "3"]).await;
    system.wait_registered(1).await;
    for i in 0..3 {
        let (status, reply) = curl_post(system.facade, &format!("kept {i}"));
        assert_eq!(status, 201, "{reply}");
    }
    let (status, reply) = curl_post(system.facade, "one too many");
    assert_eq!(status, 507, "{reply}");
    let error = reply["error"].as_str().expect("{\"error\"}");
    assert!(error.contains("full"), "{error}");
    let (status, logs, _) = get_lab(system.facade);
    assert_eq!(status, 200);
    assert_eq!(logs, ["kept 0", "kept 1", "kept 2"]);
}
