//! The cluster broker on Redis, through fred: `SPUBLISH`/`SSUBSCRIBE` on standalone Redis and on
//! Redis Cluster alike.
//!
//! Sharded pub/sub spreads topics over a cluster's shards (a node receives only the shards it
//! subscribed to), and on standalone Redis 7 the same commands behave as plain pub/sub, so one
//! code path serves both. A message on the wire is exactly the `MESSAGE` tail the publishing
//! node encoded ([`MessageTemplate::tail`]); receiving nodes hand it to their registry without
//! re-encoding.
//!
//! Liveness: fred reconnects with capped exponential backoff and jitter. Every (re)connection of
//! the subscriber connection bumps [`RedisBroker`]'s connection epoch, which makes the hub's
//! subscription manager resubscribe every topic the node holds. A pub/sub connection can also
//! go silent while looking connected; a probe published to this node's own channel on an
//! interval must come back, or the subscriber connection is forced to reconnect.

use crate::broker::{Broker, BrokerError};
use crate::registry::Registry;
use fred::prelude::*;
use fred::types::RespVersion;
use fred::types::config::{ClusterDiscoveryPolicy, UnresponsiveConfig};
use futures_util::future::{BoxFuture, try_join_all};
use protocol::MessageTemplate;
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
    channel: String,
    tail: Arc<str>,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// The Redis broker.
#[derive(Debug)]
pub struct RedisBroker {
    /// Publishes (and probes). Separate from the subscriber so a burst of publishes never
    /// queues behind subscription traffic.
    publisher: Arc<PublisherSlot>,
    /// Feeds the publishing task, which pipelines whatever accumulated while the previous
    /// pipeline was in flight: one round trip carries many events, in call order.
    jobs: mpsc::Sender<PublishJob>,
    /// Bytes of the events in `jobs`, bounded by `queue_budget`.
    queued_bytes: Arc<AtomicUsize>,
    queue_budget: usize,
    subscriber: Client,
    cluster: bool,
    prefix: String,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    probe_channel: String,
    probes_sent: AtomicU64,
    probes_seen: AtomicU64,
    probe_ok: AtomicBool,
    /// Bumped on every subscriber (re)connection and cluster change.
    epoch: watch::Sender<u64>,
}

impl RedisBroker {
    /// Creates the clients and starts connecting in the background; the node starts (not
    /// ready) even while Redis is down. `node_id` names this node's probe channel.
    ///
    /// # Errors
    ///
    /// When the URL is invalid.
    pub fn start(
        settings: &RedisSettings,
        registry: Arc<Registry>,
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
            state,
        });
        tokio::spawn(publish_batches(
            broker.publisher.clone(),
            queue,
            queued_bytes,
            settings.command_timeout,
            shutdown.clone(),
        ));
        let shutdown_for_publisher = shutdown.clone();
        broker.spawn_tasks(registry, settings.probe_interval, shutdown);
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
        registry: Arc<Registry>,
        probe_interval: Duration,
        shutdown: CancellationToken,
    ) {
        // Inbound messages → registry.
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
                        let Some(topic) = channel.strip_prefix(prefix.as_str()) else {
                            continue;
                        };
                        let Some(tail) = message
                            .value
                            .as_bytes()
                            .and_then(|b| std::str::from_utf8(b).ok())
                        else {
                            warn!(channel, "ignoring a non-UTF-8 message on a topic channel");
                            continue;
                        };
                        registry.deliver(topic, &MessageTemplate::from_tail(Arc::from(tail)));
                    }
                    Err(RecvError::Lagged(n)) => {
                        warn!(lost = n, "fell behind Redis pub/sub; events were dropped");
                        metrics::counter!(crate::metrics::BROKER_LAGGED).increment(n);
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
        format!("{}{topic}", self.prefix)
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

/// Sends queued events to Redis in pipelines, and reports each event's outcome.
async fn publish_batches(
    publisher: Arc<PublisherSlot>,
    mut queue: mpsc::Receiver<PublishJob>,
    queued_bytes: Arc<AtomicUsize>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    // A publish is written at most once and never waits for a reconnect: an event the caller
    // was told failed must not turn up later, replayed from the client's retry buffer.
    let options = fred::types::config::Options {
        fail_fast: true,
        max_attempts: Some(1),
        timeout: Some(timeout),
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
        let Some(client) = publisher.current() else {
            for job in batch.drain(..) {
                let _ = job.done.send(Err(BrokerError::Unavailable(
                    "not connected to Redis".to_owned(),
                )));
            }
            continue;
        };
        let pipeline = client.pipeline();
        let with_options = pipeline.with_options(&options);
        for job in &batch {
            // Queued locally; sent by try_all below.
            let queued: Result<(), _> = with_options
                .spublish(job.channel.as_str(), &*job.tail)
                .await;
            if let Err(err) = queued {
                debug!(%err, "could not queue a publish");
            }
        }
        let results: Vec<Result<i64, fred::error::Error>> = pipeline.try_all().await;
        let mut results = results.into_iter();
        for job in batch.drain(..) {
            let outcome = match results.next() {
                Some(Ok(_receivers)) => Ok(()),
                Some(Err(err)) => Err(unavailable(&err)),
                None => Err(BrokerError::Unavailable("no reply from Redis".to_owned())),
            };
            let _ = job.done.send(outcome);
        }
    }
}

fn unavailable(err: &fred::error::Error) -> BrokerError {
    BrokerError::Unavailable(err.to_string())
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        topic: &str,
        message: &MessageTemplate,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
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
            channel: self.channel(topic),
            tail: message.tail().clone(),
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

    fn is_ready(&self) -> bool {
        self.publisher.current().is_some_and(|c| c.is_connected())
            && self.subscriber.is_connected()
            && self.state.probe_ok.load(Ordering::Relaxed)
    }

    fn connection_epoch(&self) -> Option<watch::Receiver<u64>> {
        Some(self.state.epoch.subscribe())
    }
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
        let channels: Vec<String> = (0..500).map(|i| format!("lockstep:/user/u{i}")).collect();
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
