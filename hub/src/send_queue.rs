//! A connection's bounded outbound queue.
//!
//! Fan-out pushes frames here for every subscriber of a topic, so a push must be cheap and must
//! never wait. Compared with a general-purpose channel this queue does four things for that
//! job: it wakes the session only when the queue goes from empty to non-empty (a burst of
//! events is one wake-up, then one write); it carries the slow-consumer mark itself (a full
//! queue is exactly when no "close" item would fit); it is bounded in bytes as well as in
//! frames (a frame count alone lets a few stalled subscribers of large events pin gigabytes);
//! and it allocates nothing while idle.
//!
//! It also conflates (DESIGN §13): once it is more than half full, a keyed event replaces the
//! queued events of the same subscription and key instead of queueing behind them, carrying
//! `x-conflated:<n>` (how many events of its key it stands for beyond itself). A slow browser
//! then gets each job's latest progress rather than a 4008. The replacement takes the newest
//! place, not the replaced one's: offsets a subscriber receives only ever increase, so a client
//! that resumes from the last offset it saw can never skip an unkeyed event queued between the
//! two. Unkeyed events are never dropped, replaced or reordered, and still fill the queue up to
//! the slow-consumer close.

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// The pushing side and the session side share one `SendQueue`; cloning is cheap.
#[derive(Debug, Clone)]
pub(crate) struct SendQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// A `parking_lot` mutex: held for a push or a pop, never across an `.await`.
    queue: Mutex<Queue>,
    /// Most frames, and most bytes, queued at once. A frame is always taken into an empty
    /// queue, whatever its size, so one event larger than the byte bound still goes out.
    capacity: usize,
    capacity_bytes: usize,
    /// Set when a push found the queue full; the session then closes with 4008.
    slow: AtomicBool,
    /// Set when the session ended; pushes are dropped.
    closed: AtomicBool,
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Entry>,
    /// Bytes of the queued frames.
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    frame: Utf8Bytes,
    /// For a keyed event: whose and which key, and how many it replaced.
    keyed: Option<Keyed>,
}

#[derive(Debug)]
struct Keyed {
    subscription: Arc<str>,
    key: Arc<str>,
    replaced: u32,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// It replaced the queued event of its key (the queue is more than half full).
    Conflated,
    /// The queue was full: the connection is now marked as a slow consumer.
    Full,
    /// The session is gone.
    Closed,
}

/// What the session should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    Frames,
    Slow,
}

