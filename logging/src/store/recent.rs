//! The newest messages of the stream, in memory, for the reads most clients make: the
//! end of the log (the latest page, a lab GET of a small log).
//!
//! Bounded by a count and by bytes of text (flags), whatever the log's size. The cache
//! covers a range of positions `from..=through`: every message the stream holds in that
//! range is in it, in order. It is filled by following the stream (see
//! `nats::follow`), never by the instance's own writes, so it holds what every instance
//! wrote. A read asks it first and fetches from the stream whatever it does not cover:
//! older positions, and the newest ones it has not received yet (read-your-writes stays:
//! the end of a read comes from the stream's own state, not from the cache).

use std::{collections::VecDeque, sync::RwLock};

use super::Stored;

/// How big the cache may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug)]
pub struct Recent {
    limits: CacheLimits,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    messages: VecDeque<Stored>,
    bytes: usize,
    /// The covered range, `from..=through`; empty (nothing covered) while `from > through`.
    from: u64,
    through: u64,
}

impl Recent {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            inner: RwLock::new(Inner {
                from: 1,
                ..Inner::default()
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limits.max_messages > 0 && self.limits.max_bytes > 0
    }

    /// Starts covering from `position` on (dropping anything held): the follower
    /// (re)starts reading the stream there.
    pub fn restart_at(&self, position: u64) {
        let mut inner = self.write();
        *inner = Inner {
            from: position,
            through: position.saturating_sub(1),
            ..Inner::default()
        };
    }

    /// The next position the follower should deliver.
    pub fn next_position(&self) -> u64 {
        self.read().through + 1
    }

    /// Adds the stream's next message (`position` after every one before it), then drops
    /// the oldest while over either limit.
    pub fn push(&self, message: Stored) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.write();
        if message.position <= inner.through {
            return; // already held (a redelivery)
        }
        inner.through = message.position;
        inner.bytes += message.text.len();
        inner.messages.push_back(message);
        while inner.messages.len() > self.limits.max_messages
            || (inner.bytes > self.limits.max_bytes && !inner.messages.is_empty())
        {
            if let Some(old) = inner.messages.pop_front() {
                inner.bytes -= old.text.len();
                inner.from = old.position + 1;
            }
        }
    }

    /// Messages from `start` up to `stop`, at most `max`, when the cache covers `start`:
    /// the messages, and the last position they answer for (every message of the stream
    /// from `start` through it is among them). `None` when `start` is older than the
    /// cache. A `start` past what the cache received answers `start - 1`: nothing yet.
    pub fn take(&self, start: u64, stop: u64, max: usize) -> Option<(Vec<Stored>, u64)> {
        if !self.enabled() {
            return None;
        }
        let inner = self.read();
        if start < inner.from || inner.from > inner.through + 1 {
            return None;
        }
        let first = inner.messages.partition_point(|m| m.position < start);
        let taken: Vec<Stored> = inner
            .messages
            .range(first..)
            .take_while(|m| m.position <= stop)
            .take(max)
            .cloned()
            .collect();
        let answered = if taken.len() == max {
            taken.last().map_or(start - 1, |m| m.position)
        } else {
            stop.min(inner.through).max(start - 1)
        };
        Some((taken, answered))
    }

    /// How many messages and bytes of text it holds.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.messages.len(), inner.bytes)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(position: u64, text: &str) -> Stored {
        Stored {
            position,
            id: format!("id-{position}"),
            text: text.to_owned(),
        }
    }

    fn positions(messages: &[Stored]) -> Vec<u64> {
        messages.iter().map(|m| m.position).collect()
    }

    #[test]
    fn it_covers_from_where_it_started_and_answers_only_for_what_it_holds() {
        let recent = Recent::new(CacheLimits::default());
        recent.restart_at(5);
        assert_eq!(recent.take(4, 10, 100), None, "older than the cache");
        let (none, answered) = recent.take(5, 10, 100).expect("covered");
        assert!(none.is_empty());
        assert_eq!(answered, 4, "nothing received yet");
        for position in [5, 6, 8] {
            recent.push(stored(position, "x")); // 7 is a gap in the stream itself
        }
        let (taken, answered) = recent.take(5, 10, 100).expect("covered");
        assert_eq!(positions(&taken), [5, 6, 8]);
        assert_eq!(answered, 8, "the rest (9, 10) must come from the stream");
        let (taken, answered) = recent.take(6, 7, 100).expect("covered");
        assert_eq!((positions(&taken), answered), (vec![6], 7));
        let (taken, answered) = recent.take(5, 10, 2).expect("covered");
        assert_eq!((positions(&taken), answered), (vec![5, 6], 6), "cut at max");
        assert_eq!(recent.next_position(), 9);
    }

    #[test]
    fn it_drops_the_oldest_past_either_limit_and_stops_covering_them() {
        let recent = Recent::new(CacheLimits {
            max_messages: 3,
            max_bytes: 10,
        });
        recent.restart_at(1);
        for position in 1..=5 {
            recent.push(stored(position, "ab"));
        }
        assert_eq!(recent.size(), (3, 6));
        assert_eq!(recent.take(2, 5, 100), None);
        let (taken, _) = recent.take(3, 5, 100).expect("covered");
        assert_eq!(positions(&taken), [3, 4, 5]);
        recent.push(stored(6, "123456789")); // 15 bytes: 3, 4 and 5 must go
        assert_eq!(recent.size(), (1, 9));
        assert_eq!(recent.take(5, 6, 100), None);
        assert_eq!(
            recent.take(6, 6, 100).map(|(m, a)| (positions(&m), a)),
            Some((vec![6], 6))
        );
        recent.push(stored(6, "again")); // a redelivery changes nothing
        assert_eq!(recent.size(), (1, 9));
    }

    #[test]
    fn a_disabled_cache_covers_nothing_it_is_given() {
        let recent = Recent::new(CacheLimits {
            max_messages: 0,
            max_bytes: 0,
        });
        recent.restart_at(1);
        recent.push(stored(1, "x"));
        assert_eq!(recent.size(), (0, 0));
        assert_eq!(recent.take(1, 1, 10), None);
    }
}
