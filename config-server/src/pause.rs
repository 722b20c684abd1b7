//! Notices that this whole process was paused (SIGSTOP, a paused VM, swapped out).
//!
//! A ticker wakes every [`TICK`]; one that comes more than [`LATE`] after the one before
//! means the process could not run in between. Clients ping the registry every 250 ms
//! and close a connection that stops answering, so after a pause the registry sees
//! many sessions end at once, all the moment it resumes. Those ends say nothing about
//! the instances, so a session lost while [`Pauses::just_resumed`] holds gets one TTL
//! to register again: the allowance the sweeper gives every lease after a pause.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How often the ticker wakes.
const TICK: Duration = Duration::from_millis(50);
/// A tick this late means a pause; a busy scheduler is late by milliseconds. Below the
/// clients' 500 ms to give up on a silent registry, so every pause that closed
/// connections is seen.
const LATE: Duration = Duration::from_millis(250);
/// How long after a noticed resume a lost session still counts as the pause's doing.
const RECENT: Duration = Duration::from_secs(1);

pub(crate) struct Pauses {
    origin: Instant,
    /// Milliseconds since `origin` of the last tick, and of the last resume seen.
    last_tick: AtomicU64,
    resumed: AtomicU64,
}

impl Pauses {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_tick: AtomicU64::new(0),
            resumed: AtomicU64::new(u64::MAX),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// Ticks until `shutdown`.
    pub(crate) async fn run(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = self.millis(Instant::now());
            let last = self.last_tick.swap(now, Ordering::AcqRel);
            if now.saturating_sub(last) > millis(LATE) {
                self.resumed.store(now, Ordering::Release);
            }
        }
    }

    /// Whether the process was paused just before `now`: the ticker has not run since
    /// (it is late), or it noticed a resume less than [`RECENT`] ago.
    pub(crate) fn just_resumed(&self, now: Instant) -> bool {
        let now = self.millis(now);
        let resumed = self.resumed.load(Ordering::Acquire);
        now.saturating_sub(self.last_tick.load(Ordering::Acquire)) > millis(LATE)
            || (resumed != u64::MAX && now.saturating_sub(resumed) < millis(RECENT))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_is_a_pause_for_a_while_and_then_forgotten() {
        let pauses = Arc::new(Pauses::new());
        let shutdown = CancellationToken::new();
        let ticker = tokio::spawn({
            let pauses = Arc::clone(&pauses);
            let shutdown = shutdown.clone();
            async move { pauses.run(shutdown).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!pauses.just_resumed(Instant::now()), "ticking on time");

        // The clock jumps with nothing running: the process was paused. Before the
        // ticker runs, the late tick already tells.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(pauses.just_resumed(Instant::now()), "before the ticker ran");
        tokio::time::sleep(TICK).await;
        assert!(
            pauses.just_resumed(Instant::now()),
            "after it noticed the resume"
        );
        tokio::time::sleep(RECENT).await;
        assert!(
            !pauses.just_resumed(Instant::now()),
            "a while after the resume"
        );

        shutdown.cancel();
        ticker.await.expect("ticker stops");
    }
}
