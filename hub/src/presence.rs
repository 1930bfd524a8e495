//! Presence (DESIGN §14): who subscribes to a team or item topic, on any node, and the
//! `presence.joined` / `presence.left` events that tell a topic's subscribers when it changes.
//!
//! Each node knows its own half from its connection table. [`PresenceStore`] keeps the
//! cluster's: one entry per (user, node) with an expiry the node refreshes, and per user the
//! number of nodes it is present on, so that joining and leaving are decided at the user level
//! and atomically per topic (a user's first entry anywhere joins, the last one gone leaves).
//! A node that dies stops refreshing; its entries expire and the next update of the topic by
//! any node sweeps them, answering exactly one leave per user left with no entry at all.
//!
//! `Tracker` is the node's side: sessions tell it which (topic, user) pairs changed here;
//! it batches those for a short window, waits out the leave delay before it removes a user's
//! entry (a reload or a second tab re-joins within it, so nobody sees a thing), refreshes all
//! of the node's entries well before they expire, and publishes what the store answers as keyed
//! events (`presence:{user}`) through the hub, versioned by the store's decision order so a
//! late publish can never overtake a newer change of the same user.
//!
//! [`MemoryPresence`] is the single-node store; the Redis one lives beside the Redis broker.

use crate::BrokerError;
use crate::config::PresenceConfig;
use crate::connections::Member;
use dashmap::DashMap;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, warn};

/// The event a user's first subscription to a topic anywhere in the cluster publishes.
pub const JOINED: &str = "presence.joined";
/// The event a user's last subscription to a topic anywhere in the cluster publishes, after
/// the leave delay.
pub const LEFT: &str = "presence.left";

/// Most entries one store update carries; a larger refresh is split.
const CHUNK: usize = 500;
/// Store updates in flight at once during a flush.
const CONCURRENCY: usize = 32;

/// One user's presence in a topic on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub user: Arc<str>,
    /// How many of the user's connections on the node subscribe. Zero in an update keeps an
    /// existing entry alive and changes nothing else: the user's last connection here is
    /// gone, but the leave waits out the delay, and the entry must not expire first.
    pub connections: u32,
    /// Since when, in Unix milliseconds.
    pub since_ms: u64,
}

/// A change of a user's cluster-wide presence in a topic, as the store decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub user: Arc<str>,
    pub joined: bool,
    /// Grows with every decision of the topic: the published event's version.
    pub version: u64,
    /// Users present in the topic after this change: a join that makes it 1 occupied the
    /// topic, a leave that makes it 0 vacated it.
    pub present: u64,
}

impl Change {
    /// What this change did to the topic's occupancy.
    pub fn occupancy(&self) -> Option<Occupancy> {
        match (self.joined, self.present) {
            (true, 1) => Some(Occupancy::Occupied),
            (false, 0) => Some(Occupancy::Vacated),
            _ => None,
        }
    }
}

/// A topic's first user anywhere in the cluster came, or its last one left (after the leave
/// delay, so a reload is silent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occupancy {
    Occupied,
    Vacated,
}

/// Who is present in a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Users present.
    pub count: usize,
    /// Each user once (connections summed over nodes, `since` the earliest), sorted by user;
    /// `None` when more than the asked maximum are present (then `count` may still include
    /// users of a node that died and was not swept yet).
    pub members: Option<Vec<Member>>,
}

/// The cluster's presence, one topic at a time.
pub trait PresenceStore: Send + Sync + std::fmt::Debug + 'static {
    /// Applies `node`'s changes to `topic` (entries set or refreshed to expire in `ttl`, users
    /// removed) after forgetting every entry, of any node, whose expiry passed; answers the
    /// users whose presence changed, in decision order.
    fn update<'a>(
        &'a self,
        topic: &'a str,
        node: &'a str,
        upserts: &'a [Entry],
        removes: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<Change>, BrokerError>>;

    /// Who is present in `topic` (entries not expired), listed when at most `max` are.
    fn list<'a>(
        &'a self,
        topic: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, BrokerError>>;
}

/// Whether a topic has presence: team and item topics do (DESIGN §14).
pub fn has_presence(topic: &str) -> bool {
    topic.starts_with("/team/")
}

/// The version after `last` at `now_ms`: one more than the last, or the time times 4096 when
/// that is larger, so versions grow with every change of a topic and also across a store
/// that lost its state (a Redis restart, keys expired).
pub(crate) fn next_version(last: u64, now_ms: u64) -> u64 {
    last.max(now_ms * 4096) + 1
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(0)
}

