//! The cluster broker: how an event published on one node reaches every node with subscribers,
//! in one order, with the offset it has in its topic's history.
//!
//! [`Broker`] is where appending to history and publishing meet: `publish` assigns the event
//! its offset, keeps it in the topic's history and hands it to every subscribed node as one
//! step per topic, and answers the event's [`Position`]. Brokers deliver inbound events through
//! a narrow callback, [`Delivery`], with the position and the shared `MESSAGE` tail (already
//! carrying its position headers); they know nothing about sessions or the registry.
//!
//! [`MemoryBroker`] is the single-node broker: history is an in-memory ring per topic, bounded
//! in count, age and bytes, and the epoch is made anew at every process start.

use crate::config::HistoryConfig;
use crate::control::Revocation;
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use protocol::stream::{self, Position};
use protocol::{MessageTemplate, TopicKind};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::watch;

/// A broker failure. Publishing callers turn it into 503 / an `ERROR` frame; the subscription
/// manager retries.
#[derive(Debug, Clone, Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker overloaded: too many events waiting to be published")]
    Overloaded,
}

/// One event of a topic's stream: its position and its `MESSAGE` tail, which starts with the
/// position headers. What brokers deliver and what history keeps.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub offset: u64,
    pub epoch: Arc<str>,
    pub message: MessageTemplate,
}

impl StreamEvent {
    /// Reads an event from a positioned tail (as a broker carries it).
    pub fn from_tail(tail: &str) -> Option<StreamEvent> {
        let (offset, epoch) = stream::position_of(tail)?;
        Some(StreamEvent {
            offset,
            epoch: epoch.into(),
            message: MessageTemplate::from_tail(tail.into()),
        })
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }
}

/// What a publish asks for besides the event itself.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Publish at most once per key (scoped by the caller, within the history age): a retry
    /// answers the first publish's position and id.
    pub idempotency_key: Option<String>,
    /// The event's key within its topic (`lock:{item}`, `job:{id}`).
    pub key: Option<String>,
    /// With `key`: the event's version. The topic takes it only if it is newer than every
    /// version of that key it took before; an older one is *superseded* and not published.
    /// (Lock events carry their outbox row's id, which grows with every change of an item, so
    /// an event published late, by a slow node or a sweeper, cannot overtake a newer one.)
    pub version: Option<u64>,
}

/// A publish's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub position: Position,
    /// The event id: this publish's, or the first one's when it was a repeated idempotent
    /// publish (then nothing was published again).
    pub id: Arc<str>,
    pub duplicate: bool,
    /// A newer version of its key was already published: this event was not (and `position`
    /// is the topic's top when it was refused).
    pub superseded: bool,
}

/// Part of a topic's history.
#[derive(Debug, Clone)]
pub struct History {
    /// The topic's latest position (offset 0 when nothing was published in this epoch).
    pub top: Position,
    /// The oldest offset history still holds (`top.offset + 1` when it holds none).
    pub first: u64,
    /// Events after the asked offset, oldest first, at most the asked number.
    pub events: Vec<StreamEvent>,
}

/// The latest event of every key of a topic, taken at one position.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The topic's position when the snapshot was taken: live delivery continues after it.
    pub top: Position,
    /// The latest event of each key, in offset order.
    pub events: Vec<StreamEvent>,
}

/// Receives the events a broker delivers to this node, in offset order per topic as the broker
/// saw them (gaps are the receiver's business).
pub trait Delivery: Send + Sync + std::fmt::Debug + 'static {
    fn deliver(&self, topic: &str, event: StreamEvent);

    /// The broker knows it dropped inbound events (it fell behind its connection): every
    /// topic's position must be checked, since the lost event may be a topic's last.
    fn lost(&self) {}

    /// A control message (`crate::control`) reached this node.
    fn control(&self, _message: &str) {}
}

