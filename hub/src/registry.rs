//! The node-local subscription registry: which connections hold which topics.
//!
//! Sharded by topic (a `DashMap`), so fan-out on one topic never waits for work on another.
//! The registry knows nothing about brokers or Redis: the node's fan-out hands it events in
//! offset order ([`Registry::deliver`]), and the subscription manager asks it which topics have
//! subscribers.
//!
//! A subscription that resumes from a position starts in recovery: until its session has read
//! the history it missed, its live events wait in a buffer of its own (`Recovery`) instead of
//! its connection's queue, so the session can merge the two by offset and send them in order.

use crate::send_queue::{Pushed, SendQueue};
use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::{MessageTemplate, Position};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A connection id, unique within this node.
pub(crate) type ConnId = u64;

/// One subscription of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) conn: ConnId,
    pub(crate) sub_id: Arc<str>,
    /// `MESSAGE\nsubscription:{id}\n`, encoded once when the subscription was made.
    pub(crate) prefix: Arc<str>,
    /// A STOMP 1.0 session: headers go out without escape sequences.
    pub(crate) unescaped: bool,
    pub(crate) queue: SendQueue,
    /// Set while the subscription recovers from a position; its live events wait there.
    pub(crate) recovery: Option<Arc<Recovery>>,
    /// Whether it gets the topic's `presence.*` events (`x-presence:false` says no).
    pub(crate) presence: bool,
}

/// Whether an event is one of Lockstep's presence events, which `x-presence:false`
/// subscriptions do not get.
pub(crate) fn is_presence(message: &MessageTemplate) -> bool {
    message
        .event_type()
        .is_some_and(|t| t.starts_with("presence."))
}

/// A live event (or reset) held for a recovering subscription, already framed for it.
#[derive(Debug, Clone)]
pub(crate) enum Held {
    Event {
        offset: u64,
        epoch: Arc<str>,
        frame: Utf8Bytes,
    },
    /// The node could not deliver part of the stream; what follows continues after `position`.
    Reset {
        position: Position,
        frame: Utf8Bytes,
    },
}

/// The live events of a recovering subscription, bounded by its connection's queue capacity.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// Whether fan-out must hold this subscription's events: checked without the lock on
    /// every delivery, so live subscriptions pay one atomic load.
    active: AtomicBool,
    /// `None` once the session took them and the subscription went live. A `parking_lot`
    /// mutex: held to push one frame or to take them all.
    held: Mutex<Option<Vec<Held>>>,
    capacity: usize,
    /// Once live: events at or below this offset were already sent by the resume (history can
    /// run ahead of this node's pub/sub delivery) and are dropped.
    sent_through: AtomicU64,
    /// The epoch `sent_through` counts in: an event of another epoch (Redis flushed since)
    /// was never sent, whatever its offset. Set once, when the subscription goes live.
    sent_epoch: std::sync::OnceLock<Arc<str>>,
}

impl Recovery {
    pub(crate) fn new(capacity: usize) -> Recovery {
        Recovery {
            active: AtomicBool::new(true),
            held: Mutex::new(Some(Vec::new())),
            capacity,
            sent_through: AtomicU64::new(0),
            sent_epoch: std::sync::OnceLock::new(),
        }
    }

    /// Holds `frame` if still recovering; gives it back otherwise (the subscription is live).
    fn hold(&self, held: Held) -> Result<bool, Held> {
        if !self.active.load(Ordering::Acquire) {
            return Err(held);
        }
        let mut guard = self.held.lock();
        match guard.as_mut() {
            Some(frames) if frames.len() < self.capacity => {
                frames.push(held);
                Ok(true)
            }
            // Too far behind already: the connection is a slow consumer.
            Some(_) => Ok(false),
            None => Err(held),
        }
    }

    /// Takes what was held and turns the subscription live: from now on fan-out queues its
    /// events, except those at or below the offset `sent_through` computes from the held
    /// events (what the resume sends itself). Everything delivered before this call is in the
    /// result, everything after it goes to the queue, so nothing is lost or doubled between
    /// the two.
    pub(crate) fn go_live(
        &self,
        epoch: &Arc<str>,
        sent_through: impl FnOnce(&[Held]) -> u64,
    ) -> Vec<Held> {
        let mut guard = self.held.lock();
        let held = guard.take().unwrap_or_default();
        let _ = self.sent_epoch.set(epoch.clone());
        self.sent_through
            .store(sent_through(&held), Ordering::Release);
        self.active.store(false, Ordering::Release);
        held
    }

