//! What operators see: request ids that follow a message through every service, JSON
//! logs, and Prometheus metrics on every port.

use std::time::Duration;

use e2e::{curl, eventually, System};
use nix::sys::signal::Signal;

fn json_lines(output: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[tokio::test]
async fn a_request_id_follows_the_message_into_every_service_and_json_logs_carry_it() {
    let mut system = System::start(2, &["--log-format", "json"]).await;
    let url = format!("http://{}/messages", system.facade);
    let post = |request_id: Option<&str>, msg: &str| {
        let body = serde_json::json!({ "msg": msg }).to_string();
        let mut args = vec!["-H", "content-type: application/json", "-d", &body];
        let header;
        if let Some(id) = request_id {
            header = format!("x-request-id: {id}");
            args.extend(["-H", header.as_str()]);
        }
        let (status, head, reply) = curl("POST", &url, &args);
        assert_eq!(status, 201, "{reply}");
        let echoed = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-request-id: ")
                    .map(str::to_owned)
            })
            .expect("x-request-id in the response");
        let id: serde_json::Value = serde_json::from_str(&reply).expect("json");
        (
            echoed.trim().to_owned(),
            id["id"].as_str().expect("id").to_owned(),
        )
    };

    // A client's id is kept, echoed, and logged by the instance that stored the message.
    let (echoed, id) = post(Some("trace-me-42"), "traced");
    assert_eq!(echoed, "trace-me-42");
    let logged = system.logging.iter().any(|(_, proc)| {
        proc.output().lines().any(|l| {
            l.contains("request_id=\"trace-me-42\"") && l.contains(&id) && l.contains("stored")
        })
    });
    assert!(
        logged,
        "a logging instance logged the request id with the message id"
    );

    // Without one, the facade makes one.
    let (made, _) = post(None, "untraced");
    assert_eq!(made.len(), 36, "{made}");

    // Failover lines in the facade (JSON) name the request they belong to.
    let (hung, _) = system.logging[0];
    system.logging_proc(hung).signal(Signal::SIGSTOP);
    for i in 0..20 {
        post(Some(&format!("hung-{i}")), &format!("while hung {i}"));
    }
    system.logging_proc(hung).signal(Signal::SIGCONT);
    let lines = json_lines(&system.facade_proc.output());
    assert!(!lines.is_empty(), "the facade logs JSON");
    let failover = lines
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.contains("attempt failed"))
                && line["request_id"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("hung-"))
        })
        .unwrap_or_else(|| panic!("no failover line with a request id in {lines:?}"));
    let request_id = failover["request_id"].as_str().unwrap_or_default();
    // ...and the instance that finally stored it logged the same id.
    let other = &system.logging[1].1;
    assert!(
        other
            .output()
            .contains(&format!("request_id=\"{request_id}\"")),
        "{request_id} in the storing instance's log"
    );
}

#[tokio::test]
async fn every_service_serves_prometheus_metrics_on_its_own_port() {
    let system = System::start(1, &[]).await;
    let (status, _, _) = curl(
        "POST",
        &format!("http://{}/messages", system.facade),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"msg":"count me"}"#,
        ],
    );
    assert_eq!(status, 201);
    let scrape = |addr: std::net::SocketAddr| {
        let (status, head, body) = curl("GET", &format!("http://{addr}/metrics"), &[]);
        assert_eq!(status, 200, "{addr}");
        assert!(head.contains("text/plain"), "{head}");
        body
    };
    let facade = scrape(system.facade);
    assert!(
        facade.contains(
            r#"facade_http_requests_total{route="/messages",method="POST",status="201"} 1"#
        ),
        "{facade}"
    );
    assert!(
        facade.contains("facade_http_request_duration_seconds_bucket"),
        "{facade}"
    );
    // Unknown paths and /metrics itself get an id and are counted too.
    let (status, head, _) = curl(
        "GET",
        &format!("http://{}/no-such-path", system.facade),
        &[],
    );
    assert_eq!(status, 404);
    assert!(
        head.to_ascii_lowercase().contains("x-request-id: "),
        "{head}"
    );
    let facade = scrape(system.facade);
    for counted in [
        r#"facade_http_requests_total{route="unmatched",method="GET",status="404"} 1"#,
        r#"facade_http_requests_total{route="/metrics",method="GET",status="200"}"#,
    ] {
        assert!(facade.contains(counted), "{counted} in {facade}");
    }
    let registry = scrape(system.registry);
    assert!(
        registry.contains("registry_registrations_total 1"),
        "{registry}"
    );
    assert!(registry.contains("registry_instances 2"), "{registry}");
    // Heartbeats come every 250 ms.
    eventually(Duration::from_secs(5), "a heartbeat counted", || async {
        scrape(system.registry).contains("registry_heartbeats_total")
    })
    .await;
    let logging = scrape(system.logging[0].0);
    assert!(
        logging.contains(r#"logging_appends_total{outcome="inserted"} 1"#),
        "{logging}"
    );
}
