//! Publishing lock events after commit, and the background work every node does: announcing
//! expiries, releasing the locks of closed sessions, and publishing events whose node died
//! before it could.

use super::store::{LockStore, StoredEvent};
use super::{LockConfig, millis};
use crate::{EventOptions, EventPublisher, NodeSessions};
use protocol::{EventType, Topic};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Publishes stored events in order and deletes the ones that went out. One that cannot be
/// published (broker down) stops the run: it and the rest stay in the outbox, and a sweeper
/// publishes them, in order, once their claim lapses.
pub(crate) async fn publish(
    store: &LockStore,
    publisher: &dyn EventPublisher,
    events: &[StoredEvent],
) {
    let done = publish_only(publisher, events).await;
    if let Err(err) = store.delete_events(&done).await {
        // They will be published again after their lease: at least once, never lost.
        warn!(%err, "could not delete published lock events");
    }
}

/// What the request path queues for [`run_deleter`]: ids of published events.
pub(crate) type Deletes = mpsc::Sender<Vec<i64>>;

/// Publishes a decision's events in order and queues the published ones for deletion in a
/// batch, off the request path: the answer waits for the broker, not for a second commit. A
/// row whose delete is late or lost is published again by the next decision of its item or by
/// a sweeper after its lease, and the broker drops that copy by version. When the queue is
/// full the delete is made here, so the queue bounds memory and the database sets the pace.
pub(crate) async fn publish_queued(
    store: &LockStore,
    deletes: &Deletes,
    publisher: &dyn EventPublisher,
    events: &[StoredEvent],
) {
    let done = publish_only(publisher, events).await;
    if done.is_empty() {
        return;
    }
    if let Err(mpsc::error::TrySendError::Full(done) | mpsc::error::TrySendError::Closed(done)) =
        deletes.try_send(done)
        && let Err(err) = store.delete_events(&done).await
    {
        warn!(%err, "could not delete published lock events");
    }
}

/// Most ids deleted in one statement.
const DELETE_BATCH: usize = 1000;

/// Deletes the published events the request path queued, many per statement. It stops when
/// every sender is gone (not on shutdown), so what was queued while the node drained is still
/// deleted.
pub(crate) async fn run_deleter(store: LockStore, mut queued: mpsc::Receiver<Vec<i64>>) {
    while let Some(mut ids) = queued.recv().await {
        while ids.len() < DELETE_BATCH {
            match queued.try_recv() {
                Ok(more) => ids.extend(more),
                Err(_) => break,
            }
        }
        if let Err(err) = store.delete_events(&ids).await {
            // Published again after their lease and dropped by the broker: at least once.
            warn!(%err, n = ids.len(), "could not delete published lock events");
        }
    }
}

/// Publishes events in order until one fails; returns the ids of those that went out.
async fn publish_only(publisher: &dyn EventPublisher, events: &[StoredEvent]) -> Vec<i64> {
    let mut done = Vec::with_capacity(events.len());
    for event in events {
        let (Ok(topic), Ok(event_type), Ok(data)) = (
            Topic::parse(&event.topic),
            EventType::parse(&event.event_type),
            RawValue::from_string(event.data.clone()),
        ) else {
            // Written by us; cannot be malformed. Drop it rather than retry it forever.
            warn!(id = event.id, topic = %event.topic, "dropping a malformed lock event");
            done.push(event.id);
            continue;
        };
        // Keyed by item and versioned by the outbox id, which grows with every change of the
        // item in commit order: an event published late (by a slow node, or by the sweeper
        // after its node died) cannot overtake a newer one; it is superseded instead, so every
        // subscriber sees an item's lock events in token order.
        let options = EventOptions {
            key: lock_key(&event.data),
            version: u64::try_from(event.id).ok(),
            ..EventOptions::default()
        };
        match publisher.publish(&topic, &event_type, &data, options).await {
            Ok(published) => {
                if published.superseded {
                    debug!(id = event.id, topic = %event.topic, "lock event superseded by a newer one of its item");
                } else {
                    crate::metrics::lock_event(&event.topic, &event.event_type);
                }
                done.push(event.id);
            }
            Err(err) => {
                warn!(%err, id = event.id, "lock event not published yet; a sweeper will retry");
                break;
            }
        }
    }
    done
}

/// The key of a lock event: `lock:{item}`, from its data.
fn lock_key(data: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        item: &'a str,
    }
    serde_json::from_str::<Item<'_>>(data)
        .ok()
        .map(|d| format!("lock:{}", d.item))
}

/// How many sweeps pass between two checks of this node's session-bound locks against the
/// sessions it has open.
const SESSION_CHECK_EVERY: u32 = 4;

