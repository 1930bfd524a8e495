//! A connection's bounded outbound queue.
//!
//! Fan-out pushes frames here for every subscriber of a topic, so a push must be cheap and must
//! never wait. Compared with a general-purpose channel this queue does three things for that
//! job: it wakes the session only when the queue goes from empty to non-empty (a burst of
//! events is one wake-up, then one write); it carries the slow-consumer mark itself (a full
//! queue is exactly when no "close" item would fit); and it allocates nothing while idle.

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// The pushing side and the session side share one `Outbox`; cloning is cheap.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// A `parking_lot` mutex: held for a push or a pop, never across an `.await`.
    queue: Mutex<VecDeque<Utf8Bytes>>,
    capacity: usize,
    /// Set when a push found the queue full; the session then closes with 4008.
    slow: AtomicBool,
    /// Set when the session ended; pushes are dropped.
    closed: AtomicBool,
    waker: AtomicWaker,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
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

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Outbox {
        Outbox {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                capacity,
                slow: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            }),
        }
    }

    /// Queues a frame without waiting.
    pub(crate) fn push(&self, frame: Utf8Bytes) -> Pushed {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return Pushed::Closed;
        }
        let was_empty = {
            let mut queue = shared.queue.lock();
            if queue.len() >= shared.capacity {
                drop(queue);
                shared.slow.store(true, Ordering::Release);
                shared.waker.wake();
                return Pushed::Full;
            }
            let was_empty = queue.is_empty();
            queue.push_back(frame);
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
        } else if self.shared.queue.lock().is_empty() {
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

    pub(crate) fn is_slow(&self) -> bool {
        self.shared.slow.load(Ordering::Acquire)
    }

    /// Takes the oldest queued frame. Gives back the memory of a drained burst, so idle
    /// connections stay small.
    pub(crate) fn pop(&self) -> Option<Utf8Bytes> {
        let mut queue = self.shared.queue.lock();
        let frame = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 64 {
            *queue = VecDeque::new();
        }
        frame
    }

    /// The session ended: refuse further pushes and free what is queued.
    pub(crate) fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        *self.shared.queue.lock() = VecDeque::new();
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
    fn wakes_once_per_burst_and_marks_slow_when_full() {
        let outbox = Outbox::new(3);
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(outbox.poll_ready(&mut cx), Poll::Pending);
        for _ in 0..3 {
            assert_eq!(outbox.push(Utf8Bytes::from_static("x")), Pushed::Queued);
        }
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "a burst is one wake-up"
        );
        assert_eq!(outbox.poll_ready(&mut cx), Poll::Ready(Ready::Frames));
        assert_eq!(outbox.push(Utf8Bytes::from_static("x")), Pushed::Full);
        assert_eq!(outbox.poll_ready(&mut cx), Poll::Ready(Ready::Slow));
        assert!(outbox.pop().is_some());
        outbox.close();
        assert_eq!(outbox.push(Utf8Bytes::from_static("x")), Pushed::Closed);
        assert!(outbox.pop().is_none());
    }
}