    /// Whether a live event at `offset` of `epoch` was already sent by the resume.
    fn already_sent(&self, offset: u64, epoch: &str) -> bool {
        self.sent_epoch.get().is_some_and(|e| **e == *epoch)
            && offset <= self.sent_through.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct TopicEntry {
    subscribers: Vec<Subscriber>,
    /// Whether the cluster broker confirmed this node's subscription to the topic. `SUBSCRIBE`
    /// receipts wait for it (DESIGN §2).
    confirmed: bool,
}

/// What one [`Registry::deliver`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Frames queued for a connection.
    pub queued: usize,
    /// Subscribers whose queue was full; each is being closed as a slow consumer.
    pub slow: usize,
}

/// Topic → local subscribers.
#[derive(Debug)]
pub struct Registry {
    topics: DashMap<String, TopicEntry>,
    /// Deliveries queued, and deliveries refused by a full queue (the subscriber is then
    /// closed as slow). Resolved once: fan-out counts every event.
    deliveries: metrics::Counter,
    dropped: metrics::Counter,
    /// Keyed events that replaced their key's queued event.
    conflated: metrics::Counter,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            topics: DashMap::new(),
            deliveries: metrics::counter!(crate::metrics::DELIVERIES),
            dropped: metrics::counter!(crate::metrics::DELIVERIES_DROPPED),
            conflated: metrics::counter!(crate::metrics::CONFLATED),
        }
    }
}

