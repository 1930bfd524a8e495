//! Configuration: a TOML file plus `LOCKSTEP_*` environment variables, typed and validated
//! before anything binds.
//!
//! Every key is declared once in [`KEYS`], with its documentation and default. A key
//! `group.name` is `[group] name = …` in the file and `LOCKSTEP_GROUP_NAME` in the environment;
//! the environment wins. Unknown keys in either place are errors, so a typo never silently
//! falls back to a default. All problems are collected and reported together.

use api::locks::LockConfig;
use api::locks::store::StoreConfig;
use api::presign::StorageConfig;
use api::webhooks::{Endpoint, EventFilter, WebhookConfig};
use api::{ApiConfig, Cors};
use hub::redis::RedisSettings;
use hub::{HistoryConfig, HubConfig, OriginPolicy, PresenceConfig};
use protocol::{HeartBeat, Limits};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// One configuration key.
#[derive(Debug)]
pub(crate) struct Key {
    /// `group.name`, or `name` for top-level keys.
    pub(crate) name: &'static str,
    pub(crate) default: &'static str,
    pub(crate) doc: &'static str,
}

impl Key {
    /// The environment variable for this key.
    pub(crate) fn env(&self) -> String {
        format!("LOCKSTEP_{}", self.name.replace('.', "_").to_uppercase())
    }
}

macro_rules! keys {
    ($($name:literal, $default:literal, $doc:literal;)*) => {
        /// Every configuration key, in documentation order.
        pub(crate) const KEYS: &[Key] = &[$(Key { name: $name, default: $default, doc: $doc }),*];
    };
}

