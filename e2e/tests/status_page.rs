//! The config server's status page in real headless Chromium: instances appear, a
//! killed one vanishes without a reload, and screenshots (laptop and phone widths) are
//! saved under target/e2e-screenshots/.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use e2e::{free_addr, repo_root, wait_serving, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_instances_live_and_drops_a_killed_one() {
    let registry = free_addr();
    let _server = Proc::start(
        "config-server",
        "config-server",
        &[
            "--addr",
            &registry.to_string(),
            "--static",
            "messages=127.0.0.1:50060",
            "--heartbeat-interval",
            "250ms",
            "--ttl",
            "1s",
        ],
    );
    wait_serving(registry).await;
    let registry_url = format!("http://{registry}");
    let mut instances = Vec::new();
    for _ in 0..2 {
        let addr = free_addr();
        let proc = Proc::start(
            "logging",
            "logging",
            &[
                &addr.port().to_string(),
                "--registry",
                &registry_url,
                "--store",
                "memory",
            ],
        );
        wait_serving(addr).await;
        instances.push((addr, proc));
    }

    let shots = repo_root().join("target/e2e-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let watch = [
        instances[0].0.to_string(),
        instances[1].0.to_string(),
        "127.0.0.1:50060".to_owned(),
    ]
    .join(",");
    let gone = instances[0].0.to_string();
    let mut browser = Command::new("node")
        .arg(repo_root().join("e2e/browser/status_page.mjs"))
        .args([
            &format!("http://{registry}/"),
            &shots.display().to_string(),
            &watch,
            &gone,
        ])
        .env(
            "PLAYWRIGHT_DIR",
            repo_root().join(".tools/npm/node_modules"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs (scripts/setup installs it)");
    let stdout = browser.stdout.take().expect("stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let seen = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the browser reports");
    assert_eq!(seen, "SEEN");
    instances[0].1.kill9().await;
    let vanished = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the browser reports");
    assert_eq!(vanished, "VANISHED");
    let status = browser.wait().expect("browser exits");
    assert!(status.success(), "{status}");
    for name in ["laptop", "phone", "after-kill"] {
        let shot = shots.join(format!("status-page-{name}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "{} missing or empty", shot.display());
    }
}
