//! The hub's settings. Every bound of DESIGN §9 that concerns WebSocket sessions is a field
//! here; the binary fills them from configuration.

use protocol::{HeartBeat, Limits, SessionKey};
use std::time::Duration;

/// Which `Origin`s may open a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OriginPolicy {
    /// Only pages served from this very host (`Origin` matches `Host`).
    #[default]
    SameOrigin,
    /// These origins (`scheme://host[:port]`), and same-origin pages.
    List(Vec<String>),
    /// Any origin (`*` in the list).
    Any,
}

/// What each topic's history keeps (DESIGN §12), for the in-process and the Redis broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Keep history at all. Without it, offsets are still assigned (in memory) but nothing can
    /// be replayed: every resume answers `x-recovered:false`.
    pub enabled: bool,
    /// Events kept per team topic, per item topic, per user topic, and for `/global`.
    pub team_events: usize,
    pub item_events: usize,
    pub user_events: usize,
    pub global_events: usize,
    /// Events older than this are dropped; idempotency keys are remembered this long.
    pub max_age: Duration,
    /// How long a topic's epoch and offset counter outlive its last event, so a quiet topic
    /// still answers "nothing missed".
    pub meta_ttl: Duration,
    /// Most events one resume replays; a client further behind gets `x-recovered:false`.
    pub max_replay: usize,
    /// Bytes of history the in-process broker keeps over all topics (oldest dropped first).
    pub memory_bytes: usize,
    /// Keys whose latest event a topic keeps for `snapshot` (DESIGN §13); past it the least
    /// recently updated key is forgotten.
    pub max_keys: usize,
    /// A key not updated for this long is forgotten.
    pub key_idle: Duration,
}

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            enabled: true,
            team_events: 1000,
            item_events: 100,
            user_events: 100,
            global_events: 1000,
            max_age: Duration::from_secs(600),
            meta_ttl: Duration::from_secs(7 * 24 * 3600),
            max_replay: 1000,
            memory_bytes: 256 * 1024 * 1024,
            max_keys: 1000,
            key_idle: Duration::from_secs(3600),
        }
    }
}

/// Presence of team and item topics (DESIGN §14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceConfig {
    /// Track presence and publish `presence.*` events at all.
    pub enabled: bool,
    /// How long a user's last subscription may be gone before they leave; a re-join within it
    /// (a reload, another tab, another node) is silent.
    pub leave_delay: Duration,
    /// Within this a dead node's users leave (its entries expire and are swept). Nodes refresh
    /// their entries three times per timeout.
    pub timeout: Duration,
    /// Changes within this window go to the store (and out as events) together.
    pub batch: Duration,
    /// Above this many users present, the HTTP list answers the count only.
    pub max_listed: usize,
}

impl Default for PresenceConfig {
    fn default() -> PresenceConfig {
        PresenceConfig {
            enabled: true,
            leave_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            batch: Duration::from_millis(50),
            max_listed: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    /// STOMP frame bounds.
    pub limits: Limits,
    /// What the server offers in `CONNECTED`'s `heart-beat`: it can send every `send_ms` and
    /// wants to hear from the client every `recv_ms`.
    pub heart_beat: HeartBeat,
    /// Most authenticated WebSocket connections on this node (a slot is taken at `CONNECT`).
    pub max_connections: usize,
    /// Most connections waiting for `CONNECT`; past it, the oldest waiting one is closed.
    pub max_pending_connections: usize,
    /// Largest frame a client may send before `CONNECT` succeeded (a `CONNECT` carries a
    /// token, nothing bigger is needed yet).
    pub connect_frame_bytes: usize,
    /// Most subscriptions on one connection.
    pub max_subscriptions: usize,
    /// Capacity, in frames and in bytes, of a connection's outbound queue; a client that lets
    /// it fill up is closed with 4008.
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    /// Largest event `data` (JSON bytes) anyone may publish, over STOMP or HTTP.
    pub max_event_bytes: usize,
    /// How long a new connection may take to send `CONNECT`.
    pub connect_timeout: Duration,
    /// How long one write to a client may take before it counts as a slow consumer, and how
    /// long the closing handshake may take.
    pub write_timeout: Duration,
    /// Longest a connection may stay silent (no frame, heart-beat or pong) before it counts as
    /// dead. It caps the heart-beat interval a client asks for, and covers clients that send
    /// no heart-beats at all: the server pings them at half of it.
    pub idle_timeout: Duration,
    /// How long a `SUBSCRIBE` waits for the cluster broker to confirm before failing.
    pub subscribe_timeout: Duration,
    /// `SEND` frames per second per token (shared by all its connections on this node; 0:
    /// unlimited), the burst allowed above it, and the highest rate a token's `publish_rate`
    /// claim may ask for.
    pub publish_rate: u32,
    pub publish_burst: u32,
    pub max_claimed_rate: u32,
    /// Who may open WebSockets from a browser.
    pub origins: OriginPolicy,
    /// Size of a connection's WebSocket read buffer. tokio-tungstenite allocates it eagerly for
    /// every connection (128 KiB by default), so it dominates idle memory; frames larger than it
    /// still work, they just take several reads.
    pub read_buffer_bytes: usize,
    /// This node's id, a ULID. Session ids start with it (`{node_id}.{ulid}.{mac}`), so that
    /// when the node dies the other nodes can tell which sessions died with it.
    pub node_id: String,
    /// Signs session ids, so the lock API can check one was issued to its caller. Every node
    /// of a cluster must use the same key.
    pub session_key: SessionKey,
    /// What history keeps, and how far a resume may reach back.
    pub history: HistoryConfig,
    pub presence: PresenceConfig,
    /// How long a control call's revocation is kept: at least the lifetime of the longest
    /// token it must refuse (a token issued before the call and still valid after this would
    /// be accepted again).
    pub revocation_ttl: Duration,
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            limits: Limits::default(),
            heart_beat: HeartBeat {
                send_ms: 10_000,
                recv_ms: 10_000,
            },
            max_connections: 100_000,
            max_pending_connections: 1024,
            connect_frame_bytes: 16 * 1024,
            max_subscriptions: 64,
            outbound_queue: 1024,
            outbound_queue_bytes: 1024 * 1024,
            max_event_bytes: 60 * 1024,
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            subscribe_timeout: Duration::from_secs(10),
            publish_rate: 100,
            publish_burst: 200,
            max_claimed_rate: 10_000,
            origins: OriginPolicy::SameOrigin,
            read_buffer_bytes: 4096,
            node_id: ulid::Ulid::new().to_string(),
            session_key: SessionKey::new(&rand::random::<[u8; 32]>()),
            history: HistoryConfig::default(),
            presence: PresenceConfig::default(),
            revocation_ttl: Duration::from_secs(24 * 3600),
        }
    }
}
