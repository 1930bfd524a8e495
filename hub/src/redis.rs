//! The cluster broker on Redis, through fred: `SPUBLISH`/`SSUBSCRIBE` on standalone Redis and on
//! Redis Cluster alike.
//!
//! Sharded pub/sub spreads topics over a cluster's shards (a node receives only the shards it
//! subscribed to), and on standalone Redis 7 the same commands behave as plain pub/sub, so one
//! code path serves both.
//!
//! History (DESIGN §12): each topic has a stream (`{prefix}{T}:s`, entries `<offset>-0`), a
//! meta hash (`{prefix}{T}:m`: epoch, top offset) and its shard channel (`{prefix}{T}`), all
//! under one hash tag, so one slot. Publishing is one server-side script per topic and batch
//! (`redis/publish.lua`): it assigns the offsets, appends to the stream, trims it by count
//! and age, and `SPUBLISH`es the events, atomically; the script is run by its SHA and sent
//! again as `EVAL` wherever the server does not know it (a restart, `SCRIPT FLUSH`, a new
//! primary after a failover). A flushed or restarted Redis has no meta hash, so the next
//! publish starts a new epoch: offsets are never reused within an epoch.
//!
//! A message on the wire is one or more positioned `MESSAGE` tails, back to back: the tail the
//! publishing node encoded once ([`MessageTemplate::tail`]) with the position headers the script
//! put in front. Receiving nodes hand each to the node's [`Delivery`] without re-encoding.
//!
//! Liveness: fred reconnects with capped exponential backoff and jitter. Every (re)connection of
//! the subscriber connection bumps [`RedisBroker`]'s connection epoch, which makes the hub's
//! subscription manager resubscribe every topic the node holds. A pub/sub connection can also
//! go silent while looking connected; a probe published to this node's own channel on an
//! interval must come back, or the subscriber connection is forced to reconnect.

use crate::broker::{
    self, Broker, BrokerError, Delivery, History, PublishOptions, Published, Snapshot, StreamEvent,
};
use crate::config::HistoryConfig;
use fred::prelude::*;
use fred::types::config::{ClusterDiscoveryPolicy, UnresponsiveConfig};
use fred::types::{ClusterHash, CustomCommand, RespVersion};
use futures_util::future::{BoxFuture, try_join_all};
use protocol::{MessageTemplate, Position};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://…` (standalone) or `redis-cluster://host:port,host:port,…`.
    pub url: String,
    /// Prepended to topic names to form channel names, so several deployments can share Redis.
    pub channel_prefix: String,
    /// How often the pub/sub probe is sent.
    pub probe_interval: Duration,
    /// Longest a publish or subscribe may wait for Redis.
    pub command_timeout: Duration,
    /// Most bytes of events waiting to be sent to Redis; past it, publishes answer
    /// "overloaded" at once.
    pub publish_queue_bytes: usize,
}

