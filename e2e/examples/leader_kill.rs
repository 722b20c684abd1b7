//! Measures how long a three-node JetStream cluster refuses writes after kill -9 of a
//! follower and of the stream leader. Run: `cargo run -p e2e --example leader_kill`.

use std::time::{Duration, Instant};

use logging::store::{Message, MessageStore, NatsConfig, NatsStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut nats = e2e::Nats::cluster(3).await;
    let urls: Vec<String> = nats.urls().split(',').map(str::to_owned).collect();
    let store = NatsStore::connect(
        NatsConfig::new(urls),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await?;
    let probe = async_nats::jetstream::new(async_nats::connect(nats.nodes[0].url()).await?);
    let mut n = 0;
    for round in 0..6 {
        let info = probe.get_stream("MESSAGES").await?.get_info().await?;
        let leader = info.cluster.and_then(|c| c.leader).unwrap_or_default();
        let leader_index = leader.trim_start_matches("nats-").parse::<usize>()? - 1;
        // Alternate follower and leader; node 0 carries the probe, so it is never killed.
        let victim = if round % 2 == 0 {
            (1..3).find(|i| *i != leader_index).unwrap_or(1)
        } else {
            leader_index
        };
        if victim == 0 {
            continue;
        }
        let role = if victim == leader_index {
            "leader"
        } else {
            "follower"
        };
        nats.kill9(victim).await;
        let killed = Instant::now();
        let mut refused = 0;
        loop {
            n += 1;
            let message = Message {
                id: format!("probe-{n}"),
                text: "x".into(),
            };
            if store.append(message).await.is_ok() {
                break;
            }
            refused += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "kill -9 of the stream {role}: writes accepted again after {:?} ({refused} refused)",
            killed.elapsed()
        );
        nats.start_node(victim);
        nats.wait_ready().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(())
}