impl SendQueue {
    pub(crate) fn new(capacity: usize, capacity_bytes: usize) -> SendQueue {
        SendQueue {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                capacity,
                capacity_bytes,
                slow: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            }),
        }
    }

    /// Queues a frame without waiting.
    pub(crate) fn push(&self, frame: Utf8Bytes) -> Pushed {
        self.push_entry(Entry { frame, keyed: None }, None::<fn(u32) -> Utf8Bytes>)
    }

    /// Queues a keyed event's frame for `subscription` without waiting. Above half full, it
    /// replaces the queued frame of the same subscription and key instead, as `render(n)`
    /// makes it (the frame with `x-conflated:n`).
    pub(crate) fn push_keyed(
        &self,
        frame: Utf8Bytes,
        subscription: &Arc<str>,
        key: &Arc<str>,
        render: impl FnOnce(u32) -> Utf8Bytes,
    ) -> Pushed {
        let entry = Entry {
            frame,
            keyed: Some(Keyed {
                subscription: subscription.clone(),
                key: key.clone(),
                replaced: 0,
            }),
        };
        self.push_entry(entry, Some(render))
    }

    fn push_entry(&self, entry: Entry, render: Option<impl FnOnce(u32) -> Utf8Bytes>) -> Pushed {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return Pushed::Closed;
        }
        let was_empty = {
            let mut queue = shared.queue.lock();
            let half_full =
                queue.frames.len() * 2 > shared.capacity || queue.bytes * 2 > shared.capacity_bytes;
            if let (true, Some(render), Some(keyed)) = (half_full, render, &entry.keyed) {
                // Every queued event of the key goes (more than one when they were queued
                // below half full); the newest stands for all of them.
                let same = |e: &Entry| {
                    e.keyed.as_ref().is_some_and(|k| {
                        Arc::ptr_eq(&k.subscription, &keyed.subscription) && k.key == keyed.key
                    })
                };
                if queue.frames.iter().any(same) {
                    let (mut replaced, mut freed) = (0u32, 0usize);
                    queue.frames.retain(|e| {
                        if !same(e) {
                            return true;
                        }
                        replaced += e.keyed.as_ref().map_or(0, |k| k.replaced) + 1;
                        freed += e.frame.len();
                        false
                    });
                    let frame = render(replaced);
                    queue.bytes = queue.bytes + frame.len() - freed;
                    queue.frames.push_back(Entry {
                        frame,
                        keyed: entry.keyed.map(|k| Keyed { replaced, ..k }),
                    });
                    // Not empty before or after: the writer already has something to do.
                    return Pushed::Conflated;
                }
            }
            let frame = entry.frame;
            let was_empty = queue.frames.is_empty();
            if !was_empty
                && (queue.frames.len() >= shared.capacity
                    || queue.bytes + frame.len() > shared.capacity_bytes)
            {
                drop(queue);
                shared.slow.store(true, Ordering::Release);
                shared.waker.wake();
                return Pushed::Full;
            }
            queue.bytes += frame.len();
            queue.frames.push_back(Entry {
                frame,
                keyed: entry.keyed,
            });
            was_empty
        };
        if was_empty {
            shared.waker.wake();
        }
        Pushed::Queued
    }

    /// Resolves when there is something to write, or the connection was marked slow.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Ready> {
        if let Some(ready) = self.ready() {
            return Poll::Ready(ready);
        }
        self.shared.waker.register(cx.waker());
        // A push between the first check and the registration would otherwise be missed.
        self.ready().map_or(Poll::Pending, Poll::Ready)
    }

    fn ready(&self) -> Option<Ready> {
        if self.shared.slow.load(Ordering::Acquire) {
            Some(Ready::Slow)
        } else if self.shared.queue.lock().frames.is_empty() {
            None
        } else {
            Some(Ready::Frames)
        }
    }

    /// Resolves once the connection is marked slow.
    pub(crate) fn poll_slow(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_slow() {
            return Poll::Ready(());
        }
        self.shared.waker.register(cx.waker());
        if self.is_slow() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Marks the connection a slow consumer (it fell too far behind elsewhere, e.g. while a
    /// subscription recovered); the session closes with 4008.
    pub(crate) fn mark_slow(&self) {
        self.shared.slow.store(true, Ordering::Release);
        self.shared.waker.wake();
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.shared.slow.load(Ordering::Acquire)
    }

    /// Takes the oldest queued frame. Gives back the memory of a drained burst, so idle
    /// connections stay small.
    pub(crate) fn pop(&self) -> Option<Utf8Bytes> {
        let mut queue = self.shared.queue.lock();
        let frame = queue.frames.pop_front().map(|e| e.frame);
        if let Some(frame) = &frame {
            queue.bytes -= frame.len();
        }
        if queue.frames.is_empty() && queue.frames.capacity() > 64 {
            queue.frames = VecDeque::new();
        }
        frame
    }

    /// The session ended: refuse further pushes and free what is queued.
    pub(crate) fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        *self.shared.queue.lock() = Queue::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn keyed_events_conflate_above_half_full_and_unkeyed_never() {
        let queue = SendQueue::new(4, 1 << 20);
        let (s, other): (Arc<str>, Arc<str>) = ("sub".into(), "sub".into());
        let (a, b): (Arc<str>, Arc<str>) = ("job:a".into(), "job:b".into());
        let frame = |t: &str| Utf8Bytes::from(t.to_owned());
        // Below half full: queued behind each other.
        assert_eq!(
            queue.push_keyed(frame("a1"), &s, &a, |_| frame("x")),
            Pushed::Queued
        );
        assert_eq!(
            queue.push_keyed(frame("a2"), &s, &a, |_| frame("x")),
            Pushed::Queued
        );
        assert_eq!(queue.push(frame("u1")), Pushed::Queued);
        // Above half full: a1 and a2 are replaced by a3, which counts them and goes last, so
        // offsets keep increasing.
        assert_eq!(
            queue.push_keyed(frame("a3"), &s, &a, |n| frame(&format!("a3+{n}"))),
            Pushed::Conflated
        );
        // Back at half: queued again; then a5 stands for a3's two, a3 and a4.
        assert_eq!(
            queue.push_keyed(frame("a4"), &s, &a, |_| frame("x")),
            Pushed::Queued
        );
        assert_eq!(
            queue.push_keyed(frame("a5"), &s, &a, |n| frame(&format!("a5+{n}"))),
            Pushed::Conflated
        );
        // Another subscription's same key is its own.
        assert_eq!(
            queue.push_keyed(frame("o1"), &other, &a, |_| frame("x")),
            Pushed::Queued
        );
        // Unkeyed events and new keys still fill the queue, then it is slow.
        assert_eq!(
            queue.push_keyed(frame("b1"), &s, &b, |_| frame("x")),
            Pushed::Queued
        );
        assert_eq!(queue.push(frame("u2")), Pushed::Full);
        let order: Vec<String> = std::iter::from_fn(|| queue.pop())
            .map(|f| f.as_str().to_owned())
            .collect();
        assert_eq!(order, ["u1", "a5+4", "o1", "b1"]);
    }

    #[test]
    fn bounded_in_bytes_too() {
        let queue = SendQueue::new(100, 10);
        // An empty queue takes any frame, so one large event still goes out.
        assert_eq!(queue.push(Utf8Bytes::from("x".repeat(50))), Pushed::Queued);
        assert_eq!(queue.push(Utf8Bytes::from_static("y")), Pushed::Full);
        assert!(queue.is_slow());
        let queue = SendQueue::new(100, 10);
        assert_eq!(queue.push(Utf8Bytes::from("x".repeat(6))), Pushed::Queued);
        assert_eq!(queue.push(Utf8Bytes::from("x".repeat(4))), Pushed::Queued);
        assert_eq!(queue.pop().map(|f| f.len()), Some(6));
        // Popping gives the bytes back.
        assert_eq!(queue.push(Utf8Bytes::from("x".repeat(6))), Pushed::Queued);
        assert!(!queue.is_slow());
    }

    #[test]
    fn wakes_once_per_burst_and_marks_slow_when_full() {
        let queue = SendQueue::new(3, 1 << 20);
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(queue.poll_ready(&mut cx), Poll::Pending);
        for _ in 0..3 {
            assert_eq!(queue.push(Utf8Bytes::from_static("x")), Pushed::Queued);
        }
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "a burst is one wake-up"
        );
        assert_eq!(queue.poll_ready(&mut cx), Poll::Ready(Ready::Frames));
        assert_eq!(queue.push(Utf8Bytes::from_static("x")), Pushed::Full);
        assert_eq!(queue.poll_ready(&mut cx), Poll::Ready(Ready::Slow));
        assert!(queue.pop().is_some());
        queue.close();
        assert_eq!(queue.push(Utf8Bytes::from_static("x")), Pushed::Closed);
        assert!(queue.pop().is_none());
    }
}
