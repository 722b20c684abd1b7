//! The one retry loop of the system, so that every wait behaves the same way.
//!
//! Every start-up wait and every retry (registering, following the registry, choosing
//! and connecting a store, failing over between instances, waiting for a child to
//! answer) is a call to [`Retry::run`]. Each one:
//!
//! - sleeps a capped, jittered, exponential [`Backoff`] between attempts;
//! - stops at once when its [`CancellationToken`] fires, even in the middle of an
//!   attempt or a sleep, so a process that is waiting for something that never comes
//!   still stops on Ctrl+C or SIGTERM;
//! - gives up after an optional time budget, returning the last error;
//! - returns a permanent error (as the caller classifies it) without retrying;
//! - logs the first failure, every tenth after it, and the recovery, unless the caller
//!   logs attempts itself ([`Retry::quiet`]).
//!
//! The shape follows neon's `utils::backoff::retry(op, is_permanent, ..., cancel)`.

mod backoff;

use std::{fmt::Display, future::Future, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use backoff::Backoff;

/// Failures logged at WARN: the first, then every this many.
const WARN_EVERY: u32 = 10;

/// Why [`Retry::run`] returned without a result.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetryError<E> {
    /// The cancellation token fired (the process is shutting down).
    #[error("cancelled: shutting down")]
    Cancelled,
    /// The operation failed in a way retrying cannot fix.
    #[error("{0}")]
    Permanent(E),
    /// The time budget ran out; `last` is the last attempt's error.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: E },
}

/// How to retry one operation; see the crate docs.
#[derive(Debug, Clone)]
pub struct Retry {
    what: String,
    cancel: CancellationToken,
    base: Duration,
    cap: Duration,
    budget: Option<Duration>,
    log: bool,
}

impl Retry {
    /// Retries `what` (a short phrase for the logs, e.g. "connect to JetStream") until it
    /// succeeds or `cancel` fires; 100 ms doubling to 2 s between attempts, no budget.
    pub fn new(what: impl Into<String>, cancel: &CancellationToken) -> Self {
        Self {
            what: what.into(),
            cancel: cancel.clone(),
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            budget: None,
            log: true,
        }
    }

    /// The first delay and the longest one (equal values give a fixed pace).
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap;
        self
    }

    /// Give up once this much time has passed since the first attempt.
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Do not log attempts (for callers that log each one with more context).
    pub fn quiet(mut self) -> Self {
        self.log = false;
        self
    }

    /// Runs `op` until it succeeds, fails permanently, the budget runs out, or the token
    /// fires. Errors for which `is_permanent` holds are returned at once.
    pub async fn run<T, E, Op, Fut>(
        &self,
        mut op: Op,
        is_permanent: impl Fn(&E) -> bool,
    ) -> Result<T, RetryError<E>>
    where
        Op: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Display,
    {
        let started = Instant::now();
        let deadline = self.budget.map(|budget| started + budget);
        let mut backoff = Backoff::new(self.base, self.cap);
        let mut failures = 0u32;
        loop {
            let result = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Err(self.cancelled(failures)),
                result = op() => result,
            };
            let error = match result {
                Ok(value) => {
                    if failures > 0 && self.log {
                        info!(
                            attempts = failures + 1,
                            "{}: succeeded after retrying", self.what
                        );
                    }
                    return Ok(value);
                }
                Err(error) if is_permanent(&error) => return Err(RetryError::Permanent(error)),
                Err(error) => error,
            };
            failures += 1;
            let mut delay = backoff.next_delay();
            if let Some(deadline) = deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(RetryError::Exhausted {
                        attempts: failures,
                        last: error,
                    });
                }
                delay = delay.min(remaining);
            }
            if self.log {
                if failures == 1 || failures.is_multiple_of(WARN_EVERY) {
                    warn!(%error, attempts = failures, retry_in = ?delay, "{}: failed; retrying", self.what);
                } else {
                    debug!(%error, attempts = failures, retry_in = ?delay, "{}: failed; retrying", self.what);
                }
            }
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Err(self.cancelled(failures)),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn cancelled<E>(&self, failures: u32) -> RetryError<E> {
        if self.log && failures > 0 {
            info!(
                attempts = failures,
                "{}: stopped retrying (shutting down)", self.what
            );
        }
        RetryError::Cancelled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn never_permanent(_: &String) -> bool {
        false
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_with_growing_pauses() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let retry = Retry::new("test", &CancellationToken::new())
            .backoff(Duration::from_millis(100), Duration::from_secs(1));
        let value = retry
            .run(
                || async {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0..=2 => Err("not yet".to_owned()),
                        _ => Ok(7),
                    }
                },
                never_permanent,
            )
            .await;
        assert_eq!(value, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Three pauses of at least half of 100, 200 and 400 ms; at most their sum.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(350), "{waited:?}");
        assert!(waited <= Duration::from_millis(700), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_returned_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = Retry::new("test", &CancellationToken::new())
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("refused".to_owned())
                },
                |error: &String| error == "refused",
            )
            .await;
        assert_eq!(result, Err(RetryError::Permanent("refused".to_owned())));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_ends_it_with_the_last_error() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = Retry::new("test", &CancellationToken::new())
            .backoff(Duration::from_millis(100), Duration::from_millis(100))
            .budget(Duration::from_secs(1))
            .run(
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    Err(format!("failure {n}"))
                },
                never_permanent,
            )
            .await;
        let attempts = calls.load(Ordering::SeqCst);
        assert_eq!(
            result,
            Err(RetryError::Exhausted {
                attempts,
                last: format!("failure {}", attempts - 1)
            })
        );
        // Paced at 50-100 ms: between 10 and 21 attempts fit in one second.
        assert!((10..=21).contains(&attempts), "{attempts}");
        assert!(started.elapsed() <= Duration::from_millis(1001));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_a_pause_and_a_hung_attempt() {
        let cancel = CancellationToken::new();
        let retry =
            Retry::new("test", &cancel).backoff(Duration::from_secs(60), Duration::from_secs(60));

        // During the pause after a failure.
        let pausing = tokio::spawn({
            let retry = retry.clone();
            async move {
                retry
                    .run(
                        || async { Err::<(), _>("down".to_owned()) },
                        never_permanent,
                    )
                    .await
            }
        });
        // During an attempt that never answers.
        let hung = tokio::spawn({
            let retry = retry.clone();
            async move {
                retry
                    .run(std::future::pending::<Result<(), String>>, never_permanent)
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let before = Instant::now();
        cancel.cancel();
        assert_eq!(pausing.await.expect("join"), Err(RetryError::Cancelled));
        assert_eq!(hung.await.expect("join"), Err(RetryError::Cancelled));
        assert_eq!(before.elapsed(), Duration::ZERO, "stopped without waiting");

        // An already cancelled token makes no attempt at all.
        let calls = AtomicU32::new(0);
        let result = retry
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(())
                },
                never_permanent,
            )
            .await;
        assert_eq!(result, Err(RetryError::Cancelled));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
