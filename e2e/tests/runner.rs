//! The runner starts the system in order, and stops every child on Ctrl+C.

use std::time::Duration;

use e2e::{curl, curl_post, eventually, free_port, Proc};
use nix::sys::signal::Signal;

fn port_is_closed(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn runner_starts_everything_serves_the_walkthrough_and_stops_on_ctrl_c() {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    // Logging instances take consecutive ports from --logging-port; find two free ones.
    let logging_port = loop {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
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
    let mut runner = Proc::start("runner", "runner", &args);
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
    let mut runner = Proc::start("runner", "runner", &args);
    let status = runner.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let output = runner.output();
    assert!(
        output.contains("messages exited during start-up"),
        "{output}"
    );
    assert!(output.contains("cannot listen on"), "{output}");
}
