//! `lockstep serve`: build the node from its configuration and run it.

use crate::config::{Config, LogFormat, redact};
use anyhow::Context as _;
use api::locks::store::LockStore;
use api::locks::{LockNode, Locks};
use api::{
    ApiState, EventOptions, EventPage, EventPublisher, NodeSessions, PresencePage, PublishFailure,
    PublishedEvent, ReadinessCheck, StatePage,
};
use axum::Router;
use axum::serve::ListenerExt as _;
use futures_util::future::BoxFuture;
use hub::{
    Broker, Fanout, Hub, MemoryBroker, MemoryPresence, PresenceStore, PublishError, PublishOptions,
    Registry,
};
use protocol::auth::AuthConfig;
use protocol::{Authenticator, Disconnect, EventType, SessionKey, Topic};
use serde_json::value::RawValue;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, warn};

/// `lockstep migrate`: runs the lock store's migrations and exits.
///
/// # Errors
///
/// When the database cannot be reached or migrated.
pub(crate) fn migrate(config: &Config) -> anyhow::Result<()> {
    init_tracing(config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if config.database.url.starts_with("sqlite:") {
            std::fs::create_dir_all(&config.data_dir)?;
        }
        LockStore::open(&config.database)?.migrate().await?;
        info!(url = %redact(&config.database.url), "migrations applied");
        Ok(())
    })
}

/// # Errors
///
/// When the node cannot start: keys cannot be read, the address cannot be bound.
pub(crate) fn run(config: Config) -> anyhow::Result<()> {
    init_tracing(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config))
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tungstenite's trace output prints whole WebSocket frames, and a STOMP CONNECT frame
    // carries the client's token: those events are dropped whatever level is configured, so no
    // log holds one. A filter of its own, because a directive would also raise these targets to
    // its level when the configured one is lower.
    let never_trace = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE
            && NEVER_TRACE
                .iter()
                .any(|target| meta.target().starts_with(target)))
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(never_trace);
    let stderr = std::io::stderr;
    match config.log_format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(stderr))
            .init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(stderr))
            .init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let node = Node::build(&config).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local = listener.local_addr()?;
    announce(local);
    info!(addr = %local, hub = config.hub_enabled, api = config.api_enabled, "lockstep listening");
    node.run(listener, shutdown_signal()).await
}

/// A node built from its configuration: the router it serves and what its shutdown drains.
/// [`Node::build`] wires the parts (broker, hub, lock store, webhooks, API, console);
/// [`Node::run`] serves a bound listener until `shutdown`, then drains in order.
struct Node {
    app: Router,
    hub: Hub,
    locks: Arc<Locks>,
    webhooks: Option<Arc<api::webhooks::Webhooks>>,
    /// Cancelled after the hub has drained, so the broker (and the webhook tasks) outlive the
    /// sessions they serve.
    broker_stop: CancellationToken,
    send_buffer: usize,
    grace: std::time::Duration,
}