/// Runs the sweepers until `shutdown`. `node` is this node's id.
pub(crate) async fn run_sweepers(
    store: LockStore,
    publisher: Arc<dyn EventPublisher>,
    sessions: Arc<dyn NodeSessions>,
    node: String,
    config: LockConfig,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when this node has reached the database at every tick. It judges other nodes only
    // after a whole `node_timeout` of that: after a database outage every node's last
    // heartbeat is old, and the first node back must not take the others for dead before they
    // had the chance to report.
    let mut reachable_since: Option<tokio::time::Instant> = None;
    let mut ticks: u32 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        ticks = ticks.wrapping_add(1);
        let mut reached = true;
        for (what, result) in [
            ("expiries", store.sweep_expired(100).await),
            ("closed sessions", store.release_closed_sessions(100).await),
            ("orphaned events", store.claim_orphaned_events(100).await),
        ] {
            match result {
                Ok(events) if !events.is_empty() => {
                    publish(&store, publisher.as_ref(), &events).await;
                }
                Ok(_) => {}
                Err(err) => {
                    reached = false;
                    debug!(%err, what, "lock sweep failed; retrying next tick");
                }
            }
        }
        if !reached {
            reachable_since = None;
            continue;
        }
        let since = *reachable_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= config.node_timeout {
            match store
                .close_dead_nodes(millis(config.node_timeout), millis(config.session_grace))
                .await
            {
                Ok(dead) if !dead.is_empty() => {
                    warn!(?dead, "nodes went silent; their sessions count as closed");
                }
                Ok(_) => {}
                Err(err) => debug!(%err, "dead-node sweep failed; retrying next tick"),
            }
        }
        if ticks.is_multiple_of(SESSION_CHECK_EVERY) {
            check_own_sessions(&store, sessions.as_ref(), &node, config.session_grace).await;
        }
    }
}

/// Records as closed every session of this node that holds locks but is not open here: it
/// closed before its lock was granted, or its close could not be recorded. Its locks are then
/// released after the grace, like any closed session's.
async fn check_own_sessions(
    store: &LockStore,
    sessions: &dyn NodeSessions,
    node: &str,
    grace: Duration,
) {
    let held = match store.node_sessions(node).await {
        Ok(held) => held,
        Err(err) => {
            debug!(%err, "session check failed; retrying later");
            return;
        }
    };
    for session in held.iter().filter(|s| !sessions.is_open(s)) {
        debug!(session, "a session holding locks is not open on this node");
        if let Err(err) = store.session_closed(session, millis(grace)).await {
            debug!(%err, "could not record a closed session; retrying later");
        }
    }
}

/// Keeps this node's row in `nodes` fresh, on a connection of its own, until `shutdown`. When
/// the row is gone, the other nodes took this one for dead while it stalled (a pause longer
/// than `locks.node_timeout`) and are releasing its sessions' locks: it closes every session
/// it has, so their clients reconnect and acquire again instead of editing under locks they no
/// longer hold, and registers again.
pub(crate) async fn run_heartbeat(
    store: LockStore,
    sessions: Arc<dyn NodeSessions>,
    node: String,
    config: LockConfig,
    registered: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown: CancellationToken,
) {
    // A tenth of the timeout: a node is taken for dead only after ten missed beats.
    let every = (config.node_timeout / 10).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !*registered.borrow() {
            match store.register_node(&node).await {
                Ok(()) => {
                    registered.send_replace(true);
                }
                Err(err) => debug!(%err, "cannot register this node yet; retrying"),
            }
            continue;
        }
        match store.node_heartbeat(&node).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(
                    node,
                    "the cluster took this node for dead (it stalled); closing its sessions so their clients reconnect and lock again"
                );
                sessions.node_expired();
                registered.send_replace(false);
                ticker.reset_immediately();
            }
            Err(err) => debug!(%err, "node heartbeat failed; retrying next beat"),
        }
    }
}

/// What the session closer is told.
#[derive(Debug)]
pub(crate) enum Closing {
    /// A WebSocket session ended.
    Session(String),
    /// Answer once every close queued before this one is recorded (node shutdown).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Records closed sessions in the store, off the session's path. Bounded: when the store is
/// down and the queue fills, closes are dropped and their locks simply run out their TTL.
/// It stops when every sender is gone, not on shutdown: closes queued while the node drains
/// its WebSockets must still be recorded, or their locks would outlive their sessions.
pub(crate) async fn run_session_closer(
    store: LockStore,
    mut closing: mpsc::Receiver<Closing>,
    grace: Duration,
) {
    let grace_ms = millis(grace);
    while let Some(message) = closing.recv().await {
        match message {
            Closing::Session(session) => {
                if let Err(err) = store.session_closed(&session, grace_ms).await {
                    warn!(%err, session, "could not record a closed session; its locks will expire by TTL");
                }
            }
            Closing::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}
