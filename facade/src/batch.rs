//! Group commit: the POSTs that arrive while earlier calls to logging are in flight go
//! out together, as one call.
//!
//! A [`Batcher`] has `in_flight` call slots. An item that arrives when a slot is free
//! goes out at once, alone (or with whatever else is waiting): no item ever waits for
//! company. An item that arrives while every slot is busy waits, and the next slot to
//! free takes everything waiting (up to `items` items and `bytes` bytes) in one call. So
//! under light load every POST is its own call, as without batching, and under heavy load the cost
//! of a call (a gRPC round trip, a lookup, the work per request on both sides) is shared
//! by all the POSTs that queued meanwhile. A call that outlasts `patience` frees its
//! slot and finishes on its own, so a hung peer holds a slot for that long, not for
//! the call's whole deadline.
//!
//! The batcher knows nothing of gRPC: a [`Sink`] sends a batch and answers each item,
//! so unit tests drive it with a fake one.

use std::{collections::VecDeque, future::Future, sync::Arc, time::Duration};

use parking_lot::{Mutex, MutexGuard};

use tokio::{sync::oneshot, time::Instant};

/// Where batches go.
pub trait Sink: Send + Sync + 'static {
    type Item: Send + 'static;
    type Outcome: Send + 'static;

    /// Sends `items` (each with when it arrived) as one call; answers one outcome per
    /// item, in order.
    fn send(
        &self,
        items: Vec<(Self::Item, Instant)>,
    ) -> impl Future<Output = Vec<Self::Outcome>> + Send;

    /// What counts against [`Limits::bytes`].
    fn size(item: &Self::Item) -> usize;
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most calls in flight at once, not counting calls slower than `patience`.
    pub in_flight: usize,
    /// Most items in one call.
    pub items: usize,
    /// Most bytes in one call (by [`Sink::size`]); one item over it still goes, alone.
    pub bytes: usize,
    /// How long a call may take before it stops counting against `in_flight`.
    pub patience: Duration,
    /// Most items waiting for a call; past it [`Batcher::submit`] refuses at once.
    pub waiting: usize,
    /// Most bytes (by [`Sink::size`]) waiting for a call; past it [`Batcher::submit`]
    /// refuses at once.
    pub waiting_bytes: usize,
}

/// What [`Batcher::submit`] refuses with: the queue is at one of its limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("{0} items wait for a call, the most allowed")]
    Items(usize),
    #[error("{0} bytes wait for a call, and at most {1} may")]
    Bytes(usize, usize),
}

struct Waiting<S: Sink> {
    item: S::Item,
    arrived: Instant,
    size: usize,
    reply: oneshot::Sender<S::Outcome>,
}

struct Queue<S: Sink> {
    waiting: VecDeque<Waiting<S>>,
    /// The bytes of what waits.
    waiting_bytes: usize,
    /// Call slots taken: calls in flight, less those slower than the patience.
    slots: usize,
}

pub struct Batcher<S: Sink> {
    shared: Arc<Shared<S>>,
}

struct Shared<S: Sink> {
    limits: Limits,
    queue: Mutex<Queue<S>>,
}

impl<S: Sink> Batcher<S> {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            in_flight: limits.in_flight.max(1),
            items: limits.items.max(1),
            ..limits
        };
        Self {
            shared: Arc::new(Shared {
                limits,
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    waiting_bytes: 0,
                    slots: 0,
                }),
            }),
        }
    }

    /// Sends `item` through `sink` in the next call and answers its outcome; `None` if
    /// the call was dropped before it answered (the runtime is shutting down). Refused
    /// at once when the queue is at its limits. The sink is passed in, not kept, so a
    /// sink may own its batcher.
    pub async fn submit(
        &self,
        sink: &Arc<S>,
        item: S::Item,
    ) -> Result<Option<S::Outcome>, QueueFull> {
        let (reply, outcome) = oneshot::channel();
        let size = S::size(&item);
        let limits = &self.shared.limits;
        let start = {
            let mut queue = self.shared.lock();
            if queue.waiting.len() >= limits.waiting {
                return Err(QueueFull::Items(queue.waiting.len()));
            }
            // One item over the byte limit still waits alone, as it would go alone.
            if !queue.waiting.is_empty() && queue.waiting_bytes + size > limits.waiting_bytes {
                return Err(QueueFull::Bytes(queue.waiting_bytes, limits.waiting_bytes));
            }
            queue.waiting_bytes += size;
            queue.waiting.push_back(Waiting {
                item,
                arrived: Instant::now(),
                size,
                reply,
            });
            metrics::gauge!("facade_append_waiting").set(queue.waiting.len() as f64);
            queue.claim_slot(limits)
        };
        if start {
            tokio::spawn(drain(Arc::clone(sink), Arc::clone(&self.shared)));
        }
        Ok(outcome.await.ok())
    }
}