keys! {
    "listen", "127.0.0.1:8080", "Address to bind; the WebSocket endpoint and the HTTP API share it.";
    "send_buffer_bytes", "0", "Kernel send buffer of each accepted connection (`SO_SNDBUF`); 0: the OS sizes it. What the kernel holds can no longer be conflated: on a slow link the latest value of a key waits behind about this plus half of `hub.outbound_queue_bytes`, so lower it where browsers sit on slow links and want fresh progress.";
    "data_dir", "./lockstep-data", "Embedded state: the SQLite lock store (when no database is configured) and the generated JWT secret.";
    "allowed_origins", "", "Comma-separated Origins allowed to open WebSockets and call the API from a browser; `*` for any. Empty: same-origin only.";
    "shutdown_grace", "10s", "How long a SIGTERM/SIGINT shutdown may take: clients get 4010 closes, in-flight requests finish.";
    "log.format", "text", "`text` or `json`.";
    "log.level", "info", "A tracing filter, e.g. `info` or `info,hub=debug`.";
    "jwt.secret", "", "HS256 secret. Empty: one is generated into the data directory (mode 0600) and reused.";
    "jwt.public_keys", "", "Path to a PEM public key or a JWKS file, for RS256/ES256 tokens.";
    "jwt.issuer", "", "Required `iss` claim. Empty: not checked.";
    "jwt.audience", "", "Required `aud` claim. Empty: not checked.";
    "jwt.leeway", "0s", "Clock skew tolerated on `exp` and `nbf`.";
    "jwt.reload_interval", "30s", "How often `jwt.public_keys` is checked for changes (a JWKS rotation needs no restart); 0s: read once at start.";
    "session_secret", "", "Signs session ids (the `session` header of CONNECTED), so the lock API accepts only a session a node issued to the caller. Every node of a cluster needs the same one. Empty: derived from jwt.secret, or from the secret generated into the data directory.";
    "hub.enabled", "true", "Serve `GET /ws` on this node.";
    "hub.max_connections", "100000", "Most authenticated WebSocket connections on this node; a CONNECT beyond it is refused and closed with 4009.";
    "hub.max_pending_connections", "1024", "Most WebSocket connections waiting to send CONNECT; past it the oldest waiting one is closed (4001), so silent upgrades cannot crowd out real clients.";
    "hub.connect_frame_bytes", "16384", "Largest frame a connection may send before its CONNECT is accepted.";
    "hub.max_subscriptions", "64", "Most subscriptions on one connection.";
    "hub.outbound_queue", "1024", "Frames queued per connection before it is closed as a slow consumer (4008).";
    "hub.outbound_queue_bytes", "1048576", "Bytes queued per connection before it is closed as a slow consumer (4008); a single event larger than this still goes out to an idle connection.";
    "hub.max_event_bytes", "61440", "Largest event `data` (JSON bytes) anyone may publish, over STOMP or the HTTP API (413 `event_too_large`).";
    "hub.max_frame_bytes", "65536", "Largest STOMP frame a client may send.";
    "hub.max_body_bytes", "61440", "Largest STOMP frame body a client may send.";
    "hub.max_headers", "32", "Most headers in one STOMP frame.";
    "hub.max_header_bytes", "4096", "Longest STOMP header line.";
    "hub.heartbeat_send_ms", "10000", "Heart-beat interval the server offers to send (0: none).";
    "hub.heartbeat_recv_ms", "10000", "Heart-beat interval the server asks clients for (0: none). Two missed intervals close the connection.";
    "hub.connect_timeout", "5s", "Time a new WebSocket has to send CONNECT.";
    "hub.write_timeout", "10s", "Time one write to a client may take before it is closed as a slow consumer.";
    "hub.idle_timeout", "60s", "Longest a connection may stay silent (no frame, heart-beat or WebSocket pong) before it is closed as dead (4003). Caps the heart-beat interval a client asks for; a silent client is pinged at half of it.";
    "hub.subscribe_timeout", "10s", "Time a SUBSCRIBE with a receipt waits for the cluster broker.";
    "hub.publish_rate", "100", "STOMP SEND frames per second per token, shared by all its connections on the node (0: unlimited); faster senders are slowed down, never cut off.";
    "hub.publish_burst", "200", "Burst of SEND frames allowed above the rate.";
    "hub.max_claimed_rate", "10000", "Highest `publish_rate` a token may claim for itself (a service token's own SEND rate).";
    "hub.read_buffer_bytes", "4096", "WebSocket read buffer per connection (allocated for every connection).";
    "history.enabled", "true", "Keep each topic's recent events, so a client that reconnects gets what it missed (`x-stream-offset`). Off: offsets are still assigned, every resume answers `x-recovered:false`.";
    "history.team_events", "1000", "Events kept per team topic.";
    "history.item_events", "100", "Events kept per item topic (`/team/{t}/items/{i}`).";
    "history.user_events", "100", "Events kept per user topic.";
    "history.global_events", "1000", "Events kept for `/global`.";
    "history.max_age", "10m", "Events older than this are dropped from history; idempotency keys are remembered this long.";
    "history.meta_ttl", "7d", "How long a topic's epoch and offset outlive its last event, so a quiet topic still answers \"nothing missed\" (Redis key TTL; the in-process broker forgets idle topics after it).";
    "history.max_replay", "1000", "Most events one resume (or one HTTP history page) returns; a client further behind gets `x-recovered:false`.";
    "history.max_keys", "1000", "Keys per topic whose latest event is kept for `x-stream-offset:snapshot` (the least recently updated goes first).";
    "history.key_idle", "1h", "A key not updated for this long is forgotten: its latest event leaves the snapshot.";
    "history.memory_bytes", "268435456", "Bytes of history the in-process broker keeps over all topics (oldest dropped first). With Redis, Redis's own memory settings bound it.";
    "presence.enabled", "true", "Track who subscribes to team and item topics, across nodes, and publish `presence.joined` / `presence.left` on them (DESIGN §14).";
    "presence.leave_delay", "5s", "How long a user's last subscription to a topic may be gone before they leave it; a re-join within it (a reload, another tab, another node) is silent.";
    "presence.timeout", "30s", "Within this a dead node's users leave presence (its entries expire and a live node sweeps them); nodes refresh their entries three times per timeout.";
    "presence.batch", "50ms", "Presence changes within this window go to the store, and out as events, together.";
    "presence.max_listed", "10000", "Above this many users present in a topic, `GET /api/v1/topics/{topic}/presence` answers the count only.";
    "control.revocation_ttl", "24h", "How long a control call (disconnect, unsubscribe) keeps refusing the user's tokens issued before it: at least your longest token lifetime (an older token still valid after this is accepted again).";
    "webhooks.urls", "", "Comma-separated endpoint URLs (`https://…`) that get signed `POST`s of `{id, ts, events}` (DESIGN §15); each has its own durable queue in the lock store's database. Empty: webhooks are off.";
    "webhooks.secret", "", "HMAC-SHA256 secret the deliveries are signed with (`Lockstep-Signature`), at least 32 bytes: one for every URL, or a comma-separated list with one per URL in the same order. `lockstep webhook verify` checks a delivery with it.";
    "webhooks.events", "topic.occupied,topic.vacated", "Comma-separated event types the endpoints get: `topic.occupied`, `topic.vacated` (a team or item topic's first user in the cluster, its last one gone after presence.leave_delay), `presence.joined`, `presence.left`, `lock.acquired`, `lock.released`, `lock.expired`, `lock.taken_over`; `lock.*`-style families and `*` work too.";
    "webhooks.batch", "100", "Most events in one delivery.";
    "webhooks.timeout", "10s", "Longest one delivery attempt may take before it counts as failed.";
    "webhooks.retry_min", "1s", "Delay before the first retry of a failed delivery; it doubles per attempt up to webhooks.retry_max. An endpoint's later deliveries wait behind it (they go out in id order).";
    "webhooks.retry_max", "5m", "Longest delay between two attempts.";
    "webhooks.retry_for", "24h", "How long after it was queued a delivery is retried; then it moves to the `webhook_dead_letters` table (counted in lockstep_webhook_dead_letters_total) and the next one goes.";
    "webhooks.lease", "10s", "How long a node's claim on an endpoint's queue lasts without renewal: within it, another node takes over the deliveries of a node that died.";
    "webhooks.poll_interval", "250ms", "How often the node delivering an endpoint looks for deliveries other nodes queued (its own are sent at once).";
    "webhooks.queue", "10000", "Events a node holds in memory while the database is away; past it new ones are dropped and counted (lockstep_webhook_events_dropped_total).";
    "redis.url", "", "Cluster broker: `redis://host:port` (standalone) or `redis-cluster://host:port,host:port` (Redis Cluster, sharded pub/sub). Empty: the in-process broker (a single node).";
    "redis.channel_prefix", "lockstep:", "Prefix of the Redis key and channel names, so several deployments can share one Redis (no `{` or `}`: each topic's keys share a hash tag).";
    "redis.probe_interval", "2s", "How often each node checks its pub/sub connection with a probe message; a probe that does not come back forces a reconnect.";
    "redis.command_timeout", "2s", "Longest a publish or subscribe waits for Redis before failing.";
    "redis.publish_queue_bytes", "67108864", "Bytes of events a node may have waiting to go to Redis; past it publishes fail at once (503) instead of piling up.";
    "database.url", "", "Lock store: `postgres://user@host/db` (a cluster's nodes share it) or `sqlite://path`. Empty: SQLite in the data directory (a single node).";
    "database.max_connections", "16", "Connections to PostgreSQL per node.";
    "locks.default_ttl", "60s", "Lock lifetime when a request names none.";
    "locks.min_ttl", "1s", "Shortest lock lifetime a request may ask for.";
    "locks.max_ttl", "1h", "Longest lock lifetime a request may ask for.";
    "locks.max_batch", "100", "Most items in one batch lock or unlock request.";
    "locks.session_grace", "10s", "How long after its WebSocket closes a session-bound lock is released (a page reload within it keeps the lock).";
    "locks.sweep_interval", "250ms", "How often each node announces expiries and releases locks of closed sessions.";
    "locks.node_timeout", "10s", "How long a node may stop sweeping before the others take it for dead: the sessions it hosted count as closed, and their locks are released after `locks.session_grace`.";
    "s3.bucket", "", "Bucket holding item files. Empty: presigning is off (503 `storage_not_configured`).";
    "s3.region", "us-east-1", "Region the URLs are signed for.";
    "s3.endpoint", "", "S3-compatible endpoint, e.g. `http://127.0.0.1:9000` (MinIO) or `https://oss-cn-hangzhou.aliyuncs.com`. Empty: AWS S3 for the region.";
    "s3.path_style", "false", "Path-style URLs (`endpoint/bucket/key`, MinIO and most local servers) instead of virtual-hosted (`bucket.endpoint/key`).";
    "s3.prefix", "", "Key prefix before `{team}/{item}/{name}`.";
    "s3.access_key_id", "", "Static access key. Empty: the standard AWS credential chain (environment, profile, web identity, instance metadata).";
    "s3.secret_access_key", "", "Static secret key, with `s3.access_key_id`.";
    "s3.session_token", "", "Session token for temporary static credentials; usually empty.";
    "s3.default_expires", "5m", "Lifetime of a presigned URL when the request names none.";
    "s3.max_expires", "1h", "Longest lifetime of any presigned URL (write URLs also end with their lock).";
    "s3.max_batch", "500", "Most objects in one batch presign request.";
    "s3.content_types", "application/octet-stream,application/json,application/x-ndjson,application/zip,application/gzip,application/x-protobuf,text/plain,text/csv,image/png,image/jpeg,image/webp,image/tiff,image/bmp,image/gif,video/mp4,video/webm,audio/mpeg,audio/wav,audio/ogg,audio/flac,model/gltf-binary", "Content types a write URL may sign (`type/subtype`, `type/*`, or `*`); a write without one signs `application/octet-stream`. The default leaves out types a browser would run (HTML, SVG, XML, JavaScript).";
    "api.enabled", "true", "Serve the HTTP API on this node.";
    "api.max_body_bytes", "1048576", "Largest API request body.";
    "api.max_batch", "100", "Most events in one `POST /api/v1/publish/batch`.";
    "api.publish_rate", "1000", "Events per second per token through the API (0: unlimited): publishes, and the events of lock requests and commits.";
    "api.publish_burst", "2000", "Burst of events allowed above the rate.";
    "api.max_claimed_rate", "10000", "Highest `publish_rate` a token may claim for itself through the API.";
    "api.request_timeout", "30s", "Longest an API request may take; then 503.";
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The whole configuration, typed.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) listen: SocketAddr,
    pub(crate) send_buffer_bytes: usize,
    pub(crate) data_dir: PathBuf,
    pub(crate) shutdown_grace: Duration,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    pub(crate) jwt: JwtConfig,
    pub(crate) hub_enabled: bool,
    pub(crate) hub: HubConfig,
    pub(crate) api_enabled: bool,
    pub(crate) api: ApiConfig,
    /// `None`: the in-process broker.
    pub(crate) redis: Option<RedisSettings>,
    pub(crate) database: StoreConfig,
    pub(crate) locks: LockConfig,
    /// `None`: presigning is off.
    pub(crate) storage: Option<StorageConfig>,
    /// No endpoints: webhooks are off.
    pub(crate) webhooks: WebhookConfig,
}

