//! Webhooks (DESIGN §15): signed `POST`s of `{id, ts, events}` to configured endpoints when a
//! team or item topic becomes occupied or vacated, and optionally for presence and lock events.
//!
//! Deliveries are queued durably in the lock store's database, beside the locks: every
//! deployment has it (the embedded SQLite file, or the PostgreSQL a cluster shares), so what a
//! node queued is delivered by another if it dies. Each endpoint has its own queue; one node at
//! a time holds an endpoint's lease and delivers its queue in id order, one delivery in flight,
//! retrying the head with capped exponential backoff for `retry_for` before it becomes a dead
//! letter. A receiver that is down holds back only its own queue.
//!
//! Events enter two ways. The hub's presence decisions (occupied, vacated, joined, left) come
//! through [`Webhooks::emit`] into a bounded in-memory queue a writer task empties into the
//! database, a batch per write. Lock events move from the lock outbox into the webhook queue in
//! the transaction that deletes them from the outbox ([`LockForward`]), so none is lost between
//! the two.
//!
//! # Layout
//!
//! - [`sign`]: the `Lockstep-Signature` header, for this sender and for receivers.
//! - `queue`: the deliveries table: enqueue, lease, head, outcome, dead letters.
//! - `deliver`: the per-endpoint worker every node runs; the lease holder delivers.

mod deliver;
pub(crate) mod queue;
pub mod sign;

pub use deliver::label;

use crate::locks::store::LockStore;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, warn};

/// Every event type a webhook can carry.
pub const EVENT_TYPES: &[&str] = &[
    "topic.occupied",
    "topic.vacated",
    "presence.joined",
    "presence.left",
    "lock.acquired",
    "lock.released",
    "lock.expired",
    "lock.taken_over",
];

/// A receiving URL and the secret its deliveries are signed with.
#[derive(Clone)]
pub struct Endpoint {
    pub url: String,
    pub secret: Arc<[u8]>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A webhook URL's path or query often carries a token of its own.
        f.debug_struct("Endpoint")
            .field("url", &deliver::label(&self.url))
            .field("secret", &"***")
            .finish()
    }
}

/// An entry of `webhooks.events` that matches no event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{entry}' matches no webhook event type (known: {known})")]
pub struct FilterError {
    entry: String,
    known: String,
}

/// Which event types go to the endpoints: names, `prefix.*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    patterns: Vec<String>,
}

impl EventFilter {
    /// Parses a comma-separated list of event types (`topic.occupied`), families
    /// (`lock.*`) or `*`.
    ///
    /// # Errors
    ///
    /// [`FilterError`] naming the first entry that matches no event type.
    pub fn parse(list: &str) -> Result<EventFilter, FilterError> {
        let mut patterns = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let pattern = EventFilter {
                patterns: vec![entry.to_owned()],
            };
            if !EVENT_TYPES.iter().any(|t| pattern.matches(t)) {
                return Err(FilterError {
                    entry: entry.to_owned(),
                    known: EVENT_TYPES.join(", "),
                });
            }
            patterns.push(entry.to_owned());
        }
        Ok(EventFilter { patterns })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| {
            p == "*"
                || p == event_type
                || p.strip_suffix('*')
                    .is_some_and(|prefix| prefix.ends_with('.') && event_type.starts_with(prefix))
        })
    }

    /// Whether any type of `family` (`lock.`, `topic.`) passes.
    pub fn wants_any(&self, family: &str) -> bool {
        EVENT_TYPES
            .iter()
            .any(|t| t.starts_with(family) && self.matches(t))
    }
}

/// Settings of the webhooks.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Empty: webhooks are off.
    pub endpoints: Vec<Endpoint>,
    pub events: EventFilter,
    /// Most events in one delivery.
    pub batch: usize,
    /// Longest one delivery attempt may take.
    pub timeout: Duration,
    /// The first retry's delay; each next one doubles, up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long after it was queued a delivery is retried before it becomes a dead letter.
    pub retry_for: Duration,
    /// How long a node's claim on an endpoint's queue lasts unrenewed: within it, another node
    /// takes over the queue of a node that died.
    pub lease: Duration,
    /// How often the lease holder looks for deliveries other nodes queued.
    pub poll_interval: Duration,
    /// Events this node holds before they are written to the database; past it (the database
    /// is down) new ones are dropped and counted.
    pub queue: usize,
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig {
            endpoints: Vec::new(),
            events: EventFilter {
                patterns: vec!["topic.occupied".into(), "topic.vacated".into()],
            },
            batch: 100,
            timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            retry_for: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            queue: 10_000,
        }
    }
}

/// One event of a delivery's `events`, as JSON: `{"type", "topic", "ts", "data"}`, `ts` in
/// Unix milliseconds, `data` the event's own JSON (`{}` for occupancy).
pub(crate) fn event_json(event_type: &str, topic: &str, ts: i64, data: &str) -> String {
    format!(
        r#"{{"type":{},"topic":{},"ts":{ts},"data":{data}}}"#,
        serde_json::Value::from(event_type),
        serde_json::Value::from(topic),
    )
}

