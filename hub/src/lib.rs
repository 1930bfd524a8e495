//! Lockstep's real-time hub: STOMP 1.2 over WebSocket, fanned out through a broker.
//!
//! [`router`] serves `GET /ws`. Each connection runs one session task that authenticates the
//! client, tracks its subscriptions in the node's [`Registry`], and writes the frames fan-out
//! queues for it. Events reach the registry through a [`Broker`]: [`MemoryBroker`] on a single
//! node, Redis in a cluster. [`Hub::publish`] is the one way events enter, for STOMP `SEND` and
//! (through the binary's wiring) the HTTP API alike.
//!
//! # Layout
//!
//! - `upgrade`: the `/ws` handler: Origin check, subprotocol, buffer sizes.
//! - `session`: the per-connection state machine.
//! - `connections`: the node's table of connections (by id and session), the pool of
//!   connections waiting for `CONNECT`, and a way to ask a session to close.
//! - `send_queue`: `SendQueue`, a connection's bounded outbound queue (not to be
//!   confused with the lock service's event outbox in `api`).
//! - [`registry`]: topic → local subscribers, and encode-once fan-out.
//! - `subscriptions`: keeps broker subscriptions in step with the registry.
//! - [`broker`]: the [`Broker`] trait (publish with a position, history) and [`MemoryBroker`].
//! - [`fanout`]: [`Fanout`], the brokers' [`broker::Delivery`]: each topic in offset order to the
//!   registry, gaps filled from history once per topic, `lockstep.reset` when they cannot be.
//! - [`control`]: the control API's side in the hub (DESIGN §15): revocations kept by the
//!   broker and checked on `CONNECT` and `SUBSCRIBE`, control messages that close connections
//!   or end subscriptions on every node, and the connections survey.
//! - [`presence`]: who subscribes to team and item topics across the cluster: the
//!   [`PresenceStore`] trait with [`MemoryPresence`] (the Redis store is
//!   [`redis::RedisBroker`]'s), and the node's tracker, which batches changes, waits out the
//!   leave delay, refreshes entries and publishes `presence.joined` / `presence.left`.
//! - [`redis`]: [`redis::RedisBroker`], the cluster broker on Redis (fred).
//! - [`config`]: [`HubConfig`], every bound of a session.
//! - [`metrics`]: the hub's Prometheus metric names and the handles hot paths keep.

pub mod broker;
pub mod config;
mod connections;
pub mod control;
pub mod fanout;
pub mod metrics;
pub mod presence;
mod reads;
pub mod redis;
pub mod registry;
mod send_queue;
mod session;
mod subscriptions;
mod upgrade;

pub use broker::{Broker, BrokerError, History, MemoryBroker, PublishOptions, Published, Snapshot};
pub use config::{HistoryConfig, HubConfig, OriginPolicy, PresenceConfig};
pub use connections::Member;
pub use control::{ConnectionInfo, Revocation};
pub use fanout::Fanout;
pub use presence::{Change as PresenceChange, Listing, MemoryPresence, Occupancy, PresenceStore};
pub use registry::Registry;

use axum::Router;
use axum::routing::get;
use connections::Connections;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use protocol::rate::KeyedBuckets;
use protocol::server::MessageTemplate;
use protocol::{Authenticator, Disconnect, EventType, Position, Topic, envelope};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use subscriptions::Subscriptions;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Told when a STOMP session ends, wherever in the node it ran. The lock service uses it to
/// release session-bound locks; the hub does not know what observers do.
pub trait SessionObserver: Send + Sync + std::fmt::Debug + 'static {
    fn session_closed(&self, session_id: &str, user: &str);
}

/// Told of every presence change this node's store updates decided (each change is decided
/// on exactly one node, so the cluster tells each once). Webhooks use it for
/// `topic.occupied` / `topic.vacated`. Called on the presence task: it must not block.
pub trait PresenceObserver: Send + Sync + std::fmt::Debug + 'static {
    fn presence_changed(&self, topic: &str, change: &presence::Change);
}

/// Who outside the hub is told what happens in it.
#[derive(Debug, Default)]
pub struct Observers {
    pub sessions: Option<Arc<dyn SessionObserver>>,
    pub presence: Option<Arc<dyn PresenceObserver>>,
}