impl Node {
    /// Builds every part of the node from `config`. Nothing binds yet.
    ///
    /// # Errors
    ///
    /// When keys cannot be read, the metrics recorder cannot be installed, the data directory
    /// cannot be created or the SQLite store cannot be migrated.
    async fn build(config: &Config) -> anyhow::Result<Node> {
        for warning in config.warnings() {
            warn!("{warning}");
        }
        let (auth, hs256_secret) = authenticator(config)?;
        let auth = Arc::new(auth);
        let session_key = session_key(config, hs256_secret.as_deref())?;
        if let Some(path) = &config.jwt.public_keys
            && !config.jwt.reload_interval.is_zero()
        {
            tokio::spawn(reload_public_keys(
                auth.clone(),
                path.clone(),
                config.jwt.reload_interval,
            ));
        }
        // Cancelled after the hub has drained, so the broker outlives the sessions it serves.
        let broker_stop = CancellationToken::new();
        let metrics = install_metrics(&broker_stop)?;
        if config.database.url.starts_with("sqlite:") {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
        }
        let registry = Arc::new(Registry::new());
        // The brokers deliver through the node's fan-out, which keeps each topic in offset order.
        let fanout = Fanout::new(
            registry.clone(),
            config.hub.history.max_replay,
            config.hub.outbound_queue,
        );
        let node_id = ulid::Ulid::new().to_string();
        let (broker, presence) = start_broker(config, &fanout, &node_id, &broker_stop)?;
        // The hub tells the lock service when sessions end; the lock service publishes through the
        // hub. The observer is made first and pointed at the locks once they exist.
        let sessions = Arc::new(LockSessions::default());
        let mut hub_config = config.hub.clone();
        hub_config.node_id.clone_from(&node_id);
        hub_config.session_key = session_key.clone();
        let store = LockStore::open(&config.database)?;
        info!(url = %redact(&config.database.url), "lock store");
        // Webhooks queue in the lock store's database; the hub tells them of presence changes and
        // the lock store moves lock events into their queue.
        let webhooks =
            api::webhooks::Webhooks::start(&store, config.webhooks.clone(), &node_id, &broker_stop);
        if webhooks.is_some() {
            info!(endpoints = config.webhooks.endpoints.len(), "webhooks on");
        }
        let store = store.forwarding(webhooks.as_ref().and_then(|w| w.lock_forward()));
        let hub = Hub::new(
            hub_config,
            auth.clone(),
            registry,
            fanout,
            broker,
            presence,
            hub::Observers {
                sessions: Some(sessions.clone()),
                presence: webhooks
                    .clone()
                    .map(|w| Arc::new(PresenceHooks(w)) as Arc<dyn hub::PresenceObserver>),
            },
        );
        let publisher: Arc<dyn EventPublisher> = Arc::new(HubPublisher(hub.clone()));
        let migrated = migrate_store(config, &store, &broker_stop).await?;
        let locks = Locks::start(
            store.clone(),
            config.locks.clone(),
            LockNode {
                id: node_id.clone(),
                sessions: session_key,
                open: Arc::new(HubSessions(hub.clone())),
            },
            publisher.clone(),
            &broker_stop,
        );
        if config.database.url.starts_with("sqlite:") {
            // A local file: the node registers at once, so its sessions can take locks from the
            // first moment it says it is listening.
            if tokio::time::timeout(std::time::Duration::from_secs(5), locks.wait_registered())
                .await
                .is_err()
            {
                warn!(
                    "the node could not register in the SQLite lock store yet; session-bound locks wait for it"
                );
            }
        }
        let _ = sessions.0.set(locks.clone());

        let mut app = Router::new();
        if config.hub_enabled {
            app = app.merge(hub::router(hub.clone()));
        }
        if config.api_enabled {
            let parts = ApiParts {
                hub: hub.clone(),
                store,
                migrated,
                locks: locks.clone(),
                auth,
                publisher,
                metrics,
            };
            app = app.merge(api_routes(config, parts).await);
            if config.hub_enabled {
                // Development tokens only where nothing else can mint tokens: the embedded
                // default's generated secret, on a single node listening on loopback (the
                // container image listens on 0.0.0.0: its network gets none).
                let dev_secret = hs256_secret.clone().filter(|_| {
                    config.redis.is_none()
                        && config.jwt.secret.is_none()
                        && config.jwt.public_keys.is_none()
                        && config.listen.ip().is_loopback()
                });
                app = app.merge(crate::console::router(dev_secret));
            }
        }
        Ok(Node {
            app,
            hub,
            locks,
            webhooks,
            broker_stop,
            send_buffer: config.send_buffer_bytes,
            grace: config.shutdown_grace,
        })
    }

