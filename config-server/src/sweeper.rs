//! Evicts instances whose lease has ended.
//!
//! The task sleeps until the earliest deadline and no longer; a change in the registry
//! (such as the first registration) wakes it to look again. With a fixed TTL, deadlines
//! only ever move later, so nothing else can make it oversleep.

use std::sync::Arc;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::registry::Registry;

pub(crate) async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut changes = registry.subscribe();
    loop {
        let next = registry.next_deadline();
        let due = async {
            match next {
                Some(deadline) => sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                metrics::gauge!("registry_instances").set(registry.len() as f64);
            }
            () = due => {
                let ttl = humantime::format_duration(registry.ttl()).to_string();
                let evicted = registry.evict_expired(Instant::now());
                metrics::counter!("registry_evictions_total").increment(evicted.len() as u64);
                for instance in evicted {
                    info!(
                        service = instance.service,
                        address = instance.address,
                        instance_id = %instance.id,
                        ttl,
                        "evicted: no heartbeat within the ttl"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::registry::RegistryConfig;

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_evicts_on_time_without_wall_clock_waiting() {
        let registry = Arc::new(Registry::new(RegistryConfig::default()).expect("registry"));
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(run(Arc::clone(&registry), shutdown.clone()));
        let ttl = registry.ttl();

        let (lease, _) = registry
            .register(
                "logging",
                "127.0.0.1:50051",
                BTreeMap::new(),
                Instant::now(),
            )
            .expect("register");
        let mut changes = registry.subscribe();
        changes.borrow_and_update();

        tokio::time::advance(ttl - Duration::from_millis(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(registry.len(), 1, "still within the ttl");

        // The next change is the eviction; with the clock paused it comes right at ttl.
        let started = Instant::now();
        changes.changed().await.expect("eviction announced");
        assert_eq!(registry.len(), 0);
        assert!(registry
            .heartbeat(&lease.instance_id, Instant::now())
            .is_err());
        assert!(Instant::now() - started <= Duration::from_millis(10));

        shutdown.cancel();
        sweeper.await.expect("sweeper stops");
    }
}