#[derive(Debug, Clone)]
pub(crate) struct JwtConfig {
    pub(crate) secret: Option<String>,
    pub(crate) public_keys: Option<PathBuf>,
    pub(crate) issuer: Option<String>,
    pub(crate) audience: Option<String>,
    pub(crate) leeway: Duration,
    pub(crate) reload_interval: Duration,
    /// Signs session ids; `None`: derived from the HS256 secret.
    pub(crate) session_secret: Option<String>,
}

impl Config {
    /// Valid but probably not meant: `serve` logs these and `config check` prints them.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.redis.is_some() && self.database.url.starts_with("sqlite:") {
            warnings.push(
                "a cluster broker (redis.url) with a SQLite lock store: every node would grant locks from its own file; set database.url to PostgreSQL"
                    .to_owned(),
            );
        }
        if self.redis.is_some()
            && self.jwt.secret.is_none()
            && self.jwt.public_keys.is_some()
            && self.jwt.session_secret.is_none()
        {
            warnings.push(
                "a cluster broker (redis.url) with public keys and no session_secret: each node would sign session ids with a secret of its own, so a lock request naming a session of another node is refused; set session_secret (the same on every node)"
                    .to_owned(),
            );
        }
        if self.redis.is_some() && self.jwt.secret.is_none() && self.jwt.public_keys.is_none() {
            warnings.push(
                "a cluster broker (redis.url) with a generated JWT secret: each node generates its own, so a token works on one node only; set jwt.secret or jwt.public_keys"
                    .to_owned(),
            );
        }
        warnings
    }

    /// What this configuration runs, a line per part, without secrets (`config check`).
    pub(crate) fn summary(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, value: String| {
            out.push_str(&format!("  {name:<14} {value}\n"));
        };
        line("listen", self.listen.to_string());
        let serves = match (self.hub_enabled, self.api_enabled) {
            (true, true) => "WebSocket hub and HTTP API",
            (true, false) => "WebSocket hub only",
            _ => "HTTP API only",
        };
        line("serves", serves.to_owned());
        line(
            "broker",
            self.redis
                .as_ref()
                .map_or_else(|| "in-process (single node)".to_owned(), |r| redact(&r.url)),
        );
        let history = &self.hub.history;
        line(
            "history",
            if history.enabled {
                format!(
                    "{} events per team topic, {} per item topic, {} per user topic, {} for /global, at most {}; a resume replays at most {}; offsets kept {} after a topic's last event; latest event of up to {} keys per topic, {} idle; {}",
                    history.team_events,
                    history.item_events,
                    history.user_events,
                    history.global_events,
                    humantime::format_duration(history.max_age),
                    history.max_replay,
                    humantime::format_duration(history.meta_ttl),
                    history.max_keys,
                    humantime::format_duration(history.key_idle),
                    if self.redis.is_some() {
                        "in Redis: a Redis restarted without persistence (or flushed) starts a new epoch"
                    } else {
                        "in memory: a restart of this node starts a new epoch"
                    }
                )
            } else {
                "off: offsets only; every resume answers x-recovered:false".to_owned()
            },
        );
        line("lock store", redact(&self.database.url));
        line(
            "storage",
            self.storage.as_ref().map_or_else(
                || "not configured (presign answers 503)".to_owned(),
                |s| {
                    format!(
                        "bucket {} at {}",
                        s.bucket,
                        s.endpoint
                            .as_deref()
                            .unwrap_or("the AWS endpoint of the region")
                    )
                },
            ),
        );
        let jwt = match (&self.jwt.secret, &self.jwt.public_keys) {
            (Some(_), Some(keys)) => format!("HS256 secret and keys from {}", keys.display()),
            (Some(_), None) => "HS256 with the configured secret".to_owned(),
            (None, Some(keys)) => format!("keys from {}", keys.display()),
            (None, None) => format!(
                "HS256 with the secret generated into {}",
                self.data_dir.display()
            ),
        };
        line("tokens", jwt);
        let hooks = &self.webhooks;
        line(
            "webhooks",
            if hooks.endpoints.is_empty() {
                "off".to_owned()
            } else {
                format!(
                    "{} endpoint(s), queued in the lock store: {}",
                    hooks.endpoints.len(),
                    hooks
                        .endpoints
                        .iter()
                        .map(|e| api::webhooks::label(&e.url))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
        line(
            "log",
            format!("{} at {}", self.log_format.as_str(), self.log_level),
        );
        out
    }
}

/// A URL without its credentials, for logs and summaries: the user info, and any `password`
/// query parameter (PostgreSQL URLs may carry the password there).
pub(crate) fn redact(url: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &base[..scheme], &base[at + 1..])
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Everything wrong with a configuration.
#[derive(Debug)]
pub(crate) struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    Env(String),
    File,
    Flag,
}

/// Raw values by key name, before typing.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    values: BTreeMap<&'static str, (String, Origin)>,
    errors: Vec<String>,
}