    /// Serves `listener` until `shutdown` resolves; then closes the WebSockets (4010), records
    /// their sessions' closes for the lock service, finishes requests, stops the broker and the
    /// webhook tasks, all within the shutdown grace.
    ///
    /// # Errors
    ///
    /// None today; the signature leaves room for a server that fails to start.
    async fn run(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Node {
            app,
            hub,
            locks,
            webhooks,
            broker_stop,
            send_buffer,
            grace,
        } = self;
        let stop = CancellationToken::new();
        let listener = listener.tap_io(move |tcp| {
            // Events are small and latency matters more than packet count; writes are already
            // coalesced per wake-up.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "could not set TCP_NODELAY");
            }
            // A backlog kept in the hub's queue can still be conflated; in the kernel it cannot.
            if send_buffer > 0
                && let Err(err) = socket2::SockRef::from(&*tcp).set_send_buffer_size(send_buffer)
            {
                tracing::debug!(%err, "could not set SO_SNDBUF");
            }
        });
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned());
        let server = tokio::spawn(async move { server.await });

        shutdown.await;
        info!(
            ?grace,
            "shutting down: closing connections with 4010, finishing requests"
        );
        stop.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let sessions_done = hub.shutdown(grace).await;
        // The closed WebSockets' session-bound locks must be on record before the node goes, so
        // another node (or this one, restarted) releases them after the grace.
        if tokio::time::timeout_at(deadline, locks.flush_closed_sessions())
            .await
            .is_err()
        {
            warn!("could not record every closed session in time; their locks will expire by TTL");
        }
        let requests_done = tokio::time::timeout_at(deadline, server).await.is_ok();
        broker_stop.cancel();
        // The webhook writer's last batch and the workers' lease releases (another node takes
        // over at once instead of after the lease); bounded, the node is leaving.
        if let Some(hooks) = &webhooks
            && tokio::time::timeout(std::time::Duration::from_secs(2), hooks.finished())
                .await
                .is_err()
        {
            warn!("webhook tasks did not stop in time; queued events may be lost");
        }
        if sessions_done && requests_done {
            info!("shutdown complete");
        } else {
            warn!(
                sessions_done,
                requests_done, "shutdown grace elapsed; exiting anyway"
            );
        }
        Ok(())
    }
}

/// Installs the Prometheus recorder and folds histogram samples on a timer until `stop`.
fn install_metrics(
    stop: &CancellationToken,
) -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        // Histograms as Prometheus histograms (aggregatable across nodes), not summaries.
        .set_buckets(LATENCY_BUCKETS)
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    hub::metrics::describe();
    api::metrics::describe();
    // Histogram samples wait in the recorder until upkeep folds them into buckets; without a
    // scrape (or on a node that serves no API, so no /metrics) they would pile up, so fold them
    // on a timer, on every node.
    let upkeep = metrics.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(
        async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = upkeep_stop.cancelled() => return,
                    _ = ticker.tick() => upkeep.run_upkeep(),
                }
            }
        }
        .instrument(tracing::info_span!("metrics_upkeep")),
    );
    Ok(metrics)
}

/// The broker and the presence store: Redis (both beside each topic's stream) or in memory.
fn start_broker(
    config: &Config,
    fanout: &Arc<Fanout>,
    node_id: &str,
    stop: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Broker>, Arc<dyn PresenceStore>)> {
    let history = &config.hub.history;
    Ok(match &config.redis {
        Some(settings) => {
            info!(url = %redact(&settings.url), node = %node_id, "cluster broker: Redis");
            let redis = hub::redis::RedisBroker::start(
                settings,
                history,
                fanout.clone(),
                node_id,
                stop.clone(),
            )?;
            (redis.clone(), redis)
        }
        None => (
            Arc::new(MemoryBroker::new(fanout.clone(), history.clone())),
            Arc::new(MemoryPresence::new()),
        ),
    })
}

/// Migrates the lock store: the embedded SQLite file before binding (so the node is ready when
/// it says it is listening, and a broken file stops it with a clear error), a database server
/// in the background until it answers (the node comes up not ready). Answers the flag that
/// says it is done.
async fn migrate_store(
    config: &Config,
    store: &LockStore,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<std::sync::atomic::AtomicBool>> {
    let migrated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if config.database.url.starts_with("sqlite:") {
        store
            .migrate()
            .await
            .context("migrating the SQLite lock store")?;
        migrated.store(true, std::sync::atomic::Ordering::SeqCst);
    } else {
        tokio::spawn(migrate_until_done(
            store.clone(),
            migrated.clone(),
            stop.clone(),
        ));
    }
    Ok(migrated)
}

/// What the HTTP API is built on.
struct ApiParts {
    hub: Hub,
    store: LockStore,
    migrated: Arc<std::sync::atomic::AtomicBool>,
    locks: Arc<Locks>,
    auth: Arc<Authenticator>,
    publisher: Arc<dyn EventPublisher>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// The HTTP API's routes: readiness checks, `/metrics`, storage, locks and control.
async fn api_routes(config: &Config, parts: ApiParts) -> Router {
    let ApiParts {
        hub,
        store,
        migrated,
        locks,
        auth,
        publisher,
        metrics,
    } = parts;
    let checks: Vec<Arc<dyn ReadinessCheck>> = vec![
        Arc::new(BrokerCheck(hub.clone())),
        Arc::new(ControlCheck(hub.clone())),
        Arc::new(StoreCheck {
            store,
            migrated,
            locks: locks.clone(),
        }),
    ];
    let gauges = hub.clone();
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        gauges.record_gauges();
        metrics.render()
    });
    let storage = match &config.storage {
        Some(settings) => {
            info!(bucket = %settings.bucket, endpoint = ?settings.endpoint, "object storage");
            Some(api::presign::Storage::new(settings.clone()).await)
        }
        None => {
            info!("object storage not configured: presign answers 503 storage_not_configured");
            None
        }
    };
    let backends = api::Backends {
        locks: Some(locks),
        storage,
        control: Some(Arc::new(HubControl(hub))),
    };
    let state = ApiState::new(
        config.api.clone(),
        auth,
        publisher,
        checks,
        Some(render),
        backends,
    );
    api::app(state)
}