impl<S: Sink> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, Queue<S>> {
        self.queue.lock()
    }
}

impl<S: Sink> Queue<S> {
    /// Takes a call slot if one is free and something waits for it.
    fn claim_slot(&mut self, limits: &Limits) -> bool {
        let claim = !self.waiting.is_empty() && self.slots < limits.in_flight;
        if claim {
            self.slots += 1;
        }
        claim
    }

    /// The next batch: the longest run of waiting items within the limits (at least
    /// one). Empty when nothing waits, and then the slot is given back in the same
    /// breath, so an item that arrives right after finds it free.
    fn next_batch(&mut self, limits: &Limits) -> Vec<Waiting<S>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.waiting.front() {
            let full = batch.len() >= limits.items
                || (!batch.is_empty() && bytes + next.size > limits.bytes);
            if full {
                break;
            }
            bytes += next.size;
            batch.extend(self.waiting.pop_front());
        }
        self.waiting_bytes -= bytes;
        if batch.is_empty() {
            self.slots -= 1;
        } else {
            metrics::gauge!("facade_append_waiting").set(self.waiting.len() as f64);
        }
        batch
    }
}

/// A task holding one call slot: sends what is waiting, batch after batch, until
/// nothing is; then gives the slot back. A call slower than [`Limits::patience`] goes
/// on in a task of its own and the slot moves on to what waits, so one slow or hung
/// instance cannot hold everyone.
async fn drain<S: Sink>(sink: Arc<S>, shared: Arc<Shared<S>>) {
    let limits = shared.limits;
    // Gives the slot back if the sink panics, so the batcher never runs out of slots.
    let mut slot = Slot {
        shared: &shared,
        held: true,
    };
    loop {
        let batch = shared.lock().next_batch(&limits);
        if batch.is_empty() {
            slot.held = false;
            return;
        }
        metrics::histogram!("facade_append_batch_size").record(batch.len() as f64);
        let mut call = Box::pin(send_and_answer(Arc::clone(&sink), batch));
        let slow = tokio::select! {
            () = &mut call => false,
            () = tokio::time::sleep(limits.patience) => true,
        };
        if slow {
            metrics::counter!("facade_append_slow_calls_total").increment(1);
            tokio::spawn(call);
        }
    }
}

/// Sends one batch and hands each caller its outcome.
async fn send_and_answer<S: Sink>(sink: Arc<S>, batch: Vec<Waiting<S>>) {
    let (items, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|w| ((w.item, w.arrived), w.reply))
        .unzip();
    let outcomes = sink.send(items).await;
    debug_assert_eq!(outcomes.len(), replies.len());
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        // The caller may have gone (a client that hung up); the others still get theirs.
        let _ = reply.send(outcome);
    }
}

struct Slot<'a, S: Sink> {
    shared: &'a Shared<S>,
    held: bool,
}