/// A handle to the hub: cheap to clone, shared by every session and the router.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: HubConfig,
    auth: Arc<Authenticator>,
    registry: Arc<Registry>,
    broker: Arc<dyn Broker>,
    /// Told where a topic stands when a subscription reads it from the broker.
    fanout: Arc<Fanout>,
    /// History reads in flight, shared by the subscriptions resuming the same range.
    reads: reads::Reads,
    subscriptions: Arc<Subscriptions>,
    /// One permit per authenticated WebSocket (taken at `CONNECT`); `max_connections` in all.
    slots: Arc<Semaphore>,
    /// Every connection of this node, authenticated or waiting for `CONNECT`.
    connections: Connections,
    /// The node's side of presence: sessions tell it what changed.
    presence: Arc<presence::Tracker>,
    /// The node's side of the control plane: live nodes, surveys in flight.
    control: control::Control,
    /// `SEND` budgets per token, shared by all of a token's connections on this node.
    budgets: KeyedBuckets,
    /// The clock the budgets count on.
    started: std::time::Instant,
    /// Cancelled on shutdown: sessions close with 4010.
    shutdown: CancellationToken,
    /// Tracks session tasks so shutdown can wait for their closing handshakes.
    tracker: TaskTracker,
    /// Event and session ids: ULIDs, monotonic within this node, so ids sort by publish order.
    /// A `parking_lot` mutex: held for a few nanoseconds, never across an `.await`.
    ids: IdGenerator,
    next_conn: AtomicU64,
    observer: Option<Arc<dyn SessionObserver>>,
    presence_observer: Option<Arc<dyn PresenceObserver>>,
    metrics: metrics::HubMetrics,
}

struct IdGenerator(Mutex<ulid::Generator>);

impl std::fmt::Debug for IdGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdGenerator")
    }
}

/// Why an event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("event data is {size} bytes; at most {limit} are allowed")]
    TooLarge { size: usize, limit: usize },
}

impl Hub {
    /// Creates the hub and starts its subscription manager. Must run inside a Tokio runtime.
    ///
    /// `fanout` must be the `broker`'s [`broker::Delivery`], over the same `registry`.
    pub fn new(
        config: HubConfig,
        auth: Arc<Authenticator>,
        registry: Arc<Registry>,
        fanout: Arc<Fanout>,
        broker: Arc<dyn Broker>,
        presence: Arc<dyn PresenceStore>,
        observers: Observers,
    ) -> Hub {
        let shutdown = CancellationToken::new();
        let tracker = Arc::new(presence::Tracker::new(
            config.presence.clone(),
            &config.node_id,
            presence,
        ));
        fanout.set_broker(&broker);
        let subscriptions = Arc::new(Subscriptions::new(broker.connection_epoch()));
        tokio::spawn(subscriptions.clone().run(
            registry.clone(),
            broker.clone(),
            fanout.clone(),
            shutdown.clone(),
        ));
        let hub = Hub {
            inner: Arc::new(Inner {
                presence: tracker.clone(),
                control: control::Control::default(),
                slots: Arc::new(Semaphore::new(config.max_connections)),
                connections: Connections::new(config.max_pending_connections),
                // Past 10,000 tokens, those idle for a minute are forgotten.
                budgets: KeyedBuckets::new(10_000, 60.0),
                started: std::time::Instant::now(),
                config,
                auth,
                registry,
                broker,
                fanout,
                reads: reads::Reads::default(),
                subscriptions,
                shutdown,
                tracker: TaskTracker::new(),
                ids: IdGenerator(Mutex::new(ulid::Generator::new())),
                next_conn: AtomicU64::new(1),
                observer: observers.sessions,
                presence_observer: observers.presence,
                metrics: metrics::HubMetrics::new(),
            }),
        };
        tracker.spawn(Arc::new(hub.clone()), hub.inner.shutdown.clone());
        let weak = Arc::downgrade(&hub.inner);
        hub.inner
            .fanout
            .set_control(fanout::ControlHandler(Box::new(move |message: &str| {
                if let Some(inner) = weak.upgrade() {
                    Hub { inner }.on_control(message);
                }
            })));
        hub.spawn_control();
        hub
    }

