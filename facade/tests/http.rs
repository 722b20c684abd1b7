//! The facade's HTTP and gRPC APIs against real in-process services on 127.0.0.1: every
//! status code of the contract, checked with curl, and concurrency with 16 clients.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use testkit::{curl, curl_post_keyed, eventually};

use config_server::RegistryConfig;
use logging::store::MemoryStore;
use proto::facade::v1::{facade_client::FacadeClient, GetRequest, PostRequest, ReadPageRequest};
use registry_client::RegistryClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Stack {
    facade: SocketAddr,
    store: Arc<MemoryStore>,
    shutdown: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Waits (bounded) until the registry lists a logging instance.
async fn logging_registered(client: &RegistryClient) {
    eventually(Duration::from_secs(10), "logging registered", || async {
        client
            .lookup("logging")
            .await
            .is_ok_and(|reply| !reply.instances.is_empty())
    })
    .await;
}

/// Registry, messages, one logging instance (memory) and the facade, all in-process.
async fn start(with_logging: bool, budget: &str) -> Stack {
    let shutdown = CancellationToken::new();
    let (registry_listener, registry) = bind().await;
    let (messages_listener, messages) = bind().await;
    let registry_config = RegistryConfig {
        static_entries: vec![("messages".into(), messages.to_string())],
        ..RegistryConfig::default()
    };
    tokio::spawn(config_server::serve(
        registry_listener,
        registry_config,
        shutdown.clone(),
    ));
    tokio::spawn(messages::serve(messages_listener, shutdown.clone()));

    let store = Arc::new(MemoryStore::default());
    let client = RegistryClient::new(&registry.to_string()).expect("registry client");
    if with_logging {
        let (logging_listener, _) = bind().await;
        tokio::spawn(logging::serve(
            logging_listener,
            Arc::clone(&store),
            client.clone(),
            logging::ServeOptions::default(),
            shutdown.clone(),
        ));
        logging_registered(&client).await;
    }

    let (facade_listener, facade) = bind().await;
    let mut config = facade::Config::new(facade, &registry.to_string());
    config.retry_budget = humantime::parse_duration(budget).expect("duration");
    tokio::spawn(facade::serve(facade_listener, config, shutdown.clone()));
    Stack {
        facade,
        store,
        shutdown,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_code_of_the_http_contract() {
    let stack = start(true, "5s").await;
    let url = format!("http://{}/messages", stack.facade);
    let json = "content-type: application/json";
    let big = serde_json::json!({ "msg": "x".repeat(70 * 1024) }).to_string();
    let just_over = serde_json::json!({ "msg": "x".repeat(64 * 1024 + 1) }).to_string();

    // (method, body, extra header, expected status, text in the error)
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", Some(r#"{"msg":"hello"}"#), Some(json), 201, ""),
        ("POST", Some(r#"{"msg":""}"#), Some(json), 400, "empty"),
        ("POST", Some(r#"{}"#), Some(json), 400, "required"),
        ("POST", Some(r#"{"msg":null}"#), Some(json), 400, "required"),
        (
            "POST",
            Some(r#"{"msg":5}"#),
            Some(json),
            400,
            "invalid type",
        ),
        ("POST", Some(r#"[1,2]"#), Some(json), 400, ""),
        ("POST", Some("null"), Some(json), 400, ""),
        ("POST", Some(r#"{"msg":"#), Some(json), 400, "parse"),
        ("POST", Some(""), Some(json), 400, ""),
        (
            "POST",
            Some(r#"{"msg":"hello"}"#),
            None,
            415,
            "Content-Type",
        ),
        (
            "POST",
            Some(r#"{"msg":"hello"}"#),
            Some("content-type: text/plain"),
            415,
            "",
        ),
        ("POST", Some(big.as_str()), Some(json), 413, ""),
        ("POST", Some(just_over.as_str()), Some(json), 413, "at most"),
        ("DELETE", None, None, 405, "method"),
        ("GET", None, None, 200, ""),
    ];
    for (method, body, header, expected, needle) in cases {
        let mut args: Vec<&str> = Vec::new();
        if let Some(header) = header {
            args.extend(["-H", header]);
        }
        if let Some(body) = body {
            args.extend(["--data-binary", body]);
        }
        let (status, _, reply) = curl(method, &url, &args);
        assert_eq!(
            status,
            expected,
            "{method} {:?}: {reply}",
            body.map(|b| &b[..b.len().min(40)])
        );
        let reply: serde_json::Value = serde_json::from_str(&reply).expect("a JSON body");
        if status >= 400 {
            let error = reply["error"].as_str().expect("{\"error\": ...}");
            assert!(
                error.contains(needle),
                "{error:?} should mention {needle:?}"
            );
        }
    }
    let (status, _, body) = curl("GET", &format!("http://{}/nope", stack.facade), &[]);
    assert_eq!(status, 404);
    assert!(body.contains("error"));
    let (status, _, body) = curl("GET", &format!("http://{}/healthz", stack.facade), &[]);
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    // Only the one good POST was stored; none of the bad input reached the store.
    let stored = logging::store::MessageStore::read(stack.store.as_ref(), 0, 1000)
        .await
        .expect("read")
        .messages;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].text, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_logging_instance_is_503_with_retry_after_over_http_and_unavailable_over_grpc() {
    let stack = start(false, "200ms").await;
    let (status, head, body) = curl(
        "POST",
        &format!("http://{}/messages", stack.facade),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"msg":"x"}"#,
        ],
    );
    assert_eq!(status, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    // Plain words for the client; addresses and transport errors only in the log.
    let error: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        error["error"],
        "no logging instance could store the message within 200ms; try again"
    );
    let (status, _, _) = curl("GET", &format!("http://{}/messages", stack.facade), &[]);
    assert_eq!(status, 503);

    let channel = rpc::channel(&stack.facade.to_string()).expect("channel");
    let error = FacadeClient::new(channel)
        .post(PostRequest {
            msg: "x".into(),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("unavailable");
    assert_eq!(error.code(), tonic::Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_over_grpc_all_succeed_and_nothing_is_lost() {
    let stack = start(true, "5s").await;
    let channel = rpc::channel(&stack.facade.to_string()).expect("channel");
    const CLIENTS: usize = 16;
    const EACH: usize = 50;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = FacadeClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..EACH {
                let reply = client
                    .post(PostRequest {
                        msg: format!("{c}-{i}"),
                        idempotency_key: String::new(),
                    })
                    .await
                    .expect("post");
                ids.push(reply.into_inner().id);
            }
            ids
        }));
    }
    let posting = async {
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("client"));
        }
        all
    };
    // A lock held across an await would deadlock here; the timeout turns that into a
    // failure instead of a hang.
    let ids = tokio::time::timeout(Duration::from_secs(60), posting)
        .await
        .expect("16 clients finish");
    assert_eq!(ids.len(), CLIENTS * EACH);

    // The lab's Get streams every text, then the messages service's text.
    let mut client = FacadeClient::new(channel);
    let mut stream = client.get(GetRequest {}).await.expect("get").into_inner();
    let (mut logs, mut message) = (Vec::new(), String::new());
    while let Some(batch) = stream.message().await.expect("a complete stream") {
        logs.extend(batch.logs);
        if !batch.message.is_empty() {
            message = batch.message;
        }
    }
    assert_eq!(logs.len(), CLIENTS * EACH);
    assert_eq!(message, "not implemented yet");
    // Pages carry the ids: every id once, in the same order as the texts.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = client
            .read_page(ReadPageRequest {
                limit: 300,
                after: after.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        paged.extend(page.messages);
        if page.next.is_empty() {
            break;
        }
        after = page.next;
    }
    let texts: Vec<&String> = paged.iter().map(|entry| &entry.msg).collect();
    assert_eq!(texts, logs.iter().collect::<Vec<_>>());
    let unique: std::collections::HashSet<_> = paged.iter().map(|entry| &entry.id).collect();
    assert_eq!(unique.len(), CLIENTS * EACH);
    assert!(ids.iter().all(|id| unique.contains(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_still_answers_when_the_messages_service_is_down() {
    // A registry whose static messages entry points at a port nobody listens on.
    let shutdown = CancellationToken::new();
    let (registry_listener, registry) = bind().await;
    let (_, dead) = bind().await; // released at once: nothing listens there
    tokio::spawn(config_server::serve(
        registry_listener,
        RegistryConfig {
            static_entries: vec![("messages".into(), dead.to_string())],
            ..RegistryConfig::default()
        },
        shutdown.clone(),
    ));
    let client = RegistryClient::new(&registry.to_string()).expect("client");
    let (logging_listener, _) = bind().await;
    tokio::spawn(logging::serve(
        logging_listener,
        Arc::new(MemoryStore::default()),
        client.clone(),
        logging::ServeOptions {
            max_text_bytes: 1024,
            ..Default::default()
        },
        shutdown.clone(),
    ));
    logging_registered(&client).await;
    let (facade_listener, facade) = bind().await;
    tokio::spawn(facade::serve(
        facade_listener,
        facade::Config::new(facade, &registry.to_string()),
        shutdown.clone(),
    ));
    let (status, _, body) = curl("GET", &format!("http://{facade}/messages"), &[]);
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(body["message"].is_null());
    assert!(body["warnings"][0]
        .as_str()
        .unwrap_or("")
        .contains("messages service unavailable"));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_idempotency_keys_answer_400_and_422_as_documented() {
    let stack = start(true, "5s").await;
    let post = |key: &str, msg: &str| {
        let (status, _, reply) = curl_post_keyed(stack.facade, msg, key);
        (
            status,
            serde_json::from_str::<serde_json::Value>(&reply).expect("json"),
        )
    };
    let (status, first) = post("order-1", "first");
    assert_eq!(status, 201);
    // The same key and body: the same id again.
    let (status, again) = post("order-1", "first");
    assert_eq!((status, &again["id"]), (201, &first["id"]));
    // The same key, another body: 422, and the first message is untouched.
    let (status, refused) = post("order-1", "second");
    assert_eq!(status, 422, "{refused}");
    assert!(refused["error"]
        .as_str()
        .is_some_and(|e| e.contains("Idempotency-Key")));

    let page = |query: &str| {
        let (status, _, body) = curl(
            "GET",
            &format!("http://{}/v1/messages{query}", stack.facade),
            &[],
        );
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).expect("json"),
        )
    };
    let (status, all) = page("");
    assert_eq!(status, 200);
    assert_eq!(all["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(all["messages"][0]["msg"], "first");
    assert_eq!(all["messages"][0]["id"], first["id"]);
    assert!(all["next"].is_null(), "{all}");

    for _ in 0..4 {
        assert_eq!(post(&uuid_like(), "more").0, 201);
    }
    let (status, one) = page("?limit=2");
    assert_eq!(status, 200);
    let next = one["next"].as_str().expect("a next cursor").to_owned();
    let (status, rest) = page(&format!("?limit=1000&after={next}"));
    assert_eq!(status, 200);
    assert_eq!(rest["messages"].as_array().map(Vec::len), Some(3));
    assert!(rest["next"].is_null());

    for (query, needle) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=ten", "limit"),
        ("?after=bogus", "cursor"),
        ("?after=c0", "cursor"),
        ("?after=c99999", "cursor"),
    ] {
        let (status, error) = page(query);
        assert_eq!(status, 400, "{query}: {error}");
        assert!(
            error["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{query}: {error}"
        );
    }
    let (status, _, _) = curl("POST", &format!("http://{}/v1/messages", stack.facade), &[]);
    assert_eq!(status, 405);
}

/// A fresh key each call.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("key-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