impl Default for RedisSettings {
    fn default() -> RedisSettings {
        RedisSettings {
            url: "redis://127.0.0.1:6379".to_owned(),
            channel_prefix: "lockstep:".to_owned(),
            probe_interval: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            publish_queue_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Parses a Redis URL into a fred configuration.
///
/// # Errors
///
/// When the URL is not a valid `redis://` or `redis-cluster://` URL.
pub fn parse_url(url: &str) -> Result<Config, String> {
    if !(url.starts_with("redis://") || url.starts_with("redis-cluster://")) {
        return Err(
            "use redis://host:port or redis-cluster://host:port,host:port (TLS is not built in)"
                .to_owned(),
        );
    }
    if let Some(rest) = url.strip_prefix("redis-cluster://") {
        // DESIGN's form: a comma-separated list of seed nodes.
        if rest.contains(',') {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (Some(auth), hosts),
                None => (None, rest),
            };
            let mut servers = Vec::new();
            for host in hosts.trim_end_matches('/').split(',') {
                let (h, p) = host
                    .rsplit_once(':')
                    .ok_or_else(|| format!("'{host}' is not host:port"))?;
                let port: u16 = p
                    .parse()
                    .map_err(|_| format!("'{host}' has an invalid port"))?;
                servers.push(fred::types::config::Server::new(h, port));
            }
            let mut config = Config {
                server: ServerConfig::Clustered {
                    hosts: servers,
                    policy: ClusterDiscoveryPolicy::default(),
                },
                ..Config::default()
            };
            if let Some(auth) = auth {
                let (user, password) = auth.split_once(':').unwrap_or(("", auth));
                config.username = (!user.is_empty()).then(|| user.to_owned());
                config.password = Some(password.to_owned());
            }
            return Ok(config);
        }
    }
    Config::from_url(url).map_err(|e| e.to_string())
}

/// Events waiting to be published, at most (and at most `publish_queue_bytes` of them). A full
/// queue answers "overloaded" at once.
const PUBLISH_QUEUE: usize = 65_536;
/// Most events sent to Redis in one pipeline.
const PUBLISH_BATCH: usize = 512;

/// One event on its way to Redis.
#[derive(Debug)]
struct PublishJob {
    topic: String,
    tail: Arc<str>,
    /// The event id (`message-id`), kept with an idempotency key so a retry answers it.
    id: Arc<str>,
    idempotency_key: Option<String>,
    /// The event's key and version, for "newer versions only".
    key: Option<String>,
    version: Option<u64>,
    done: oneshot::Sender<Result<Published, BrokerError>>,
}

/// The scripts, with the trim function they share in front.
const PUBLISH_LUA: &str = concat!(
    include_str!("redis/trim.lua"),
    include_str!("redis/publish.lua")
);
const READ_LUA: &str = concat!(
    include_str!("redis/trim.lua"),
    include_str!("redis/read.lua")
);
const SNAPSHOT_LUA: &str = concat!(
    include_str!("redis/trim.lua"),
    include_str!("redis/snapshot.lua")
);
const PRESENCE_LUA: &str = concat!(
    include_str!("redis/trim.lua"),
    include_str!("redis/presence.lua")
);
const PRESENCE_LIST_LUA: &str = concat!(
    include_str!("redis/trim.lua"),
    include_str!("redis/presence_list.lua")
);

const REVOKE_LUA: &str = include_str!("redis/revoke.lua");

/// A script and its SHA1, which `EVALSHA` names it by.
#[derive(Debug)]
struct Script {
    body: &'static str,
    sha: String,
}

impl Script {
    fn new(body: &'static str) -> Script {
        use sha1::Digest as _;
        let digest = sha1::Sha1::digest(body.as_bytes());
        Script {
            body,
            sha: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// `EVALSHA` (or, when `load`, `EVAL` with the body: the server caches it) for a command
    /// whose keys all share `slot`.
    fn command(&self, slot: u16, load: bool) -> (CustomCommand, Value) {
        let name = if load { "EVAL" } else { "EVALSHA" };
        let head = if load { self.body } else { self.sha.as_str() };
        (
            CustomCommand::new_static(name, ClusterHash::Custom(slot), false),
            Value::from(head),
        )
    }
}

/// Whether a reply says the server does not know the script (it never ran: safe to resend).
fn no_script(err: &fred::error::Error) -> bool {
    err.details().starts_with("NOSCRIPT")
}

/// Names of one topic's Redis keys and channel: one hash tag, so one slot.
#[derive(Debug)]
struct TopicKeys {
    channel: String,
    stream: String,
    meta: String,
    versions: String,
    latest: String,
    updated: String,
    /// Presence (`presence.lua`): entries by expiry, their details, users' node counts, the
    /// last change's version.
    presence: [String; 4],
    slot: u16,
}

impl TopicKeys {
    fn new(prefix: &str, topic: &str) -> TopicKeys {
        // Topics are never empty and never hold `}` (ids are [A-Za-z0-9_.:-]), and the prefix
        // holds no `{` (configuration refuses one), so the tag is exactly the topic.
        let channel = format!("{prefix}{{{topic}}}");
        TopicKeys {
            stream: format!("{channel}:s"),
            meta: format!("{channel}:m"),
            versions: format!("{channel}:v"),
            latest: format!("{channel}:k"),
            updated: format!("{channel}:kt"),
            presence: [
                format!("{channel}:pe"),
                format!("{channel}:pd"),
                format!("{channel}:pu"),
                format!("{channel}:pv"),
            ],
            slot: fred::util::redis_keyslot(channel.as_bytes()),
            channel,
        }
    }

    /// The idempotency key for `key`, or the slot's placeholder when there is none (the script
    /// takes one key per event, and every key must be in the slot).
    fn idempotency(&self, key: Option<&str>) -> String {
        format!("{}:i:{}", self.channel, key.unwrap_or(""))
    }
}

/// The Redis broker.
#[derive(Debug)]
pub struct RedisBroker {
    /// Publishes (and probes). Separate from the subscriber so a burst of publishes never
    /// queues behind subscription traffic.
    publisher: Arc<PublisherSlot>,
    /// Feeds the publishing task, which pipelines whatever accumulated while the previous
    /// pipeline was in flight: one round trip carries many events, in call order, and one
    /// script call per topic carries that topic's events.
    jobs: mpsc::Sender<PublishJob>,
    /// Bytes of the events in `jobs`, bounded by `queue_budget`.
    queued_bytes: Arc<AtomicUsize>,
    queue_budget: usize,
    subscriber: Client,
    cluster: bool,
    prefix: String,
    history: HistoryConfig,
    read: Arc<Script>,
    snapshot: Arc<Script>,
    presence: Script,
    presence_list: Script,
    revoke: Script,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    probe_channel: String,
    /// Every node's control messages (`crate::control`).
    control_channel: String,
    /// False once a control channel subscription failed, until one works: the probe task
    /// retries it meanwhile.
    control_subscribed: AtomicBool,
    probes_sent: AtomicU64,
    probes_seen: AtomicU64,
    probe_ok: AtomicBool,
    /// Bumped on every subscriber (re)connection and cluster change.
    epoch: watch::Sender<u64>,
}

impl RedisBroker {
    /// The publishing connection, when one is up.
    fn client(&self) -> Result<Client, BrokerError> {
        self.publisher
            .current()
            .ok_or_else(|| BrokerError::Unavailable("not connected to Redis".to_owned()))
    }

    /// Runs a read script over a topic's keys (stream, meta, latest, updated) with a fresh
    /// epoch for a topic that has none, then `args`; loads the script where the server lacks it.
    async fn read_topic(
        &self,
        script: &Script,
        topic: &str,
        args: &[Value],
    ) -> Result<Value, BrokerError> {
        let client = self.client()?;
        let keys = TopicKeys::new(&self.prefix, topic);
        let read = |load: bool| {
            let (command, head) = script.command(keys.slot, load);
            let mut all = vec![
                head,
                Value::from(4),
                Value::from(keys.stream.as_str()),
                Value::from(keys.meta.as_str()),
                Value::from(keys.latest.as_str()),
                Value::from(keys.updated.as_str()),
                Value::from(&*broker::new_epoch()),
            ];
            all.extend_from_slice(args);
            let client = client.clone();
            async move { client.custom::<Value, Value>(command, all).await }
        };
        match read(false).await {
            Err(err) if no_script(&err) => read(true).await,
            other => other,
        }
        .map_err(|e| unavailable(&e))
    }

    /// Runs `script` over `keys` (all in `slot`) with `args`; loads the script where the
    /// server lacks it.
    async fn run_script(
        &self,
        script: &Script,
        slot: u16,
        keys: &[String],
        args: Vec<Value>,
    ) -> Result<Value, BrokerError> {
        let client = self.client()?;
        let run = |load: bool| {
            let (command, head) = script.command(slot, load);
            let mut all = Vec::with_capacity(2 + keys.len() + args.len());
            all.push(head);
            all.push(Value::from(keys.len() as i64));
            all.extend(keys.iter().map(|k| Value::from(k.as_str())));
            all.extend_from_slice(&args);
            let client = client.clone();
            async move { client.custom::<Value, Value>(command, all).await }
        };
        match run(false).await {
            Err(err) if no_script(&err) => run(true).await,
            other => other,
        }
        .map_err(|e| unavailable(&e))
    }

    /// Creates the clients and starts connecting in the background; the node starts (not
    /// ready) even while Redis is down. `node_id` names this node's probe channel.
    ///
    /// # Errors
    ///
    /// When the URL is invalid.
    pub fn start(
        settings: &RedisSettings,
        history: &HistoryConfig,
        delivery: Arc<dyn Delivery>,
        node_id: &str,
        shutdown: CancellationToken,
    ) -> Result<Arc<RedisBroker>, BrokerError> {
        let config = parse_url(&settings.url)
            .map_err(|e| BrokerError::Unavailable(format!("redis url: {e}")))?;
        let cluster = matches!(config.server, ServerConfig::Clustered { .. });
        let build = |broadcast_capacity: usize, reconnect: bool| {
            let mut builder = Builder::from_config(Config {
                version: RespVersion::RESP3,
                // Without a policy, fred connects once and reports failure (the supervisor
                // retries); with one, it retries by itself from the start.
                fail_fast: !reconnect,
                ..config.clone()
            });
            if reconnect {
                let mut policy = ReconnectPolicy::new_exponential(0, 100, 5_000, 2);
                policy.set_jitter(100);
                builder.set_policy(policy);
            }
            builder.with_performance_config(|p| {
                p.default_command_timeout = settings.command_timeout;
                p.broadcast_channel_capacity = broadcast_capacity;
            });
            builder.with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                // A publish is sent once: retrying after a broken connection could deliver twice.
                c.max_command_attempts = 1;
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(Duration::from_secs(5)),
                    interval: Duration::from_secs(1),
                };
                c.tcp = fred::types::config::TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            });
            builder
        };
        // The publisher has no reconnect policy: fred keeps commands queued while it is
        // disconnected and writes them once it is back, so a publish the caller was told had
        // failed (it timed out during the outage) would still go out later. Instead
        // `supervise_publisher` builds a fresh client for every connection; commands queued on
        // a dead one die with it.
        let publisher_builder = build(16, false);
        let publisher = Arc::new(PublisherSlot::default());
        // Inbound events wait here while the registry fans them out; a lagging receiver would
        // lose events, so the buffer is generous.
        let subscriber = build(1 << 16, true)
            .build()
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let state = Arc::new(State {
            probe_channel: format!("{}probe:{node_id}", settings.channel_prefix),
            control_channel: format!("{}control", settings.channel_prefix),
            control_subscribed: AtomicBool::new(true),
            probes_sent: AtomicU64::new(0),
            probes_seen: AtomicU64::new(0),
            probe_ok: AtomicBool::new(true),
            epoch: watch::Sender::new(0),
        });
        let (jobs, queue) = mpsc::channel(PUBLISH_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let broker = Arc::new(RedisBroker {
            publisher,
            jobs,
            queued_bytes: queued_bytes.clone(),
            queue_budget: settings.publish_queue_bytes,
            subscriber,
            cluster,
            prefix: settings.channel_prefix.clone(),
            history: history.clone(),
            read: Arc::new(Script::new(READ_LUA)),
            snapshot: Arc::new(Script::new(SNAPSHOT_LUA)),
            presence: Script::new(PRESENCE_LUA),
            presence_list: Script::new(PRESENCE_LIST_LUA),
            revoke: Script::new(REVOKE_LUA),
            state,
        });
        tokio::spawn(publish_batches(
            Publisher {
                slot: broker.publisher.clone(),
                script: Script::new(PUBLISH_LUA),
                prefix: settings.channel_prefix.clone(),
                history: history.clone(),
                timeout: settings.command_timeout,
            },
            queue,
            queued_bytes,
            shutdown.clone(),
        ));
        let shutdown_for_publisher = shutdown.clone();
        broker.spawn_tasks(delivery, settings.probe_interval, shutdown);
        // The connection tasks run (and reconnect) on their own; their join handles are not
        // needed, and dropping a Tokio join handle detaches, it does not cancel.
        tokio::spawn(supervise_publisher(
            publisher_builder,
            broker.publisher.clone(),
            shutdown_for_publisher,
        ));
        drop(broker.subscriber.connect());
        Ok(broker)
    }

    fn spawn_tasks(
        self: &Arc<Self>,
        delivery: Arc<dyn Delivery>,
        probe_interval: Duration,
        shutdown: CancellationToken,
    ) {
        // Inbound messages → the node's delivery.
        let mut messages = self.subscriber.message_rx();
        let (state, prefix, stop) = (self.state.clone(), self.prefix.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    m = messages.recv() => m,
                };
                match message {
                    Ok(message) => {
                        let channel: &str = &message.channel;
                        if channel == state.probe_channel {
                            let seq = message.value.as_u64().unwrap_or(0);
                            state.probes_seen.fetch_max(seq, Ordering::Relaxed);
                            continue;
                        }
                        if channel == state.control_channel {
                            match message
                                .value
                                .as_bytes()
                                .and_then(|b| std::str::from_utf8(b).ok())
                            {
                                Some(text) => delivery.control(text),
                                None => warn!("ignoring a non-UTF-8 control message"),
                            }
                            continue;
                        }
                        let Some(topic) = channel
                            .strip_prefix(prefix.as_str())
                            .and_then(|c| c.strip_prefix('{'))
                            .and_then(|c| c.strip_suffix('}'))
                        else {
                            continue;
                        };
                        let Some(payload) = message
                            .value
                            .as_bytes()
                            .and_then(|b| std::str::from_utf8(b).ok())
                        else {
                            warn!(channel, "ignoring a non-UTF-8 message on a topic channel");
                            continue;
                        };
                        for tail in protocol::stream::split_batch(payload) {
                            match StreamEvent::from_tail(tail) {
                                Some(event) => delivery.deliver(topic, event),
                                None => {
                                    warn!(channel, "ignoring a message without a stream position");
                                }
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        warn!(
                            lost = n,
                            "fell behind Redis pub/sub; events were dropped; checking every topic's position"
                        );
                        metrics::counter!(crate::metrics::BROKER_LAGGED).increment(n);
                        delivery.lost();
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });

        // (Re)connections and cluster changes → resubscribe everything.
        let mut reconnects = self.subscriber.reconnect_rx();
        let mut changes = self.subscriber.cluster_change_rx();
        let mut errors = self.subscriber.error_rx();
        let broker = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        let _ = broker.subscriber.quit().await;
                        return;
                    }
                    r = reconnects.recv() => match r {
                        Ok(server) => {
                            metrics::counter!(crate::metrics::REDIS_RECONNECTS).increment(1);
                            info!(%server, "connected to Redis");
                        }
                        Err(RecvError::Closed) => return,
                        Err(RecvError::Lagged(_)) => {}
                    },
                    c = changes.recv() => match c {
                        Ok(change) => info!(?change, "Redis cluster changed"),
                        Err(RecvError::Closed) => return,
                        Err(RecvError::Lagged(_)) => {}
                    },
                    e = errors.recv() => {
                        if let Ok((error, server)) = e {
                            warn!(%error, ?server, "Redis connection error; reconnecting with backoff");
                        }
                        // The subscriptions may be gone: not ready until they are restored.
                        broker.state.epoch.send_modify(|e| *e += 1);
                        continue;
                    }
                }
                // Whatever this connection had subscribed is gone or uncertain.
                let probe = broker.state.probe_channel.clone();
                if let Err(err) = broker.subscriber.ssubscribe(probe).await {
                    debug!(%err, "probe subscription failed; the probe will force a reconnect");
                }
                broker.subscribe_control().await;
                let sent = broker.state.probes_sent.load(Ordering::Relaxed);
                broker.state.probes_seen.fetch_max(sent, Ordering::Relaxed);
                broker.state.probe_ok.store(true, Ordering::Relaxed);
                broker.state.epoch.send_modify(|e| *e += 1);
            }
        });

