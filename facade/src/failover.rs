//! The failover policy: which instance to try next, which errors move on, how long to
//! keep trying.
//!
//! One call through [`Failover::run`]:
//! 1. ask discovery for the live instances (from the pushed view by default);
//! 2. try them in random order, instances that failed in the last few seconds last,
//!    each attempt with its own deadline;
//! 3. a transient failure (unavailable, deadline exceeded, a broken connection) marks the
//!    instance as suspect and moves on; any other answer is final and returned as is;
//! 4. after a full round, back off (jittered, capped) and look up again, until the
//!    total budget is spent or the facade shuts down; while the registry lists no
//!    instance at all, only for [`Policy::unlisted_for`]. The rounds are one [`Retry`]:
//!    the same loop every wait in the system uses.
//!
//! Retrying is only safe because every attempt carries the same message id and the
//! store is put-if-absent by id: an attempt that timed out but did store is answered
//! `duplicate` on the retry, and nothing is stored twice.
//!
//! The policy knows nothing of gRPC channels: `lookup` and `call` are closures, so unit
//! tests drive it with a fake transport and no network.

use std::{
    collections::HashMap,
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use parking_lot::{Mutex, MutexGuard};

use rand::seq::SliceRandom;
use retry::{Retry, RetryError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::warn;

#[derive(Debug, Clone)]
pub struct Policy {
    /// Deadline of one attempt on one instance.
    pub attempt_deadline: Duration,
    /// Total time one call may take, all attempts and backoffs included.
    pub budget: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long an instance that failed is tried last.
    pub suspect_for: Duration,
    /// How long the registry may list no instance at all before a call gives up,
    /// whatever is left of the budget: long enough for an instance that is restarting to
    /// register again (about a heartbeat interval), far shorter than an election.
    pub unlisted_for: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            attempt_deadline: Duration::from_secs(1),
            budget: Duration::from_secs(30),
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_millis(500),
            suspect_for: Duration::from_secs(5),
            unlisted_for: Duration::from_secs(1),
        }
    }
}

/// Whether a failed attempt may be retried on another instance.
pub fn is_transient(code: Code) -> bool {
    // Unknown and Cancelled cover connections that broke mid-call; retrying them is safe
    // here because every operation we retry is idempotent (put-if-absent, or a read).
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FailoverError {
    /// Nobody could take the call within the budget.
    #[error("no {service} instance answered within {budget:?} ({attempts} attempts; last error: {last})")]
    Exhausted {
        service: String,
        budget: Duration,
        attempts: usize,
        last: String,
    },
    /// The registry listed no instance for `waited`: nobody runs the service.
    #[error("no {service} instance is registered (none listed for {waited:?})")]
    Unlisted { service: String, waited: Duration },
    /// An instance answered with a final (non-transient) error.
    #[error("{0}")]
    Rejected(Status),
    /// The facade is shutting down; the call was not retried further.
    #[error("the facade is shutting down")]
    ShuttingDown,
}

/// How one round over the instances ended, when nobody took the call.
#[derive(Debug)]
enum RoundError {
    /// Every instance tried failed transiently (or the budget ended first): the last
    /// failure.
    Transient(String),
    /// The registry listed no instance, at this instant (the caller gives up once that
    /// has lasted [`Policy::unlisted_for`]).
    Unlisted(Instant),
    /// An instance gave a final answer.
    Rejected(Status),
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient(last) => f.write_str(last),
            Self::Unlisted(_) => f.write_str("no instance listed"),
            Self::Rejected(status) => write!(f, "{status}"),
        }
    }
}

/// The policy plus what it remembers: which instances failed recently.
#[derive(Debug, Default)]
pub struct Failover {
    policy: Policy,
    suspects: Mutex<HashMap<String, Instant>>,
    /// Stops retrying (calls then fail with [`FailoverError::ShuttingDown`]).
    shutdown: CancellationToken,
}

