//! The facade's OpenAPI document against tools that do not come from this project: the
//! copy in `docs/` is what the facade serves, openapi-spec-validator accepts it as
//! OpenAPI 3.1, Postman's converter (openapi-to-postmanv2) makes a collection of every
//! route from it, and schemathesis, run against the live system on the NATS store with
//! every check it has (its default; `e2e/schemathesis.toml` turns one off for three
//! operations, and says why), finds nothing. The tools are installed by
//! `SETUP_TEST=1 scripts/setup`, pinned by version and hash.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use e2e::{curl, Nats, System};
use serde_json::Value;

/// A test tool under `.tools/bin`.
fn tool(name: &str) -> PathBuf {
    let path = testkit::repo_root().join(".tools/bin").join(name);
    assert!(
        path.exists(),
        "{name} is not installed: run SETUP_TEST=1 scripts/setup"
    );
    path
}

fn committed() -> (PathBuf, Value) {
    let path = testkit::repo_root().join("docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.json");
    (
        path,
        serde_json::from_str(&text).expect("docs/openapi.json is JSON"),
    )
}

/// Every (method, path) the document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|key| ["get", "post", "put", "delete", "patch"].contains(&key.as_str()))
                .map(|method| (method.to_uppercase(), path.clone()))
        })
        .collect()
}

/// Runs `program` with `args`; its output on failure.
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_serves_the_committed_document_and_it_is_openapi_3_1() {
    let system = System::start(1, &[]).await;
    let (status, head, body) = curl(
        "GET",
        &format!("http://{}/openapi.json", system.facade),
        &[],
    );
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let served: Value = serde_json::from_str(&body).expect("the served document is JSON");
    let (path, committed) = committed();
    assert!(
        served == committed,
        "{} differs from what the facade serves; write it again with \
         `target/debug/facade --print-openapi > docs/openapi.json`",
        path.display()
    );
    assert!(
        served["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "{}",
        served["openapi"]
    );
    // The document names every route the facade answers on, and nothing else.
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/messages"),
        ("POST", "/messages"),
        ("GET", "/facade"),
        ("POST", "/facade"),
        ("GET", "/v1/messages"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(operations(&served), expected);

    let (valid, output) = run(
        &tool("openapi-spec-validator"),
        &[path.to_str().expect("path")],
    );
    assert!(
        valid,
        "openapi-spec-validator refuses the document:\n{output}"
    );
    println!("openapi-spec-validator: {}", output.trim());
}

#[test]
fn postman_imports_every_route() {
    let (path, doc) = committed();
    let out = std::env::temp_dir().join(format!("e2e-postman-{}.json", std::process::id()));
    let (converted, output) = run(
        &tool("openapi2postmanv2"),
        &[
            "-s",
            path.to_str().expect("path"),
            "-o",
            out.to_str().expect("path"),
            "-p",
            "-O",
            "folderStrategy=Paths",
        ],
    );
    assert!(converted, "openapi2postmanv2 failed:\n{output}");
    let collection: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("the collection"))
            .expect("JSON");
    let _ = std::fs::remove_file(&out);

    // Every request in the collection, folders walked, as (method, /path).
    fn requests(items: &Value, found: &mut BTreeSet<(String, String)>) {
        for item in items.as_array().into_iter().flatten() {
            if let Some(request) = item.get("request") {
                let method = request["method"].as_str().expect("method").to_owned();
                let segments: Vec<&str> = request["url"]["path"]
                    .as_array()
                    .expect("url.path")
                    .iter()
                    .map(|s| s.as_str().expect("segment"))
                    .collect();
                found.insert((method, format!("/{}", segments.join("/"))));
            }
            requests(&item["item"], found);
        }
    }
    let mut found = BTreeSet::new();
    requests(&collection["item"], &mut found);
    assert_eq!(found, operations(&doc), "the collection's requests");
    assert_eq!(collection["info"]["name"], doc["info"]["title"]);
    // The POST carries the documented body and idempotency header.
    let text = collection.to_string();
    assert!(text.contains("Idempotency-Key"), "{text}");
    assert!(text.contains("x-request-id"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_the_live_system_on_nats() {
    let nats = Nats::cluster(3).await;
    let system = System::start_with_store(3, &[], &nats.urls()).await;
    let config = testkit::repo_root().join("e2e/schemathesis.toml");
    let url = format!("http://{}/openapi.json", system.facade);
    // Its working directory is where Hypothesis keeps its files: not the source tree.
    let cwd = std::env::temp_dir().join(format!("e2e-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&cwd).expect("a working directory");
    let output = Command::new(tool("st"))
        .current_dir(&cwd)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &url])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis runs");
    let _ = std::fs::remove_dir_all(&cwd);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{text}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "schemathesis found failures (above)"
    );
    // Its summary counts the cases it generated ("670 generated, 670 passed").
    let cases = text
        .lines()
        .find(|line| line.contains(" generated, "))
        .unwrap_or_else(|| panic!("no count of test cases in:\n{text}"));
    println!("schemathesis: {}", cases.trim());
    let counts: Vec<u32> = cases
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [generated, passed] = counts[..] else {
        panic!("not `N generated, N passed`: {cases}");
    };
    assert_eq!(passed, generated, "{cases}");
    assert!(generated >= 500, "too few cases to mean anything: {cases}");
    drop(system);
}