        // The probe.
        let broker = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(probe_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let Some(publisher) = broker.publisher.current() else {
                    continue;
                };
                if !broker.subscriber.is_connected() {
                    continue;
                }
                if !broker.state.control_subscribed.load(Ordering::Relaxed) {
                    broker.subscribe_control().await;
                }
                let state = &broker.state;
                let sent = state.probes_sent.load(Ordering::Relaxed);
                if sent > state.probes_seen.load(Ordering::Relaxed) {
                    warn!(
                        "the pub/sub probe did not come back; forcing the subscriber to reconnect"
                    );
                    state.probe_ok.store(false, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::REDIS_PROBE_FAILURES).increment(1);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        broker.subscriber.force_reconnection(),
                    )
                    .await;
                    continue;
                }
                state.probe_ok.store(true, Ordering::Relaxed);
                state.probes_sent.store(sent + 1, Ordering::Relaxed);
                let published: Result<i64, _> = publisher
                    .spublish(state.probe_channel.as_str(), sent + 1)
                    .await;
                if let Err(err) = published {
                    debug!(%err, "probe publish failed");
                    // Not the subscriber's fault: do not count this probe as lost.
                    state.probes_sent.store(sent, Ordering::Relaxed);
                }
            }
        });
    }

    fn channel(&self, topic: &str) -> String {
        TopicKeys::new(&self.prefix, topic).channel
    }

    /// Subscribes to the control channel (after every reconnection, and on every probe tick
    /// until it worked).
    async fn subscribe_control(&self) {
        let control = self.state.control_channel.clone();
        match self.subscriber.ssubscribe(control).await {
            Ok(()) => self.state.control_subscribed.store(true, Ordering::Relaxed),
            Err(err) => {
                if self.state.control_subscribed.swap(false, Ordering::Relaxed) {
                    warn!(%err, "control channel subscription failed; retrying with every probe (control calls reach this node only through revocations meanwhile)");
                } else {
                    debug!(%err, "control channel subscription failed again");
                }
            }
        }
    }

    /// The hash of `user`'s revocations (field: topic or `*`; value: the revocation's JSON).
    fn revocations_key(&self, user: &str) -> String {
        format!("{}revoked:{user}", self.prefix)
    }
}

