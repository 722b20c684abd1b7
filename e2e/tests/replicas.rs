//! Registry replicas: they list each other, every instance registers with all of them
//! under one id, a client told of one learns the rest, and the status page shows which
//! answer. (Losing, freezing and restarting one under load is in the chaos suite.)

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use e2e::{curl, eventually, free_addr, grpcurl_json, wait_serving, Proc, System};
use registry_client::RegistryClient;

/// Instance id by address, for `service`, as one replica lists it.
async fn ids_on(replica: SocketAddr, service: &str) -> BTreeMap<String, String> {
    let client = RegistryClient::new(&replica.to_string()).expect("client");
    let reply = client.lookup(service).await.expect("lookup");
    reply
        .instances
        .into_iter()
        .map(|i| (i.address, i.instance_id))
        .collect()
}

/// `/v1/services`'s replicas on `replica`: (address, this, answers).
fn status_replicas(replica: SocketAddr) -> Vec<(String, bool, Option<bool>)> {
    let (status, _, body) = curl("GET", &format!("http://{replica}/v1/services"), &[]);
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    body["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap_or_default().to_owned(),
                r["this"].as_bool().unwrap_or_default(),
                r["answers"].as_bool(),
            )
        })
        .collect()
}

#[tokio::test]
async fn replicas_list_each_other_and_hold_every_instance_under_one_id() {
    let mut system = System::start_replicated(3, 2, &[], "memory").await;
    let replicas = system.replica_addrs();
    let mut all: Vec<String> = replicas.iter().map(ToString::to_string).collect();
    all.sort();

    // Every replica lists all replicas as `config-server` (grpcurl, from any one).
    for replica in &replicas {
        let reply = grpcurl_json(
            *replica,
            "registry.v1.Registry/Lookup",
            Some(r#"{"service":"config-server"}"#),
        );
        let mut listed: Vec<String> = reply["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| i["address"].as_str().unwrap_or_default().to_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, all, "on {replica}");
    }

    // Every instance is on every replica, under the id it chose.
    let on_first = ids_on(replicas[0], "logging").await;
    assert_eq!(on_first.len(), 2);
    for replica in &replicas[1..] {
        eventually(
            Duration::from_secs(5),
            "the same instances and ids",
            || async { ids_on(*replica, "logging").await == on_first },
        )
        .await;
    }

    // An instance told of one replica only learns the others from it.
    let late = free_addr();
    let only_last = format!("http://{}", replicas[2]);
    let _late = Proc::start(
        "logging-late",
        "logging",
        &[&late.port().to_string(), "--registry", &only_last],
    );
    wait_serving(late).await;
    for replica in &replicas {
        eventually(
            Duration::from_secs(15),
            "the late instance on every replica",
            || async {
                ids_on(*replica, "logging")
                    .await
                    .contains_key(&late.to_string())
            },
        )
        .await;
    }
    let id = ids_on(replicas[2], "logging").await[&late.to_string()].clone();
    for replica in &replicas {
        assert_eq!(ids_on(*replica, "logging").await[&late.to_string()], id);
    }

    // The status page shows every replica and whether it answers.
    eventually(Duration::from_secs(5), "every replica answers", || async {
        let seen = status_replicas(replicas[0]);
        seen.len() == 3 && seen.iter().all(|(_, _, answers)| *answers == Some(true))
    })
    .await;
    let seen = status_replicas(replicas[0]);
    assert_eq!(
        seen.iter().filter(|(_, this, _)| *this).count(),
        1,
        "{seen:?}"
    );
    system.replica_proc(1).kill9().await;
    let dead = replicas[1].to_string();
    eventually(
        Duration::from_secs(5),
        "the dead replica shown down",
        || async {
            status_replicas(replicas[0])
                .iter()
                .any(|(address, _, answers)| *address == dead && *answers == Some(false))
        },
    )
    .await;
}