/// Log targets whose `trace` events are never written: they contain message payloads, which may
/// hold tokens. Matched as prefixes of the event's target (`tungstenite::protocol`, …).
const NEVER_TRACE: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Latency histogram buckets, in seconds: sub-millisecond broker round trips up to requests
/// that hit the 30 s timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// One line on stdout with the bound address, so scripts (and the test harness) can find a
/// node started on port 0.
#[allow(clippy::print_stdout)]
fn announce(addr: SocketAddr) {
    println!("lockstep listening on http://{addr}");
    let _ = std::io::stdout().flush();
}

/// What `serve` would refuse before binding, checked without side effects (no secret is
/// generated, nothing connects): `config check` runs it.
///
/// # Errors
///
/// Every problem found, one line each.
pub(crate) fn preflight(config: &Config) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(path) = &config.jwt.public_keys {
        match std::fs::read_to_string(path) {
            Ok(keys) => {
                let auth = AuthConfig {
                    hs256_secret: config.jwt.secret.clone().map(String::into_bytes),
                    public_keys: Some(keys),
                    issuer: config.jwt.issuer.clone(),
                    audience: config.jwt.audience.clone(),
                    leeway_secs: config.jwt.leeway.as_secs(),
                };
                if let Err(err) = Authenticator::new(&auth) {
                    problems.push(format!("jwt.public_keys {}: {err}", path.display()));
                }
            }
            Err(err) => problems.push(format!("jwt.public_keys {}: {err}", path.display())),
        }
    }
    if config.data_dir.exists() && !config.data_dir.is_dir() {
        problems.push(format!(
            "data_dir {} exists and is not a directory",
            config.data_dir.display()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The key session ids are signed with: `session_secret`, else one derived from the HS256
/// secret (every node of a cluster shares it), else one generated into the data directory (a
/// node that verifies with public keys only; a cluster of those needs `session_secret`).
fn session_key(config: &Config, hs256_secret: Option<&str>) -> anyhow::Result<SessionKey> {
    Ok(match (&config.jwt.session_secret, hs256_secret) {
        (Some(secret), _) => SessionKey::new(secret.as_bytes()),
        (None, Some(secret)) => SessionKey::derived_from(secret.as_bytes()),
        (None, None) => SessionKey::new(
            crate::secret::load_or_create_file(&config.data_dir, crate::secret::SESSION_FILE)?
                .as_bytes(),
        ),
    })
}

/// Re-reads the public key file whenever it changes (checked every `every`), so a JWKS
/// rotation takes effect without a restart. A file that fails to parse leaves the keys in use.
async fn reload_public_keys(
    auth: Arc<Authenticator>,
    path: std::path::PathBuf,
    every: std::time::Duration,
) {
    let stamp = |path: &std::path::Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match std::fs::read_to_string(&path) {
            Ok(text) => match auth.reload_public_keys(&text) {
                Ok(keys) => info!(path = %path.display(), keys, "reloaded the public keys"),
                Err(err) => {
                    warn!(path = %path.display(), %err, "the public key file changed but does not parse; keeping the keys in use");
                }
            },
            Err(err) => {
                warn!(path = %path.display(), %err, "cannot read the public key file; keeping the keys in use");
            }
        }
    }
}

/// The verifier, and the HS256 secret it uses (configured or generated), if any.
fn authenticator(config: &Config) -> anyhow::Result<(Authenticator, Option<String>)> {
    let jwt = &config.jwt;
    let public_keys = match &jwt.public_keys {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading jwt.public_keys {}", path.display()))?,
        ),
        None => None,
    };
    let secret = match (&jwt.secret, &public_keys) {
        (Some(secret), _) => Some(secret.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(crate::secret::load_or_create(&config.data_dir)?),
    };
    let auth = AuthConfig {
        hs256_secret: secret.clone().map(String::into_bytes),
        public_keys,
        issuer: jwt.issuer.clone(),
        audience: jwt.audience.clone(),
        leeway_secs: jwt.leeway.as_secs(),
    };
    Ok((Authenticator::new(&auth)?, secret))
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The control API acts through the hub.
#[derive(Debug)]
struct HubControl(Hub);

impl api::control::ControlPlane for HubControl {
    fn revoke<'a>(
        &'a self,
        user: &'a str,
        topic: Option<&'a Topic>,
    ) -> BoxFuture<'a, Result<api::control::RevocationView, String>> {
        Box::pin(async move {
            let r = match topic {
                None => self.0.disconnect_user(user).await,
                Some(topic) => self.0.unsubscribe_user(user, topic).await,
            }
            .map_err(|e| e.to_string())?;
            Ok(api::control::RevocationView::new(
                user,
                r.topic.as_deref(),
                r.cutoff,
                r.until,
            ))
        })
    }

    fn is_revoked<'a>(
        &'a self,
        user: &'a str,
        topic: &'a Topic,
        issued_at: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            self.0
                .is_revoked(user, topic, issued_at)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn connections<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<api::control::ConnectionsView, String>> {
        Box::pin(async move {
            let found = self
                .0
                .user_connections(user)
                .await
                .map_err(|e| e.to_string())?;
            Ok(api::control::ConnectionsView {
                user: user.to_owned(),
                connections: found
                    .connections
                    .into_iter()
                    .map(|c| api::control::ConnectionView {
                        node: c.node,
                        session: c.session,
                        since: humantime::format_rfc3339_millis(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.since_ms),
                        )
                        .to_string(),
                        topics: c.topics,
                    })
                    .collect(),
                nodes_answered: found.answered,
                nodes_missing: found.missing,
            })
        })
    }
}