impl Sources {
    /// Reads a TOML file's contents (`path` only for messages).
    pub(crate) fn file(&mut self, path: &str, text: &str) {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(err) => {
                self.errors.push(format!("{path}: {err}"));
                return;
            }
        };
        for (name, value) in table {
            match value {
                toml::Value::Table(group) => {
                    for (sub, value) in group {
                        self.file_value(path, &format!("{name}.{sub}"), &value);
                    }
                }
                value => self.file_value(path, &name, &value),
            }
        }
    }

    fn file_value(&mut self, path: &str, name: &str, value: &toml::Value) {
        let Some(key) = KEYS.iter().find(|k| k.name == name) else {
            self.errors
                .push(format!("{path}: unknown key '{name}'{}", suggest(name)));
            return;
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => parts.push(s.clone()),
                        other => {
                            self.errors.push(format!(
                                "{path}: '{name}' must be a list of strings, found {other}"
                            ));
                            return;
                        }
                    }
                }
                parts.join(",")
            }
            other => {
                self.errors
                    .push(format!("{path}: '{name}' has an unsupported value {other}"));
                return;
            }
        };
        self.values.insert(key.name, (text, Origin::File));
    }

    /// Reads `LOCKSTEP_*` variables from `vars`.
    pub(crate) fn env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (var, value) in vars {
            if !var.starts_with("LOCKSTEP_") || var == "LOCKSTEP_CONFIG" {
                continue;
            }
            match KEYS.iter().find(|k| k.env() == var) {
                Some(key) => {
                    self.values.insert(key.name, (value, Origin::Env(var)));
                }
                None => self.errors.push(format!(
                    "unknown environment variable {var}{}",
                    suggest(&var)
                )),
            }
        }
    }

    /// A command-line flag (wins over everything).
    pub(crate) fn flag(&mut self, name: &'static str, value: String) {
        self.values.insert(name, (value, Origin::Flag));
    }

    /// Types and validates every key.
    ///
    /// # Errors
    ///
    /// [`ConfigErrors`] listing every problem found.
    pub(crate) fn build(self) -> Result<Config, ConfigErrors> {
        let mut p = Parser {
            sources: &self,
            errors: self.errors.clone(),
        };
        let limits = Limits {
            max_frame_bytes: p.get("hub.max_frame_bytes"),
            max_headers: p.get("hub.max_headers"),
            max_header_bytes: p.get("hub.max_header_bytes"),
            max_body_bytes: p.get("hub.max_body_bytes"),
        };
        if limits.max_body_bytes > limits.max_frame_bytes {
            p.errors
                .push("hub.max_body_bytes must not exceed hub.max_frame_bytes".to_owned());
        }
        let origins = p.origins();
        let hub = HubConfig {
            limits,
            heart_beat: HeartBeat {
                send_ms: p.get("hub.heartbeat_send_ms"),
                recv_ms: p.get("hub.heartbeat_recv_ms"),
            },
            max_connections: p.positive("hub.max_connections"),
            max_pending_connections: p.positive("hub.max_pending_connections"),
            connect_frame_bytes: p.positive("hub.connect_frame_bytes"),
            max_subscriptions: p.positive("hub.max_subscriptions"),
            outbound_queue: p.positive("hub.outbound_queue"),
            outbound_queue_bytes: p.positive("hub.outbound_queue_bytes"),
            max_event_bytes: p.positive("hub.max_event_bytes"),
            connect_timeout: p.duration("hub.connect_timeout"),
            write_timeout: p.duration("hub.write_timeout"),
            idle_timeout: p.duration("hub.idle_timeout"),
            subscribe_timeout: p.duration("hub.subscribe_timeout"),
            publish_rate: p.get("hub.publish_rate"),
            publish_burst: p.get("hub.publish_burst"),
            max_claimed_rate: p.positive_u32("hub.max_claimed_rate"),
            origins: origins.clone(),
            read_buffer_bytes: p.positive("hub.read_buffer_bytes"),
            history: HistoryConfig {
                enabled: p.get("history.enabled"),
                team_events: p.positive("history.team_events"),
                item_events: p.positive("history.item_events"),
                user_events: p.positive("history.user_events"),
                global_events: p.positive("history.global_events"),
                max_age: p.duration("history.max_age"),
                meta_ttl: p.duration("history.meta_ttl"),
                max_replay: p.positive("history.max_replay"),
                memory_bytes: p.positive("history.memory_bytes"),
                max_keys: p.positive("history.max_keys"),
                key_idle: p.duration("history.key_idle"),
            },
            presence: PresenceConfig {
                enabled: p.get("presence.enabled"),
                leave_delay: p.duration("presence.leave_delay"),
                timeout: p.duration("presence.timeout"),
                batch: p.duration("presence.batch"),
                max_listed: p.positive("presence.max_listed"),
            },
            revocation_ttl: p.duration("control.revocation_ttl"),
            // Both set by `serve`, which makes the node's id and knows the secrets.
            ..HubConfig::default()
        };
        if hub.history.meta_ttl < hub.history.max_age {
            p.errors.push(
                "history.meta_ttl must be at least history.max_age: a topic's offsets must outlive its events"
                    .to_owned(),
            );
        }
        if hub.presence.timeout < Duration::from_millis(300) {
            p.error("presence.timeout", "must be at least 300ms");
        }
        if hub.presence.batch > Duration::from_secs(5) {
            p.error("presence.batch", "must be at most 5s");
        }
        if hub.idle_timeout < Duration::from_secs(1) {
            p.error("hub.idle_timeout", "must be at least 1s");
        }
        let api = ApiConfig {
            max_body_bytes: p.positive("api.max_body_bytes"),
            max_batch: p.positive("api.max_batch"),
            max_event_bytes: hub.max_event_bytes,
            max_replay: hub.history.max_replay,
            publish_rate: p.get("api.publish_rate"),
            publish_burst: p.get("api.publish_burst"),
            max_claimed_rate: p.positive_u32("api.max_claimed_rate"),
            request_timeout: p.duration("api.request_timeout"),
            cors: match &origins {
                OriginPolicy::SameOrigin => Cors::SameOrigin,
                OriginPolicy::Any => Cors::Any,
                OriginPolicy::List(list) => Cors::List(list.clone()),
            },
        };
        let log_format = match p.raw("log.format").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                p.error("log.format", &format!("'{other}' is not `text` or `json`"));
                LogFormat::Text
            }
        };
        let log_level = p.raw("log.level");
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            p.error(
                "log.level",
                &format!("'{log_level}' is not a tracing filter: {err}"),
            );
        }
        let config = Config {
            listen: p.listen(),
            send_buffer_bytes: p.get("send_buffer_bytes"),
            data_dir: PathBuf::from(p.raw("data_dir")),
            shutdown_grace: p.duration("shutdown_grace"),
            log_format,
            log_level,
            jwt: JwtConfig {
                secret: p.optional("jwt.secret"),
                public_keys: p.optional("jwt.public_keys").map(PathBuf::from),
                issuer: p.optional("jwt.issuer"),
                audience: p.optional("jwt.audience"),
                leeway: p.duration("jwt.leeway"),
                reload_interval: p.duration("jwt.reload_interval"),
                session_secret: p.optional("session_secret"),
            },
            hub_enabled: p.get("hub.enabled"),
            hub,
            api_enabled: p.get("api.enabled"),
            api,
            redis: p.redis(),
            database: StoreConfig {
                url: String::new(),
                max_connections: p.get("database.max_connections"),
                event_lease: Duration::from_secs(5),
            },
            locks: LockConfig {
                default_ttl: p.duration("locks.default_ttl"),
                min_ttl: p.duration("locks.min_ttl"),
                max_ttl: p.duration("locks.max_ttl"),
                max_batch: p.positive("locks.max_batch"),
                session_grace: p.duration("locks.session_grace"),
                sweep_interval: p.duration("locks.sweep_interval"),
                node_timeout: p.duration("locks.node_timeout"),
            },
            storage: None,
            webhooks: WebhookConfig::default(),
        };
        let mut config = config;
        config.storage = p.storage();
        config.webhooks = p.webhooks();
        if !config.webhooks.endpoints.is_empty()
            && !config.hub.presence.enabled
            && [
                "topic.occupied",
                "topic.vacated",
                "presence.joined",
                "presence.left",
            ]
            .iter()
            .any(|t| config.webhooks.events.matches(t))
        {
            p.errors.push(
                "webhooks.events asks for occupancy or presence events, which presence decides: set presence.enabled = true"
                    .to_owned(),
            );
        }
        config.database.url = match p.optional("database.url") {
            Some(url)
                if url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.starts_with("sqlite:") =>
            {
                // Like the embedded default, a SQLite store is created when missing; an
                // explicit `mode=` in the URL still wins.
                if url.starts_with("sqlite:") && !url.contains("mode=") {
                    let separator = if url.contains('?') { '&' } else { '?' };
                    format!("{url}{separator}mode=rwc")
                } else {
                    url
                }
            }
            Some(url) => {
                p.error(
                    "database.url",
                    &format!("'{url}' is not a postgres:// or sqlite:// URL"),
                );
                url
            }
            None => format!(
                "sqlite://{}?mode=rwc",
                config.data_dir.join("lockstep.db").display()
            ),
        };
        if config.locks.node_timeout < config.locks.sweep_interval * 4 {
            p.errors.push(
                "locks.node_timeout must be at least 4 × locks.sweep_interval: a node that misses a sweep or two is not dead"
                    .to_owned(),
            );
        }
        if config.locks.min_ttl > config.locks.default_ttl
            || config.locks.default_ttl > config.locks.max_ttl
        {
            p.errors.push(
                "locks.default_ttl must lie between locks.min_ttl and locks.max_ttl".to_owned(),
            );
        }
        if !config.hub_enabled && !config.api_enabled {
            p.errors.push(
                "hub.enabled and api.enabled are both false: this node would serve nothing"
                    .to_owned(),
            );
        }
        if let Some(secret) = &config.jwt.secret
            && secret.len() < 32
        {
            p.error("jwt.secret", "must be at least 32 bytes long");
        }
        if let Some(secret) = &config.jwt.session_secret
            && secret.len() < 32
        {
            p.error("session_secret", "must be at least 32 bytes long");
        }
        if config.hub.outbound_queue_bytes < config.hub.max_event_bytes {
            p.errors.push(
                "hub.outbound_queue_bytes must be at least hub.max_event_bytes: a queue must hold one whole event"
                    .to_owned(),
            );
        }
        if p.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(p.errors))
        }
    }
}

