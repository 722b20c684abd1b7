//! The config server's status page in real headless Chromium: instances appear, a
//! killed one vanishes without a reload and is listed as removed, and the screenshots
//! (laptop and phone widths) are written under target/e2e-screenshots/, each with what
//! it shows (tables, their columns, the heartbeat) in a PNG text chunk. The README's
//! pictures, `docs/status-page.png` and `docs/status-page-phone.png`, must show the
//! same: the test fails when the page has changed and they have not.

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
    let expected_heartbeat = "heartbeat every 1000 ms"; // the default, as a user sees it
    for name in ["status-page.png", "status-page-phone.png"] {
        let live = layout(&shots.join(name));
        let tables: Vec<&str> = live["tables"]
            .as_array()
            .expect("tables")
            .iter()
            .map(|t| t["table"].as_str().expect("title"))
            .collect();
        assert!(tables.contains(&"Recently removed"), "{name}: {live}");
        let logging = live["tables"]
            .as_array()
            .expect("tables")
            .iter()
            .find(|t| t["table"] == "logging")
            .unwrap_or_else(|| panic!("{name}: no logging table in {live}"));
        assert!(
            logging["columns"]
                .as_array()
                .expect("columns")
                .iter()
                .any(|c| c == "Held by"),
            "{name}: {live}"
        );
        assert_eq!(live["heartbeat"], expected_heartbeat, "{name}: {live}");
        let committed = layout(&repo_root().join("docs").join(name));
        assert!(
            committed == live,
            "docs/{name} shows {committed}, the page now shows {live}: copy \
             target/e2e-screenshots/{name} to docs/"
        );
    }
}

/// What a screenshot shows, from its "layout" text chunk (the browser script writes it).
fn layout(png: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        png.display()
    );
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let length = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..(at + 8 + length).min(bytes.len())];
        if kind == b"tEXt" {
            if let Some(text) = data.strip_prefix(b"layout\0") {
                return serde_json::from_slice(text).expect("layout is JSON");
            }
        }
        at += 12 + length;
    }
    panic!(
        "{} says nothing of what it shows (no layout chunk): it was not written by this test",
        png.display()
    )
}