/// Sums one topic's entries per user (connections added, the earliest `since`), sorted by user.
pub(crate) fn aggregate(entries: impl IntoIterator<Item = Entry>) -> Vec<Member> {
    let mut users: HashMap<Arc<str>, (u32, u64)> = HashMap::new();
    for e in entries {
        let slot = users.entry(e.user).or_insert((0, u64::MAX));
        slot.0 += e.connections;
        slot.1 = slot.1.min(e.since_ms);
    }
    let mut members: Vec<Member> = users
        .into_iter()
        .map(|(user, (connections, since))| Member {
            user,
            connections,
            since: UNIX_EPOCH + Duration::from_millis(since),
        })
        .collect();
    members.sort_by(|a, b| a.user.cmp(&b.user));
    members
}

/// The single-node store: the same decisions as the Redis script, in memory.
#[derive(Debug, Default)]
pub struct MemoryPresence {
    topics: DashMap<Arc<str>, TopicPresence>,
}

/// One stored entry: connections, since (ms), expires at (ms).
type Stored = (u32, u64, u64);

/// Topic → user → when their membership here last changed.
type Dirty = HashMap<Arc<str>, HashMap<Arc<str>, Instant>>;

/// Topic → (entries to set, users to remove): one flush's store updates.
type Updates = HashMap<Arc<str>, (Vec<Entry>, Vec<Arc<str>>)>;

#[derive(Debug, Default)]
struct TopicPresence {
    /// (user, node) → (connections, since ms, expires at ms).
    entries: HashMap<(Arc<str>, Arc<str>), Stored>,
    /// User → number of nodes it has an entry on.
    users: HashMap<Arc<str>, u32>,
    /// The last change's version.
    version: u64,
}

impl MemoryPresence {
    pub fn new() -> MemoryPresence {
        MemoryPresence::default()
    }

    fn apply(
        &self,
        topic: &str,
        node: &str,
        upserts: &[Entry],
        removes: &[Arc<str>],
        ttl: Duration,
        now: u64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut p = self.topics.entry(topic.into()).or_default();
        let p = &mut *p;
        let gone = |users: &mut HashMap<Arc<str>, u32>,
                    changes: &mut Vec<(Arc<str>, bool, usize)>,
                    user: &Arc<str>| {
            if let Some(n) = users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    users.remove(user);
                    changes.push((user.clone(), false, users.len()));
                }
            }
        };
        let expired: Vec<_> = p
            .entries
            .iter()
            .filter(|(_, (_, _, expires))| *expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            p.entries.remove(&key);
            gone(&mut p.users, &mut changes, &key.0);
        }
        let node: Arc<str> = node.into();
        let expires = now + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
        for e in upserts {
            let key = (e.user.clone(), node.clone());
            if e.connections == 0 {
                // A pending leave's keep-alive: only an existing entry lives on.
                if let Some(stored) = p.entries.get_mut(&key) {
                    stored.2 = expires;
                }
                continue;
            }
            if p.entries
                .insert(key, (e.connections, e.since_ms, expires))
                .is_none()
            {
                let n = p.users.entry(e.user.clone()).or_insert(0);
                *n += 1;
                if *n == 1 {
                    changes.push((e.user.clone(), true, p.users.len()));
                }
            }
        }
        for user in removes {
            if p.entries.remove(&(user.clone(), node.clone())).is_some() {
                gone(&mut p.users, &mut changes, user);
            }
        }
        changes
            .into_iter()
            .map(|(user, joined, present)| {
                p.version = next_version(p.version, now);
                Change {
                    user,
                    joined,
                    version: p.version,
                    present: present as u64,
                }
            })
            .collect()
    }
}

impl PresenceStore for MemoryPresence {
    fn update<'a>(
        &'a self,
        topic: &'a str,
        node: &'a str,
        upserts: &'a [Entry],
        removes: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<Change>, BrokerError>> {
        let now = unix_ms(SystemTime::now());
        let changes = self.apply(topic, node, upserts, removes, ttl, now);
        // A topic nobody is present in is forgotten (its versions start again above the
        // last, from the clock).
        self.topics.remove_if(topic, |_, p| p.entries.is_empty());
        Box::pin(std::future::ready(Ok(changes)))
    }