    /// Publishes an event: builds its envelope and `MESSAGE` once, and hands it to the broker.
    /// The event is ordered at the call; the returned future resolves to its id and position
    /// once the broker confirmed it, so a caller may keep several publishes in flight.
    ///
    /// An idempotency key in `options` must already be scoped to its caller (the key space is
    /// the topic's).
    pub fn publish(
        &self,
        topic: &Topic,
        event_type: &EventType,
        data: &RawValue,
        mut options: PublishOptions,
    ) -> BoxFuture<'static, Result<Published, PublishError>> {
        if self.inner.shutdown.is_cancelled() {
            return Box::pin(std::future::ready(Err(PublishError::ShuttingDown)));
        }
        // One bound for every way in (STOMP SEND, the HTTP API, the lock service), so an event
        // that one path accepts can be delivered by every node to every client.
        let limit = self.inner.config.max_event_bytes;
        if data.get().len() > limit {
            return Box::pin(std::future::ready(Err(PublishError::TooLarge {
                size: data.get().len(),
                limit,
            })));
        }
        let id = self.new_id();
        let ts = envelope::format_ts(SystemTime::now());
        let json = protocol::Envelope {
            id: &id,
            event_type: event_type.as_str(),
            topic: topic.as_str(),
            ts: &ts,
            data,
        }
        .to_json();
        if options.key.is_none() {
            options.key = default_key(event_type, data);
        }
        let message = MessageTemplate::keyed(
            topic.as_str(),
            &id,
            event_type.as_str(),
            options.key.as_deref(),
            &json,
        );
        let started = std::time::Instant::now();
        let confirmed = self.inner.broker.publish(topic.as_str(), &message, options);
        let inner = self.inner.clone();
        Box::pin(async move {
            let metrics = &inner.metrics;
            match confirmed.await {
                Ok(published) => {
                    metrics.publish_seconds.record(started.elapsed());
                    if !published.duplicate {
                        metrics.published.increment(1);
                    }
                    Ok(published)
                }
                Err(err) => {
                    metrics.publish_failures.increment(1);
                    Err(err.into())
                }
            }
        })
    }

    /// Up to `limit` events of `topic` after offset `after` (at most the configured replay
    /// maximum), with the topic's latest position.
    ///
    /// # Errors
    ///
    /// When the broker does not answer in time.
    pub async fn history(
        &self,
        topic: &Topic,
        after: u64,
        limit: usize,
    ) -> Result<History, BrokerError> {
        self.history_since(topic, after, limit, None).await
    }

    /// [`Hub::history`] from a read issued at `since` or later (`None`: any), shared with
    /// other subscriptions reading the same range (see `reads`). A resuming subscription
    /// passes when it began holding its live events: an earlier read could miss an event it
    /// never holds.
    pub(crate) async fn history_since(
        &self,
        topic: &Topic,
        after: u64,
        limit: usize,
        since: Option<std::time::Instant>,
    ) -> Result<History, BrokerError> {
        let limit = limit.min(self.inner.config.history.max_replay);
        let broker = self.inner.broker.clone();
        let name = topic.as_str().to_owned();
        let read = move || {
            async move {
                tokio::time::timeout(broker::HISTORY_TIMEOUT, broker.history(&name, after, limit))
                    .await
                    .map_err(|_| BrokerError::Unavailable("history read timed out".to_owned()))?
            }
            .boxed()
        };
        self.inner
            .reads
            .read((topic.as_str().to_owned(), after, limit), since, read)
            .await
    }

    /// The latest event of every key of `topic`, and the position it was taken at.
    ///
    /// # Errors
    ///
    /// When the broker does not answer in time.
    pub async fn snapshot(&self, topic: &Topic) -> Result<Snapshot, BrokerError> {
        tokio::time::timeout(
            broker::HISTORY_TIMEOUT,
            self.inner.broker.snapshot(topic.as_str()),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("snapshot read timed out".to_owned()))?
    }

    /// The topic's latest position.
    ///
    /// # Errors
    ///
    /// When the broker does not answer in time.
    pub async fn position(&self, topic: &Topic) -> Result<Position, BrokerError> {
        Ok(self.history(topic, u64::MAX, 0).await?.top)
    }

    /// Whether the broker is reachable and holds every subscription this node needs (for
    /// `/readyz`).
    pub fn is_ready(&self) -> bool {
        !self.inner.shutdown.is_cancelled()
            && self.inner.broker.is_ready()
            && self.inner.subscriptions.in_step()
    }

    /// Number of authenticated WebSocket sessions on this node.
    pub fn connection_count(&self) -> usize {
        self.inner.config.max_connections - self.inner.slots.available_permits()
    }

    /// Whether the session with this id (the `session` header of its `CONNECTED`) is open on
    /// this node.
    pub fn is_session_open(&self, session: &str) -> bool {
        self.inner.connections.is_open(session)
    }

    /// The users subscribed to `topic` on this node, with how many of their connections and
    /// since when (the per-node half of presence).
    pub fn local_members(&self, topic: &Topic) -> Vec<Member> {
        self.inner.connections.members(topic.as_str())
    }

    /// Who is present in `topic` across the cluster (DESIGN §14): listed when at most the
    /// configured number of users are, else counted only.
    ///
    /// # Errors
    ///
    /// When the presence store does not answer in time.
    pub async fn presence(&self, topic: &Topic) -> Result<Listing, BrokerError> {
        let tracker = &self.inner.presence;
        tokio::time::timeout(
            broker::HISTORY_TIMEOUT,
            tracker
                .store()
                .list(topic.as_str(), tracker.config().max_listed),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("presence read timed out".to_owned()))?
    }

    /// The sessions `user` has open on this node.
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<str>> {
        self.inner.connections.sessions_of(user)
    }

    /// Closes every session of this node with `disconnect` (the node keeps running).
    pub fn close_all(&self, disconnect: Disconnect) {
        self.inner.connections.close_all(disconnect);
    }

    /// Sets the gauges that are read off the hub's state (connections, subscriptions, topics);
    /// called when `/metrics` is scraped.
    pub fn record_gauges(&self) {
        #[allow(clippy::cast_precision_loss)] // Counts far below 2^52.
        {
            ::metrics::gauge!(metrics::CONNECTIONS).set(self.connection_count() as f64);
            ::metrics::gauge!(metrics::PENDING_CONNECTIONS)
                .set(self.inner.connections.pending() as f64);
            ::metrics::gauge!(metrics::USERS).set(self.inner.connections.user_count() as f64);
            let registry = &self.inner.registry;
            ::metrics::gauge!(metrics::SUBSCRIPTIONS).set(registry.subscription_count() as f64);
            ::metrics::gauge!(metrics::TOPICS).set(registry.topic_count() as f64);
        }
    }

    /// Closes every session with 4010 and waits up to `grace` for their closing handshakes.
    /// Returns whether all sessions finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_ok()
    }

    /// The token's `SEND` budget: `Err(wait)` in seconds when spent.
    fn take_budget(&self, principal: &protocol::Principal) -> Result<(), f64> {
        let config = &self.inner.config;
        let limit = protocol::rate::Limit::for_caller(
            protocol::rate::Limit {
                rate: config.publish_rate,
                burst: config.publish_burst,
            },
            principal.publish_rate,
            config.max_claimed_rate,
        );
        let now = self.inner.started.elapsed().as_secs_f64();
        self.inner.budgets.take(&principal.sub, 1, limit, now)
    }

    /// A new ULID, monotonic on this node.
    pub fn new_id(&self) -> String {
        let mut ids = self.inner.ids.0.lock();
        // `generate` fails only if 2^80 ids were made in one millisecond; fall back to a fresh
        // random id rather than panic.
        ids.generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .to_string()
    }

    fn next_conn_id(&self) -> u64 {
        self.inner.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Presence reads the node's connection table and publishes through the hub.
impl presence::Node for Hub {
    fn member(&self, topic: &str, user: &str) -> Option<(u32, SystemTime)> {
        self.inner.connections.member(topic, user)
    }

    fn members(&self) -> Vec<(Arc<str>, Vec<Member>)> {
        self.inner.connections.presence_members()
    }

    fn publish(
        &self,
        topic: &str,
        change: &presence::Change,
    ) -> BoxFuture<'static, Result<(), String>> {
        let (Ok(topic), Ok(event_type)) = (
            Topic::parse(topic),
            EventType::parse(if change.joined {
                presence::JOINED
            } else {
                presence::LEFT
            }),
        ) else {
            return Box::pin(std::future::ready(Err(format!("not a topic: {topic}"))));
        };
        let data = serde_json::json!({ "user": &*change.user }).to_string();
        let Ok(data) = RawValue::from_string(data) else {
            return Box::pin(std::future::ready(Err("unencodable user".to_owned())));
        };
        let published = Hub::publish(
            self,
            &topic,
            &event_type,
            &data,
            PublishOptions {
                key: Some(format!("presence:{}", change.user)),
                version: Some(change.version),
                ..PublishOptions::default()
            },
        );
        Box::pin(async move { published.await.map(|_| ()).map_err(|e| e.to_string()) })
    }

    fn observe(&self, topic: &str, change: &presence::Change) {
        if let Some(observer) = &self.inner.presence_observer {
            observer.presence_changed(topic, change);
        }
    }
}

/// The key an event gets when its publisher gave none (DESIGN §13): a job's progress,
/// completion and failure are keyed by the job, `job:{data.job_id}`, so a topic keeps each
/// running job's latest state.
fn default_key(event_type: &EventType, data: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Job {
        job_id: Option<serde_json::Value>,
    }
    if !matches!(
        event_type.as_str(),
        "job.progress" | "job.completed" | "job.failed"
    ) {
        return None;
    }
    let job = serde_json::from_str::<Job>(data.get()).ok()?.job_id?;
    let id = match job {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    protocol::topic::is_valid_id(&id).then(|| format!("job:{id}"))
}

/// The hub's routes: `GET /ws`.
pub fn router(hub: Hub) -> Router {
    Router::new()
        .route("/ws", get(upgrade::handler))
        .with_state(hub)
}
