//! The built `config-server` binary, driven with grpcurl through reflection alone.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use e2e::{eventually, free_addr, grpcurl, grpcurl_json, wait_serving, Proc};

#[tokio::test]
async fn grpcurl_registers_looks_up_heartbeats_and_deregisters() {
    let addr = free_addr();
    let addr_arg = addr.to_string();
    let mut server = Proc::start(
        "config-server",
        "config-server",
        &[
            "--addr",
            &addr_arg,
            "--static",
            "messages=127.0.0.1:50060",
            "--set",
            "logging.store=memory",
            // Long enough for the grpcurl calls below (each spawns a process) to come
            // before the eviction even on a loaded machine; the eviction is tested last.
            "--heartbeat-interval",
            "1s",
            "--ttl",
            "5s",
        ],
    );
    wait_serving(addr).await;

    // Reflection: no .proto files needed.
    let list = grpcurl(addr, "list", None);
    let services = String::from_utf8_lossy(&list.stdout);
    for expected in ["registry.v1.Registry", "grpc.health.v1.Health"] {
        assert!(
            services.contains(expected),
            "missing {expected} in:\n{services}"
        );
    }

    let lease = grpcurl_json(
        addr,
        "registry.v1.Registry/Register",
        Some(r#"{"service":"logging","address":"127.0.0.1:50051","metadata":{"store":"memory"}}"#),
    );
    let id = lease["instanceId"]
        .as_str()
        .expect("instance id")
        .to_owned();
    assert_eq!(lease["ttlMs"], "5000");
    assert_eq!(lease["heartbeatIntervalMs"], "1000");

    let lookup = grpcurl_json(
        addr,
        "registry.v1.Registry/Lookup",
        Some(r#"{"service":"logging"}"#),
    );
    assert_eq!(lookup["instances"][0]["address"], "127.0.0.1:50051");
    assert_eq!(lookup["instances"][0]["metadata"]["store"], "memory");

    let heartbeat = grpcurl(
        addr,
        "registry.v1.Registry/Heartbeat",
        Some(&serde_json::json!({ "instanceId": id }).to_string()),
    );
    assert!(
        heartbeat.status.success(),
        "{}",
        String::from_utf8_lossy(&heartbeat.stderr)
    );

    let setting = grpcurl_json(
        addr,
        "registry.v1.Registry/GetSetting",
        Some(r#"{"key":"logging.store"}"#),
    );
    assert_eq!(setting["value"], "memory");

    let messages = grpcurl_json(
        addr,
        "registry.v1.Registry/Lookup",
        Some(r#"{"service":"messages"}"#),
    );
    assert_eq!(messages["instances"][0]["isStatic"], true);

    let deregister = grpcurl(
        addr,
        "registry.v1.Registry/Deregister",
        Some(&serde_json::json!({ "instanceId": id }).to_string()),
    );
    assert!(
        deregister.status.success(),
        "{}",
        String::from_utf8_lossy(&deregister.stderr)
    );
    let lookup = grpcurl_json(
        addr,
        "registry.v1.Registry/Lookup",
        Some(r#"{"service":"logging"}"#),
    );
    assert!(
        lookup.get("instances").is_none(),
        "deregistered at once: {lookup}"
    );

    // A heartbeat for the removed id is NOT_FOUND, with a message a person can act on.
    let unknown = grpcurl(
        addr,
        "registry.v1.Registry/Heartbeat",
        Some(&serde_json::json!({ "instanceId": id }).to_string()),
    );
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(
        stderr.contains("NotFound") && stderr.contains("unknown instance id"),
        "{stderr}"
    );

    // One registered without heartbeats is evicted by the binary's sweeper.
    grpcurl_json(
        addr,
        "registry.v1.Registry/Register",
        Some(r#"{"service":"logging","address":"127.0.0.1:50052"}"#),
    );
    eventually(Duration::from_secs(15), "eviction", || async {
        grpcurl_json(
            addr,
            "registry.v1.Registry/Lookup",
            Some(r#"{"service":"logging"}"#),
        )
        .get("instances")
        .is_none()
    })
    .await;
    let log = server.output();
    assert!(
        log.contains("registered") && log.contains("evicted"),
        "{log}"
    );

    let status = server.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

#[tokio::test]
async fn a_taken_port_or_a_bad_flag_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut server = Proc::start("config-server", "config-server", &["--addr", &addr]);
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert!(
        server.output().contains("cannot listen on"),
        "{}",
        server.output()
    );

    let mut bad = Proc::start("config-server", "config-server", &["--ttl", "soon"]);
    let status = bad.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert!(bad.output().contains("--ttl"), "{}", bad.output());
}

#[tokio::test]
async fn with_a_token_file_grpcurl_must_send_the_bearer_token_to_register() {
    let dir = std::env::temp_dir().join(format!("token-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token_file = dir.join("registry.token");
    std::fs::write(&token_file, "tok-123\n").expect("write");
    // A token others may read is refused (the security suite checks that).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let addr = free_addr();
    let mut server = Proc::start(
        "config-server",
        "config-server",
        &[
            "--addr",
            &addr.to_string(),
            "--token-file",
            &token_file.display().to_string(),
        ],
    );
    wait_serving(addr).await;
    let body = r#"{"service":"logging","address":"127.0.0.1:50051"}"#;
    let run = |headers: &[&str]| {
        let mut command = std::process::Command::new(e2e::grpcurl_path());
        command.args(["-plaintext", "-max-time", "10"]);
        for header in headers {
            command.args(["-H", header]);
        }
        command
            .args([
                "-d",
                body,
                &addr.to_string(),
                "registry.v1.Registry/Register",
            ])
            .output()
            .expect("grpcurl runs")
    };
    let anonymous = run(&[]);
    assert!(!anonymous.status.success());
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("Unauthenticated"));
    let wrong = run(&["authorization: Bearer nope"]);
    assert!(!wrong.status.success());
    let right = run(&["authorization: Bearer tok-123"]);
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    // Reads stay open.
    let lookup = grpcurl_json(
        addr,
        "registry.v1.Registry/Lookup",
        Some(r#"{"service":"logging"}"#),
    );
    assert_eq!(lookup["instances"][0]["address"], "127.0.0.1:50051");
    // The refusals were logged with the peer's address.
    let log = server.output();
    assert!(
        log.contains("refused an unauthenticated call") && log.contains("peer=\"127.0.0.1:"),
        "{log}"
    );
    assert!(server.terminate().await.success());
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_frozen_registry_evicts_nobody_when_it_resumes() {
    // TTL 1 s, heartbeats every 250 ms: a 3 s freeze outlives every lease.
    let mut system = e2e::System::start(2, &[]).await;
    system
        .registry_proc
        .signal(nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await; // the freeze under test, not a settle
    system
        .registry_proc
        .signal(nix::sys::signal::Signal::SIGCONT);
    let registry = system.registry;
    eventually(Duration::from_secs(10), "the pause noticed", || async {
        let (_, _, metrics) = e2e::curl("GET", &format!("http://{registry}/metrics"), &[]);
        metrics.contains("registry_pauses_total 1")
    })
    .await;
    assert_eq!(system.registered().await.len(), 2);
    let log = system.registry_proc.output();
    assert!(!log.contains("evicted"), "{log}");
    assert!(log.contains("the registry was paused"), "{log}");
    // The instances' clients gave up on the frozen registry and closed their sessions.
    // Whether it saw those end before or after their new sessions registered, it
    // removed nobody for it.
    let (first, _) = system.logging[0];
    let instance_log = system.logging_proc(first).output();
    assert!(
        instance_log.contains("registry session broke"),
        "{instance_log}"
    );
    assert!(!log.contains("removed: connection lost"), "{log}");
    // The instances heartbeat again; a crash after the resume is still evicted in time.
    let (dead, _) = system.logging[0];
    system.logging_proc(dead).kill9().await;
    system.wait_registered(1).await;
}

/// The runtime's worker threads of process `pid`, by the name tokio gives them.
fn worker_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("tokio-"))
        })
        .count()
}

#[tokio::test]
async fn threads_sets_the_runtime_one_thread_by_default() {
    for (flags, workers) in [(&[][..], 0), (&["--threads", "2"][..], 2)] {
        let addr = free_addr();
        let addr_arg = addr.to_string();
        let mut args = vec!["--addr", addr_arg.as_str()];
        args.extend_from_slice(flags);
        let server = Proc::start("config-server", "config-server", &args);
        wait_serving(addr).await;
        let lookup = grpcurl_json(
            addr,
            "registry.v1.Registry/Lookup",
            Some(r#"{"service":"logging"}"#),
        );
        assert_eq!(lookup["service"], "logging", "{lookup}");
        assert_eq!(
            worker_threads(server.pid().as_raw()),
            workers,
            "{flags:?}: tokio worker threads"
        );
    }
}
