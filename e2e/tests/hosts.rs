//! The test bed of hosts (`testkit::hosts`): network namespaces joined in a mesh, with
//! no route out, where one pair can be cut while the others carry on. Needs root; where
//! namespaces cannot be made the test says so in one line and passes nothing off as
//! tested.

use std::time::Duration;

use e2e::{bin, eventually, hosts::Hosts};

/// Whether `from` gets an HTTP answer from `url` within a second.
fn answers(hosts: &Hosts, from: &str, url: &str) -> bool {
    hosts
        .run(
            from,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                "-w",
                "%{http_code}",
                url,
            ],
        )
        .is_ok_and(|code| code == "200")
}

#[tokio::test]
async fn hosts_reach_each_other_but_nothing_else_and_a_cut_pair_only_loses_each_other() {
    let hosts = match Hosts::new(&["a", "b", "c"]) {
        Ok(hosts) => hosts,
        Err(why) => {
            println!("skipped: hosts_reach_each_other_but_nothing_else_and_a_cut_pair_only_loses_each_other (no network namespaces here: {why})");
            return;
        }
    };
    let b = format!("{}:50050", hosts.ip("b"));
    // Plain HTTP is what curl probes the links with; the hosts have no route out.
    let registry = hosts.spawn(
        "b",
        "config-server-b",
        &bin("config-server"),
        &["--addr", &b, "--insecure"],
    );
    let url = format!("http://{b}/v1/services");
    eventually(Duration::from_secs(20), "b answering a and c", || async {
        answers(&hosts, "a", &url) && answers(&hosts, "c", &url)
    })
    .await;

    for host in ["a", "b", "c"] {
        let routes = hosts.run(host, "ip", &["route", "show"]).expect("routes");
        assert!(
            !routes.contains("default"),
            "{host} has a way out:\n{routes}"
        );
        let links = hosts
            .run(host, "ip", &["-o", "link", "show"])
            .expect("links");
        assert_eq!(
            links.lines().count(),
            5,
            "{host}: lo, one veth end per other host and the sink pair, nothing else:\n{links}"
        );
    }

    hosts.cut("a", "b");
    assert!(!answers(&hosts, "a", &url), "a reached b through the cut");
    assert!(
        answers(&hosts, "c", &url),
        "c lost b though only a-b was cut"
    );
    hosts.heal("a", "b");
    eventually(Duration::from_secs(5), "a reaching b again", || async {
        answers(&hosts, "a", &url)
    })
    .await;

    hosts.isolate("b");
    assert!(!answers(&hosts, "a", &url) && !answers(&hosts, "c", &url));
    hosts.rejoin("b");
    eventually(Duration::from_secs(5), "b back for both", || async {
        answers(&hosts, "a", &url) && answers(&hosts, "c", &url)
    })
    .await;

    let namespace = hosts.namespace("a").to_owned();
    drop(registry);
    drop(hosts);
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&namespace),
        "namespaces left behind"
    );
}