/// The current publishing connection, if one is up.
#[derive(Debug, Default)]
struct PublisherSlot {
    /// Replaced on every reconnect; a `parking_lot` lock held only to clone or swap.
    client: parking_lot::RwLock<Option<Client>>,
}

impl PublisherSlot {
    fn current(&self) -> Option<Client> {
        self.client.read().clone()
    }

    fn set(&self, client: Option<Client>) {
        *self.client.write() = client;
    }
}

/// Keeps a publishing connection up: builds a client, connects, publishes it in the slot,
/// waits for the connection to end, backs off (exponentially, capped, with jitter), repeats.
async fn supervise_publisher(
    builder: Builder,
    slot: Arc<PublisherSlot>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        match builder.build() {
            Ok(client) => {
                let connection = client.connect();
                let connected = tokio::select! {
                    () = shutdown.cancelled() => {
                        let _ = client.quit().await;
                        return;
                    }
                    result = tokio::time::timeout(Duration::from_secs(5), client.wait_for_connect()) => {
                        matches!(result, Ok(Ok(())))
                    }
                };
                if connected {
                    slot.set(Some(client.clone()));
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            slot.set(None);
                            let _ = client.quit().await;
                            return;
                        }
                        result = connection => debug!(?result, "publisher connection ended"),
                    }
                    slot.set(None);
                } else {
                    connection.abort();
                }
            }
            Err(err) => warn!(%err, "cannot build a Redis client"),
        }
        // A connection that lived a while resets the backoff.
        if started.elapsed() > Duration::from_secs(10) {
            delay = Duration::from_millis(100);
        }
        let jitter = Duration::from_millis(rand::random_range(0..=100));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay + jitter) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What the publishing task needs.
