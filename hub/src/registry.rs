//! The node-local subscription registry: which connections hold which topics.
//!
//! Sharded by topic (a `DashMap`), so fan-out on one topic never waits for work on another.
//! The registry knows nothing about brokers or Redis: the broker hands it events with
//! [`Registry::deliver`], and the subscription manager asks it which topics have subscribers.

use crate::send_queue::{Pushed, SendQueue};
use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use protocol::MessageTemplate;
use std::sync::Arc;

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
pub struct Delivery {
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
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            topics: DashMap::new(),
            deliveries: metrics::counter!(crate::metrics::DELIVERIES),
            dropped: metrics::counter!(crate::metrics::DELIVERIES_DROPPED),
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

    /// Queues `message` for every local subscriber of `topic`. Never blocks: a subscriber whose
    /// queue is full is marked slow and will be disconnected; the others are unaffected.
    pub fn deliver(&self, topic: &str, message: &MessageTemplate) -> Delivery {
        let mut delivery = Delivery::default();
        let Some(entry) = self.topics.get(topic) else {
            return delivery;
        };
        let mut cache: Vec<(&Arc<str>, bool, Utf8Bytes)> = Vec::new();
        // Asked only when a STOMP 1.0 subscriber shows up.
        let mut has_escapes = None;
        for sub in &entry.subscribers {
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
            match sub.queue.push(frame) {
                Pushed::Queued => delivery.queued += 1,
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
        };
        (sub, queue)
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
        assert_eq!(r.deliver("/team/t", &m), Delivery { queued: 3, slow: 0 });
        assert_eq!(r.deliver("/team/t", &m), Delivery { queued: 2, slow: 1 });
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
        assert_eq!(r.deliver("/team/none", &m), Delivery::default());
    }
}
