//! Capped exponential backoff with jitter: the delays [`Retry`](crate::Retry) waits.
//!
//! Each delay is drawn from the upper half of the current step (`[step/2, step]`), so
//! peers that failed together spread out while no retry comes sooner than half a step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    cap: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            cap,
            step: base.min(cap),
        }
    }

    /// The next delay to wait; each call doubles the step up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=step - half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_jitter_bounds_and_stays_under_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        let mut backoff = Backoff::new(base, cap);
        let mut step = base;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
            step = (step * 2).min(cap);
        }
    }
}