#[derive(Debug)]
struct Publisher {
    slot: Arc<PublisherSlot>,
    script: Script,
    prefix: String,
    history: HistoryConfig,
    timeout: Duration,
}

/// Sends queued events to Redis in pipelines (one script call per topic in each), and reports
/// each event's outcome.
async fn publish_batches(
    publisher: Publisher,
    mut queue: mpsc::Receiver<PublishJob>,
    queued_bytes: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) {
    // A publish is written at most once and never waits for a reconnect: an event the caller
    // was told failed must not turn up later, replayed from the client's retry buffer.
    let options = fred::types::config::Options {
        fail_fast: true,
        max_attempts: Some(1),
        timeout: Some(publisher.timeout),
        ..Default::default()
    };
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            job = queue.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        batch.push(first);
        while batch.len() < PUBLISH_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let taken: usize = batch.iter().map(|job| job.tail.len()).sum();
        queued_bytes.fetch_sub(taken, Ordering::AcqRel);
        let Some(client) = publisher.slot.current() else {
            for job in batch.drain(..) {
                let _ = job.done.send(Err(BrokerError::Unavailable(
                    "not connected to Redis".to_owned(),
                )));
            }
            continue;
        };
        // One group per topic, in the order of each topic's first event; within a group the
        // events keep their call order (so do their offsets).
        let mut groups: Vec<(String, Vec<PublishJob>)> = Vec::new();
        for job in batch.drain(..) {
            match groups.iter_mut().find(|(topic, _)| *topic == job.topic) {
                Some((_, jobs)) => jobs.push(job),
                None => groups.push((job.topic.clone(), vec![job])),
            }
        }
        let mut outcomes = publisher.send(&client, &options, &groups, false).await;
        // Servers that did not know the script (restart, SCRIPT FLUSH, a new primary) ran
        // nothing: send those groups again with the script's body.
        let unknown: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Err(e) if no_script(e)))
            .map(|(i, _)| i)
            .collect();
        if !unknown.is_empty() {
            let again = publisher
                .send_some(&client, &options, &groups, &unknown)
                .await;
            for (i, outcome) in unknown.into_iter().zip(again) {
                outcomes[i] = outcome;
            }
        }
        for ((topic, jobs), outcome) in groups.into_iter().zip(outcomes) {
            match outcome.and_then(|reply| parse_publish_reply(&reply, jobs.len())) {
                Ok((epoch, results)) => {
                    for (job, (offset, outcome, id)) in jobs.into_iter().zip(results) {
                        let _ = job.done.send(Ok(Published {
                            position: Position::new(offset, epoch.clone()),
                            id: id.into(),
                            duplicate: outcome == 1,
                            superseded: outcome == 2,
                        }));
                    }
                }
                Err(err) => {
                    debug!(%err, topic, "publish failed");
                    for job in jobs {
                        let _ = job.done.send(Err(unavailable(&err)));
                    }
                }
            }
        }
    }
}

impl Publisher {
    /// One pipeline with a script call per group; the replies in group order.
    async fn send(
        &self,
        client: &Client,
        options: &fred::types::config::Options,
        groups: &[(String, Vec<PublishJob>)],
        load: bool,
    ) -> Vec<Result<Value, fred::error::Error>> {
        let all: Vec<usize> = (0..groups.len()).collect();
        self.pipeline(client, options, groups, &all, load).await
    }