/// Moves events between nodes, and keeps each topic's recent history.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes an encoded event (without position headers) on `topic` to every node, this
    /// one included; the future resolves to its position when the broker confirmed it.
    ///
    /// The event takes its place in the order when `publish` is *called*, not when the future is
    /// first polled: events one caller publishes on one topic arrive everywhere in call order,
    /// even when the caller keeps several publishes in flight (a pipelining STOMP session).
    fn publish(
        &self,
        topic: &str,
        message: &MessageTemplate,
        options: PublishOptions,
    ) -> BoxFuture<'static, Result<Published, BrokerError>>;

    /// Starts delivering `topics` to this node. Returns once the broker confirmed.
    fn subscribe<'a>(&'a self, topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Stops delivering `topics` to this node.
    fn unsubscribe<'a>(&'a self, topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Up to `limit` events of `topic` after `after`, with the topic's latest position. A
    /// topic never published to gets an epoch here, so its first subscriber and its first
    /// event agree on it.
    fn history<'a>(
        &'a self,
        topic: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>>;

    /// The latest event of every key of `topic` and the position they were taken at, as one
    /// atomic read.
    fn snapshot<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Snapshot, BrokerError>>;

    /// Whether the broker is reachable and its subscriptions are live.
    fn is_ready(&self) -> bool;

    /// Sends a control message to every node, this one included, through
    /// [`Delivery::control`]. Best effort, like any pub/sub message: what must hold even when
    /// it is lost is also kept with [`Broker::revoke`].
    fn control<'a>(&'a self, message: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Keeps `revocation` of `user`'s tokens until it lapses, for every node to check on
    /// `CONNECT`, `SUBSCRIBE` and token refresh. A later revocation of the same scope (all
    /// connections, or one topic) replaces the earlier one.
    fn revoke<'a>(
        &'a self,
        user: &'a str,
        revocation: &'a Revocation,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The revocations of `user`'s tokens that have not lapsed.
    fn revocations<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, BrokerError>>;

    /// Changes whenever the broker (re)connected and may have lost this node's subscriptions;
    /// the subscription manager then resubscribes every topic. `None`: subscriptions are never
    /// lost.
    fn connection_epoch(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// A new epoch: a ULID, so epochs made later sort later (a help when reading logs) and need no
/// escaping anywhere.
pub fn new_epoch() -> Arc<str> {
    ulid::Ulid::new().to_string().into()
}

/// Events kept per topic, by the kind of topic.
pub(crate) fn retained(config: &HistoryConfig, topic: &str) -> usize {
    match protocol::Topic::parse(topic).map(|t| t.kind()) {
        Ok(TopicKind::User) => config.user_events,
        Ok(TopicKind::Team) => config.team_events,
        Ok(TopicKind::Item) => config.item_events,
        Ok(TopicKind::Global) | Err(_) => config.global_events,
    }
}

/// The single-node broker: publishing appends to the topic's in-memory history and delivers
/// straight to this node.
#[derive(Debug)]
pub struct MemoryBroker {
    delivery: Arc<dyn Delivery>,
    config: HistoryConfig,
    /// Made at start: a restarted node has lost its history, and says so with a new epoch.
    epoch: Arc<str>,
    topics: DashMap<String, Arc<Mutex<TopicStream>>>,
    /// Every retained event in publish order (topic, offset, bytes), so the oldest can be
    /// dropped first, whatever its topic, when the bytes exceed `config.memory_bytes`. A
    /// `parking_lot` mutex held for a push or a few pops, never across an `.await`.
    retained: Mutex<Retained>,
    /// User → revocations of their tokens (lapsed ones are dropped when the user's are read).
    revocations: DashMap<String, Vec<Revocation>>,
}

#[derive(Debug, Default)]
struct Retained {
    order: VecDeque<(Arc<str>, u64, usize)>,
    bytes: usize,
}

/// One topic: its top offset, its recent events, and recent idempotency keys.
#[derive(Debug, Default)]
struct TopicStream {
    top: u64,
    events: VecDeque<Kept>,
    /// Idempotency key → the first publish's outcome, and when it was made.
    idempotent: HashMap<String, (Published, Instant)>,
    /// Key → the newest version published, and when.
    versions: HashMap<String, (u64, Instant)>,
    /// Key → its latest event and when it came; `latest_order` indexes them by offset, so the
    /// least recently updated (the lowest offset) is found first.
    latest: HashMap<String, (StreamEvent, Instant)>,
    latest_order: std::collections::BTreeMap<u64, String>,
    /// When the topic was last published to or read.
    used: Option<Instant>,
}

#[derive(Debug)]
struct Kept {
    event: StreamEvent,
    at: Instant,
}

impl MemoryBroker {
    pub fn new(delivery: Arc<dyn Delivery>, config: HistoryConfig) -> MemoryBroker {
        MemoryBroker {
            delivery,
            config,
            epoch: new_epoch(),
            topics: DashMap::new(),
            retained: Mutex::new(Retained::default()),
            revocations: DashMap::new(),
        }
    }

    fn topic(&self, topic: &str) -> Arc<Mutex<TopicStream>> {
        if let Some(stream) = self.topics.get(topic) {
            return stream.clone();
        }
        self.topics.entry(topic.to_owned()).or_default().clone()
    }

    /// Drops events past the topic's count and age, and idempotency keys past the age.
    fn trim(&self, topic: &str, stream: &mut TopicStream, now: Instant) {
        let keep = retained(&self.config, topic);
        while stream.events.len() > keep
            || stream
                .events
                .front()
                .is_some_and(|k| now.duration_since(k.at) > self.config.max_age)
        {
            stream.events.pop_front();
        }
        let age = self.config.max_age;
        stream
            .idempotent
            .retain(|_, (_, at)| now.duration_since(*at) <= age);
        // Versions matter only while a late event can still arrive: long after its key's
        // last change, none will.
        if stream.versions.len() > MAX_VERSIONS {
            let ttl = self.config.meta_ttl;
            stream
                .versions
                .retain(|_, (_, at)| now.duration_since(*at) <= ttl.min(age));
        }
    }

    /// Makes `event` the latest of `key`, within `max_keys` (the least recently updated key
    /// goes first).
    fn keep_latest(&self, stream: &mut TopicStream, key: &str, event: &StreamEvent, now: Instant) {
        if let Some((old, _)) = stream.latest.insert(key.to_owned(), (event.clone(), now)) {
            stream.latest_order.remove(&old.offset);
        }
        stream.latest_order.insert(event.offset, key.to_owned());
        while stream.latest.len() > self.config.max_keys {
            let Some((_, oldest)) = stream.latest_order.pop_first() else {
                break;
            };
            stream.latest.remove(&oldest);
        }
    }

    /// Forgets keys not updated for `key_idle`. Updates come in offset order, so the idle
    /// ones are the first by offset.
    fn forget_idle_keys(&self, stream: &mut TopicStream, now: Instant) {
        while let Some((_, key)) = stream.latest_order.first_key_value() {
            let idle = stream
                .latest
                .get(key)
                .is_none_or(|(_, at)| now.duration_since(*at) > self.config.key_idle);
            if !idle {
                break;
            }
            if let Some((_, key)) = stream.latest_order.pop_first() {
                stream.latest.remove(&key);
            }
        }
    }

    /// Keeps the bytes of all topics' history under `memory_bytes`, dropping the oldest events
    /// first. Entries of events that a topic already trimmed count until they reach the front.
    fn bound_memory(&self, topic: &Arc<str>, offset: u64, bytes: usize) {
        let mut evict = Vec::new();
        {
            let mut retained = self.retained.lock();
            retained.order.push_back((topic.clone(), offset, bytes));
            retained.bytes += bytes;
            while retained.bytes > self.config.memory_bytes {
                let Some((t, o, b)) = retained.order.pop_front() else {
                    break;
                };
                retained.bytes -= b;
                evict.push((t, o));
            }
        }
        for (t, o) in evict {
            if let Some(stream) = self.topics.get(&*t) {
                let mut stream = stream.lock();
                while stream.events.front().is_some_and(|k| k.event.offset <= o) {
                    stream.events.pop_front();
                }
            }
        }
    }

    /// Forgets topics idle for longer than `meta_ttl` (their offsets go with them; a later
    /// publish starts the topic again at 1 in this epoch, which a subscriber resuming an old
    /// offset sees as a position beyond the top or a gap: not recovered).
    fn forget_idle(&self, now: Instant) {
        let ttl = self.config.meta_ttl;
        self.topics.retain(|_, stream| {
            stream
                .lock()
                .used
                .is_none_or(|used| now.duration_since(used) <= ttl)
        });
    }
}

impl Broker for MemoryBroker {
    fn publish(
        &self,
        topic: &str,
        message: &MessageTemplate,
        options: PublishOptions,
    ) -> BoxFuture<'static, Result<Published, BrokerError>> {
        let now = Instant::now();
        let handle = self.topic(topic);
        let mut stream = handle.lock();
        stream.used = Some(now);
        if let Some(key) = &options.idempotency_key
            && let Some((first, at)) = stream.idempotent.get(key)
            && now.duration_since(*at) <= self.config.max_age
        {
            let mut first = first.clone();
            first.duplicate = true;
            return Box::pin(std::future::ready(Ok(first)));
        }
        if let (Some(key), Some(version)) = (&options.key, options.version) {
            if stream.versions.get(key).is_some_and(|(v, _)| *v >= version) {
                let superseded = Published {
                    position: Position {
                        offset: stream.top,
                        epoch: self.epoch.clone(),
                    },
                    id: message_id(message).into(),
                    duplicate: false,
                    superseded: true,
                };
                return Box::pin(std::future::ready(Ok(superseded)));
            }
            stream.versions.insert(key.clone(), (version, now));
        }
        stream.top += 1;
        let offset = stream.top;
        let event = StreamEvent {
            offset,
            epoch: self.epoch.clone(),
            message: stream::positioned(message, offset, &self.epoch),
        };
        let published = Published {
            position: event.position(),
            id: message_id(message).into(),
            duplicate: false,
            superseded: false,
        };
        if let Some(key) = options.idempotency_key {
            stream.idempotent.insert(key, (published.clone(), now));
        }
        // Delivered under the topic's lock: events of one topic reach the node in offset order.
        self.delivery.deliver(topic, event.clone());
        if let Some(key) = &options.key {
            self.keep_latest(&mut stream, key, &event, now);
        }
        let bytes = event.message.tail().len();
        if self.config.enabled {
            stream.events.push_back(Kept { event, at: now });
        }
        self.trim(topic, &mut stream, now);
        drop(stream);
        if self.config.enabled {
            self.bound_memory(&Arc::from(topic), offset, bytes);
        }
        // Cheap enough to do now and then on the publishing path: one in a thousand offsets.
        if offset.is_multiple_of(1000) {
            self.forget_idle(now);
        }
        Box::pin(std::future::ready(Ok(published)))
    }

    fn subscribe<'a>(&'a self, _topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe<'a>(&'a self, _topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn history<'a>(
        &'a self,
        topic: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        let now = Instant::now();
        let handle = self.topic(topic);
        let mut stream = handle.lock();
        stream.used = Some(now);
        self.trim(topic, &mut stream, now);
        let first = stream
            .events
            .front()
            .map_or(stream.top + 1, |k| k.event.offset);
        let events = stream
            .events
            .iter()
            .filter(|k| k.event.offset > after)
            .take(limit)
            .map(|k| k.event.clone())
            .collect();
        let history = History {
            top: Position {
                offset: stream.top,
                epoch: self.epoch.clone(),
            },
            first,
            events,
        };
        Box::pin(std::future::ready(Ok(history)))
    }

    fn snapshot<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Snapshot, BrokerError>> {
        let now = Instant::now();
        let handle = self.topic(topic);
        let mut stream = handle.lock();
        stream.used = Some(now);
        self.forget_idle_keys(&mut stream, now);
        let events = stream
            .latest_order
            .values()
            .filter_map(|key| stream.latest.get(key).map(|(e, _)| e.clone()))
            .collect();
        let snapshot = Snapshot {
            top: Position {
                offset: stream.top,
                epoch: self.epoch.clone(),
            },
            events,
        };
        Box::pin(std::future::ready(Ok(snapshot)))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn control<'a>(&'a self, message: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.delivery.control(message);
        Box::pin(std::future::ready(Ok(())))
    }

    fn revoke<'a>(
        &'a self,
        user: &'a str,
        revocation: &'a Revocation,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        // Calls are rare: each sweeps every lapsed revocation, so users who never come back
        // do not stay.
        let now = crate::control::unix_now();
        self.revocations.retain(|_, kept| {
            kept.retain(|r| r.until > now);
            !kept.is_empty()
        });
        let mut kept = self.revocations.entry(user.to_owned()).or_default();
        kept.retain(|r| r.topic != revocation.topic);
        kept.push(revocation.clone());
        Box::pin(std::future::ready(Ok(())))
    }

    fn revocations<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, BrokerError>> {
        let now = crate::control::unix_now();
        let mut found = Vec::new();
        self.revocations.remove_if_mut(user, |_, kept| {
            kept.retain(|r| r.until > now);
            found.clone_from(kept);
            kept.is_empty()
        });
        Box::pin(std::future::ready(Ok(found)))
    }
}

