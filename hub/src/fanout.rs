//! Between the broker and the registry: each topic is delivered to this node's subscribers in
//! offset order, without gaps and without duplicates, or with an explicit `lockstep.reset`.
//!
//! [`Fanout`] is the broker's [`Delivery`]. It remembers, per topic with local subscribers, the
//! position it delivered last. The next event normally follows it. When one does not (the
//! broker skipped offsets: a pub/sub message was lost, the node reconnected to Redis), the
//! topic's events are held while its gap is filled from history, once for the topic (not per
//! client); if history no longer holds the missing events, or the epoch changed (Redis was
//! flushed or restarted), the topic's subscribers get `lockstep.reset` with the new position
//! instead, so none is ever silently behind. Events at or below the delivered position are
//! duplicates and dropped.
//!
//! After a Redis reconnect, a quiet topic would show its gap only at its next event; the
//! subscription manager asks `Fanout::check` to compare each topic's position at once.

use crate::broker::{Broker, Delivery, HISTORY_TIMEOUT, StreamEvent};
use crate::registry::Registry;
use dashmap::DashMap;
use futures_util::StreamExt as _;
use protocol::{Position, envelope, stream};
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;
use tracing::{debug, warn};

/// Topics whose positions are checked at once after a reconnect.
const CHECK_CONCURRENCY: usize = 32;

/// The node's ordered delivery of every topic with local subscribers.
#[derive(Debug)]
pub struct Fanout {
    registry: Arc<Registry>,
    /// Per topic: what was delivered last, and events held while a gap is filled.
    cursors: DashMap<String, Cursor>,
    /// The broker, for gap filling; set once it exists (it needs this fan-out first).
    broker: OnceLock<Weak<dyn Broker>>,
    /// Most events one gap fill replays; a larger gap is a reset.
    max_fill: usize,
    /// Most events held for one topic while its gap is filled; past it the fill ends in a
    /// reset (the node fell too far behind).
    max_held: usize,
    /// Itself, for the fills it spawns.
    me: Weak<Fanout>,
    /// Where control messages go (the hub); set once the hub exists.
    control: OnceLock<ControlHandler>,
}

/// Takes the control messages the broker delivers.
pub(crate) struct ControlHandler(pub(crate) Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for ControlHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlHandler")
    }
}

#[derive(Debug, Default)]
struct Cursor {
    last: Option<Position>,
    /// `Some` while a gap fill runs: the events that arrived meanwhile, in order.
    held: Option<Vec<StreamEvent>>,
    /// A held event was dropped (the hold overflowed): the fill must end in a reset.
    overflowed: bool,
}

impl Fanout {
    pub fn new(registry: Arc<Registry>, max_fill: usize, max_held: usize) -> Arc<Fanout> {
        Arc::new_cyclic(|me| Fanout {
            registry,
            cursors: DashMap::new(),
            broker: OnceLock::new(),
            max_fill,
            max_held,
            me: me.clone(),
            control: OnceLock::new(),
        })
    }

    /// Connects the hub that control messages go to.
    pub(crate) fn set_control(&self, handler: ControlHandler) {
        let _ = self.control.set(handler);
    }