/// The API publishes through the hub.
#[derive(Debug)]
struct HubPublisher(Hub);

impl EventPublisher for HubPublisher {
    fn publish<'a>(
        &'a self,
        topic: &'a Topic,
        event_type: &'a EventType,
        data: &'a RawValue,
        options: EventOptions,
    ) -> BoxFuture<'a, Result<PublishedEvent, PublishFailure>> {
        let options = PublishOptions {
            idempotency_key: options.idempotency_key,
            key: options.key,
            version: options.version,
        };
        // Called now, not when the future is first polled: the event takes its place in the
        // topic's order here, so a caller may start several publishes and await them after.
        let confirmed = self.0.publish(topic, event_type, data, options);
        Box::pin(async move {
            confirmed
                .await
                .map(|p| PublishedEvent {
                    id: p.id.to_string(),
                    position: p.position,
                    duplicate: p.duplicate,
                    superseded: p.superseded,
                })
                .map_err(|err| match err {
                    PublishError::Broker(e) => PublishFailure::Unavailable(e.to_string()),
                    PublishError::ShuttingDown => PublishFailure::ShuttingDown,
                    PublishError::TooLarge { size, limit } => {
                        PublishFailure::TooLarge { size, limit }
                    }
                })
        })
    }

    fn snapshot<'a>(
        &'a self,
        topic: &'a Topic,
    ) -> BoxFuture<'a, Result<StatePage, PublishFailure>> {
        Box::pin(async move {
            let snapshot = self
                .0
                .snapshot(topic)
                .await
                .map_err(|e| PublishFailure::Unavailable(e.to_string()))?;
            Ok(StatePage {
                top: snapshot.top,
                events: snapshot
                    .events
                    .into_iter()
                    .filter_map(|e| {
                        let key = e.message.key()?;
                        Some((e.offset, key, e.message.body().to_owned()))
                    })
                    .collect(),
            })
        })
    }

    fn presence<'a>(
        &'a self,
        topic: &'a Topic,
    ) -> BoxFuture<'a, Result<PresencePage, PublishFailure>> {
        Box::pin(async move {
            let listing = self
                .0
                .presence(topic)
                .await
                .map_err(|e| PublishFailure::Unavailable(e.to_string()))?;
            Ok(PresencePage {
                count: listing.count,
                members: listing.members.map(|members| {
                    members
                        .into_iter()
                        .map(|m| (m.user.to_string(), m.connections, m.since))
                        .collect()
                }),
            })
        })
    }

    fn history<'a>(
        &'a self,
        topic: &'a Topic,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<EventPage, PublishFailure>> {
        Box::pin(async move {
            let history = self
                .0
                .history(topic, after, limit)
                .await
                .map_err(|e| PublishFailure::Unavailable(e.to_string()))?;
            Ok(EventPage {
                top: history.top,
                first: history.first,
                events: history
                    .events
                    .into_iter()
                    .map(|e| (e.offset, e.message.body().to_owned()))
                    .collect(),
            })
        })
    }
}

