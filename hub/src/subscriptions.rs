//! Keeps the broker's subscriptions in step with the registry.
//!
//! Sessions never call the broker's subscribe/unsubscribe themselves: they mark a topic
//! *dirty* when it gains its first or loses its last local subscriber, and one manager task per
//! node reconciles: subscribe what has subscribers and is not subscribed, unsubscribe what is
//! subscribed and has none. Reconciling state instead of replaying operations means a
//! subscribe/unsubscribe race on one topic cannot leave Redis in the wrong state, a burst of
//! thousands of new topics becomes a few batched commands, and resubscribing everything after a
//! broker reconnect is the same code path.

use crate::broker::Broker;
use crate::fanout::Fanout;
use crate::registry::Registry;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Topics changed since the last reconcile pass, and the signals around them.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    /// `std`-style lock: held only to insert or take, never across an `.await`.
    dirty: Mutex<HashSet<String>>,
    /// Wakes the manager. A `Notify` keeps at most one permit, so marks coalesce.
    wake: Notify,
    /// Bumped after every reconcile pass; sessions waiting for a confirmation watch it.
    epoch: watch::Sender<u64>,
    /// Set when the broker lost every subscription (a reconnect): the next pass resubscribes
    /// all topics.
    resync: AtomicBool,
    /// Whether the broker's subscriptions match the registry (no resync pending, the last pass
    /// failed nothing). Part of readiness.
    in_step: AtomicBool,
    /// The broker's connection epoch (`None` for a broker that never loses subscriptions), and
    /// the last epoch for which a full resubscription succeeded. They differ from the moment
    /// the broker reports a disconnect until every topic is subscribed again, so readiness
    /// never races ahead of the resubscription.
    broker_epoch: Option<watch::Receiver<u64>>,
    synced_epoch: AtomicU64,
}

impl Subscriptions {
    pub(crate) fn new(broker_epoch: Option<watch::Receiver<u64>>) -> Subscriptions {
        Subscriptions {
            dirty: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            epoch: watch::Sender::new(0),
            resync: AtomicBool::new(false),
            in_step: AtomicBool::new(true),
            synced_epoch: AtomicU64::new(broker_epoch.as_ref().map_or(0, |rx| *rx.borrow())),
            broker_epoch,
        }
    }

    /// Whether every topic with a local subscriber is subscribed in the broker.
    pub(crate) fn in_step(&self) -> bool {
        let epoch = self.broker_epoch.as_ref().map_or(0, |rx| *rx.borrow());
        self.in_step.load(Ordering::SeqCst) && self.synced_epoch.load(Ordering::SeqCst) == epoch
    }

    /// A topic gained its first or lost its last local subscriber.
    pub(crate) fn mark(&self, topic: &str) {
        self.dirty.lock().insert(topic.to_owned());
        self.wake.notify_one();
    }

    /// The broker lost its subscriptions; resubscribe everything.
    pub(crate) fn resync(&self) {
        self.in_step.store(false, Ordering::SeqCst);
        self.resync.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub(crate) fn watch_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Runs the manager until `shutdown`.
    pub(crate) async fn run(
        self: Arc<Self>,
        registry: Arc<Registry>,
        broker: Arc<dyn Broker>,
        fanout: Arc<Fanout>,
        shutdown: CancellationToken,
    ) {
        let mut subscribed: HashSet<String> = HashSet::new();
        let mut backoff = Duration::from_millis(50);
        let mut connections = self.broker_epoch.clone();
        let mut target_epoch = self.synced_epoch.load(Ordering::SeqCst);
        // A resubscription happened and the positions were not checked since.
        let mut check_pending = false;
        loop {
            let reconnected = async {
                match connections.as_mut() {
                    Some(rx) => rx.changed().await.map(|()| *rx.borrow_and_update()).ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                epoch = reconnected => match epoch {
                    Some(epoch) => {
                        target_epoch = epoch;
                        self.resync();
                    }
                    None => connections = None,
                },
            }
            if self.resync.swap(false, Ordering::SeqCst) {
                check_pending = true;
                registry.unconfirm_all();
                subscribed.clear();
                self.dirty.lock().extend(registry.topics());
            }
            let dirty: Vec<String> = self.dirty.lock().drain().collect();
            let (mut subscribe, mut unsubscribe, mut confirm) =
                (Vec::new(), Vec::new(), Vec::new());
            for topic in dirty {
                match (
                    registry.has_subscribers(&topic),
                    subscribed.contains(&topic),
                ) {
                    (true, false) => subscribe.push(topic),
                    (true, true) => confirm.push(topic),
                    (false, true) => unsubscribe.push(topic),
                    (false, false) => {}
                }
            }
            let mut failed = false;
            if !subscribe.is_empty() {
                let started = std::time::Instant::now();
                let result = broker.subscribe(&subscribe).await;
                metrics::histogram!(crate::metrics::BROKER_SUBSCRIBE_SECONDS)
                    .record(started.elapsed());
                match result {
                    Ok(()) => {
                        subscribed.extend(subscribe.iter().cloned());
                        confirm.append(&mut subscribe);
                    }
                    Err(err) => {
                        debug!(%err, topics = subscribe.len(), "broker subscribe failed; will retry");
                        self.dirty.lock().extend(subscribe);
                        failed = true;
                    }
                }
            }
            if !unsubscribe.is_empty() {
                match broker.unsubscribe(&unsubscribe).await {
                    Ok(()) => {
                        for t in &unsubscribe {
                            subscribed.remove(t);
                            fanout.forget(t);
                        }
                    }
                    Err(err) => {
                        debug!(%err, topics = unsubscribe.len(), "broker unsubscribe failed; will retry");
                        self.dirty.lock().extend(unsubscribe);
                        failed = true;
                    }
                }
            }
            for topic in &confirm {
                registry.confirm(topic);
            }
            let done = !failed && !self.resync.load(Ordering::SeqCst);
            if done {
                self.synced_epoch.store(target_epoch, Ordering::SeqCst);
                if std::mem::take(&mut check_pending) {
                    // The node may have missed events while it was away from the broker; a
                    // quiet topic would only show it at its next event. Compare positions now,
                    // in the background (the manager goes on reconciling meanwhile).
                    let fanout = fanout.clone();
                    let topics: Vec<String> = subscribed.iter().cloned().collect();
                    tokio::spawn(async move { fanout.check(topics).await });
                }
            }
            self.in_step.store(done, Ordering::SeqCst);
            self.epoch.send_modify(|e| *e += 1);
            if failed {
                warn!(retry_in = ?backoff, "broker subscriptions out of step; retrying");
                // Back off before retrying, but wake at once on shutdown.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                self.wake.notify_one();
            } else {
                backoff = Duration::from_millis(50);
            }
        }
    }
}