    /// Connects the broker the gaps are filled from.
    pub fn set_broker(&self, broker: &Arc<dyn Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    fn broker(&self) -> Option<Arc<dyn Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// A subscription read where `topic` stands from the broker: the first live event this
    /// node sees for it is compared with that, so a new epoch (Redis flushed meanwhile) is a
    /// reset rather than offsets that silently start again below what the subscriber was told.
    pub(crate) fn observe(&self, topic: &str, position: &Position) {
        if !self.registry.has_subscribers(topic) {
            return;
        }
        let mut cursor = self.cursors.entry(topic.to_owned()).or_default();
        if cursor.last.is_none() && cursor.held.is_none() {
            cursor.last = Some(position.clone());
        }
    }

    /// The topic has no local subscriber any more: its position is forgotten, so a later
    /// subscription starts fresh instead of "filling" what nobody here missed.
    pub(crate) fn forget(&self, topic: &str) {
        self.cursors.remove(topic);
    }

    /// Compares each topic's position with what was delivered, filling what was missed (the
    /// node was disconnected from the broker and a topic may have gone on without it).
    pub(crate) async fn check(self: &Arc<Self>, topics: Vec<String>) {
        futures_util::stream::iter(topics)
            .map(|topic| {
                let fanout = self.clone();
                async move {
                    let last = {
                        let Some(mut cursor) = fanout.cursors.get_mut(&topic) else {
                            return;
                        };
                        if cursor.held.is_some() {
                            // A fill is under way; it will see what is there.
                            return;
                        }
                        let Some(last) = cursor.last.clone() else {
                            return;
                        };
                        cursor.held = Some(Vec::new());
                        last
                    };
                    fanout.fill(&topic, last).await;
                }
            })
            .buffer_unordered(CHECK_CONCURRENCY)
            .collect::<()>()
            .await;
    }

    /// Reads what followed `last` from history and delivers it, then what was held meanwhile;
    /// a reset where history cannot serve it whole (never a partial fill).
    async fn fill(&self, topic: &str, last: Position) {
        let history = match self.broker() {
            Some(broker) => tokio::time::timeout(
                HISTORY_TIMEOUT,
                broker.history(topic, last.offset, self.max_fill),
            )
            .await
            .ok()
            .and_then(Result::ok),
            None => None,
        };
        let Some(mut cursor) = self.cursors.get_mut(topic) else {
            return;
        };
        let held = cursor.held.take().unwrap_or_default();
        let overflowed = std::mem::take(&mut cursor.overflowed);
        let mut next = last.clone();
        match history {
            Some(h)
                if h.top.epoch == last.epoch
                    && h.top.offset.saturating_sub(last.offset) <= self.max_fill as u64
                    && (h.top.offset <= last.offset || h.first <= last.offset + 1) =>
            {
                for event in h.events {
                    if event.offset == next.offset + 1 {
                        self.registry
                            .deliver(topic, &event.position(), &event.message);
                        next = event.position();
                    }
                }
            }
            Some(h) => {
                debug!(topic, ?last, top = ?h.top, first = h.first, "history cannot fill the gap");
                let reason = if h.top.epoch == last.epoch {
                    "events_lost"
                } else {
                    "epoch_changed"
                };
                self.reset(topic, &h.top, reason);
                next = h.top;
            }
            None if held.is_empty() => {
                // Nothing to go on: keep the position, the next event or check tries again.
                warn!(topic, "could not read history to check a topic's position");
            }
            None => warn!(
                topic,
                "could not read history to fill a gap; resetting the topic's subscribers"
            ),
        }
        let mut broken = overflowed;
        for event in held {
            if event.epoch == next.epoch && event.offset <= next.offset {
                continue;
            }
            if broken || event.epoch != next.epoch || event.offset != next.offset + 1 {
                let reason = if event.epoch == next.epoch {
                    "events_lost"
                } else {
                    "epoch_changed"
                };
                // Continue right before this event, in its epoch.
                self.reset(
                    topic,
                    &Position::new(event.offset - 1, event.epoch.clone()),
                    reason,
                );
                broken = false;
            }
            self.registry
                .deliver(topic, &event.position(), &event.message);
            next = event.position();
        }
        cursor.last = Some(next);
    }

    fn reset(&self, topic: &str, position: &Position, reason: &str) {
        metrics::counter!(crate::metrics::RESETS).increment(1);
        let id = ulid::Ulid::new().to_string();
        let ts = envelope::format_ts(SystemTime::now());
        let message = stream::reset(topic, &id, &ts, position, reason);
        self.registry.deliver_reset(topic, position, &message);
    }
}

impl Delivery for Fanout {
    fn control(&self, message: &str) {
        if let Some(handler) = self.control.get() {
            (handler.0)(message);
        }
    }

    fn deliver(&self, topic: &str, event: StreamEvent) {
        // A topic nobody here holds (an event in flight past an unsubscribe) is not tracked:
        // cursors exist only for topics with local subscribers.
        if !self.registry.has_subscribers(topic) {
            return;
        }
        let mut cursor = self.cursors.entry(topic.to_owned()).or_default();
        if let Some(held) = cursor.held.as_mut() {
            if held.len() < self.max_held {
                held.push(event);
            } else {
                cursor.overflowed = true;
            }
            return;
        }
        let Some(last) = cursor.last.clone() else {
            // The first event this node sees for the topic: nothing to compare with.
            self.registry
                .deliver(topic, &event.position(), &event.message);
            cursor.last = Some(event.position());
            return;
        };
        if event.epoch != last.epoch {
            // The topic's history and counter were lost (Redis flushed or restarted): say so,
            // then go on in the new epoch.
            self.reset(
                topic,
                &Position::new(event.offset - 1, event.epoch.clone()),
                "epoch_changed",
            );
        } else if event.offset <= last.offset {
            return;
        } else if event.offset > last.offset + 1 {
            metrics::counter!(crate::metrics::GAPS).increment(1);
            debug!(
                topic,
                from = last.offset,
                to = event.offset,
                "gap in a topic's stream; filling it from history"
            );
            cursor.held = Some(vec![event]);
            drop(cursor);
            // Spawned: the broker's delivery loop must not wait for history.
            if let Some(fanout) = self.me.upgrade() {
                let topic = topic.to_owned();
                tokio::spawn(async move { fanout.fill(&topic, last).await });
            }
            return;
        }
        self.registry
            .deliver(topic, &event.position(), &event.message);
        cursor.last = Some(event.position());
    }

    fn lost(&self) {
        let topics: Vec<String> = self.cursors.iter().map(|c| c.key().clone()).collect();
        if let Some(fanout) = self.me.upgrade() {
            tokio::spawn(async move { fanout.check(topics).await });
        }
    }
}
