//! The hub's settings. Every bound of DESIGN §9 that concerns WebSocket sessions is a field
//! here; the binary fills them from configuration.

use protocol::{HeartBeat, Limits};
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

#[derive(Debug, Clone)]
pub struct HubConfig {
    /// STOMP frame bounds.
    pub limits: Limits,
    /// What the server offers in `CONNECTED`'s `heart-beat`: it can send every `send_ms` and
    /// wants to hear from the client every `recv_ms`.
    pub heart_beat: HeartBeat,
    /// Most WebSocket connections on this node.
    pub max_connections: usize,
    /// Most subscriptions on one connection.
    pub max_subscriptions: usize,
    /// Capacity, in frames, of a connection's outbound queue; a client that lets it fill up is
    /// closed with 4008.
    pub outbound_queue: usize,
    /// How long a new connection may take to send `CONNECT`.
    pub connect_timeout: Duration,
    /// How long one write to a client may take before it counts as a slow consumer, and how
    /// long the closing handshake may take.
    pub write_timeout: Duration,
    /// How long a `SUBSCRIBE` waits for the cluster broker to confirm before failing.
    pub subscribe_timeout: Duration,
    /// `SEND` frames per second per connection, and the burst allowed above it.
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// Who may open WebSockets from a browser.
    pub origins: OriginPolicy,
    /// Size of a connection's WebSocket read buffer. tokio-tungstenite allocates it eagerly for
    /// every connection (128 KiB by default), so it dominates idle memory; frames larger than it
    /// still work, they just take several reads.
    pub read_buffer_bytes: usize,
    /// This node's id. Session ids start with it (`{node_id}.{ulid}`), so that when the node
    /// dies the other nodes can tell which sessions died with it. Empty: plain ULIDs.
    pub node_id: String,
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
            max_subscriptions: 64,
            outbound_queue: 1024,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            subscribe_timeout: Duration::from_secs(10),
            publish_rate: 100,
            publish_burst: 200,
            origins: OriginPolicy::SameOrigin,
            read_buffer_bytes: 4096,
            node_id: String::new(),
        }
    }
}