impl<S: Sink> Drop for Slot<'_, S> {
    fn drop(&mut self) {
        if self.held {
            self.shared.lock().slots -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::watch;

    use super::*;

    /// Records every batch; while `hold` is true, calls wait (so tests can keep slots
    /// busy).
    struct Recorder {
        batches: Mutex<Vec<Vec<u32>>>,
        hold: watch::Sender<bool>,
        /// Holds only the calls that carry this item (all calls when `None`).
        hold_only: Option<u32>,
        calls_running: AtomicUsize,
        most_running: AtomicUsize,
    }

    impl Recorder {
        fn new(hold: bool) -> Arc<Self> {
            Arc::new(Self {
                batches: Mutex::default(),
                hold: watch::channel(hold).0,
                hold_only: None,
                calls_running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
            })
        }

        fn release(&self) {
            self.hold.send_replace(false);
        }
    }

    impl Sink for Recorder {
        type Item = u32;
        type Outcome = u32;

        async fn send(&self, items: Vec<(u32, Instant)>) -> Vec<u32> {
            let running = self.calls_running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(running, Ordering::SeqCst);
            let items: Vec<u32> = items.into_iter().map(|(item, _)| item).collect();
            self.batches.lock().push(items.clone());
            if self.hold_only.is_none_or(|only| items.contains(&only)) {
                let mut hold = self.hold.subscribe();
                hold.wait_for(|held| !held).await.expect("the sender lives");
            }
            self.calls_running.fetch_sub(1, Ordering::SeqCst);
            items.into_iter().map(|item| item * 10).collect()
        }

        fn size(item: &u32) -> usize {
            *item as usize
        }
    }

    fn limits(in_flight: usize, items: usize, bytes: usize) -> Limits {
        Limits {
            in_flight,
            items,
            bytes,
            patience: Duration::from_secs(60),
            waiting: 10_000,
            waiting_bytes: usize::MAX,
        }
    }

    async fn until(condition: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !condition() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition within 5 s");
    }

    fn spawn_submit(
        batcher: &Arc<Batcher<Recorder>>,
        sink: &Arc<Recorder>,
        item: u32,
    ) -> tokio::task::JoinHandle<Option<u32>> {
        let (batcher, sink) = (Arc::clone(batcher), Arc::clone(sink));
        tokio::spawn(async move { batcher.submit(&sink, item).await.expect("room") })
    }

    fn waiting(batcher: &Batcher<Recorder>) -> usize {
        batcher.shared.lock().waiting.len()
    }

    #[tokio::test]
    async fn an_item_with_a_free_slot_goes_alone_and_at_once() {
        let sink = Recorder::new(false);
        let batcher = Batcher::new(limits(2, 64, 1 << 20));
        for item in 1..=3 {
            assert_eq!(batcher.submit(&sink, item).await, Ok(Some(item * 10)));
        }
        assert_eq!(*sink.batches.lock(), [[1], [2], [3]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_that_arrive_while_the_slots_are_busy_go_together_in_order() {
        let sink = Recorder::new(true);
        let batcher = Arc::new(Batcher::new(limits(1, 64, 1 << 20)));
        // The first takes the only slot and is held there.
        let first = spawn_submit(&batcher, &sink, 1);
        until(|| sink.calls_running.load(Ordering::SeqCst) == 1).await;
        let mut later = Vec::new();
        for item in 2..=6 {
            later.push(spawn_submit(&batcher, &sink, item));
            until(|| waiting(&batcher) == (item - 1) as usize).await;
        }
        sink.release();
        assert_eq!(first.await.unwrap(), Some(10));
        for (item, task) in (2..=6).zip(later) {
            assert_eq!(
                task.await.unwrap(),
                Some(item * 10),
                "each gets its own answer"
            );
        }
        assert_eq!(*sink.batches.lock(), [vec![1], vec![2, 3, 4, 5, 6]]);
        assert_eq!(sink.most_running.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_keep_to_the_item_and_byte_limits_and_the_slot_count() {
        let sink = Recorder::new(true);
        let batcher = Arc::new(Batcher::new(limits(2, 3, 100)));
        // One at a time, so each takes a slot of its own.
        let mut tasks = vec![spawn_submit(&batcher, &sink, 1)];
        until(|| sink.calls_running.load(Ordering::SeqCst) == 1).await;
        tasks.push(spawn_submit(&batcher, &sink, 2));
        until(|| sink.calls_running.load(Ordering::SeqCst) == 2).await;
        // Waiting: four of 1 byte (three fill a batch), then 60 and 50 (110 > 100
        // bytes), then one of 500 (over the limit: alone), then 1.
        for item in [1, 1, 1, 1, 60, 50, 500, 1] {
            tasks.push(spawn_submit(&batcher, &sink, item));
            until(|| waiting(&batcher) == tasks.len() - 2).await;
        }
        sink.release();
        for task in tasks {
            assert!(task.await.unwrap().is_some());
        }
        let batches = sink.batches.lock().clone();
        let mut after_the_first_two = batches[2..].to_vec();
        after_the_first_two.sort();
        let mut expected = vec![vec![1, 1, 1], vec![1, 60], vec![50], vec![500], vec![1]];
        expected.sort();
        assert_eq!(after_the_first_two, expected, "all batches: {batches:?}");
        assert_eq!(sink.most_running.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_does_not_stop_the_others() {
        let sink = Recorder::new(true);
        let batcher = Arc::new(Batcher::new(limits(1, 64, 1 << 20)));
        let first = spawn_submit(&batcher, &sink, 1);
        until(|| sink.calls_running.load(Ordering::SeqCst) == 1).await;
        let gone = spawn_submit(&batcher, &sink, 2);
        until(|| waiting(&batcher) == 1).await;
        let stays = spawn_submit(&batcher, &sink, 3);
        until(|| waiting(&batcher) == 2).await;
        gone.abort();
        sink.release();
        assert_eq!(first.await.unwrap(), Some(10));
        assert_eq!(stays.await.unwrap(), Some(30));
        // The slot is free again: a new item goes out alone.
        assert_eq!(batcher.submit(&sink, 4).await, Ok(Some(40)));
        assert_eq!(*sink.batches.lock(), [vec![1], vec![2, 3], vec![4]]);
        until(|| batcher.shared.lock().slots == 0).await;
    }

    /// Items wait only up to the queue's limits, in count and in bytes; past them a
    /// submit is refused at once, and the queue takes items again once it drains.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_at_once_and_takes_items_again_once_drained() {
        let sink = Recorder::new(true);
        let batcher = Arc::new(Batcher::new(Limits {
            waiting: 2,
            waiting_bytes: 25,
            ..limits(1, 64, 1 << 20)
        }));
        // The only slot is busy with item 1; 10 and 11 wait, a third is refused.
        let first = spawn_submit(&batcher, &sink, 1);
        until(|| sink.calls_running.load(Ordering::SeqCst) == 1).await;
        let waiting_items = [
            spawn_submit(&batcher, &sink, 10),
            spawn_submit(&batcher, &sink, 11),
        ];
        until(|| waiting(&batcher) == 2).await;
        assert_eq!(batcher.submit(&sink, 2).await, Err(QueueFull::Items(2)));
        sink.release();
        assert_eq!(first.await.expect("first"), Some(10));
        for (task, item) in waiting_items.into_iter().zip([10, 11]) {
            assert_eq!(task.await.expect("waiting"), Some(item * 10));
        }
        // By bytes: 20 waits, 6 more would make 26 of 25.
        sink.hold.send_replace(true);
        let busy = spawn_submit(&batcher, &sink, 1);
        until(|| sink.calls_running.load(Ordering::SeqCst) == 1).await;
        let twenty = spawn_submit(&batcher, &sink, 20);
        until(|| waiting(&batcher) == 1).await;
        assert_eq!(
            batcher.submit(&sink, 6).await,
            Err(QueueFull::Bytes(20, 25))
        );
        sink.release();
        assert_eq!(busy.await.expect("busy"), Some(10));
        assert_eq!(twenty.await.expect("twenty"), Some(200));
        assert_eq!(batcher.submit(&sink, 6).await, Ok(Some(60)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_slower_than_the_patience_gives_its_slot_up() {
        let mut sink = Recorder::new(true);
        Arc::get_mut(&mut sink).expect("only owner").hold_only = Some(1);
        let batcher = Arc::new(Batcher::new(Limits {
            patience: Duration::from_millis(20),
            ..limits(1, 64, 1 << 20)
        }));
        // A call that hangs (until released) holds the only slot...
        let hung = spawn_submit(&batcher, &sink, 1);
        until(|| sink.calls_running.load(Ordering::SeqCst) == 1).await;
        // ...for no longer than the patience: the next item goes out in a call of its own.
        let next = tokio::time::timeout(Duration::from_secs(5), batcher.submit(&sink, 2)).await;
        assert_eq!(next.expect("not held behind the hung call"), Ok(Some(20)));
        assert!(!hung.is_finished());
        sink.release();
        assert_eq!(hung.await.unwrap(), Some(10));
        assert_eq!(*sink.batches.lock(), [vec![1], vec![2]]);
        until(|| batcher.shared.lock().slots == 0).await;
    }
}