/// How lock events reach the webhook queue: the endpoints and filter, applied by the lock
/// store as it deletes published events from its outbox.
pub struct LockForward {
    pub(crate) endpoints: Vec<String>,
    pub(crate) filter: EventFilter,
    pub(crate) batch: usize,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for LockForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockForward")
            .field("endpoints", &self.endpoints.len())
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl LockForward {
    /// `n` events were queued for every endpoint: count them and wake this node's workers.
    pub(crate) fn queued(&self, n: usize) {
        metrics::counter!(crate::metrics::WEBHOOK_EVENTS, "source" => "locks").increment(n as u64);
        self.wake.notify_waiters();
    }
}

/// The node's webhooks: the queue of events to write, and the endpoints' workers.
#[derive(Debug)]
pub struct Webhooks {
    config: Arc<WebhookConfig>,
    /// The endpoints' URLs: their queues' keys.
    urls: Vec<String>,
    /// The writer and the workers, awaited at shutdown (the writer's last batch, the workers'
    /// lease releases).
    tasks: TaskTracker,
    /// Events (as their JSON) waiting to be written into the database; bounded by
    /// `config.queue`.
    events: mpsc::Sender<String>,
    /// Wakes this node's delivery workers when it queued something.
    wake: Arc<Notify>,
}

impl Webhooks {
    /// Starts the writer and one delivery worker per endpoint until `shutdown`; `None` when no
    /// endpoint is configured.
    pub fn start(
        store: &LockStore,
        config: WebhookConfig,
        node: &str,
        shutdown: &CancellationToken,
    ) -> Option<Arc<Webhooks>> {
        if config.endpoints.is_empty() {
            return None;
        }
        let config = Arc::new(config);
        let wake = Arc::new(Notify::new());
        let (events, queued) = mpsc::channel(config.queue);
        let urls: Vec<String> = config.endpoints.iter().map(|e| e.url.clone()).collect();
        let tasks = TaskTracker::new();
        tasks.spawn(
            queue::run_writer(
                store.clone(),
                urls.clone(),
                queued,
                config.batch,
                wake.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("webhook_writer")),
        );
        let client = deliver::client(&config);
        for (i, endpoint) in config.endpoints.iter().enumerate() {
            let worker = deliver::Worker {
                store: store.clone(),
                endpoint: endpoint.clone(),
                config: config.clone(),
                node: node.to_owned(),
                client: client.clone(),
                wake: wake.clone(),
                label: format!("{i} {}", deliver::label(&endpoint.url)),
            };
            let span = tracing::info_span!("webhook", endpoint = %worker.label);
            tasks.spawn(worker.run(shutdown.clone()).instrument(span));
        }
        tasks.close();
        Some(Arc::new(Webhooks {
            config,
            urls,
            tasks,
            events,
            wake,
        }))
    }

    /// Resolves once the writer and the workers stopped (after `shutdown` was cancelled).
    pub async fn finished(&self) {
        self.tasks.wait().await;
    }

    /// Whether events of this type go out.
    pub fn wants(&self, event_type: &str) -> bool {
        self.config.events.matches(event_type)
    }

    /// Queues an event for every endpoint, if the filter wants it. Never waits: when the queue
    /// is full (the database has been away for a while) the event is dropped and counted.
    pub fn emit(&self, event_type: &str, topic: &str, data: &str) {
        if !self.wants(event_type) {
            return;
        }
        let now = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(i64::MAX);
        match self
            .events
            .try_send(event_json(event_type, topic, now, data))
        {
            Ok(()) => {
                metrics::counter!(crate::metrics::WEBHOOK_EVENTS, "source" => "presence")
                    .increment(1);
            }
            Err(_) => {
                metrics::counter!(crate::metrics::WEBHOOK_DROPPED).increment(1);
                warn!(
                    event_type,
                    topic, "webhook queue full (is the database down?); event dropped"
                );
            }
        }
    }

    /// What the lock store needs to forward lock events; `None` when no lock event is wanted.
    pub fn lock_forward(&self) -> Option<LockForward> {
        self.config.events.wants_any("lock.").then(|| LockForward {
            endpoints: self.urls.clone(),
            filter: self.config.events.clone(),
            batch: self.config.batch,
            wake: self.wake.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_names_families_and_everything() {
        let f = EventFilter::parse("topic.occupied, lock.*").unwrap();
        assert!(f.matches("topic.occupied"));
        assert!(!f.matches("topic.vacated"));
        assert!(f.matches("lock.acquired") && f.matches("lock.taken_over"));
        assert!(f.wants_any("lock.") && !f.wants_any("presence."));
        let all = EventFilter::parse("*").unwrap();
        assert!(EVENT_TYPES.iter().all(|t| all.matches(t)));
        assert!(EventFilter::parse("").unwrap().patterns.is_empty());
        for bad in ["topic.occupie", "lock", "lock*", "presence.joined,nope.*"] {
            assert!(EventFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_are_json_with_escaped_names() {
        let json = event_json("topic.occupied", "/team/a\"b", 7, "{}");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type": "topic.occupied", "topic": "/team/a\"b", "ts": 7, "data": {}})
        );
    }
}