struct Parser<'a> {
    sources: &'a Sources,
    errors: Vec<String>,
}

impl Parser<'_> {
    fn raw(&self, name: &str) -> String {
        match self.sources.values.get(name) {
            Some((value, _)) => value.clone(),
            None => KEYS
                .iter()
                .find(|k| k.name == name)
                .map(|k| k.default.to_owned())
                .unwrap_or_default(),
        }
    }

    /// A comma-separated key's entries, trimmed, empty ones left out.
    fn list(&self, name: &str) -> Vec<String> {
        self.raw(name)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn optional(&self, name: &str) -> Option<String> {
        Some(self.raw(name)).filter(|v| !v.trim().is_empty())
    }

    fn error(&mut self, name: &str, problem: &str) {
        let source = match self.sources.values.get(name) {
            Some((_, Origin::Env(var))) => format!("{var} (environment)"),
            Some((_, Origin::File)) => format!("'{name}' (config file)"),
            Some((_, Origin::Flag)) => format!("--{} (command line)", name.replace('_', "-")),
            None => format!("'{name}' (default)"),
        };
        self.errors.push(format!("{source}: {problem}"));
    }

    fn get<T: FromStr + Default>(&mut self, name: &str) -> T
    where
        T::Err: fmt::Display,
    {
        self.parse(name).unwrap_or_default()
    }

    fn parse<T: FromStr>(&mut self, name: &str) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let raw = self.raw(name);
        match raw.trim().parse() {
            Ok(v) => Some(v),
            Err(err) => {
                self.error(name, &format!("'{raw}' is invalid: {err}"));
                None
            }
        }
    }

    fn listen(&mut self) -> SocketAddr {
        let raw = self.raw("listen");
        raw.trim().parse().unwrap_or_else(|err| {
            self.error(
                "listen",
                &format!("'{raw}' is not an address like 127.0.0.1:8080: {err}"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        })
    }

    fn positive(&mut self, name: &str) -> usize {
        match self.parse::<usize>(name) {
            Some(0) => {
                self.error(name, "must be greater than 0");
                1
            }
            Some(value) => value,
            None => 1,
        }
    }

    fn positive_u32(&mut self, name: &str) -> u32 {
        match self.parse::<u32>(name) {
            Some(0) => {
                self.error(name, "must be greater than 0");
                1
            }
            Some(value) => value,
            None => 1,
        }
    }

    fn duration(&mut self, name: &str) -> Duration {
        let raw = self.raw(name);
        match humantime::parse_duration(raw.trim()) {
            Ok(d) => d,
            Err(err) => {
                self.error(
                    name,
                    &format!("'{raw}' is not a duration like 10s or 500ms: {err}"),
                );
                Duration::ZERO
            }
        }
    }

    fn storage(&mut self) -> Option<StorageConfig> {
        let endpoint = self.optional("s3.endpoint");
        if let Some(e) = &endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            self.error("s3.endpoint", &format!("'{e}' is not an http(s):// URL"));
        }
        let access_key_id = self.optional("s3.access_key_id");
        let secret_access_key = self.optional("s3.secret_access_key");
        if access_key_id.is_some() != secret_access_key.is_some() {
            self.errors.push(
                "s3.access_key_id and s3.secret_access_key go together: set both or neither"
                    .to_owned(),
            );
        }
        let max_expires = self.duration("s3.max_expires");
        if max_expires > Duration::from_secs(7 * 24 * 3600) {
            self.error("s3.max_expires", "SigV4 URLs live at most 7 days");
        }
        let config = StorageConfig {
            endpoint,
            region: self.raw("s3.region"),
            bucket: self.optional("s3.bucket").unwrap_or_default(),
            prefix: self.raw("s3.prefix").trim_matches('/').to_owned(),
            path_style: self.get("s3.path_style"),
            access_key_id,
            secret_access_key,
            session_token: self.optional("s3.session_token"),
            default_expires: self.duration("s3.default_expires"),
            max_expires,
            max_batch: self.positive("s3.max_batch"),
            content_types: self.content_types(),
        };
        (!config.bucket.is_empty()).then_some(config)
    }

    fn webhooks(&mut self) -> WebhookConfig {
        let mut config = WebhookConfig {
            batch: self.positive("webhooks.batch"),
            timeout: self.duration("webhooks.timeout"),
            retry_min: self.duration("webhooks.retry_min"),
            retry_max: self.duration("webhooks.retry_max"),
            retry_for: self.duration("webhooks.retry_for"),
            lease: self.duration("webhooks.lease"),
            poll_interval: self.duration("webhooks.poll_interval"),
            queue: self.positive("webhooks.queue"),
            ..WebhookConfig::default()
        };
        match EventFilter::parse(&self.raw("webhooks.events")) {
            Ok(events) => config.events = events,
            Err(problem) => self.error("webhooks.events", &problem.to_string()),
        }
        let urls = self.list("webhooks.urls");
        if urls.is_empty() {
            return config;
        }
        for (i, url) in urls.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.error(
                    "webhooks.urls",
                    &format!(
                        "entry {} ({}) is not an http:// or https:// URL",
                        i + 1,
                        api::webhooks::label(url)
                    ),
                );
            }
            // Each URL is one queue, delivered by one node at a time; listed twice, one node
            // would run two deliverers of it.
            if urls[..i].contains(url) {
                self.error(
                    "webhooks.urls",
                    &format!("entry {} repeats an earlier URL", i + 1),
                );
            }
        }
        let secrets = self.list("webhooks.secret");
        if secrets.is_empty() {
            self.error("webhooks.secret", "is required when webhooks.urls is set");
            return config;
        }
        if secrets.len() != 1 && secrets.len() != urls.len() {
            self.error(
                "webhooks.secret",
                &format!(
                    "has {} secrets for {} URLs: give one for all, or one per URL",
                    secrets.len(),
                    urls.len()
                ),
            );
            return config;
        }
        if secrets.iter().any(|s| s.len() < 32) {
            self.error("webhooks.secret", "must be at least 32 bytes long");
        }
        if config.lease < Duration::from_millis(300) {
            self.error("webhooks.lease", "must be at least 300ms");
        }
        if config.retry_min > config.retry_max {
            self.error("webhooks.retry_min", "must not exceed webhooks.retry_max");
        }
        config.endpoints = urls
            .into_iter()
            .enumerate()
            .map(|(i, url)| Endpoint {
                url,
                secret: secrets[if secrets.len() == 1 { 0 } else { i }]
                    .as_bytes()
                    .into(),
            })
            .collect();
        config
    }

    fn redis(&mut self) -> Option<RedisSettings> {
        let url = self.optional("redis.url")?;
        if let Err(err) = hub::redis::parse_url(&url) {
            self.error("redis.url", &format!("'{url}' is not a Redis URL: {err}"));
        }
        Some(RedisSettings {
            url,
            channel_prefix: {
                let prefix = self.raw("redis.channel_prefix");
                if prefix.contains(['{', '}']) {
                    self.error(
                        "redis.channel_prefix",
                        "must not contain { or }: each topic's keys and channel share the hash tag {topic}",
                    );
                }
                prefix
            },
            probe_interval: self.duration("redis.probe_interval"),
            command_timeout: self.duration("redis.command_timeout"),
            publish_queue_bytes: self.positive("redis.publish_queue_bytes"),
        })
    }

    fn content_types(&mut self) -> Vec<String> {
        let list: Vec<String> = self
            .list("s3.content_types")
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        for ct in &list {
            if ct != "*"
                && !ct
                    .split_once('/')
                    .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty())
            {
                self.error(
                    "s3.content_types",
                    &format!("'{ct}' is not a content type like image/png, image/* or *"),
                );
            }
        }
        if list.is_empty() {
            self.error("s3.content_types", "must name at least one content type");
        }
        list
    }

    fn origins(&mut self) -> OriginPolicy {
        let list: Vec<String> = self
            .list("allowed_origins")
            .iter()
            .map(|s| s.trim_end_matches('/').to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if list.iter().any(|o| o == "*") {
            return OriginPolicy::Any;
        }
        for origin in &list {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                self.error(
                    "allowed_origins",
                    &format!("'{origin}' is not an origin like https://app.example.com"),
                );
            }
        }
        if list.is_empty() {
            OriginPolicy::SameOrigin
        } else {
            OriginPolicy::List(list)
        }
    }
}