    /// The groups at `which` again, with the script's body.
    async fn send_some(
        &self,
        client: &Client,
        options: &fred::types::config::Options,
        groups: &[(String, Vec<PublishJob>)],
        which: &[usize],
    ) -> Vec<Result<Value, fred::error::Error>> {
        self.pipeline(client, options, groups, which, true).await
    }

    async fn pipeline(
        &self,
        client: &Client,
        options: &fred::types::config::Options,
        groups: &[(String, Vec<PublishJob>)],
        which: &[usize],
        load: bool,
    ) -> Vec<Result<Value, fred::error::Error>> {
        let pipeline = client.pipeline();
        let with_options = pipeline.with_options(options);
        for &i in which {
            let (topic, jobs) = &groups[i];
            let (command, args) = self.call(topic, jobs, load);
            // Queued locally; sent by try_all below.
            let queued: Result<(), _> = with_options.custom(command, args).await;
            if let Err(err) = queued {
                debug!(%err, "could not queue a publish");
            }
        }
        pipeline.try_all().await
    }

    /// The script call for one topic's events.
    fn call(&self, topic: &str, jobs: &[PublishJob], load: bool) -> (CustomCommand, Vec<Value>) {
        let keys = TopicKeys::new(&self.prefix, topic);
        let (command, head) = self.script.command(keys.slot, load);
        let history = &self.history;
        let max_age = millis(history.max_age);
        let mut args = Vec::with_capacity(2 + 5 + jobs.len() + 9 + 5 * jobs.len());
        args.push(head);
        args.push(Value::from(5 + jobs.len() as i64));
        args.push(Value::from(keys.stream.as_str()));
        args.push(Value::from(keys.meta.as_str()));
        args.push(Value::from(keys.versions.as_str()));
        args.push(Value::from(keys.latest.as_str()));
        args.push(Value::from(keys.updated.as_str()));
        for job in jobs {
            args.push(Value::from(
                keys.idempotency(job.idempotency_key.as_deref()),
            ));
        }
        args.push(Value::from(&*broker::new_epoch()));
        args.push(Value::from(keys.channel.as_str()));
        args.push(Value::from(broker::retained(history, topic) as i64));
        args.push(Value::from(max_age));
        args.push(Value::from(millis(history.meta_ttl)));
        // An idempotency key lives as long as history; at least a second (PX must be > 0).
        args.push(Value::from(max_age.max(1000)));
        args.push(Value::from(if history.enabled { "1" } else { "0" }));
        args.push(Value::from(history.max_keys as i64));
        args.push(Value::from(millis(history.key_idle).max(1)));
        for job in jobs {
            args.push(Value::from(&*job.tail));
            args.push(Value::from(if job.idempotency_key.is_some() {
                "1"
            } else {
                "0"
            }));
            args.push(Value::from(&*job.id));
            args.push(Value::from(job.key.as_deref().unwrap_or("")));
            args.push(Value::from(
                i64::try_from(job.version.unwrap_or(0)).unwrap_or(i64::MAX),
            ));
        }
        (command, args)
    }
}

