//! Single-flight history reads. When a node dies under a thousand browsers, they all resume the
//! same topic from about the same offset on the surviving nodes at once; a broker read each
//! would queue a thousand identical `XRANGE`s (and their parsing) behind one Redis connection
//! and time them out. Here reads of the same range share one broker read, and at most one read
//! of a range runs at a time: whoever asks while it runs waits for the next one, which then
//! serves everyone who queued behind it.
//!
//! A resuming subscription may only take a read that was issued after it began holding its live
//! events (`since`): an earlier read could miss an event that is neither in it nor held.

use crate::broker::{BrokerError, History};
use dashmap::{DashMap, Entry};
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A history read that several subscriptions may await.
type SharedRead = Shared<BoxFuture<'static, Result<History, BrokerError>>>;

/// What a read is of: topic, offset after which, at most how many events.
pub(crate) type Range = (String, u64, usize);

/// One read of a range, possibly still waiting for the one before it.
#[derive(Clone)]
struct Flight {
    /// When it asked the broker; unset while it waits its turn.
    issued: Arc<OnceLock<Instant>>,
    read: SharedRead,
}

impl Flight {
    /// Whether a subscription holding live events since `since` may take this read's result.
    fn serves(&self, since: Option<Instant>) -> bool {
        self.read.peek().is_none()
            && self
                .issued
                .get()
                .is_none_or(|issued| since.is_none_or(|since| *issued >= since))
    }
}

/// The latest read of each range in flight.
#[derive(Default)]
pub(crate) struct Reads {
    flights: DashMap<Range, Flight>,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads")
            .field("in_flight", &self.flights.len())
            .finish()
    }
}

impl Reads {
    /// The result of a read of `range` issued at `since` or later (`None`: any), sharing one in
    /// flight where it can; `read` is how to read the range from the broker.
    pub(crate) async fn read(
        &self,
        range: Range,
        since: Option<Instant>,
        read: impl FnOnce() -> BoxFuture<'static, Result<History, BrokerError>>,
    ) -> Result<History, BrokerError> {
        let queue = |before: Option<SharedRead>| {
            let issued = Arc::new(OnceLock::new());
            let mark = issued.clone();
            let read = read();
            Flight {
                issued,
                read: async move {
                    // One read of a range at a time: wait for the one in flight, if any.
                    if let Some(before) = before {
                        let _ = before.await;
                    }
                    mark.get_or_init(Instant::now);
                    read.await
                }
                .boxed()
                .shared(),
            }
        };
        let flight = match self.flights.entry(range.clone()) {
            Entry::Occupied(mut entry) if !entry.get().serves(since) => {
                let before = Some(entry.get().read.clone()).filter(|read| read.peek().is_none());
                let next = queue(before);
                entry.insert(next.clone());
                next
            }
            Entry::Occupied(entry) => entry.get().clone(),
            Entry::Vacant(entry) => entry.insert(queue(None)).clone(),
        };
        let result = flight.read.clone().await;
        // Done: the next read of this range goes to the broker again.
        self.flights
            .remove_if(&range, |_, flight| flight.read.peek().is_some());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::stream::Position;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    fn history(n: u64) -> History {
        History {
            first: 1,
            top: Position::new(n, "e"),
            events: Vec::new(),
        }
    }

    /// A broker read that counts itself and finishes when `gate` is notified; answers with the
    /// count so far as the top offset.
    fn gated(
        count: &Arc<AtomicUsize>,
        gate: &Arc<Notify>,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<History, BrokerError>> + use<> {
        let (count, gate) = (count.clone(), gate.clone());
        move || {
            async move {
                let n = count.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                gate.notified().await;
                Ok(history(n))
            }
            .boxed()
        }
    }

    fn range() -> Range {
        ("/team/t1".to_owned(), 7, 100)
    }

    #[tokio::test]
    async fn readers_that_ask_together_share_one_read() {
        let reads = Arc::new(Reads::default());
        let (count, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let since = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (reads, read) = (reads.clone(), gated(&count, &gate));
            tasks.spawn(async move { reads.read(range(), Some(since), read).await });
        }
        while count.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_waiters();
        while let Some(result) = tasks.join_next().await {
            assert_eq!(result.unwrap().unwrap().top.offset, 1);
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(reads.flights.is_empty(), "finished reads are forgotten");
    }

    #[tokio::test]
    async fn a_reader_that_began_holding_after_a_read_was_issued_waits_for_the_next() {
        let reads = Arc::new(Reads::default());
        let (count, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let first = {
            let (reads, read) = (reads.clone(), gated(&count, &gate));
            let since = Instant::now();
            tokio::spawn(async move { reads.read(range(), Some(since), read).await })
        };
        while count.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Three late readers: they queue behind the first read and share the second.
        let late = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let (reads, read) = (reads.clone(), gated(&count, &gate));
            tasks.spawn(async move { reads.read(range(), Some(late), read).await });
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "one read of a range at a time"
        );
        gate.notify_waiters();
        assert_eq!(first.await.unwrap().unwrap().top.offset, 1);
        while count.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gate.notify_waiters();
        while let Some(result) = tasks.join_next().await {
            assert_eq!(result.unwrap().unwrap().top.offset, 2);
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn other_ranges_and_failures_are_not_shared() {
        let reads = Reads::default();
        let failing =
            || async { Err::<History, _>(BrokerError::Unavailable("down".into())) }.boxed();
        assert!(reads.read(range(), None, failing).await.is_err());
        let ok = || async { Ok(history(5)) }.boxed();
        assert_eq!(reads.read(range(), None, ok).await.unwrap().top.offset, 5);
        let other = ("/team/t1".to_owned(), 8, 100);
        let ok = || async { Ok(history(6)) }.boxed();
        assert_eq!(reads.read(other, None, ok).await.unwrap().top.offset, 6);
    }
}