/// "; did you mean …?" for a near-miss key name.
fn suggest(name: &str) -> String {
    let needle = name
        .trim_start_matches("LOCKSTEP_")
        .to_lowercase()
        .replace('.', "_");
    let best = KEYS
        .iter()
        .map(|k| (k, strsim(&needle, &k.name.replace('.', "_"))))
        .filter(|(_, d)| *d <= 3)
        .min_by_key(|(_, d)| *d);
    match best {
        Some((k, _)) if name.starts_with("LOCKSTEP_") => format!("; did you mean {}?", k.env()),
        Some((k, _)) => format!("; did you mean '{}'?", k.name),
        None => String::new(),
    }
}

/// Levenshtein distance, for suggestions.
fn strsim(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The key reference as a Markdown table (`lockstep config --markdown`).
pub(crate) fn markdown() -> String {
    let mut out =
        String::from("| file key | environment | default | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        let default = if k.default.is_empty() {
            "(unset)".to_owned()
        } else {
            format!("`{}`", k.default)
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} |\n",
            k.name,
            k.env(),
            default,
            k.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/lockstep"),
            "postgres://***@db:5432/lockstep"
        );
        assert_eq!(
            redact("postgres://db/lockstep?sslmode=require&password=s3cret"),
            "postgres://db/lockstep?sslmode=require&password=***"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redact("redis://:pw@10.0.0.5:6379"),
            "redis://***@10.0.0.5:6379"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let config = Sources::default().build().unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.hub.origins, OriginPolicy::SameOrigin);
        assert_eq!(config.hub.max_subscriptions, 64);
        assert!(config.jwt.secret.is_none());
    }

    #[test]
    fn webhook_endpoints_get_their_own_or_a_shared_secret_and_bad_settings_are_reported() {
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let mut s = Sources::default();
        s.env(env(&[
            (
                "LOCKSTEP_WEBHOOKS_URLS",
                "https://one.example/in, http://127.0.0.1:9/hook",
            ),
            ("LOCKSTEP_WEBHOOKS_SECRET", &format!("{a},{b}")),
            ("LOCKSTEP_WEBHOOKS_EVENTS", "topic.*,lock.acquired"),
        ]));
        let config = s.build().unwrap();
        let hooks = &config.webhooks;
        assert_eq!(hooks.endpoints.len(), 2);
        assert_eq!(hooks.endpoints[1].url, "http://127.0.0.1:9/hook");
        assert_eq!(&*hooks.endpoints[1].secret, b.as_bytes());
        assert!(hooks.events.matches("topic.vacated") && !hooks.events.matches("lock.expired"));
        assert!(
            !format!("{hooks:?}").contains(&a),
            "secrets stay out of Debug"
        );

        let mut s = Sources::default();
        s.env(env(&[("LOCKSTEP_WEBHOOKS_URLS", "https://one.example/in")]));
        assert!(
            s.build()
                .unwrap_err()
                .to_string()
                .contains("webhooks.secret")
        );

        let mut s = Sources::default();
        s.env(env(&[
            ("LOCKSTEP_WEBHOOKS_URLS", "ftp://x,https://y,https://y"),
            ("LOCKSTEP_WEBHOOKS_SECRET", "short,also-short"),
            ("LOCKSTEP_WEBHOOKS_EVENTS", "topic.occupid"),
            ("LOCKSTEP_PRESENCE_ENABLED", "false"),
        ]));
        let errors = s.build().unwrap_err().to_string();
        for needle in [
            "entry 1 (ftp://x) is not an http:// or https:// URL",
            "has 2 secrets for 3 URLs",
            "entry 3 repeats an earlier URL",
            "'topic.occupid' matches no webhook event type",
        ] {
            assert!(errors.contains(needle), "{needle} in {errors}");
        }

        // Occupancy needs presence.
        let mut s = Sources::default();
        s.env(env(&[
            ("LOCKSTEP_WEBHOOKS_URLS", "https://one.example/in"),
            ("LOCKSTEP_WEBHOOKS_SECRET", &a),
            ("LOCKSTEP_PRESENCE_ENABLED", "false"),
        ]));
        assert!(
            s.build()
                .unwrap_err()
                .to_string()
                .contains("presence.enabled")
        );
    }

    #[test]
    fn sqlite_stores_are_created_unless_the_url_says_otherwise() {
        let url = |value: &str| {
            let mut s = Sources::default();
            s.env(env(&[("LOCKSTEP_DATABASE_URL", value)]));
            s.build().unwrap().database.url
        };
        assert_eq!(url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db?mode=rwc");
        assert_eq!(
            url("sqlite:///tmp/a.db?cache=shared"),
            "sqlite:///tmp/a.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            url("sqlite:///tmp/a.db?mode=ro"),
            "sqlite:///tmp/a.db?mode=ro"
        );
        assert_eq!(url("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn env_overrides_file() {
        let mut s = Sources::default();
        s.file(
            "c.toml",
            "listen = \"0.0.0.0:1\"\n[hub]\nmax_connections = 5\n[api]\nmax_batch = 7\n",
        );
        s.env(env(&[
            ("LOCKSTEP_HUB_MAX_CONNECTIONS", "9"),
            ("PATH", "/bin"),
        ]));
        let config = s.build().unwrap();
        assert_eq!(config.listen, "0.0.0.0:1".parse().unwrap());
        assert_eq!(config.hub.max_connections, 9);
        assert_eq!(config.api.max_batch, 7);
    }

    #[test]
    fn every_problem_is_reported() {
        let mut s = Sources::default();
        s.file(
            "c.toml",
            "[hub]\nmax_conections = 5\noutbound_queue = 0\n[jwt]\nsecret = \"short\"\n",
        );
        s.env(env(&[
            ("LOCKSTEP_LISTEN", "nowhere"),
            ("LOCKSTEP_HUB_CONNECT_TIMEOUT", "soon"),
            ("LOCKSTEP_LOG_FORMAT", "xml"),
            ("LOCKSTEP_LISTN", "x"),
        ]));
        let errors = s.build().unwrap_err().0;
        let all = errors.join("\n");
        for needle in [
            "unknown key 'hub.max_conections'; did you mean 'hub.max_connections'?",
            "unknown environment variable LOCKSTEP_LISTN; did you mean LOCKSTEP_LISTEN?",
            "LOCKSTEP_LISTEN (environment): 'nowhere' is not an address",
            "LOCKSTEP_HUB_CONNECT_TIMEOUT (environment): 'soon' is not a duration",
            "'hub.outbound_queue' (config file): must be greater than 0",
            "LOCKSTEP_LOG_FORMAT (environment): 'xml' is not `text` or `json`",
            "'jwt.secret' (config file): must be at least 32 bytes long",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(errors.len(), 7, "{all}");
    }

    #[test]
    fn origins() {
        let mut s = Sources::default();
        s.env(env(&[(
            "LOCKSTEP_ALLOWED_ORIGINS",
            "https://a.example/, http://b:3000",
        )]));
        let config = s.build().unwrap();
        assert_eq!(
            config.hub.origins,
            OriginPolicy::List(vec!["https://a.example".into(), "http://b:3000".into()])
        );
        let mut s = Sources::default();
        s.file("c.toml", "allowed_origins = [\"*\"]");
        assert_eq!(s.build().unwrap().hub.origins, OriginPolicy::Any);
    }

    #[test]
    fn env_names_are_unique() {
        let mut names: Vec<String> = KEYS.iter().map(Key::env).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KEYS.len());
    }
}
