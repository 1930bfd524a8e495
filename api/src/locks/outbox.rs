//! Publishing lock events after commit, and the background work every node does: announcing
//! expiries, releasing the locks of closed sessions, and publishing events whose node died
//! before it could.

use super::store::{LockStore, StoredEvent};
use super::{LockConfig, millis};
use crate::EventPublisher;
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
        match publisher.publish(&topic, &event_type, &data).await {
            Ok(_) => {
                crate::metrics::lock_event(&event.topic, &event.event_type);
                done.push(event.id);
            }
            Err(err) => {
                warn!(%err, id = event.id, "lock event not published yet; a sweeper will retry");
                break;
            }
        }
    }
    if let Err(err) = store.delete_events(&done).await {
        // They will be published again after their lease: at least once, never lost.
        warn!(%err, "could not delete published lock events");
    }
}

/// Runs the sweepers until `shutdown`. `node` is this node's id, stamped every sweep.
pub(crate) async fn run_sweepers(
    store: LockStore,
    publisher: Arc<dyn EventPublisher>,
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
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match store.node_seen(&node).await {
            Ok(()) => {
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
            }
            Err(err) => {
                reachable_since = None;
                debug!(%err, "node heartbeat failed; retrying next tick");
            }
        }
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
                Err(err) => debug!(%err, what, "lock sweep failed; retrying next tick"),
            }
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
