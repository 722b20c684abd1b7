//! Evicts instances whose lease has ended.
//!
//! The task sleeps until the earliest deadline and no longer; a change in the registry
//! (such as the first registration) wakes it to look again. Deadlines move later with
//! every heartbeat; the one thing that moves one earlier, a session lost with a grace,
//! wakes it too, so it never oversleeps.
//!
//! Except a pause of the whole process. If it wakes more than a heartbeat interval after
//! the deadline it slept for, the process was frozen (SIGSTOP, a paused VM, swapped
//! out): every instance's heartbeats in that time went unread, so evicting them now
//! would empty the registry of live instances. Instead every lease restarts from now,
//! as etcd extends leases after a leader change, and only instances that stay silent for
//! a whole TTL after the resume are evicted.

use std::{sync::Arc, time::Duration};

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    registry::{Registry, Removal},
    report,
};

/// The smallest lateness taken for a pause: a busy scheduler is late by milliseconds.
const MIN_PAUSE: Duration = Duration::from_millis(100);

pub(crate) async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut changes = registry.subscribe();
    let pause = registry.heartbeat_interval().max(MIN_PAUSE);
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
            () = registry.deadline_moved_earlier() => {}
            () = due => {
                let now = Instant::now();
                let late = next.map_or(Duration::ZERO, |planned| now.saturating_duration_since(planned));
                if late > pause {
                    let renewed = registry.renew_all(now);
                    metrics::counter!("registry_pauses_total").increment(1);
                    warn!(
                        late = %humantime::format_duration(late),
                        renewed,
                        "the registry was paused (a frozen process or machine): renewed every \
                         lease rather than evict instances whose heartbeats it could not read"
                    );
                    continue;
                }
                let ttl = format!("ttl {}", humantime::format_duration(registry.ttl()));
                for (instance, reason) in registry.evict_expired(now) {
                    let detail = match reason {
                        Removal::ConnectionLost => "no new session within the grace",
                        _ => ttl.as_str(),
                    };
                    report::removed(&instance, reason, detail);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::{
        ownership::Caller,
        registry::{Registrant, RegistryConfig},
    };

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_evicts_on_time_without_wall_clock_waiting() {
        let registry = Arc::new(Registry::new(RegistryConfig::default()).expect("registry"));
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(run(Arc::clone(&registry), shutdown.clone()));
        let ttl = registry.ttl();

        let (lease, _) = registry
            .register(
                Registrant {
                    caller: &Caller::Anyone,
                    session: None,
                },
                "logging",
                "127.0.0.1:50051",
                BTreeMap::new(),
                None,
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
            .heartbeat(&Caller::Anyone, &lease.instance_id, Instant::now())
            .is_err());
        assert!(Instant::now() - started <= Duration::from_millis(10));

        shutdown.cancel();
        sweeper.await.expect("sweeper stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_session_with_a_grace_wakes_the_sweeper_to_evict_when_the_grace_ends() {
        let grace = Duration::from_millis(300);
        let registry = Arc::new(
            Registry::new(RegistryConfig {
                session_grace: grace,
                ..RegistryConfig::default()
            })
            .expect("registry"),
        );
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(run(Arc::clone(&registry), shutdown.clone()));
        registry
            .register(
                Registrant {
                    caller: &Caller::Anyone,
                    session: Some(1),
                },
                "logging",
                "127.0.0.1:50051",
                BTreeMap::new(),
                Some("logging-1"),
                Instant::now(),
            )
            .expect("register");
        // Let the sweeper go to sleep until the ttl's end.
        tokio::time::advance(Duration::from_millis(10)).await;
        tokio::task::yield_now().await;

        let lost = Instant::now();
        let mut changes = registry.subscribe();
        changes.borrow_and_update();
        registry.session_lost("logging-1", 1, lost, grace);
        changes.changed().await.expect("eviction announced");
        assert_eq!(registry.len(), 0);
        // Without the wake-up it would have slept until the ttl (3 s).
        assert!(Instant::now() - lost <= grace + Duration::from_millis(10));
        assert_eq!(registry.removals()[0].reason, Removal::ConnectionLost);

        shutdown.cancel();
        sweeper.await.expect("sweeper stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_renews_every_lease_and_the_silent_are_evicted_one_ttl_later() {
        let registry = Arc::new(Registry::new(RegistryConfig::default()).expect("registry"));
        let shutdown = CancellationToken::new();
        let sweeper = tokio::spawn(run(Arc::clone(&registry), shutdown.clone()));
        let ttl = registry.ttl();
        for port in 1..=3 {
            registry
                .register(
                    Registrant {
                        caller: &Caller::Anyone,
                        session: None,
                    },
                    "logging",
                    &format!("127.0.0.1:{port}"),
                    BTreeMap::new(),
                    None,
                    Instant::now(),
                )
                .expect("register");
        }
        tokio::task::yield_now().await;

        // The sweeper cannot run while the clock jumps: a freeze of ttl + 5 s. Without
        // the pause check every lease would be over, and all three evicted at once.
        tokio::time::advance(ttl + Duration::from_secs(5)).await;
        tokio::task::yield_now().await;
        assert_eq!(registry.len(), 3, "nobody evicted right after the pause");

        // Nobody heartbeats after the resume: all evicted, within one ttl of it.
        let resumed = Instant::now();
        let mut changes = registry.subscribe();
        changes.borrow_and_update();
        tokio::time::advance(ttl - Duration::from_millis(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(
            registry.len(),
            3,
            "a full ttl after the resume to heartbeat"
        );
        changes.changed().await.expect("eviction announced");
        assert_eq!(registry.len(), 0);
        assert!(Instant::now() - resumed <= ttl);

        shutdown.cancel();
        sweeper.await.expect("sweeper stops");
    }
}
