//! The newest messages this instance has read from the stream, in memory, for the reads
//! most clients make again and again: the end of the log (the latest page, a lab GET of
//! a small log).
//!
//! A read-through cache, bounded by a count and by bytes of text (flags) whatever the
//! log's size. It covers a range of positions `from..=through`: every message the stream
//! holds in that range is in it, in order. Reads record what they fetched; a range that
//! continues the cache extends it (dropping the oldest past the limits), one that starts
//! after it replaces it, an older one leaves it alone. Nothing is added on the write
//! path, so a write costs the cluster nothing more.
//!
//! Messages never change once stored, so what the cache holds is never stale; what it
//! lacks (positions after `through`) a read fetches from the stream, whose own state
//! says where the log ends. So a read still sees every acknowledged write.

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
    /// The covered range `(from, through)`, if any.
    range: Option<(u64, u64)>,
}

impl Recent {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            inner: RwLock::new(Inner::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limits.max_messages > 0 && self.limits.max_bytes > 0
    }

    pub fn max_messages(&self) -> usize {
        self.limits.max_messages
    }

    /// Records that `messages` are all the stream holds in `start..=end`.
    pub fn record(&self, start: u64, end: u64, messages: &[Stored]) {
        if !self.enabled() || end < start {
            return;
        }
        let mut inner = self.write();
        let through = match inner.range {
            Some((_, through)) if end <= through => return, // nothing newer
            Some((from, through)) if start <= through + 1 => {
                inner.range = Some((from, end));
                through
            }
            _ => {
                // Empty, or a range after a gap: start over from it.
                inner.messages.clear();
                inner.bytes = 0;
                inner.range = Some((start, end));
                start - 1
            }
        };
        for message in messages.iter().filter(|m| m.position > through) {
            inner.bytes += message.text.len();
            inner.messages.push_back(message.clone());
        }
        while inner.messages.len() > self.limits.max_messages
            || (inner.bytes > self.limits.max_bytes && !inner.messages.is_empty())
        {
            if let Some(old) = inner.messages.pop_front() {
                inner.bytes -= old.text.len();
                inner.range = inner.range.map(|(_, through)| (old.position + 1, through));
            }
        }
        if let Some((from, through)) = inner.range {
            if from > through {
                inner.range = None; // one message over the byte limit: nothing kept
            }
        }
    }

    /// Messages from `start` up to `stop`, at most `max`, when the cache covers `start`
    /// (or `start` is the next position after it): the messages, and the last position
    /// they answer for (every message of the stream from `start` through it is among
    /// them; `start - 1` when none). `None` when the cache does not reach `start`.
    pub fn take(&self, start: u64, stop: u64, max: usize) -> Option<(Vec<Stored>, u64)> {
        let inner = self.read();
        let (from, through) = inner.range?; // none while disabled: `record` keeps nothing
        if start < from || start > through + 1 {
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
            stop.min(through).max(start - 1)
        };
        Some((taken, answered))
    }

    /// Whether a read starting at `start` begins inside the cache (or right after it).
    pub fn covers(&self, start: u64) -> bool {
        self.read()
            .range
            .is_some_and(|(from, through)| from <= start && start <= through + 1)
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

    fn range(positions: impl IntoIterator<Item = u64>, text: &str) -> Vec<Stored> {
        positions.into_iter().map(|p| stored(p, text)).collect()
    }

    fn positions(messages: &[Stored]) -> Vec<u64> {
        messages.iter().map(|m| m.position).collect()
    }

    #[test]
    fn it_answers_for_what_reads_recorded_and_no_further() {
        let recent = Recent::new(CacheLimits::default());
        assert_eq!(recent.take(1, 10, 100), None, "empty");
        // 5..=10 read from the stream; 7 is a gap in the stream itself.
        recent.record(5, 10, &range([5, 6, 8, 9, 10], "x"));
        assert_eq!(recent.take(4, 10, 100), None, "older than the cache");
        let (taken, answered) = recent.take(5, 20, 100).expect("covered");
        assert_eq!(positions(&taken), [5, 6, 8, 9, 10]);
        assert_eq!(answered, 10, "11.. must come from the stream");
        let (taken, answered) = recent.take(6, 7, 100).expect("covered");
        assert_eq!((positions(&taken), answered), (vec![6], 7));
        let (taken, answered) = recent.take(5, 10, 2).expect("covered");
        assert_eq!((positions(&taken), answered), (vec![5, 6], 6), "cut at max");
        let (taken, answered) = recent.take(11, 20, 100).expect("the next position");
        assert_eq!((taken.len(), answered), (0, 10), "nothing yet");
        assert_eq!(recent.take(12, 20, 100), None, "past the next position");
        assert!(recent.covers(5) && recent.covers(11) && !recent.covers(4) && !recent.covers(12));
    }

    #[test]
    fn a_read_that_continues_it_extends_it_a_later_one_replaces_it_an_older_one_does_not() {
        let recent = Recent::new(CacheLimits::default());
        recent.record(1, 10, &range(1..=10, "x"));
        recent.record(8, 15, &range(8..=15, "x")); // overlaps and continues
        assert_eq!(
            positions(&recent.take(1, 99, 99).expect("covered").0),
            (1..=15).collect::<Vec<_>>()
        );
        recent.record(2, 5, &range(2..=5, "x")); // older: nothing new
        assert_eq!(recent.size().0, 15);
        recent.record(30, 31, &range(30..=31, "x")); // after a gap: starts over
        assert_eq!(recent.take(1, 99, 99), None);
        assert_eq!(
            positions(&recent.take(30, 99, 99).expect("covered").0),
            [30, 31]
        );
    }

    #[test]
    fn it_drops_the_oldest_past_either_limit_and_stops_covering_them() {
        let recent = Recent::new(CacheLimits {
            max_messages: 3,
            max_bytes: 10,
        });
        recent.record(1, 5, &range(1..=5, "ab"));
        assert_eq!(recent.size(), (3, 6));
        assert_eq!(recent.take(2, 5, 100), None);
        assert_eq!(
            positions(&recent.take(3, 5, 100).expect("covered").0),
            [3, 4, 5]
        );
        recent.record(6, 6, &[stored(6, "123456789")]); // 15 bytes: 3, 4 and 5 go
        assert_eq!(recent.size(), (1, 9));
        assert_eq!(recent.take(5, 6, 100), None);
        assert_eq!(positions(&recent.take(6, 6, 100).expect("covered").0), [6]);
        recent.record(7, 7, &[stored(7, "x".repeat(11).as_str())]); // alone over the limit
        assert_eq!(recent.size(), (0, 0));
        assert_eq!(recent.take(7, 7, 100), None);
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let recent = Recent::new(CacheLimits {
            max_messages: 0,
            max_bytes: 0,
        });
        recent.record(1, 1, &[stored(1, "x")]);
        assert_eq!(recent.size(), (0, 0));
        assert_eq!(recent.take(1, 1, 10), None);
    }
}