    fn list<'a>(
        &'a self,
        topic: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, BrokerError>> {
        let now = unix_ms(SystemTime::now());
        let listing = match self.topics.get(topic) {
            None => Listing {
                count: 0,
                members: Some(Vec::new()),
            },
            Some(p) if p.users.len() > max => Listing {
                count: p.users.len(),
                members: None,
            },
            Some(p) => {
                let members = aggregate(p.entries.iter().filter(|(_, v)| v.2 > now).map(
                    |((user, _), (connections, since_ms, _))| Entry {
                        user: user.clone(),
                        connections: *connections,
                        since_ms: *since_ms,
                    },
                ));
                Listing {
                    count: members.len(),
                    members: Some(members),
                }
            }
        };
        Box::pin(std::future::ready(Ok(listing)))
    }
}

/// What the tracker needs of the node: its half of presence, and a way to publish.
pub(crate) trait Node: Send + Sync + 'static {
    /// The user's membership of the topic on this node: connections subscribed and since when.
    fn member(&self, topic: &str, user: &str) -> Option<(u32, SystemTime)>;
    /// Every topic with presence that has members on this node, with them.
    fn members(&self) -> Vec<(Arc<str>, Vec<Member>)>;
    /// Publishes a presence change of `topic`.
    fn publish(&self, topic: &str, change: &Change) -> BoxFuture<'static, Result<(), String>>;
    /// Tells the node's observer (webhooks) of a change the store decided here.
    fn observe(&self, topic: &str, change: &Change);
}

/// The node's side of presence.
#[derive(Debug)]
pub(crate) struct Tracker {
    config: PresenceConfig,
    node_id: Arc<str>,
    store: Arc<dyn PresenceStore>,
    /// Topic → user → when their membership here last changed: what the next flush looks at.
    /// Bounded by the (topic, user) pairs of this node's connections (each connection holds at
    /// most `max_subscriptions` topics); a pair leaves it once flushed. A `parking_lot` mutex,
    /// held to insert one pair or to take them all.
    dirty: Mutex<Dirty>,
    /// Wakes the flushing task when a pair became dirty.
    wake: Notify,
}

impl Tracker {
    pub(crate) fn new(
        config: PresenceConfig,
        node_id: &str,
        store: Arc<dyn PresenceStore>,
    ) -> Tracker {
        Tracker {
            config,
            node_id: node_id.into(),
            store,
            dirty: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn PresenceStore> {
        &self.store
    }

    pub(crate) fn config(&self) -> &PresenceConfig {
        &self.config
    }

    /// The user's membership of `topic` on this node changed (a subscription began or ended).
    pub(crate) fn touch(&self, topic: &Arc<str>, user: &Arc<str>) {
        if !self.config.enabled || !has_presence(topic) {
            return;
        }
        self.dirty
            .lock()
            .entry(topic.clone())
            .or_default()
            .insert(user.clone(), Instant::now());
        self.wake.notify_one();
    }

    /// How long an entry lives without a refresh, and how often the node refreshes: three
    /// refreshes per timeout, so a dead node's entries are gone (expired, then swept by the
    /// next refresh of a live node) within the timeout.
    fn periods(&self) -> (Duration, Duration) {
        let refresh = (self.config.timeout / 3).max(Duration::from_millis(100));
        (
            self.config.timeout.saturating_sub(refresh).max(refresh),
            refresh,
        )
    }

    /// Flushes changes and refreshes entries until `shutdown`; then lets this node's entries
    /// expire after the leave delay, so users who reconnect elsewhere within it stay silent.
    pub(crate) async fn run(self: Arc<Self>, node: Arc<dyn Node>, shutdown: CancellationToken) {
        if !self.config.enabled {
            return;
        }
        let (ttl, refresh) = self.periods();
        let mut next_refresh = Instant::now() + refresh;
        loop {
            let due = self
                .next_due()
                .map_or(next_refresh, |d| d.min(next_refresh));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {
                    // Gather what else changes within the window: one update per topic.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(self.config.batch) => {}
                    }
                }
                () = tokio::time::sleep_until(due) => {}
            }
            let now = Instant::now();
            let all = now >= next_refresh;
            if all {
                next_refresh = now + refresh;
            }
            self.flush(&*node, now, all, ttl).await;
        }
        self.flush(&*node, Instant::now(), true, self.config.leave_delay)
            .await;
    }