/// The `message-id` of a tail (the event id).
pub(crate) fn message_id(message: &MessageTemplate) -> &str {
    message
        .tail()
        .split('\n')
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("message-id:"))
        .unwrap_or("")
}

/// Versions remembered per topic before old ones are pruned.
const MAX_VERSIONS: usize = 10_000;

/// How long a history read may wait for the broker before the read fails.
pub(crate) const HISTORY_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<(String, u64)>>);

    impl Delivery for Recorder {
        fn deliver(&self, topic: &str, event: StreamEvent) {
            self.0.lock().push((topic.to_owned(), event.offset));
        }
    }

    fn message(id: &str) -> MessageTemplate {
        MessageTemplate::new("/team/t1", id, "job.progress", "{}")
    }

    fn publish(broker: &MemoryBroker, topic: &str, id: &str, key: Option<&str>) -> Published {
        let options = PublishOptions {
            idempotency_key: key.map(str::to_owned),
            ..PublishOptions::default()
        };
        futures_util::FutureExt::now_or_never(broker.publish(topic, &message(id), options))
            .unwrap()
            .unwrap()
    }

    fn history(broker: &MemoryBroker, topic: &str, after: u64, limit: usize) -> History {
        futures_util::FutureExt::now_or_never(broker.history(topic, after, limit))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn offsets_are_contiguous_per_topic_and_delivered_in_order() {
        let recorder = Arc::new(Recorder::default());
        let broker = MemoryBroker::new(recorder.clone(), HistoryConfig::default());
        for i in 0..3 {
            let p = publish(&broker, "/team/t1", &format!("a{i}"), None);
            assert_eq!(p.position.offset, i + 1);
            assert_eq!(&*p.id, format!("a{i}"));
        }
        assert_eq!(publish(&broker, "/team/t2", "b", None).position.offset, 1);
        assert_eq!(
            *recorder.0.lock(),
            vec![
                ("/team/t1".to_owned(), 1),
                ("/team/t1".to_owned(), 2),
                ("/team/t1".to_owned(), 3),
                ("/team/t2".to_owned(), 1)
            ]
        );
        let h = history(&broker, "/team/t1", 1, 10);
        assert_eq!((h.top.offset, h.first), (3, 1));
        assert_eq!(
            h.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(
            stream::position_of(h.events[0].message.tail()),
            Some((2, &*broker.epoch))
        );
        // A topic nobody published to has the same epoch and offset 0.
        let quiet = history(&broker, "/user/nobody", 0, 10);
        assert_eq!(
            (quiet.top.offset, quiet.first, quiet.events.len()),
            (0, 1, 0)
        );
        assert_eq!(quiet.top.epoch, broker.epoch);
    }

    #[test]
    fn history_is_bounded_by_count_and_bytes() {
        let config = HistoryConfig {
            user_events: 2,
            ..HistoryConfig::default()
        };
        let broker = MemoryBroker::new(Arc::new(Recorder::default()), config);
        for i in 0..5 {
            publish(&broker, "/user/ana", &format!("u{i}"), None);
        }
        let h = history(&broker, "/user/ana", 0, 10);
        assert_eq!((h.top.offset, h.first, h.events.len()), (5, 4, 2));

        let one_event = message("x").tail().len() + 64;
        let config = HistoryConfig {
            memory_bytes: one_event * 3,
            ..HistoryConfig::default()
        };
        let broker = MemoryBroker::new(Arc::new(Recorder::default()), config);
        for i in 0..4 {
            publish(&broker, "/team/a", &format!("a{i}"), None);
            publish(&broker, "/team/b", &format!("b{i}"), None);
        }
        let kept = history(&broker, "/team/a", 0, 10).events.len()
            + history(&broker, "/team/b", 0, 10).events.len();
        assert!(kept <= 3, "{kept} events kept over the byte bound");
        // The newest survive.
        assert_eq!(
            history(&broker, "/team/b", 0, 10)
                .events
                .last()
                .unwrap()
                .offset,
            4
        );
    }

    #[test]
    fn an_older_version_of_a_key_is_superseded() {
        let recorder = Arc::new(Recorder::default());
        let broker = MemoryBroker::new(recorder.clone(), HistoryConfig::default());
        let versioned = |id: &str, key: &str, version: u64| {
            let options = PublishOptions {
                key: Some(key.to_owned()),
                version: Some(version),
                ..PublishOptions::default()
            };
            futures_util::FutureExt::now_or_never(broker.publish("/team/t1", &message(id), options))
                .unwrap()
                .unwrap()
        };
        assert!(!versioned("a", "lock:1", 5).superseded);
        // The release of token 4 arrives after the grant of token 5: not published.
        assert!(versioned("b", "lock:1", 4).superseded);
        assert!(versioned("c", "lock:1", 5).superseded);
        assert!(!versioned("d", "lock:2", 1).superseded);
        assert!(!versioned("e", "lock:1", 6).superseded);
        assert_eq!(recorder.0.lock().len(), 3);
    }

    #[test]
    fn a_snapshot_holds_the_latest_event_of_each_key_within_bounds() {
        let config = HistoryConfig {
            max_keys: 2,
            ..HistoryConfig::default()
        };
        let broker = MemoryBroker::new(Arc::new(Recorder::default()), config);
        let keyed = |id: &str, key: Option<&str>| {
            let options = PublishOptions {
                key: key.map(str::to_owned),
                ..PublishOptions::default()
            };
            futures_util::FutureExt::now_or_never(broker.publish("/team/t1", &message(id), options))
                .unwrap()
                .unwrap()
        };
        keyed("a1", Some("job:a"));
        keyed("b1", Some("job:b"));
        keyed("x", None);
        keyed("a2", Some("job:a"));
        let snapshot = futures_util::FutureExt::now_or_never(broker.snapshot("/team/t1"))
            .unwrap()
            .unwrap();
        assert_eq!(snapshot.top.offset, 4);
        // In offset order: b1 (2), a2 (4); a1 was replaced, x has no key.
        assert_eq!(
            snapshot.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [2, 4]
        );
        // A third key evicts the least recently updated (job:b).
        keyed("c1", Some("job:c"));
        let snapshot = futures_util::FutureExt::now_or_never(broker.snapshot("/team/t1"))
            .unwrap()
            .unwrap();
        assert_eq!(
            snapshot.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [4, 5]
        );
    }

    #[test]
    fn an_idempotent_retry_publishes_nothing() {
        let recorder = Arc::new(Recorder::default());
        let broker = MemoryBroker::new(recorder.clone(), HistoryConfig::default());
        let first = publish(&broker, "/team/t1", "first", Some("k1"));
        let again = publish(&broker, "/team/t1", "second", Some("k1"));
        assert_eq!(
            (again.position.clone(), again.id.clone()),
            (first.position.clone(), first.id.clone())
        );
        assert!(again.duplicate && !first.duplicate);
        assert_eq!(recorder.0.lock().len(), 1);
        assert_eq!(
            publish(&broker, "/team/t1", "third", Some("k2"))
                .position
                .offset,
            2
        );
    }
}
