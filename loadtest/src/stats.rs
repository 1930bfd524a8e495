//! Accounting for load runs: what was expected, what arrived, how late, second by second.
//!
//! Subscribers record into their own [`SubscriberStats`] (one uncontended lock per message) and
//! move latencies in batches into the run's [`Collector`], which keeps one histogram per second
//! and one for the whole run. Expected deliveries are computed exactly from what was published
//! and who was subscribed.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::Arc;

/// Latencies are recorded in microseconds, up to a minute, to 2 significant digits (1 %).
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// Latencies per second of the run, and overall.
#[derive(Debug)]
pub struct Collector {
    inner: Mutex<CollectorInner>,
}

#[derive(Debug)]
struct CollectorInner {
    total: Histogram<u64>,
    seconds: Vec<Histogram<u64>>,
}

impl Default for Collector {
    fn default() -> Collector {
        Collector {
            inner: Mutex::new(CollectorInner {
                total: new_histogram(),
                seconds: Vec::new(),
            }),
        }
    }
}

impl Collector {
    /// Records a batch of `(second, latency_us)` samples.
    pub fn record(&self, samples: &[(u32, u64)]) {
        let mut inner = self.inner.lock();
        for &(second, latency) in samples {
            let second = second as usize;
            while inner.seconds.len() <= second {
                inner.seconds.push(new_histogram());
            }
            // Out-of-range samples saturate at the maximum rather than vanish.
            inner.total.saturating_record(latency.max(1));
            inner.seconds[second].saturating_record(latency.max(1));
        }
    }

    /// Latency percentiles of the whole run, in milliseconds.
    pub fn latency(&self) -> Latency {
        Latency::of(&self.inner.lock().total)
    }

    /// Deliveries and p99 per second.
    pub fn timeline(&self) -> Vec<Second> {
        let inner = self.inner.lock();
        inner
            .seconds
            .iter()
            .enumerate()
            .map(|(i, h)| Second {
                second: i as u32,
                delivered: h.len(),
                p99_ms: ms(h.value_at_quantile(0.99)),
            })
            .collect()
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Latency {
        Latency::of(h)
    }

    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 100.0).round() / 100.0
}

/// One second of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    pub second: u32,
    pub delivered: u64,
    pub p99_ms: f64,
}

/// Batch size before a subscriber hands latencies to the collector.
const BATCH: usize = 512;

/// One subscriber's counters, behind its own lock.
#[derive(Debug)]
pub struct SubscriberStats {
    pub delivered: u64,
    /// Messages whose sequence number was not greater than the previous one from the same
    /// publisher.
    pub out_of_order: u64,
    last_seq: Vec<Option<u64>>,
    batch: Vec<(u32, u64)>,
    collector: Arc<Collector>,
}

impl SubscriberStats {
    pub fn new(publishers: usize, collector: Arc<Collector>) -> SubscriberStats {
        SubscriberStats {
            delivered: 0,
            out_of_order: 0,
            last_seq: vec![None; publishers],
            batch: Vec::with_capacity(BATCH),
            collector,
        }
    }

    /// Records one delivery: which publisher, its sequence number, and when it was sent and
    /// received (nanoseconds since the run's start on the shared wall clock).
    pub fn record(&mut self, publisher: usize, seq: u64, sent_ns: u64, received_ns: u64) {
        self.delivered += 1;
        if let Some(last) = self.last_seq.get_mut(publisher) {
            if last.is_some_and(|l| seq <= l) {
                self.out_of_order += 1;
            }
            *last = Some(seq);
        }
        let latency_us = received_ns.saturating_sub(sent_ns) / 1000;
        let second = u32::try_from(received_ns / 1_000_000_000).unwrap_or(u32::MAX);
        self.batch.push((second, latency_us));
        if self.batch.len() >= BATCH {
            self.flush();
        }
    }

    /// Hands buffered latencies to the collector.
    pub fn flush(&mut self) {
        if !self.batch.is_empty() {
            self.collector.record(&self.batch);
            self.batch.clear();
        }
    }
}

/// Expected deliveries: every message published to a topic is owed to every subscriber of it.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Subscribers per topic index.
    subscribers: Vec<u64>,
    total: u64,
}

impl Expected {
    pub fn new(subscribers_per_topic: Vec<u64>) -> Expected {
        Expected {
            subscribers: subscribers_per_topic,
            total: 0,
        }
    }

    /// A message was published to `topic`.
    pub fn published(&mut self, topic: usize) {
        self.total += self.subscribers.get(topic).copied().unwrap_or(0);
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Extracts the unsigned integer after `"key":` in a JSON body (the load generator's own
/// payloads), without parsing the JSON.
pub fn field(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(body, key)? + key.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for &d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// The sum of the samples in a Prometheus text exposition whose line starts with `prefix` (a
/// metric name, or a name and the start of its labels): a counter over all its label sets.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_counts_each_subscriber_of_the_topic() {
        let mut e = Expected::new(vec![3, 0, 5]);
        e.published(0);
        e.published(2);
        e.published(2);
        e.published(1);
        e.published(9); // unknown topic: nobody owed
        assert_eq!(e.total(), 3 + 5 + 5);
    }

    #[test]
    fn subscriber_stats_count_order_and_latency() {
        let collector = Arc::new(Collector::default());
        let mut s = SubscriberStats::new(2, collector.clone());
        s.record(0, 1, 0, 1_000_000); // 1 ms, second 0
        s.record(0, 2, 0, 2_000_000);
        s.record(1, 1, 0, 3_000_000);
        s.record(0, 2, 1_000_000_000, 1_010_000_000); // repeated seq: out of order; second 1
        s.flush();
        assert_eq!((s.delivered, s.out_of_order), (4, 1));
        let timeline = collector.timeline();
        assert_eq!(
            timeline.iter().map(|s| s.delivered).collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert!((timeline[1].p99_ms - 10.0).abs() < 0.2, "{timeline:?}");
        let latency = collector.latency();
        assert!((latency.max_ms - 10.0).abs() < 0.2, "{latency:?}");
        assert!((latency.p50_ms - 2.0).abs() < 0.05, "{latency:?}");
    }

    #[test]
    fn batches_reach_the_collector_without_an_explicit_flush() {
        let collector = Arc::new(Collector::default());
        let mut s = SubscriberStats::new(1, collector.clone());
        for i in 0..BATCH as u64 {
            s.record(0, i, 0, 5_000);
        }
        assert_eq!(collector.timeline()[0].delivered, BATCH as u64);
    }

    #[test]
    fn reads_fields_of_payloads() {
        let body = br#"{"id":"x","data":{"t":123456789,"p":3,"s":42,"x":"pad"}}"#;
        assert_eq!(field(body, br#""t":"#), Some(123_456_789));
        assert_eq!(field(body, br#""p":"#), Some(3));
        assert_eq!(field(body, br#""s":"#), Some(42));
        assert_eq!(field(body, br#""q":"#), None);
        assert_eq!(field(br#"{"t":"x"}"#, br#""t":"#), None);
    }
}
