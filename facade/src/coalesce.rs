//! Per-call lookups that share registry answers without ever using an old one.
//!
//! With `--discovery per-call`, every call is preceded by a registry Lookup. Under load
//! many calls want the same service's list at once; asking once for all of them saves
//! the registry and the facade most of that work. The rule that keeps per-call honest: a
//! caller only takes an answer from a lookup that *began after it arrived*. So a caller
//! arriving while a lookup is in flight does not take that one's answer; it waits for the
//! next, which starts as soon as the one in flight ends and serves everyone who arrived
//! meanwhile. At most one lookup per service is in flight.

use std::future::Future;

use parking_lot::{Mutex, MutexGuard};

use tokio::sync::watch;

/// One service's lookups.
pub(crate) struct Coalesced<T: Clone> {
    flight: Mutex<Flight>,
    /// The newest finished lookup: its number and its answer.
    done: watch::Sender<(u64, Option<T>)>,
}

#[derive(Default)]
struct Flight {
    /// Lookups started so far; the one in flight, if any, is number `started`.
    started: u64,
    running: bool,
}

impl<T: Clone> Coalesced<T> {
    pub(crate) fn new() -> Self {
        Self {
            flight: Mutex::new(Flight::default()),
            done: watch::channel((0, None)).0,
        }
    }

    fn flight(&self) -> MutexGuard<'_, Flight> {
        self.flight.lock()
    }

    /// An answer from a lookup (`lookup()`) that began after this call did.
    pub(crate) async fn get<F, Fut>(&self, lookup: F) -> T
    where
        F: Fn() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut done = self.done.subscribe();
        let mut need = None;
        loop {
            let mine = {
                let mut flight = self.flight();
                if flight.running {
                    // That one began before we arrived (or before we last looked): wait
                    // for a later one.
                    need.get_or_insert(flight.started + 1);
                    None
                } else {
                    flight.running = true;
                    flight.started += 1;
                    Some(flight.started)
                }
            };
            if let Some(number) = mine {
                let mut in_flight = InFlight {
                    owner: self,
                    number,
                    answer: None,
                };
                let answer = lookup().await;
                in_flight.answer = Some(answer.clone());
                return answer; // `in_flight` tells the waiters
            }
            let need = need.unwrap_or(u64::MAX);
            // Wake on every finished lookup: ours, or the one before it (then whoever
            // comes first starts ours).
            if done.changed().await.is_err() {
                continue; // cannot happen: `self` holds the sender
            }
            let (number, answer) = &*done.borrow_and_update();
            if *number >= need {
                if let Some(answer) = answer {
                    return answer.clone();
                }
            }
        }
    }
}

/// The lookup in flight. When it ends, answered or not (its caller went away
/// mid-lookup), it says so, so waiters take its answer or start the next.
struct InFlight<'a, T: Clone> {
    owner: &'a Coalesced<T>,
    number: u64,
    answer: Option<T>,
}

impl<T: Clone> Drop for InFlight<'_, T> {
    fn drop(&mut self) {
        self.owner.flight().running = false; // before telling: waiters may start the next
        self.owner
            .done
            .send_replace((self.number, self.answer.take()));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        },
        time::Duration,
    };

    use tokio::sync::Notify;

    use super::*;

    /// Callers in bulk share few lookups, and none gets an answer from a lookup that
    /// began before it arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_share_lookups_that_began_after_they_arrived() {
        let coalesced = Arc::new(Coalesced::<u64>::new());
        // Each lookup answers the time it began (a counter that ticks on every arrival
        // and every lookup start), so a caller can check it is not older than itself.
        let clock = Arc::new(AtomicU64::new(0));
        let lookups = Arc::new(AtomicU64::new(0));
        let mut callers = Vec::new();
        for i in 0..200u64 {
            let (coalesced, clock, lookups) = (
                Arc::clone(&coalesced),
                Arc::clone(&clock),
                Arc::clone(&lookups),
            );
            callers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(i * 50)).await;
                let arrived = clock.fetch_add(1, Ordering::SeqCst);
                let began = coalesced
                    .get(|| {
                        let (clock, lookups) = (Arc::clone(&clock), Arc::clone(&lookups));
                        async move {
                            lookups.fetch_add(1, Ordering::SeqCst);
                            let began = clock.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            began
                        }
                    })
                    .await;
                assert!(
                    began > arrived,
                    "an answer older than the call: {began} <= {arrived}"
                );
            }));
        }
        for caller in callers {
            caller.await.expect("caller");
        }
        let lookups = lookups.load(Ordering::SeqCst);
        assert!(lookups < 100, "{lookups} lookups for 200 callers");
        assert!(lookups >= 2);
    }

    /// On tokio's one-thread test runtime a task runs until it waits, so the test
    /// knows where each caller stands without sleeping.
    #[tokio::test]
    async fn a_caller_that_goes_away_mid_lookup_does_not_strand_the_others() {
        let coalesced = Arc::new(Coalesced::<u32>::new());
        let in_flight = Arc::new(Notify::new());
        let first = {
            let (coalesced, in_flight) = (Arc::clone(&coalesced), Arc::clone(&in_flight));
            tokio::spawn(async move {
                let lookup = || {
                    in_flight.notify_one();
                    std::future::pending::<u32>()
                };
                coalesced.get(lookup).await
            })
        };
        in_flight.notified().await;
        let second = {
            let coalesced = Arc::clone(&coalesced);
            tokio::spawn(async move { coalesced.get(|| async { 5 }).await })
        };
        // The second caller subscribes and, finding a lookup in flight, waits for the
        // next, all in one poll.
        while coalesced.done.receiver_count() < 2 {
            tokio::task::yield_now().await;
        }
        first.abort();
        let answer = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("not stranded")
            .expect("second");
        assert_eq!(answer, 5);
    }

    #[tokio::test]
    async fn a_lone_caller_looks_up_at_once_every_time() {
        let coalesced = Coalesced::<u32>::new();
        let calls = AtomicU64::new(0);
        for expected in 1..=3 {
            let answer = coalesced
                .get(|| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    7
                })
                .await;
            assert_eq!(answer, 7);
            assert_eq!(calls.load(Ordering::SeqCst), expected);
        }
    }
}
