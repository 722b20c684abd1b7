//! Nobody gets in who does not belong: the whole system on 127.0.0.1 with the
//! certificates `runner certs` makes, thrown at by a caller without them, or with the
//! wrong ones. Every attempt is a row of one table (printed at the end), and the test
//! fails naming every row that went wrong.
//!
//! Two recording proxies sit on the paths an eavesdropper would tap: between the facade
//! and the logging instance (the instance registers the proxy's address), and between
//! the instance and the registry (it is given the proxy as its registry). Neither may
//! see a readable byte: no HTTP/2 preface, no token, no posted text or instance id; a
//! plaintext registry behind the same kind of proxy shows what they would see.
//!
//! A second test checks that services refuse to start where they would be exposed:
//! beyond loopback without TLS, with a key or token file others may read, or with a TLS
//! URL and no TLS to follow it.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use e2e::{
    certs::Certs, eventually, free_addr, free_port, grpcurl_with, http_code, proxy::Proxy,
    verdicts::Verdicts, Proc,
};
use registry_client::RegistryClient;
use tokio::io::AsyncReadExt;

/// What every cleartext HTTP/2 connection starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn write_private(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The deployment's certificates: hosts `local` (127.0.0.1, where everything runs) and
/// `other` (a host of the same deployment: valid certificates, other identities).
fn make_certs(dir: &Path) -> Certs {
    let (certs, printed) = Certs::make(
        dir,
        &["local=127.0.0.1,localhost".into(), "other=127.0.0.2".into()],
    );
    assert!(
        printed.contains("host local (127.0.0.1, localhost)"),
        "says which folder goes where: {printed}"
    );
    certs
}

/// grpcurl's flags for a client holding `service@host`'s certificate.
fn grpcurl_as(certs: &Certs, host: &str, service: &str) -> Vec<String> {
    vec![
        "-cacert".into(),
        certs.ca(),
        "-cert".into(),
        certs.file(host, &format!("{service}.pem")),
        "-key".into(),
        certs.file(host, &format!("{service}.key")),
    ]
}

