//! The runner starts the system in order, and stops every child on Ctrl+C.

use std::time::Duration;

use e2e::{curl, curl_post, eventually, free_port, free_ports, Proc};
use nix::sys::signal::Signal;

fn port_is_closed(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn runner_starts_everything_serves_the_walkthrough_and_stops_on_ctrl_c() {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    // Logging instances take consecutive ports from --logging-port; find two free ones.
    let logging_port = free_ports(2);
    let token_file = std::env::temp_dir().join(format!("runner-token-{}", std::process::id()));
    let args: Vec<String> = vec![
        "--token-file".into(),
        token_file.display().to_string(),
        "--store".into(),
        "memory".into(),
        "--logging".into(),
        "2".into(),
        "--registry-port".into(),
        ports[0].to_string(),
        "--messages-port".into(),
        ports[1].to_string(),
        "--facade-port".into(),
        ports[2].to_string(),
        "--logging-port".into(),
        logging_port.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut runner = Proc::start("runner", "runner", &args).stopped_on_drop_with(Signal::SIGINT);
    eventually(Duration::from_secs(30), "runner ready", || async {
        runner.output().contains("runner: ready")
    })
    .await;

    let facade = std::net::SocketAddr::from(([127, 0, 0, 1], ports[2]));
    let (status, reply) = curl_post(facade, "through the runner");
    assert_eq!(status, 201, "{reply}");
    let (status, _, body) = curl("GET", &format!("http://{facade}/messages"), &[]);
    assert_eq!(status, 200);
    assert!(body.contains("not implemented yet"));
    let output = runner.output();
    assert!(
        output.contains("facade |") && output.contains("config-server |"),
        "prefixed output"
    );

    runner.signal(Signal::SIGINT);
    let status = runner.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let output = runner.output();
    // Reverse start order: logging first, config server last.
    let logging_stopped = output
        .find(&format!("logging-{logging_port} stopped"))
        .expect("logging stopped");
    let registry_stopped = output
        .find("config-server stopped")
        .expect("config server stopped");
    assert!(logging_stopped < registry_stopped);
    assert!(!token_file.exists(), "the token file is removed on exit");
    for port in [ports[0], ports[1], ports[2], logging_port, logging_port + 1] {
        assert!(
            port_is_closed(port),
            "port {port} still open after the runner stopped"
        );
    }
}

#[tokio::test]
async fn runner_fails_loudly_when_a_core_service_cannot_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let args: Vec<String> = vec![
        "--store".into(),
        "memory".into(),
        "--registry-port".into(),
        free_port().to_string(),
        "--messages-port".into(),
        taken_port.to_string(),
        "--facade-port".into(),
        free_port().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut runner = Proc::start("runner", "runner", &args).stopped_on_drop_with(Signal::SIGINT);
    let status = runner.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let output = runner.output();
    assert!(
        output.contains("messages exited during start-up"),
        "{output}"
    );
    assert!(output.contains("cannot listen on"), "{output}");
}

#[tokio::test]
async fn with_nats_the_terminal_stays_readable_and_a_clean_stop_reads_as_one() {
    let data_dir = std::env::temp_dir().join(format!("runner-nats-{}", std::process::id()));
    let logging_port = free_ports(3);
    let facade_port = free_port();
    let args: Vec<String> = vec![
        "--store".into(),
        "nats".into(),
        "--logging".into(),
        "3".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--nats-port".into(),
        free_ports(3).to_string(),
        "--nats-cluster-port".into(),
        free_ports(3).to_string(),
        "--registry-port".into(),
        free_port().to_string(),
        "--messages-port".into(),
        free_port().to_string(),
        "--facade-port".into(),
        facade_port.to_string(),
        "--logging-port".into(),
        logging_port.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut runner = Proc::start("runner", "runner", &args).stopped_on_drop_with(Signal::SIGINT);
    let end_of_ready = "Ctrl+C stops everything";
    eventually(Duration::from_secs(60), "runner ready", || async {
        runner.output().contains(end_of_ready)
    })
    .await;
    let output = runner.output();
    let start_up: Vec<&str> = output
        .lines()
        .take_while(|line| !line.contains(end_of_ready))
        .collect();
    eprintln!("{} lines until ready", start_up.len() + 1);
    assert!(
        start_up.len() < 60,
        "start-up fits on one screen ({} lines):\n{output}",
        start_up.len() + 1
    );
    // Every address and the store are on the screen.
    for port in [
        facade_port,
        logging_port,
        logging_port + 1,
        logging_port + 2,
    ] {
        assert!(output.contains(&format!("127.0.0.1:{port}")), "{output}");
    }
    assert!(output.contains("NATS JetStream R3 nats://"), "{output}");
    // nats-server's banner and cluster chatter are in its log files, not the terminal;
    // the NATS client's "connected" lines are at DEBUG.
    assert!(!output.contains("Starting nats-server"), "{output}");
    assert!(!output.contains("connected successfully"), "{output}");
    let node_log = std::fs::read_to_string(data_dir.join("node-1.log")).expect("node log");
    assert!(node_log.contains("Starting nats-server"), "{node_log}");

    let (status, reply) = curl_post(
        std::net::SocketAddr::from(([127, 0, 0, 1], facade_port)),
        "hi",
    );
    assert_eq!(status, 201, "{reply}");

    runner.signal(Signal::SIGINT);
    let status = runner.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    let output = runner.output();
    for node in ["nats-1", "nats-2", "nats-3", "facade", "config-server"] {
        assert!(
            output.contains(&format!("runner: {node} stopped\n")),
            "{node}:\n{output}"
        );
    }
    assert!(!output.contains("stopped with an error"), "{output}");
    assert!(!output.contains("exit status"), "{output}");
    std::fs::remove_dir_all(&data_dir).ok();
}

/// The pid of the process whose command line holds every one of `words`.
fn pid_of(words: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            words
                .iter()
                .all(|word| {
                    args.iter()
                        .any(|arg| arg == word || arg.ends_with(&format!("/{word}")))
                })
                .then_some(pid)
        })
}

#[tokio::test]
async fn runner_starts_registry_replicas_and_a_bare_logging_finds_them_with_the_first_down() {
    // Replicas go on --registry-port, +100 and +200: find a port with both free.
    let registry_port = loop {
        let port = free_port();
        let free = |p: Option<u16>| {
            p.is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        };
        if free(port.checked_add(100)) && free(port.checked_add(200)) {
            break port;
        }
    };
    let replicas: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", registry_port + 100 * i))
        .collect();
    let facade_port = free_port();
    let args: Vec<String> = vec![
        "--store".into(),
        "memory".into(),
        "--registries".into(),
        "3".into(),
        "--registry-port".into(),
        registry_port.to_string(),
        "--messages-port".into(),
        free_port().to_string(),
        "--facade-port".into(),
        facade_port.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut runner = Proc::start("runner", "runner", &args).stopped_on_drop_with(Signal::SIGINT);
    eventually(Duration::from_secs(30), "runner ready", || async {
        runner.output().contains("runner: ready")
    })
    .await;
    let replica_file = runner.cwd().join(registry_client::DEFAULT_REPLICAS_FILE);
    let listed = std::fs::read_to_string(&replica_file).expect("replica file");
    assert_eq!(listed.lines().collect::<Vec<_>>(), replicas);

    // kill -9 the first replica: the runner says which, and keeps the rest running.
    let first = pid_of(&["config-server", &replicas[0]]).expect("first replica's pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).expect("kill");
    let died = format!("config-server-{registry_port} exited unexpectedly");
    eventually(
        Duration::from_secs(10),
        "the runner reports the replica",
        || async { runner.output().contains(&died) },
    )
    .await;

    // A bare `logging PORT` beside the runner finds the other replicas from its files.
    let logging = free_port();
    let _logging = Proc::spawn_in(
        Some(runner.cwd()),
        "logging-bare",
        &e2e::bin("logging"),
        &[&logging.to_string()],
    );
    let address = format!("127.0.0.1:{logging}");
    for replica in &replicas[1..] {
        let replica: std::net::SocketAddr = replica.parse().expect("addr");
        eventually(
            Duration::from_secs(15),
            "the bare instance registered",
            || async {
                e2e::registered_on(replica)
                    .await
                    .is_ok_and(|listed| listed.contains(&address))
            },
        )
        .await;
    }
    let facade = std::net::SocketAddr::from(([127, 0, 0, 1], facade_port));
    let (status, reply) = curl_post(facade, "with a replica down");
    assert_eq!(status, 201, "{reply}");

    runner.signal(Signal::SIGINT);
    let status = runner.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert!(
        !replica_file.exists(),
        "the replica file is removed on exit"
    );
}

/// `runner certs`, then `runner --tls` on its host folder: the whole system secured on
/// a NATS cluster locked down, reached with curl over HTTPS, and not in plaintext.
#[tokio::test]
async fn runner_with_tls_serves_over_https_on_a_locked_store_and_nothing_in_the_clear() {
    let dir = std::env::temp_dir().join(format!("runner-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let certs = Proc::spawn_in(
        Some(&dir),
        "runner-certs",
        &e2e::bin("runner"),
        &["certs", "--out", "certs"],
    )
    .wait_exit(Duration::from_secs(20))
    .await;
    assert!(certs.success(), "runner certs: {certs}");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let (logging_port, nats_port, cluster_port) = (free_ports(2), free_ports(3), free_ports(3));
    let args: Vec<String> = vec![
        "--tls".into(),
        "certs/local".into(),
        "--store".into(),
        "nats".into(),
        "--logging".into(),
        "2".into(),
        "--registry-port".into(),
        ports[0].to_string(),
        "--messages-port".into(),
        ports[1].to_string(),
        "--facade-port".into(),
        ports[2].to_string(),
        "--logging-port".into(),
        logging_port.to_string(),
        "--nats-port".into(),
        nats_port.to_string(),
        "--nats-cluster-port".into(),
        cluster_port.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut runner = Proc::spawn_in(Some(&dir), "runner", &e2e::bin("runner"), &args)
        .stopped_on_drop_with(Signal::SIGINT);
    eventually(Duration::from_secs(60), "runner ready", || async {
        runner.output().contains("runner: ready")
    })
    .await;
    let ca = dir.join("certs/local/ca.pem").display().to_string();
    let facade = format!("https://127.0.0.1:{}/messages", ports[2]);
    let json = ["-H", "content-type: application/json", "--cacert", &ca];
    let body = ["-d", r#"{"msg":"over TLS"}"#];
    let (status, _, reply) = curl("POST", &facade, &[&json[..], &body[..]].concat());
    assert_eq!(status, 201, "{reply}");
    let (status, _, reply) = curl("GET", &facade, &["--cacert", &ca]);
    assert_eq!(status, 200);
    assert!(reply.contains("over TLS"), "{reply}");
    assert!(
        runner.output().contains("tls://127.0.0.1"),
        "the store over TLS:\n{}",
        runner.output()
    );
    let plain = e2e::http_code(&format!("http://127.0.0.1:{}/messages", ports[2]), &[]);
    assert_eq!(plain, "000", "no HTTP answer in the clear");

    runner.signal(Signal::SIGINT);
    let status = runner.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every port a runner said it started something on: its services' and NATS nodes'.
fn started_ports(output: &str) -> Vec<u16> {
    output
        .lines()
        .filter(|line| line.contains("is SERVING on") || line.contains("cluster ready ("))
        .flat_map(|line| line.split("127.0.0.1:").skip(1))
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The rows of a lab's verdict table: (step, pass).
fn verdict_rows(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .skip_while(|line| !line.starts_with("step "))
        .skip(2)
        .take_while(|line| line.contains(" | "))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
            (cells[0].to_owned(), cells[cells.len() - 1].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_lab_passes_on_nats_keeps_the_system_and_stops_it_on_ctrl_c() {
    let mut lab =
        Proc::start("runner", "runner", &["lab", "--keep"]).stopped_on_drop_with(Signal::SIGINT);
    eventually(
        Duration::from_secs(180),
        "the lab's verdict and --keep",
        || async { lab.output().contains("until Ctrl+C") },
    )
    .await;
    let output = lab.output();
    assert!(
        output.contains("lab: verdict: PASS, all 7 steps"),
        "{output}"
    );
    let rows = verdict_rows(&output);
    assert_eq!(rows.len(), 7, "{output}");
    assert!(rows.iter().all(|(_, pass)| pass == "yes"), "{rows:?}");
    assert!(
        output.contains("503 after") && output.contains("stop logging-"),
        "{output}"
    );
    // Who stored what: one line per message, naming an instance.
    for i in 1..=10 {
        assert!(
            output
                .lines()
                .any(|line| line.trim_start().starts_with(&format!("msg{i} "))
                    && line.contains("logging-")),
            "msg{i} without its instance:\n{output}"
        );
    }

    // Kept: the facade still answers with all ten, from the one node left.
    let facade_port = output
        .lines()
        .find(|line| line.contains("facade is SERVING on"))
        .map(|line| started_ports(line)[0])
        .expect("the facade's port");
    let (status, _, body) = curl(
        "GET",
        &format!("http://127.0.0.1:{facade_port}/messages"),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"msg10\""), "{body}");

    lab.signal(Signal::SIGINT);
    let status = lab.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    let output = lab.output();
    for port in started_ports(&output) {
        assert!(
            port_is_closed(port),
            "port {port} still open after the lab stopped"
        );
    }
    let dir = output
        .lines()
        .find_map(|line| {
            line.strip_prefix("lab: starting the system on free ports; services log to ")
        })
        .expect("the lab's directory");
    assert!(
        !std::path::Path::new(dir).exists(),
        "{dir} is removed after a pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_lab_fails_on_the_memory_store_and_says_why() {
    let mut lab = Proc::start("runner", "runner", &["lab", "--store", "memory"]);
    let status = lab.wait_exit(Duration::from_secs(120)).await;
    let output = lab.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("lab: verdict: FAIL"), "{output}");
    let rows = verdict_rows(&output);
    assert_eq!(rows.len(), 7, "{output}");
    let get = output
        .lines()
        .find(|line| line.starts_with("GET /messages "))
        .expect("the GET row");
    assert!(
        get.ends_with("| NO")
            && get
                .contains("the memory store keeps each message only on the instance that took it"),
        "{get}"
    );
    for port in started_ports(&output) {
        assert!(
            port_is_closed(port),
            "port {port} still open after the lab ended"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_lab_stops_everything_when_interrupted() {
    let mut lab = Proc::start("runner", "runner", &["lab"]).stopped_on_drop_with(Signal::SIGINT);
    eventually(
        Duration::from_secs(180),
        "the lab waiting on POST msg11",
        || async { lab.output().contains("lab: POST msg11") },
    )
    .await;
    lab.signal(Signal::SIGINT);
    let status = lab.wait_exit(Duration::from_secs(60)).await;
    let output = lab.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("interrupted"), "{output}");
    assert!(!output.contains("lab: verdict"), "{output}");
    // Stopped one by one, politely, not left to die with the runner.
    for name in ["facade", "messages", "config-server", "nats-3"] {
        assert!(
            output.contains(&format!("runner: {name} stopped\n")),
            "{name}:\n{output}"
        );
    }
    let started = started_ports(&output);
    assert!(started.len() >= 9, "{started:?}\n{output}");
    for port in started {
        assert!(port_is_closed(port), "port {port} still open after Ctrl+C");
    }
}