/// Most distinct subscription ids one fan-out remembers frames for. Clients mostly number
/// subscriptions from zero (`sub-0`), so subscribers of one topic usually share a handful of ids
/// and therefore the very same frame bytes.
const FRAME_CACHE: usize = 8;

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a subscriber. Returns `true` when this created the topic on this node (the broker
    /// must now be told).
    pub(crate) fn add(&self, topic: &str, subscriber: Subscriber) -> bool {
        let mut created = false;
        self.topics
            .entry(topic.to_owned())
            .or_insert_with(|| {
                created = true;
                TopicEntry::default()
            })
            .subscribers
            .push(subscriber);
        created
    }

    /// Removes a connection's subscription. Returns `true` when the topic has no subscriber
    /// left on this node (the broker must now be told).
    pub(crate) fn remove(&self, topic: &str, conn: ConnId, sub_id: &str) -> bool {
        let emptied = match self.topics.get_mut(topic) {
            Some(mut entry) => {
                entry
                    .subscribers
                    .retain(|s| !(s.conn == conn && &*s.sub_id == sub_id));
                entry.subscribers.is_empty()
            }
            None => return false,
        };
        if emptied {
            // Re-check under the shard's write lock: a subscriber may have arrived meanwhile.
            self.topics
                .remove_if(topic, |_, e| e.subscribers.is_empty())
                .is_some()
        } else {
            false
        }
    }

    /// Whether `topic` has a subscriber on this node.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|e| !e.subscribers.is_empty())
    }

    /// Whether the broker subscription for `topic` is confirmed.
    pub(crate) fn is_confirmed(&self, topic: &str) -> bool {
        self.topics.get(topic).is_some_and(|e| e.confirmed)
    }

    /// Marks `topic` as confirmed by the broker, if it still has subscribers.
    pub(crate) fn confirm(&self, topic: &str) {
        if let Some(mut entry) = self.topics.get_mut(topic) {
            entry.confirmed = true;
        }
    }

    /// Marks every topic unconfirmed, after the broker lost its subscriptions.
    pub(crate) fn unconfirm_all(&self) {
        for mut entry in self.topics.iter_mut() {
            entry.confirmed = false;
        }
    }

    /// Every topic with a subscriber on this node.
    pub fn topics(&self) -> Vec<String> {
        self.topics.iter().map(|e| e.key().clone()).collect()
    }

    /// Number of topics with subscribers on this node.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Number of subscriptions on this node, over every topic.
    pub fn subscription_count(&self) -> usize {
        self.topics.iter().map(|e| e.subscribers.len()).sum()
    }

    /// Queues an event for every local subscriber of `topic` (or holds it for a recovering
    /// one). Never blocks: a subscriber whose queue is full is marked slow and will be
    /// disconnected; the others are unaffected.
    pub fn deliver(
        &self,
        topic: &str,
        position: &Position,
        message: &MessageTemplate,
    ) -> Delivered {
        self.fan_out(topic, message, |frame| Held::Event {
            offset: position.offset,
            epoch: position.epoch.clone(),
            frame,
        })
    }

    /// Queues a `lockstep.reset` for every local subscriber of `topic`.
    pub(crate) fn deliver_reset(
        &self,
        topic: &str,
        position: &Position,
        message: &MessageTemplate,
    ) -> Delivered {
        self.fan_out(topic, message, |frame| Held::Reset {
            position: position.clone(),
            frame,
        })
    }

    fn fan_out(
        &self,
        topic: &str,
        message: &MessageTemplate,
        held: impl Fn(Utf8Bytes) -> Held,
    ) -> Delivered {
        let mut delivery = Delivered::default();
        let Some(entry) = self.topics.get(topic) else {
            return delivery;
        };
        let mut cache: Vec<(&Arc<str>, bool, Utf8Bytes)> = Vec::new();
        // Asked only when a STOMP 1.0 subscriber shows up.
        let mut has_escapes = None;
        // A keyed event may replace its key's queued event in a full-ish queue.
        let key: Option<Arc<str>> = message.key().map(Into::into);
        // Asked only when a subscription that opted out of presence shows up.
        let mut presence_event = None;
        for sub in &entry.subscribers {
            if !sub.presence && *presence_event.get_or_insert_with(|| is_presence(message)) {
                continue;
            }
            let unescaped =
                sub.unescaped && *has_escapes.get_or_insert_with(|| message.has_escapes());
            let cached = cache
                .iter()
                .find(|(p, u, _)| ***p == *sub.prefix && *u == unescaped);
            let frame = match cached {
                Some((_, _, frame)) => frame.clone(),
                None => {
                    let frame = Utf8Bytes::from(if unescaped {
                        message.frame_for_unescaped(&sub.prefix)
                    } else {
                        message.frame_for(&sub.prefix)
                    });
                    if cache.len() < FRAME_CACHE {
                        cache.push((&sub.prefix, unescaped, frame.clone()));
                    }
                    frame
                }
            };
            let frame = match &sub.recovery {
                Some(recovery) => match recovery.hold(held(frame)) {
                    Ok(true) => {
                        delivery.queued += 1;
                        continue;
                    }
                    Ok(false) => {
                        sub.queue.mark_slow();
                        delivery.slow += 1;
                        continue;
                    }
                    Err(Held::Event { offset, epoch, .. })
                        if recovery.already_sent(offset, &epoch) =>
                    {
                        continue;
                    }
                    Err(Held::Event { frame, .. } | Held::Reset { frame, .. }) => frame,
                },
                None => frame,
            };
            let pushed = match &key {
                Some(key) => sub.queue.push_keyed(frame, &sub.sub_id, key, |n| {
                    let conflated = format!("{}:{n}\n", protocol::server::CONFLATED_HEADER);
                    Utf8Bytes::from(if unescaped {
                        message.frame_with_unescaped(&sub.prefix, &conflated)
                    } else {
                        message.frame_with(&sub.prefix, &conflated)
                    })
                }),
                _ => sub.queue.push(frame),
            };
            match pushed {
                Pushed::Queued => delivery.queued += 1,
                Pushed::Conflated => {
                    delivery.queued += 1;
                    self.conflated.increment(1);
                }
                Pushed::Full => delivery.slow += 1,
                // The session is ending and will remove its subscriptions.
                Pushed::Closed => {}
            }
        }
        self.deliveries.increment(delivery.queued as u64);
        if delivery.slow > 0 {
            self.dropped.increment(delivery.slow as u64);
        }
        delivery
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(conn: ConnId, id: &str, capacity: usize) -> (Subscriber, SendQueue) {
        let queue = SendQueue::new(capacity, 1 << 20);
        let sub = Subscriber {
            conn,
            sub_id: id.into(),
            prefix: protocol::server::subscription_prefix(id).into(),
            unescaped: false,
            queue: queue.clone(),
            recovery: None,
            presence: true,
        };
        (sub, queue)
    }

    #[test]
    fn a_recovering_subscription_holds_its_events_until_it_goes_live() {
        let r = Registry::new();
        let (mut a, qa) = subscriber(1, "s", 8);
        let recovery = Arc::new(Recovery::new(2));
        a.recovery = Some(recovery.clone());
        r.add("/team/t", a);
        let m = MessageTemplate::new("/team/t", "1", "x.y", "{}");
        r.deliver("/team/t", &Position::new(5, "E"), &m);
        r.deliver("/team/t", &Position::new(6, "E"), &m);
        assert!(qa.pop().is_none(), "held, not queued");
        let held = recovery.go_live(&"E".into(), |_| 6);
        assert_eq!(
            held.iter()
                .map(|h| match h {
                    Held::Event { offset, .. } => *offset,
                    Held::Reset { .. } => 0,
                })
                .collect::<Vec<_>>(),
            [5, 6]
        );
        // Live: what the resume sent already (history ran ahead) is dropped, the rest queued.
        r.deliver("/team/t", &Position::new(6, "E"), &m);
        assert!(qa.pop().is_none(), "sent by the resume already");
        r.deliver("/team/t", &Position::new(7, "E"), &m);
        assert!(qa.pop().is_some(), "live: queued");
        // Holding more than the capacity marks the connection slow.
        let (mut b, qb) = subscriber(2, "s", 8);
        b.recovery = Some(Arc::new(Recovery::new(1)));
        r.add("/team/t", b);
        r.deliver("/team/t", &Position::new(8, "E"), &m);
        assert!(!qb.is_slow());
        r.deliver("/team/t", &Position::new(9, "E"), &m);
        assert!(qb.is_slow());
    }

    #[test]
    fn subscriptions_without_presence_skip_presence_events() {
        let r = Registry::new();
        let (a, qa) = subscriber(1, "s", 4);
        let (mut b, qb) = subscriber(2, "s", 4);
        b.presence = false;
        r.add("/team/t", a);
        r.add("/team/t", b);
        let joined = MessageTemplate::keyed(
            "/team/t",
            "1",
            "presence.joined",
            Some("presence:ana"),
            "{}",
        );
        let job = MessageTemplate::new("/team/t", "2", "job.progress", "{}");
        r.deliver("/team/t", &Position::new(1, "E"), &joined);
        r.deliver("/team/t", &Position::new(2, "E"), &job);
        assert!(qa.pop().unwrap().as_str().contains("presence.joined"));
        assert!(qa.pop().unwrap().as_str().contains("job.progress"));
        assert!(qb.pop().unwrap().as_str().contains("job.progress"));
        assert!(qb.pop().is_none());
    }

    #[test]
    fn add_remove_reports_first_and_last() {
        let r = Registry::new();
        let (a, _ra) = subscriber(1, "s", 4);
        let (b, _rb) = subscriber(2, "s", 4);
        assert!(r.add("/global", a));
        assert!(!r.add("/global", b));
        assert!(!r.remove("/global", 1, "s"));
        assert!(!r.remove("/global", 1, "s"));
        assert!(r.remove("/global", 2, "s"));
        assert!(!r.has_subscribers("/global"));
        assert_eq!(r.topic_count(), 0);
    }

    #[test]
    fn deliver_shares_frames_and_marks_slow_consumers() {
        let r = Registry::new();
        let (a, ra) = subscriber(1, "sub-0", 4);
        let (b, rb) = subscriber(2, "sub-0", 4);
        let (c, rc) = subscriber(3, "other", 1);
        r.add("/team/t", a);
        r.add("/team/t", b);
        r.add("/team/t", c);
        let m = MessageTemplate::new("/team/t", "1", "x.y", "{}");
        assert_eq!(
            r.deliver("/team/t", &Position::new(1, "E"), &m),
            Delivered { queued: 3, slow: 0 }
        );
        assert_eq!(
            r.deliver("/team/t", &Position::new(2, "E"), &m),
            Delivered { queued: 2, slow: 1 }
        );
        assert!(rc.is_slow() && !ra.is_slow());
        let fa = ra.pop().unwrap();
        let fb = rb.pop().unwrap();
        // The same bytes, not a copy.
        assert_eq!(fa.as_str().as_ptr(), fb.as_str().as_ptr());
        assert!(fa.as_str().starts_with("MESSAGE\nsubscription:sub-0\n"));
        assert!(
            rc.pop()
                .unwrap()
                .as_str()
                .starts_with("MESSAGE\nsubscription:other\n")
        );
        assert_eq!(
            r.deliver("/team/none", &Position::new(3, "E"), &m),
            Delivered::default()
        );
    }
}