fn args(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

fn grpcurl(flags: &[String], addr: SocketAddr, method: &str, body: Option<&str>) -> Output {
    grpcurl_with(&args(flags), addr, method, body)
}

/// Whether grpcurl was refused with `code` (as grpcurl prints it, e.g. `PermissionDenied`).
fn refused_with(output: &Output, code: &str) -> bool {
    !output.status.success() && text(output).contains(&format!("Code: {code}"))
}

// The proxies forward on the runtime while curl and grpcurl block the test's thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_without_the_deployments_keys_gets_in() {
    let dir = std::env::temp_dir().join(format!("security-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let certs = make_certs(&dir);
    let token = format!("token-{}", uuid_like());
    let token_file = dir.join("registry.token");
    write_private(&token_file, &format!("{token}\n"), 0o600);
    let token_path = token_file.display().to_string();

    let (registry, messages, facade) = (free_addr(), free_addr(), free_addr());
    let logging_port = free_port();
    let logging: SocketAddr = format!("127.0.0.1:{logging_port}").parse().expect("addr");
    let to_registry = Proxy::start(registry).await;
    let to_logging = Proxy::start(logging).await;

    let mut registry_args = vec![
        "--addr".to_owned(),
        registry.to_string(),
        "--token-file".into(),
        token_path.clone(),
        "--static".into(),
        format!("messages={messages}"),
        "--set".into(),
        "logging.store=memory".into(),
    ];
    registry_args.extend(certs.flags("local", "config-server"));
    let _registry = Proc::start("config-server", "config-server", &args(&registry_args));
    let mut messages_args = vec!["--addr".to_owned(), messages.to_string()];
    messages_args.extend(certs.flags("local", "messages"));
    let _messages = Proc::start("messages", "messages", &args(&messages_args));
    let mut logging_args = vec![
        logging_port.to_string(),
        "--advertise".into(),
        to_logging.addr().to_string(),
        "--registry".into(),
        format!("https://{}", to_registry.addr()),
        "--registry-token-file".into(),
        token_path.clone(),
    ];
    logging_args.extend(certs.flags("local", "logging"));
    let _logging = Proc::start("logging", "logging", &args(&logging_args));
    let mut facade_args = vec![
        "--addr".to_owned(),
        facade.to_string(),
        "--registry".into(),
        format!("https://{registry}"),
    ];
    facade_args.extend(certs.flags("local", "facade"));
    let _facade = Proc::start("facade", "facade", &args(&facade_args));

    let operator = certs.transport("local", "facade");
    for addr in [registry, messages, logging, facade] {
        e2e::wait_serving_over(&operator, addr).await;
    }
    let lookup = RegistryClient::with_replicas(&[registry.to_string()], &operator).expect("client");
    eventually(Duration::from_secs(20), "logging registered", || async {
        lookup
            .lookup("logging")
            .await
            .is_ok_and(|found| !found.instances.is_empty())
    })
    .await;
    let instance_id = lookup.lookup("logging").await.expect("lookup").instances[0]
        .instance_id
        .clone();

    let ca = certs.ca();
    let mut table = Verdicts::default();

    // A posted text, over HTTPS with only the CA: the public port needs no certificate.
    let secret = format!("text-{}", uuid_like());
    let body = format!("{{\"msg\":\"{secret}\"}}");
    let json = ["-H", "content-type: application/json", "-d", &body];
    let https = [&json[..], &["--cacert", &ca]].concat();
    let code = http_code(&format!("https://{facade}/messages"), &https);
    table.check(
        "POST over HTTPS, no client certificate",
        "201",
        code == "201",
        code,
    );
    let code = http_code(&format!("http://{facade}/messages"), &json);
    table.check(
        "POST over plain HTTP",
        "no HTTP answer",
        code == "000",
        code,
    );
    let read = Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert", &ca])
        .arg(format!("https://{facade}/messages"))
        .output()
        .expect("curl runs");
    table.check(
        "GET over HTTPS (the text went through the proxied instance)",
        "the text",
        text(&read).contains(&secret),
        text(&read),
    );

    // A client that connects and never says a word: its handshake holds up nobody, and
    // the connection is dropped once `rpc::tls::HANDSHAKE_TIMEOUT` has passed.
    let mut silent = tokio::net::TcpStream::connect(logging)
        .await
        .expect("connect");
    let opened = std::time::Instant::now();
    let served = rpc::is_serving_over(&operator, &logging.to_string(), "").await;
    table.check(
        "a health check while another handshake hangs",
        "SERVING",
        served,
        String::new(),
    );
    let limit = rpc::tls::HANDSHAKE_TIMEOUT + Duration::from_secs(10);
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(limit, silent.read(&mut byte)).await;
    let waited = opened.elapsed();
    table.check(
        "a handshake never finished",
        "dropped at the timeout",
        // The server's clock starts at its accept, a hair before ours: a tenth's slack
        // still tells the timeout from a refusal, which would close at once.
        matches!(closed, Ok(Ok(0) | Err(_))) && waited >= rpc::tls::HANDSHAKE_TIMEOUT.mul_f64(0.9),
        format!("{closed:?} after {waited:?}"),
    );

    // Plaintext gRPC, and TLS without a client certificate, to every port.
    // A refused connection is retried until grpcurl's connect timeout: keep it short.
    let plaintext = vec![
        "-plaintext".to_owned(),
        "-connect-timeout".into(),
        "2".into(),
    ];
    let anonymous_tls = vec![
        "-cacert".to_owned(),
        ca.clone(),
        "-connect-timeout".into(),
        "2".into(),
    ];
    for (name, addr, internal) in [
        ("config-server", registry, true),
        ("messages", messages, true),
        ("logging", logging, true),
        ("facade", facade, false),
    ] {
        let output = grpcurl(&plaintext, addr, "grpc.health.v1.Health/Check", None);
        table.check(
            format!("plaintext gRPC to {name}"),
            "refused",
            !output.status.success(),
            text(&output),
        );
        let output = grpcurl(&anonymous_tls, addr, "grpc.health.v1.Health/Check", None);
        if internal {
            table.check(
                format!("TLS without a client certificate to {name}"),
                "refused",
                !output.status.success(),
                text(&output),
            );
        } else {
            table.check(
                format!("TLS without a client certificate to {name} (public)"),
                "SERVING",
                output.status.success() && text(&output).contains("SERVING"),
                text(&output),
            );
        }
    }

    // Valid certificates of the deployment, used for what they may not do.
    let bearer = format!("authorization: Bearer {token}");
    let with_token = |mut flags: Vec<String>| {
        flags.extend(["-H".to_owned(), bearer.clone()]);
        flags
    };
    let other_logging = with_token(grpcurl_as(&certs, "other", "logging"));
    let local_messages = with_token(grpcurl_as(&certs, "local", "messages"));
    let steal = format!(
        r#"{{"service":"logging","address":"127.0.0.2:50051","instanceId":"{instance_id}"}}"#
    );
    for (who, flags) in [
        ("logging@other", &other_logging),
        ("messages@local", &local_messages),
    ] {
        let output = grpcurl(
            flags,
            registry,
            "registry.v1.Registry/Register",
            Some(&steal),
        );
        table.check(
            format!("{who} registers logging@local's instance id"),
            "PermissionDenied",
            refused_with(&output, "PermissionDenied"),
            text(&output),
        );
    }
    let at_its_address = format!(
        r#"{{"service":"logging","address":"{}","instanceId":"taken"}}"#,
        to_logging.addr()
    );
    let output = grpcurl(
        &other_logging,
        registry,
        "registry.v1.Registry/Register",
        Some(&at_its_address),
    );
    table.check(
        "logging@other registers at logging@local's address",
        "PermissionDenied",
        refused_with(&output, "PermissionDenied"),
        text(&output),
    );
    let output = grpcurl(
        &other_logging,
        registry,
        "registry.v1.Registry/Register",
        Some(r#"{"service":"config-server","address":"127.0.0.2:50050"}"#),
    );
    table.check(
        "logging@other registers config-server",
        "PermissionDenied",
        refused_with(&output, "PermissionDenied"),
        text(&output),
    );
    let id = format!(r#"{{"instanceId":"{instance_id}"}}"#);
    for method in ["Heartbeat", "Deregister"] {
        let output = grpcurl(
            &other_logging,
            registry,
            &format!("registry.v1.Registry/{method}"),
            Some(&id),
        );
        table.check(
            format!("logging@other: {method} of logging@local's instance"),
            "PermissionDenied",
            refused_with(&output, "PermissionDenied"),
            text(&output),
        );
    }
    let session = format!(
        r#"{{"register":{{"service":"logging","address":"127.0.0.2:50051","instanceId":"{instance_id}"}}}}"#
    );
    let output = grpcurl(
        &other_logging,
        registry,
        "registry.v1.Registry/Session",
        Some(&session),
    );
    table.check(
        "logging@other: a session on logging@local's instance",
        "PermissionDenied",
        refused_with(&output, "PermissionDenied"),
        text(&output),
    );

    let still = lookup.lookup("logging").await.expect("lookup");
    let listed: Vec<(String, String)> = still
        .instances
        .iter()
        .map(|i| (i.instance_id.clone(), i.address.clone()))
        .collect();
    table.check(
        "logging@local still listed, at its own address",
        "unchanged",
        listed == [(instance_id.clone(), to_logging.addr().to_string())],
        format!("{listed:?}"),
    );
    let metrics = Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert", &ca])
        .args(["--cert", &certs.file("local", "facade.pem")])
        .args(["--key", &certs.file("local", "facade.key")])
        .arg(format!("https://{registry}/metrics"))
        .output()
        .expect("curl runs");
    let denied = text(&metrics)
        .lines()
        .find_map(|line| line.strip_prefix("registry_permission_denied_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    table.check(
        "refusals counted (registry_permission_denied_total)",
        ">= 7",
        denied.is_some_and(|count| count >= 7.0),
        format!("{denied:?}"),
    );

    // What an eavesdropper on either path saw.
    table.check(
        "registry path carried traffic",
        "bytes",
        !to_registry.recorded().is_empty(),
        format!("{} bytes", to_registry.recorded().len()),
    );
    table.check(
        "facade-logging path carried traffic",
        "bytes",
        !to_logging.recorded().is_empty(),
        format!("{} bytes", to_logging.recorded().len()),
    );
    // HTTP/2 compresses headers (HPACK), so a token would not cross as its own bytes
    // even in the clear; what shows that a stream is readable is the HTTP/2 preface and
    // the protobuf bodies, which cross as they are. The control below sees both.
    for (path, proxy, needle) in [
        ("instance-registry", &to_registry, instance_id.as_str()),
        ("facade-logging", &to_logging, secret.as_str()),
    ] {
        table.check(
            format!("{path} path: the HTTP/2 preface, the token, {needle}"),
            "none seen",
            !proxy.saw(H2_PREFACE) && !proxy.saw(token.as_bytes()) && !proxy.saw(needle.as_bytes()),
            String::new(),
        );
    }

    // The same eavesdropper on a plaintext registry reads the stream: the check can fail.
    let plain = free_addr();
    let _plain_registry = Proc::start(
        "plain-config-server",
        "config-server",
        &["--addr", &plain.to_string(), "--token-file", &token_path],
    );
    e2e::wait_serving(plain).await;
    let tap = Proxy::start(plain).await;
    let output = grpcurl(
        &["-plaintext".to_owned(), "-H".into(), bearer.clone()],
        tap.addr(),
        "registry.v1.Registry/Register",
        Some(&format!(
            r#"{{"service":"demo","address":"127.0.0.1:9","instanceId":"{instance_id}"}}"#
        )),
    );
    table.check(
        "control: a plaintext registry's proxy sees the preface and the id",
        "both seen",
        output.status.success() && tap.saw(H2_PREFACE) && tap.saw(instance_id.as_bytes()),
        text(&output),
    );
    table.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A value nobody guesses, for a token or a text to look for.
fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{:x}{:x}", nanos, std::process::id())
}

/// Starts `binary` with `args` and waits for it to exit; returns its output, or panics
/// if it is still running after 20 s.
async fn exits(binary: &str, args: &[&str]) -> (bool, String) {
    let mut process = Proc::start(binary, binary, args);
    let status = process.wait_exit(Duration::from_secs(20)).await;
    (status.success(), process.output())
}

#[tokio::test]
async fn services_refuse_to_start_where_they_would_be_exposed() {
    let dir = std::env::temp_dir().join(format!("fail-closed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut table = Verdicts::default();

    let port = free_port().to_string();
    let anywhere = format!("0.0.0.0:{port}");
    let advertise = format!("127.0.0.1:{port}");
    for (binary, flags) in [
        ("config-server", vec!["--addr", anywhere.as_str()]),
        ("messages", vec!["--addr", anywhere.as_str()]),
        ("facade", vec!["--addr", anywhere.as_str()]),
        (
            "logging",
            vec![
                port.as_str(),
                "--host",
                "0.0.0.0",
                "--advertise",
                advertise.as_str(),
                "--store",
                "memory",
            ],
        ),
    ] {
        let (ok, output) = exits(binary, &flags).await;
        table.check(
            format!("{binary} on 0.0.0.0 without TLS"),
            "exits, names --insecure",
            !ok && output.contains("refusing to listen") && output.contains("--insecure"),
            output.lines().last().unwrap_or_default().to_owned(),
        );
    }

    let registry = format!("https://127.0.0.1:{}", free_port());
    let (ok, output) = exits(
        "logging",
        &[
            &free_port().to_string(),
            "--registry",
            &registry,
            "--store",
            "memory",
        ],
    )
    .await;
    table.check(
        "logging given an https:// registry without TLS",
        "exits, says so",
        !ok && output.contains("no TLS is configured"),
        output.lines().last().unwrap_or_default().to_owned(),
    );

    let token = dir.join("open.token");
    write_private(&token, "abc\n", 0o644);
    let (ok, output) = exits(
        "config-server",
        &[
            "--addr",
            &free_addr().to_string(),
            "--token-file",
            &token.display().to_string(),
        ],
    )
    .await;
    table.check(
        "config-server with a token file others may read",
        "exits, says chmod 600",
        !ok && output.contains("chmod 600"),
        output.lines().last().unwrap_or_default().to_owned(),
    );

    let certs = make_certs(&dir);
    let key = certs.file("local", "messages.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut flags = vec!["--addr".to_owned(), free_addr().to_string()];
    flags.extend(certs.flags("local", "messages"));
    let (ok, output) = exits("messages", &args(&flags)).await;
    table.check(
        "messages with a key others may read",
        "exits, says chmod 600",
        !ok && output.contains("chmod 600"),
        output.lines().last().unwrap_or_default().to_owned(),
    );
    table.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The store locked down as `runner certs` configures it, on a three-node cluster on
/// loopback: logging's own store stores and reads through it, and nobody else gets in,
/// nor may logging's own credentials lose the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_lets_in_only_logging_and_logging_cannot_lose_the_log() {
    use logging::store::{Appended, Message, MessageStore, NatsConfig, NatsStore};

    let dir = std::env::temp_dir().join(format!("locked-nats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let certs = make_certs(&dir);
    let local = certs.dir.join("local");
    let seed = certs.seed("local/logging.nk");
    let lockdown = runner::certs::lockdown(
        &local,
        "a-route-password".into(),
        local_nats::Lockdown::public_user(&seed).expect("an nkey seed"),
        Some(local_nats::Lockdown::public_user(&certs.seed("admin.nk")).expect("an nkey seed")),
    );
    let first = e2e::free_ports(6);
    let nodes = local_nats::cluster(
        &[first, first + 1, first + 2],
        &[first + 3, first + 4, first + 5],
        &dir.join("nats"),
    );
    let server = local_nats::server_path().expect("nats-server (scripts/setup installs it)");
    let _nodes: Vec<Proc> = nodes
        .iter()
        .map(|node| {
            let locked = node.locked_args(&nodes, &lockdown).expect("config");
            Proc::spawn(&node.name, &server, &args(&locked))
        })
        .collect();
    let urls = local_nats::urls(&nodes);
    let logging = runner::certs::logging_credentials(&local, seed);
    let cancel = tokio_util::sync::CancellationToken::new();
    local_nats::wait_ready_as(&logging, &urls, Duration::from_secs(60), &cancel)
        .await
        .expect("the locked cluster, to logging's user");

    let mut config = NatsConfig::new(urls.split(',').map(str::to_owned).collect());
    config.credentials = logging.clone();
    let store = NatsStore::connect(config, &cancel)
        .await
        .expect("logging's store connects");
    let message = |id: &str, text: &str| Message {
        id: id.into(),
        text: text.into(),
    };
    let mut table = Verdicts::default();
    let stored = store.append(message("m1", "kept")).await;
    table.check(
        "logging appends",
        "inserted",
        matches!(stored, Ok(Appended::Inserted)),
        format!("{stored:?}"),
    );
    let again = store.append(message("m1", "kept")).await;
    table.check(
        "logging appends the same id again",
        "duplicate",
        matches!(again, Ok(Appended::Duplicate)),
        format!("{again:?}"),
    );

    let attempt = |options: async_nats::ConnectOptions| async {
        options
            .connection_timeout(Duration::from_secs(2))
            .connect(urls.split(',').next().expect("a url"))
            .await
    };
    let anonymous = attempt(
        local_nats::Credentials {
            tls: logging.tls.clone(),
            nkey_seed: None,
        }
        .options(),
    )
    .await;
    table.check(
        "connect with a valid certificate and no user",
        "refused",
        anonymous.is_err(),
        format!("{:?}", anonymous.err()),
    );
    let plain = attempt(async_nats::ConnectOptions::new()).await;
    table.check(
        "connect without TLS",
        "refused",
        plain.is_err(),
        format!("{:?}", plain.err()),
    );

    let client = attempt(logging.options())
        .await
        .expect("logging's credentials connect");
    for subject in [
        "$JS.API.STREAM.DELETE.MESSAGES",
        "$JS.API.STREAM.PURGE.MESSAGES",
        "$JS.API.STREAM.UPDATE.MESSAGES",
    ] {
        let answer =
            tokio::time::timeout(Duration::from_secs(3), client.request(subject, "{}".into()))
                .await;
        table.check(
            format!("logging's user asks {subject}"),
            "no answer (refused)",
            !matches!(answer, Ok(Ok(_))),
            format!("{answer:?}"),
        );
    }
    let info = async_nats::jetstream::new(client.clone())
        .get_stream("MESSAGES")
        .await
        .map(|stream| stream.cached_info().state.messages);
    table.check(
        "the stream after those",
        "still there, 1 message",
        matches!(info, Ok(1)),
        format!("{info:?}"),
    );

    // A node with none of the keys, routed at the cluster.
    let routes = e2e::rogue_routes(
        "127.0.0.1",
        e2e::free_ports(3),
        &format!("127.0.0.1:{}", first + 3),
        &dir.join("rogue"),
    )
    .await;
    table.check(
        "a rogue node routed at the cluster",
        "0 routes",
        routes == 0,
        format!("num_routes {routes}"),
    );

    // A stream that needs a change logging may not make: the refusal names the subject.
    let admin = local_nats::Credentials {
        tls: logging.tls.clone(),
        nkey_seed: Some(certs.seed("admin.nk")),
    };
    let admin = attempt(admin.options()).await.expect("the admin connects");
    let jetstream = async_nats::jetstream::new(admin);
    jetstream
        .delete_stream("MESSAGES")
        .await
        .expect("the admin deletes");
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "MESSAGES".into(),
            subjects: vec!["messages.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("an old-style stream");
    let mut flags = vec![
        free_port().to_string(),
        "--store".into(),
        urls.clone(),
        "--store-nkey".into(),
        certs.file("local", runner::certs::LOGGING_NKEY),
        "--registry".into(),
        format!("https://127.0.0.1:{}", free_port()),
    ];
    flags.extend(certs.flags("local", "logging"));
    let (ok, output) = exits("logging", &args(&flags)).await;
    table.check(
        "logging on a stream it may not update",
        "exits, names the subject",
        !ok && output.contains("Permissions Violation")
            && output.contains("$JS.API.STREAM.UPDATE.MESSAGES"),
        output
            .lines()
            .find(|line| line.starts_with("Error:"))
            .unwrap_or_default()
            .to_owned(),
    );
    table.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