/// `{epoch, offset, outcome, id, …}` → the epoch and, per event, (offset, outcome, id).
#[allow(clippy::type_complexity)]
fn parse_publish_reply(
    reply: &Value,
    events: usize,
) -> Result<(Arc<str>, Vec<(u64, u64, String)>), fred::error::Error> {
    let bad = || {
        fred::error::Error::new(
            fred::error::ErrorKind::Parse,
            "unexpected reply from the publish script",
        )
    };
    let Value::Array(items) = reply else {
        return Err(bad());
    };
    if items.len() != 1 + 3 * events {
        return Err(bad());
    }
    let epoch: Arc<str> = items[0].as_string().ok_or_else(bad)?.into();
    let results = items[1..]
        .chunks(3)
        .map(|c| Some((c[0].as_u64()?, c[1].as_u64()?, c[2].as_string()?)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    Ok((epoch, results))
}

/// A duration in milliseconds, for the scripts.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn unavailable(err: &fred::error::Error) -> BrokerError {
    BrokerError::Unavailable(err.to_string())
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        topic: &str,
        message: &MessageTemplate,
        options: PublishOptions,
    ) -> BoxFuture<'static, Result<Published, BrokerError>> {
        // Fail fast while Redis is away instead of queueing behind the reconnect.
        if self.publisher.current().is_none() {
            return Box::pin(std::future::ready(Err(BrokerError::Unavailable(
                "not connected to Redis".to_owned(),
            ))));
        }
        let size = message.tail().len();
        // Reserve the bytes first: concurrent publishers cannot overshoot the budget together.
        if self.queued_bytes.fetch_add(size, Ordering::AcqRel) + size > self.queue_budget {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            return Box::pin(std::future::ready(Err(BrokerError::Overloaded)));
        }
        let (done, outcome) = oneshot::channel();
        let job = PublishJob {
            topic: topic.to_owned(),
            tail: message.tail().clone(),
            id: broker::message_id(message).into(),
            idempotency_key: options.idempotency_key,
            key: options.key,
            version: options.version,
            done,
        };
        let result = self.jobs.try_send(job);
        if result.is_err() {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
        }
        match result {
            Ok(()) => Box::pin(async move {
                outcome.await.unwrap_or_else(|_| {
                    Err(BrokerError::Unavailable("the publisher stopped".to_owned()))
                })
            }),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Box::pin(std::future::ready(Err(BrokerError::Overloaded)))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Box::pin(std::future::ready(Err(
                BrokerError::Unavailable("shutting down".to_owned()),
            ))),
        }
    }

    fn subscribe<'a>(&'a self, topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            if !self.subscriber.is_connected() {
                return Err(BrokerError::Unavailable(
                    "not connected to Redis".to_owned(),
                ));
            }
            let channels: Vec<String> = topics.iter().map(|t| self.channel(t)).collect();
            for group in slot_groups(channels, self.cluster) {
                // Each group lives on one shard; the groups go out concurrently.
                try_join_all(group.into_iter().map(|g| self.subscriber.ssubscribe(g)))
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, topics: &'a [String]) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            if !self.subscriber.is_connected() {
                return Err(BrokerError::Unavailable(
                    "not connected to Redis".to_owned(),
                ));
            }
            let channels: Vec<String> = topics.iter().map(|t| self.channel(t)).collect();
            for group in slot_groups(channels, self.cluster) {
                try_join_all(group.into_iter().map(|g| self.subscriber.sunsubscribe(g)))
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
            Ok(())
        })
    }

    fn history<'a>(
        &'a self,
        topic: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        Box::pin(async move {
            let args = [
                Value::from(after.to_string()),
                Value::from(limit as i64),
                Value::from(millis(self.history.max_age)),
                Value::from(millis(self.history.meta_ttl)),
            ];
            let reply = self.read_topic(&self.read, topic, &args).await?;
            parse_history(&reply).ok_or_else(|| {
                BrokerError::Unavailable("unexpected reply from the history script".to_owned())
            })
        })
    }

    fn snapshot<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Snapshot, BrokerError>> {
        Box::pin(async move {
            let args = [
                Value::from(millis(self.history.key_idle).max(1)),
                Value::from(self.history.max_keys as i64),
                Value::from(millis(self.history.meta_ttl)),
            ];
            let reply = self.read_topic(&self.snapshot, topic, &args).await?;
            parse_snapshot(&reply).ok_or_else(|| {
                BrokerError::Unavailable("unexpected reply from the snapshot script".to_owned())
            })
        })
    }

    fn is_ready(&self) -> bool {
        self.publisher.current().is_some_and(|c| c.is_connected())
            && self.subscriber.is_connected()
            && self.state.probe_ok.load(Ordering::Relaxed)
    }

    fn connection_epoch(&self) -> Option<watch::Receiver<u64>> {
        Some(self.state.epoch.subscribe())
    }

    fn control<'a>(&'a self, message: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let client = self.client()?;
            let _: i64 = client
                .spublish(self.state.control_channel.as_str(), message)
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(())
        })
    }

    fn revoke<'a>(
        &'a self,
        user: &'a str,
        revocation: &'a crate::control::Revocation,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let key = self.revocations_key(user);
            let slot = fred::util::redis_keyslot(key.as_bytes());
            let now = crate::control::unix_now();
            let keep_ms = revocation
                .until
                .saturating_sub(now)
                .saturating_mul(1000)
                .max(1);
            let args = vec![
                Value::from(revocation.topic.as_deref().unwrap_or("*")),
                Value::from(serde_json::to_string(revocation).expect("revocations serialize")),
                Value::from(i64::try_from(keep_ms).unwrap_or(i64::MAX)),
            ];
            self.run_script(&self.revoke, slot, &[key], args).await?;
            Ok(())
        })
    }

    fn revocations<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<crate::control::Revocation>, BrokerError>> {
        Box::pin(async move {
            let client = self.client()?;
            let all: HashMap<String, String> = client
                .hgetall(self.revocations_key(user))
                .await
                .map_err(|e| unavailable(&e))?;
            let now = crate::control::unix_now();
            Ok(all
                .values()
                .filter_map(|v| serde_json::from_str::<crate::control::Revocation>(v).ok())
                .filter(|r| r.until > now)
                .collect())
        })
    }
}

/// Presence in Redis (`redis/presence.lua`): per topic, under its hash tag, a sorted set of
/// `<user> <node>` entries scored by expiry, their details, and per user the number of nodes
/// it is present on; joins and leaves are decided by the script, atomically per topic.
impl crate::presence::PresenceStore for RedisBroker {
    fn update<'a>(
        &'a self,
        topic: &'a str,
        node: &'a str,
        upserts: &'a [crate::presence::Entry],
        removes: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<crate::presence::Change>, BrokerError>> {
        Box::pin(async move {
            let keys = TopicKeys::new(&self.prefix, topic);
            let mut args = Vec::with_capacity(4 + upserts.len() * 3 + removes.len());
            args.push(Value::from(node));
            args.push(Value::from(millis(ttl).max(1)));
            // The keys outlive the entries: a dead node's are still there to sweep.
            args.push(Value::from(millis(ttl * 4).max(1)));
            args.push(Value::from(upserts.len() as i64));
            for e in upserts {
                args.push(Value::from(&*e.user));
                args.push(Value::from(i64::from(e.connections)));
                args.push(Value::from(i64::try_from(e.since_ms).unwrap_or(0)));
            }
            args.extend(removes.iter().map(|u| Value::from(&**u)));
            let reply = self
                .run_script(&self.presence, keys.slot, &keys.presence, args)
                .await?;
            parse_presence_changes(&reply).ok_or_else(|| {
                BrokerError::Unavailable("unexpected reply from the presence script".to_owned())
            })
        })
    }