/// Runs the lock store's migrations, retrying with backoff while the database is down.
async fn migrate_until_done(
    store: LockStore,
    done: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match store.migrate().await {
            Ok(()) => {
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                info!("lock store ready");
                return;
            }
            Err(err) => warn!(%err, retry_in = ?delay, "lock store not ready"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

/// The lock service's view of the hub's sessions.
#[derive(Debug)]
struct HubSessions(Hub);

impl NodeSessions for HubSessions {
    fn is_open(&self, session: &str) -> bool {
        self.0.is_session_open(session)
    }

    fn node_expired(&self) {
        self.0.close_all(Disconnect::NODE_EXPIRED);
    }
}

/// Turns the hub's presence decisions into webhook events.
#[derive(Debug)]
struct PresenceHooks(Arc<api::webhooks::Webhooks>);

impl hub::PresenceObserver for PresenceHooks {
    fn presence_changed(&self, topic: &str, change: &hub::PresenceChange) {
        // In the order a receiver expects: the topic is occupied before its first user joined,
        // and vacated after its last one left.
        let kind = if change.joined {
            hub::presence::JOINED
        } else {
            hub::presence::LEFT
        };
        let occupancy = match change.occupancy() {
            Some(hub::Occupancy::Occupied) => Some("topic.occupied"),
            Some(hub::Occupancy::Vacated) => Some("topic.vacated"),
            None => None,
        };
        if change.joined
            && let Some(occupied) = occupancy
        {
            self.0.emit(occupied, topic, "{}");
        }
        // Built only when wanted: this runs for every presence change of the node.
        if self.0.wants(kind) {
            let user = serde_json::json!({ "user": &*change.user }).to_string();
            self.0.emit(kind, topic, &user);
        }
        if !change.joined
            && let Some(vacated) = occupancy
        {
            self.0.emit(vacated, topic, "{}");
        }
    }
}

/// Hands closed sessions to the lock service once it exists.
#[derive(Debug, Default)]
struct LockSessions(std::sync::OnceLock<Arc<Locks>>);

impl hub::SessionObserver for LockSessions {
    fn session_closed(&self, session_id: &str, _user: &str) {
        if let Some(locks) = self.0.get() {
            locks.session_closed(session_id);
        }
    }
}

#[derive(Debug)]
struct StoreCheck {
    store: LockStore,
    migrated: Arc<std::sync::atomic::AtomicBool>,
    /// Ready once the node registered in the store (its sessions can take locks).
    locks: Arc<Locks>,
}

impl ReadinessCheck for StoreCheck {
    fn name(&self) -> &'static str {
        "lock_store"
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.migrated.load(std::sync::atomic::Ordering::SeqCst)
                && self.locks.is_registered()
                && tokio::time::timeout(std::time::Duration::from_secs(2), self.store.ping())
                    .await
                    .unwrap_or(false)
        })
    }
}

#[derive(Debug)]
struct BrokerCheck(Hub);

/// The node hears the control channel (its own announcements come back): otherwise control
/// calls reach its connections only at their next `CONNECT`, `SUBSCRIBE` or refresh.
#[derive(Debug)]
struct ControlCheck(Hub);

impl ReadinessCheck for ControlCheck {
    fn name(&self) -> &'static str {
        "control"
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.0.control_in_step()))
    }
}

impl ReadinessCheck for BrokerCheck {
    fn name(&self) -> &'static str {
        "broker"
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.0.is_ready()))
    }
}