impl Failover {
    pub fn new(policy: Policy, shutdown: &CancellationToken) -> Self {
        Self {
            policy,
            suspects: Mutex::new(HashMap::new()),
            shutdown: shutdown.clone(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn suspects(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.suspects.lock()
    }

    fn suspect(&self, address: &str) {
        self.suspects().insert(address.to_owned(), Instant::now());
    }

    fn clear(&self, address: &str) {
        let mut suspects = self.suspects();
        if !suspects.is_empty() {
            suspects.remove(address);
        }
    }

    /// The order to try `instances` in: shuffled, recent failures last.
    pub fn order(&self, mut instances: Vec<String>) -> Vec<String> {
        instances.shuffle(&mut rand::rng());
        let suspects = self.suspects();
        if suspects.is_empty() {
            return instances;
        }
        let now = Instant::now();
        let recent = |address: &String| {
            suspects
                .get(address)
                .is_some_and(|since| now.duration_since(*since) < self.policy.suspect_for)
        };
        let (mut ordered, suspect): (Vec<_>, Vec<_>) =
            instances.into_iter().partition(|a| !recent(a));
        ordered.extend(suspect);
        ordered
    }

    /// Runs `call` on instances from `lookup` until one answers, or the budget is spent.
    /// The budget counts from `began`, when the request began (a POST that waited for a
    /// batch has had part of it already). `request_id` only labels the log lines of
    /// failed attempts.
    pub async fn run<T, L, LF, C, CF>(
        &self,
        began: Instant,
        service: &str,
        request_id: &str,
        lookup: L,
        call: C,
    ) -> Result<T, FailoverError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Vec<String>>,
        C: Fn(String) -> CF,
        CF: Future<Output = Result<T, Status>>,
    {
        let deadline = began + self.policy.budget;
        let attempts = AtomicUsize::new(0);
        let rounds = AtomicUsize::new(0);
        // Since when every lookup listed nobody (reset by any lookup that lists someone).
        let unlisted_since = Mutex::new(None);
        // Each round logs its failed attempts with the request id, so the loop is quiet.
        let retry = Retry::new(format!("calling {service}"), &self.shutdown)
            .backoff(self.policy.backoff_base, self.policy.backoff_cap)
            .budget(deadline.saturating_duration_since(Instant::now()))
            .quiet();
        let result = retry
            .run(
                || {
                    if rounds.fetch_add(1, Ordering::Relaxed) > 0 {
                        metrics::counter!("facade_retry_rounds_total", "service" => service.to_owned())
                            .increment(1);
                    }
                    self.round(service, request_id, &lookup, &call, deadline, &attempts)
                },
                |error| match error {
                    RoundError::Rejected(_) => true,
                    RoundError::Unlisted(since) => {
                        let since = *unlisted_since.lock().get_or_insert(*since);
                        since.elapsed() >= self.policy.unlisted_for
                    }
                    RoundError::Transient(_) => {
                        *unlisted_since.lock() = None;
                        false
                    }
                },
            )
            .await;
        match result {
            Ok(value) => Ok(value),
            Err(RetryError::Permanent(RoundError::Rejected(status))) => {
                Err(FailoverError::Rejected(status))
            }
            Err(RetryError::Permanent(RoundError::Unlisted(_))) => {
                metrics::counter!("facade_exhausted_total", "service" => service.to_owned())
                    .increment(1);
                Err(FailoverError::Unlisted {
                    service: service.to_owned(),
                    waited: self.policy.unlisted_for,
                })
            }
            Err(RetryError::Cancelled) => Err(FailoverError::ShuttingDown),
            Err(RetryError::Exhausted { last, .. } | RetryError::Permanent(last)) => {
                metrics::counter!("facade_exhausted_total", "service" => service.to_owned())
                    .increment(1);
                Err(FailoverError::Exhausted {
                    service: service.to_owned(),
                    budget: self.policy.budget,
                    attempts: attempts.load(Ordering::Relaxed),
                    last: last.to_string(),
                })
            }
        }
    }

    /// One round: every listed instance in [`order`](Self::order), each attempt within
    /// the attempt deadline and the overall `deadline`.
    async fn round<T, L, LF, C, CF>(
        &self,
        service: &str,
        request_id: &str,
        lookup: &L,
        call: &C,
        deadline: Instant,
        attempts: &AtomicUsize,
    ) -> Result<T, RoundError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Vec<String>>,
        C: Fn(String) -> CF,
        CF: Future<Output = Result<T, Status>>,
    {
        let instances = lookup().await;
        if instances.is_empty() {
            return Err(RoundError::Unlisted(Instant::now()));
        }
        // Each failure replaces it; it stays only when the budget ends before this
        // round's first attempt (a request that waited its whole budget for a call, a
        // batch, or the end of the backoff).
        let mut last = String::from("the time budget was spent before an attempt");
        for address in self.order(instances) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            attempts.fetch_add(1, Ordering::Relaxed);
            let attempt = self.policy.attempt_deadline.min(remaining);
            let result = match tokio::time::timeout(attempt, call(address.clone())).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {attempt:?}"
                ))),
            };
            match result {
                Ok(value) => {
                    self.clear(&address);
                    return Ok(value);
                }
                Err(status) if is_transient(status.code()) => {
                    warn!(request_id, service, address, code = ?status.code(), error = status.message(),
                          "attempt failed; trying the next instance");
                    self.suspect(&address);
                    metrics::counter!("facade_failovers_total", "service" => service.to_owned())
                        .increment(1);
                    last = format!("{address}: {}", status.message());
                }
                Err(status) => return Err(RoundError::Rejected(status)),
            }
        }
        Err(RoundError::Transient(last))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn policy() -> Policy {
        Policy {
            attempt_deadline: Duration::from_millis(100),
            budget: Duration::from_millis(1000),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_millis(50),
            suspect_for: Duration::from_secs(5),
            unlisted_for: Duration::from_secs(1),
        }
    }

    fn instances(list: &[&str]) -> impl Fn() -> std::future::Ready<Vec<String>> {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        move || std::future::ready(list.clone())
    }

    /// With no instance listed the call gives up after `unlisted_for`, not the budget;
    /// an instance listed within it is called.
    #[tokio::test(start_paused = true)]
    async fn nobody_listed_gives_up_after_a_moment_and_a_late_instance_is_called() {
        let policy = Policy {
            budget: Duration::from_secs(30),
            ..policy()
        };
        let failover = Failover::new(policy, &CancellationToken::new());
        let started = Instant::now();
        let result: Result<(), _> = failover
            .run(started, "logging", "r", instances(&[]), |_| async {
                Ok(())
            })
            .await;
        assert!(
            matches!(result, Err(FailoverError::Unlisted { .. })),
            "{result:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(2),
            "gave up after {took:?}"
        );
        // Listed after 300 ms (a restart): called, within the same request.
        let started = Instant::now();
        let late = || {
            let listed = started.elapsed() >= Duration::from_millis(300);
            std::future::ready(if listed {
                vec!["a".to_owned()]
            } else {
                Vec::new()
            })
        };
        let result = failover
            .run(started, "logging", "r", late, |_| async { Ok(7) })
            .await;
        assert_eq!(result.expect("called"), 7);
    }

    #[test]
    fn transient_codes_move_on_and_final_codes_do_not() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::ResourceExhausted,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::Ok,
        ] {
            assert!(!is_transient(code), "{code:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_instance_is_skipped_and_then_tried_last() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let dead_calls = AtomicUsize::new(0);
        for _ in 0..40 {
            let result = failover
                .run(
                    Instant::now(),
                    "logging",
                    "test",
                    instances(&["dead", "live"]),
                    |address| {
                        if address == "dead" {
                            dead_calls.fetch_add(1, Ordering::SeqCst);
                        }
                        async move {
                            if address == "dead" {
                                Err(Status::unavailable("connection refused"))
                            } else {
                                Ok(address)
                            }
                        }
                    },
                )
                .await;
            assert_eq!(result.expect("served by the live one"), "live");
        }
        // Picked first at random until it failed once (1 - 2^-40 likely), then always
        // ordered after the healthy instance, so never called again.
        assert_eq!(dead_calls.load(Ordering::SeqCst), 1);
        for _ in 0..20 {
            assert_eq!(
                failover.order(vec!["dead".into(), "live".into()]),
                ["live", "dead"]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_instance_costs_one_attempt_deadline() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let started = Instant::now();
        let result = failover
            .run(
                Instant::now(),
                "logging",
                "test",
                instances(&["hung", "live"]),
                |address| async move {
                    if address == "hung" {
                        std::future::pending::<()>().await;
                    }
                    Ok(address)
                },
            )
            .await;
        assert_eq!(result.expect("served"), "live");
        assert!(started.elapsed() <= policy().attempt_deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_error_is_returned_without_retrying() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let calls = AtomicUsize::new(0);
        let result: Result<(), _> = failover
            .run(
                Instant::now(),
                "logging",
                "test",
                instances(&["a", "b", "c"]),
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err(Status::invalid_argument("text is empty")) }
                },
            )
            .await;
        assert!(
            matches!(result, Err(FailoverError::Rejected(s)) if s.code() == Code::InvalidArgument)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_the_budget_is_spent_and_backs_off_between_rounds() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let calls = AtomicUsize::new(0);
        let lookups = AtomicUsize::new(0);
        let started = Instant::now();
        let result: Result<(), _> = failover
            .run(
                Instant::now(),
                "logging",
                "test",
                || {
                    lookups.fetch_add(1, Ordering::SeqCst);
                    std::future::ready(vec!["a".to_owned(), "b".to_owned()])
                },
                |_| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err(Status::unavailable("down")) }
                },
            )
            .await;
        let elapsed = started.elapsed();
        match result {
            Err(FailoverError::Exhausted { attempts, .. }) => {
                assert_eq!(attempts, calls.load(Ordering::SeqCst))
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        assert!(
            elapsed >= policy().budget && elapsed <= policy().budget + Duration::from_millis(1)
        );
        // Each round looked up again; rounds were spaced by backoff (at least 5 ms each:
        // half the 10 ms base), not a busy loop.
        let rounds = lookups.load(Ordering::SeqCst);
        assert!(rounds >= 2, "looked up again after a failed round");
        assert!(
            rounds <= 1 + 1000 / 5,
            "rounds were spaced by backoff: {rounds}"
        );
        // Every round but possibly the last (cut short by the budget) tried both.
        let calls = calls.load(Ordering::SeqCst);
        assert!(
            calls >= (rounds - 1) * 2 && calls <= rounds * 2,
            "{calls} calls, {rounds} rounds"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_from_when_the_request_began() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let calls = AtomicUsize::new(0);
        // A request that began a budget ago (it waited for a batch that long): no attempt.
        tokio::time::advance(policy().budget * 2).await;
        let began = Instant::now() - policy().budget;
        let result: Result<(), _> = failover
            .run(began, "logging", "test", instances(&["a"]), |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            })
            .await;
        match result {
            Err(FailoverError::Exhausted { attempts, last, .. }) => {
                assert_eq!(attempts, 0);
                assert!(last.contains("budget was spent"), "{last}");
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_retries_at_once() {
        let shutdown = CancellationToken::new();
        let failover = Failover::new(policy(), &shutdown);
        let stopper = shutdown.clone();
        let started = Instant::now();
        let result: Result<(), _> = failover
            .run(Instant::now(), "logging", "test", instances(&["a"]), |_| {
                stopper.cancel();
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert!(
            matches!(result, Err(FailoverError::ShuttingDown)),
            "{result:?}"
        );
        assert!(started.elapsed() < policy().budget);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_registry_is_retried_until_an_instance_appears() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let lookups = AtomicUsize::new(0);
        let result = failover
            .run(
                Instant::now(),
                "logging",
                "test",
                || {
                    let n = lookups.fetch_add(1, Ordering::SeqCst);
                    std::future::ready(if n < 3 {
                        vec![]
                    } else {
                        vec!["late".to_owned()]
                    })
                },
                |address| async move { Ok(address) },
            )
            .await;
        assert_eq!(result.expect("served"), "late");
    }

    #[test]
    fn order_is_random_among_healthy_instances() {
        let failover = Failover::new(policy(), &CancellationToken::new());
        let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let firsts: std::collections::HashSet<String> = (0..200)
            .map(|_| failover.order(all.clone())[0].clone())
            .collect();
        assert_eq!(
            firsts.len(),
            3,
            "every instance gets picked first sometimes"
        );
    }
}