    fn list<'a>(
        &'a self,
        topic: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<crate::presence::Listing, BrokerError>> {
        Box::pin(async move {
            let keys = TopicKeys::new(&self.prefix, topic);
            let args = vec![Value::from(i64::try_from(max).unwrap_or(i64::MAX))];
            let reply = self
                .run_script(&self.presence_list, keys.slot, &keys.presence, args)
                .await?;
            parse_presence_list(&reply).ok_or_else(|| {
                BrokerError::Unavailable("unexpected reply from the presence list".to_owned())
            })
        })
    }
}

/// `{(user, 1|0, version, present)…}` → the changes, in decision order.
fn parse_presence_changes(reply: &Value) -> Option<Vec<crate::presence::Change>> {
    let items = match reply {
        Value::Array(items) => items.as_slice(),
        // An empty Lua table comes back as nil on RESP3.
        Value::Null => &[],
        _ => return None,
    };
    items
        .chunks(4)
        .map(|c| {
            Some(crate::presence::Change {
                user: c.first()?.as_string()?.into(),
                joined: c.get(1)?.as_u64()? == 1,
                version: c.get(2)?.as_u64()?,
                present: c.get(3)?.as_u64()?,
            })
        })
        .collect()
}

/// `{count, 0}` (counts only) or `{count, 1, (member, details)…}` → the listing.
fn parse_presence_list(reply: &Value) -> Option<crate::presence::Listing> {
    let Value::Array(items) = reply else {
        return None;
    };
    let count = usize::try_from(items.first()?.as_u64()?).ok()?;
    if items.get(1)?.as_u64()? == 0 {
        return Some(crate::presence::Listing {
            count,
            members: None,
        });
    }
    let entries = items[2..]
        .chunks(2)
        .map(|pair| {
            let member = pair.first()?.as_string()?;
            let details = pair.get(1)?.as_string()?;
            let (user, _node) = member.split_once(' ')?;
            let (connections, since) = details.split_once(':')?;
            Some(crate::presence::Entry {
                user: user.into(),
                connections: connections.parse().ok()?,
                since_ms: since.parse().ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let members = crate::presence::aggregate(entries);
    Some(crate::presence::Listing {
        count: members.len(),
        members: Some(members),
    })
}

/// `{epoch, top, first, tail…}` → the history it describes.
fn parse_history(reply: &Value) -> Option<History> {
    let Value::Array(items) = reply else {
        return None;
    };
    let epoch: Arc<str> = items.first()?.as_string()?.into();
    let top = items.get(1)?.as_u64()?;
    let first = items.get(2)?.as_u64()?;
    let events = items[3..]
        .iter()
        .map(|tail| StreamEvent::from_tail(&tail.as_string()?))
        .collect::<Option<Vec<_>>>()?;
    Some(History {
        top: Position::new(top, epoch),
        first,
        events,
    })
}

/// `{epoch, top, tail…}` → the snapshot it describes, in offset order.
fn parse_snapshot(reply: &Value) -> Option<Snapshot> {
    let Value::Array(items) = reply else {
        return None;
    };
    let epoch: Arc<str> = items.first()?.as_string()?.into();
    let top = items.get(1)?.as_u64()?;
    let mut events = items[2..]
        .iter()
        .map(|tail| StreamEvent::from_tail(&tail.as_string()?))
        .collect::<Option<Vec<_>>>()?;
    events.sort_by_key(|e| e.offset);
    Some(Snapshot {
        top: Position::new(top, epoch),
        events,
    })
}

/// Splits channels into command batches. In a cluster every `SSUBSCRIBE` must name channels of
/// one hash slot; standalone Redis takes many channels per command. Returns rounds of at most
/// 1,000 commands (or channels) to keep any one burst bounded.
fn slot_groups(channels: Vec<String>, cluster: bool) -> Vec<Vec<Vec<String>>> {
    let commands: Vec<Vec<String>> = if cluster {
        let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
        for c in channels {
            by_slot
                .entry(fred::util::redis_keyslot(c.as_bytes()))
                .or_default()
                .push(c);
        }
        by_slot.into_values().collect()
    } else {
        channels.chunks(1000).map(<[String]>::to_vec).collect()
    };
    commands.chunks(1000).map(<[Vec<String>]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_with_seed_lists() {
        let config = parse_url("redis-cluster://:secret@127.0.0.1:7000,127.0.0.1:7001").unwrap();
        let ServerConfig::Clustered { hosts, .. } = &config.server else {
            panic!("not clustered")
        };
        assert_eq!(hosts.len(), 2);
        assert_eq!(config.password.as_deref(), Some("secret"));
        assert!(matches!(
            parse_url("redis://127.0.0.1:6379").unwrap().server,
            ServerConfig::Centralized { .. }
        ));
        assert!(parse_url("redis-cluster://a:1,b").is_err());
        assert!(parse_url("http://x").is_err());
    }

    #[test]
    fn cluster_commands_never_mix_slots() {
        let channels: Vec<String> = (0..500)
            .map(|i| format!("lockstep:{{/user/u{i}}}"))
            .collect();
        for round in slot_groups(channels.clone(), true) {
            for command in round {
                let slot = fred::util::redis_keyslot(command[0].as_bytes());
                assert!(
                    command
                        .iter()
                        .all(|c| fred::util::redis_keyslot(c.as_bytes()) == slot)
                );
            }
        }
        let standalone = slot_groups(channels, false);
        assert_eq!(standalone.len(), 1);
        assert_eq!(standalone[0].len(), 1);
    }
}