    /// When the earliest pending leave is due.
    fn next_due(&self) -> Option<Instant> {
        let delay = self.config.leave_delay;
        self.dirty
            .lock()
            .values()
            .flat_map(|users| users.values())
            .min()
            .map(|t| *t + delay)
    }

    /// Sends the store what changed here (and, with `all`, every entry of this node), then
    /// publishes what it decided.
    async fn flush(&self, node: &dyn Node, now: Instant, all: bool, ttl: Duration) {
        let mut updates = Updates::new();
        {
            let mut dirty = self.dirty.lock();
            dirty.retain(|topic, users| {
                users.retain(|user, touched| match node.member(topic, user) {
                    Some((connections, since)) => {
                        updates.entry(topic.clone()).or_default().0.push(Entry {
                            user: user.clone(),
                            connections,
                            since_ms: unix_ms(since),
                        });
                        false
                    }
                    None if *touched + self.config.leave_delay <= now => {
                        updates
                            .entry(topic.clone())
                            .or_default()
                            .1
                            .push(user.clone());
                        false
                    }
                    // Not yet: a re-join within the delay keeps the user present. Until then a
                    // refresh keeps the entry alive, or it could expire (and be swept as a
                    // leave) before the delay is over.
                    None => {
                        if all {
                            updates.entry(topic.clone()).or_default().0.push(Entry {
                                user: user.clone(),
                                connections: 0,
                                since_ms: 0,
                            });
                        }
                        true
                    }
                });
                !users.is_empty()
            });
        }
        if all {
            for (topic, members) in node.members() {
                let (upserts, _) = updates.entry(topic).or_default();
                let flushed: std::collections::HashSet<Arc<str>> =
                    upserts.iter().map(|e| e.user.clone()).collect();
                upserts.extend(
                    members
                        .into_iter()
                        .filter(|m| !flushed.contains(&m.user))
                        .map(|m| Entry {
                            user: m.user,
                            connections: m.connections,
                            since_ms: unix_ms(m.since),
                        }),
                );
            }
        }
        if updates.is_empty() {
            return;
        }
        let mut calls = Vec::new();
        for (topic, (upserts, removes)) in updates {
            let chunks = upserts.len().div_ceil(CHUNK).max(1);
            for i in 0..chunks {
                let part = upserts[i * CHUNK..upserts.len().min((i + 1) * CHUNK)].to_vec();
                // Removals travel with the first part.
                let removes = if i == 0 { removes.clone() } else { Vec::new() };
                calls.push((topic.clone(), part, removes));
            }
        }
        metrics::counter!(crate::metrics::PRESENCE_UPDATES).increment(calls.len() as u64);
        let node_id = self.node_id.clone();
        let store = self.store.clone();
        let mut done = futures_util::stream::iter(calls)
            .map(|(topic, upserts, removes)| {
                let (store, node_id) = (store.clone(), node_id.clone());
                async move {
                    let result = store
                        .update(&topic, &node_id, &upserts, &removes, ttl)
                        .await;
                    (topic, result)
                }
            })
            .buffer_unordered(CONCURRENCY);
        let mut published = Vec::new();
        while let Some((topic, result)) = done.next().await {
            match result {
                Ok(changes) => {
                    for change in &changes {
                        metrics::counter!(crate::metrics::PRESENCE_CHANGES,
                            "change" => if change.joined { "joined" } else { "left" })
                        .increment(1);
                        node.observe(&topic, change);
                        published.push(node.publish(&topic, change));
                    }
                }
                // Nothing is retried: the next refresh sends every entry of this node again (a
                // join is made then), and an entry a failed removal left behind is no longer
                // refreshed, so it expires and the next sweep removes it (a late leave).
                Err(err) => {
                    metrics::counter!(crate::metrics::PRESENCE_FAILURES).increment(1);
                    warn!(%topic, %err, "presence update failed");
                }
            }
        }
        drop(done);
        for result in futures_util::future::join_all(published).await {
            if let Err(err) = result {
                debug!(%err, "a presence event was not published");
            }
        }
    }

    /// Spawns [`Tracker::run`] with its span.
    pub(crate) fn spawn(self: &Arc<Self>, node: Arc<dyn Node>, shutdown: CancellationToken) {
        let span = tracing::info_span!("presence");
        tokio::spawn(self.clone().run(node, shutdown).instrument(span));
    }
}

#[cfg(test)]
mod tests;
