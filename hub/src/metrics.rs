//! The hub's Prometheus metrics: their names, help texts, and the handles hot paths keep.
//!
//! Metrics go through the `metrics` facade; the binary installs the Prometheus recorder before
//! it builds the hub, and without one every handle is a no-op (unit tests). Handles on paths that
//! run per delivery or per write are resolved once, when the hub is built, so they cost an atomic
//! add rather than a registry lookup; rare events (a close, a refused frame) use the macros.
//!
//! Gauges (connections, subscriptions, topics) are set when `/metrics` is scraped, from the
//! registry itself, so they can never drift from the truth.

use ::metrics::{Counter, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};
use protocol::{Command, Disconnect};

pub const CONNECTIONS: &str = "lockstep_ws_connections";
pub const PENDING_CONNECTIONS: &str = "lockstep_ws_pending_connections";
pub const USERS: &str = "lockstep_ws_users";
pub const PENDING_EVICTED: &str = "lockstep_ws_pending_evicted_total";
pub const SEND_THROTTLED: &str = "lockstep_send_throttled_total";
pub const GAPS: &str = "lockstep_stream_gaps_total";
pub const CONFLATED: &str = "lockstep_deliveries_conflated_total";
pub const RESETS: &str = "lockstep_stream_resets_total";
pub const RESUMES: &str = "lockstep_resumes_total";
pub const REPLAYED: &str = "lockstep_replayed_events_total";
pub const CONNECTIONS_OPENED: &str = "lockstep_ws_connections_opened_total";
pub const CLOSES: &str = "lockstep_ws_closes_total";
pub const SUBSCRIPTIONS: &str = "lockstep_subscriptions";
pub const TOPICS: &str = "lockstep_topics";
pub const FRAMES_IN: &str = "lockstep_frames_in_total";
pub const FRAMES_OUT: &str = "lockstep_frames_out_total";
pub const DELIVERIES: &str = "lockstep_deliveries_total";
pub const DELIVERIES_DROPPED: &str = "lockstep_deliveries_dropped_total";
pub const EVENTS_PUBLISHED: &str = "lockstep_events_published_total";
pub const PUBLISH_FAILURES: &str = "lockstep_publish_failures_total";
pub const BROKER_PUBLISH_SECONDS: &str = "lockstep_broker_publish_seconds";
pub const BROKER_SUBSCRIBE_SECONDS: &str = "lockstep_broker_subscribe_seconds";
pub const BROKER_LAGGED: &str = "lockstep_broker_lagged_total";
pub const REDIS_RECONNECTS: &str = "lockstep_redis_reconnects_total";
pub const REDIS_PROBE_FAILURES: &str = "lockstep_redis_probe_failures_total";
pub const PRESENCE_UPDATES: &str = "lockstep_presence_updates_total";
pub const PRESENCE_CHANGES: &str = "lockstep_presence_changes_total";
pub const PRESENCE_FAILURES: &str = "lockstep_presence_failures_total";
pub const CONTROL_CALLS: &str = "lockstep_control_calls_total";
pub const CONTROL_APPLIED: &str = "lockstep_control_applied_total";
pub const UNSUBSCRIBED: &str = "lockstep_subscriptions_ended_total";
pub const TOKEN_REFRESHES: &str = "lockstep_token_refreshes_total";
pub const REVOCATION_CHECK_SECONDS: &str = "lockstep_revocation_check_seconds";

/// Registers help texts and units. Call once, after the recorder is installed.
pub fn describe() {
    describe_gauge!(
        CONNECTIONS,
        "Open WebSocket connections on this node that sent a valid CONNECT."
    );
    describe_gauge!(
        USERS,
        "Distinct users with at least one authenticated connection on this node."
    );
    describe_gauge!(
        PENDING_CONNECTIONS,
        "WebSocket connections on this node that have not sent CONNECT yet."
    );
    describe_counter!(
        PENDING_EVICTED,
        "Connections closed before CONNECT because the pool of waiting connections was full (the oldest makes room)."
    );
    describe_counter!(
        CONFLATED,
        "Keyed events that replaced their key's queued event for a slow subscriber (x-conflated) instead of queueing behind it."
    );
    describe_counter!(
        GAPS,
        "Skipped offsets this node saw in a topic's stream, each filled from history once for the topic."
    );
    describe_counter!(
        RESETS,
        "lockstep.reset events this node sent a topic's subscribers: a gap history could not fill, or a new epoch."
    );
    describe_counter!(
        RESUMES,
        "Subscriptions that asked for a start position, by outcome (recovered true or false)."
    );
    describe_counter!(
        REPLAYED,
        "Events replayed from history to resuming subscriptions."
    );
    describe_counter!(
        SEND_THROTTLED,
        "STOMP SEND frames held back because the token's publish rate was spent (the session reads on once the budget refills)."
    );
    describe_counter!(
        CONNECTIONS_OPENED,
        "WebSocket connections accepted (upgraded) since start."
    );
    describe_counter!(
        CLOSES,
        "WebSocket connections ended, by close code (`peer`: the client or the network ended it)."
    );
    describe_counter!(
        PRESENCE_UPDATES,
        "Presence store updates this node sent (one per topic and batch window, and per topic at every refresh)."
    );
    describe_counter!(
        PRESENCE_CHANGES,
        "presence.joined and presence.left decisions this node's updates produced, by change."
    );
    describe_counter!(
        PRESENCE_FAILURES,
        "Presence store updates that failed (the next refresh sends the node's entries again)."
    );
    describe_gauge!(SUBSCRIPTIONS, "STOMP subscriptions held on this node.");
    describe_gauge!(TOPICS, "Topics with at least one subscriber on this node.");
    describe_counter!(FRAMES_IN, "STOMP frames received, by command.");
    describe_counter!(
        FRAMES_OUT,
        "STOMP frames sent, by command (heart-beats not counted)."
    );
    describe_counter!(
        DELIVERIES,
        "MESSAGE frames queued for local subscribers (one per subscriber per event)."
    );
    describe_counter!(
        DELIVERIES_DROPPED,
        "Deliveries refused because the subscriber's queue was full; that connection is closed with 4008."
    );
    describe_counter!(
        EVENTS_PUBLISHED,
        "Events the broker confirmed: STOMP SEND, the HTTP API, and Lockstep's own lock and item events."
    );
    describe_counter!(
        PUBLISH_FAILURES,
        "Events the broker refused or could not take (the publisher got an error)."
    );
    describe_histogram!(
        BROKER_PUBLISH_SECONDS,
        Unit::Seconds,
        "Time from an event's publish to the broker's confirmation."
    );
    describe_histogram!(
        BROKER_SUBSCRIBE_SECONDS,
        Unit::Seconds,
        "Time for one broker subscribe call (a batch of topics)."
    );
    describe_counter!(
        BROKER_LAGGED,
        "Events lost because this node fell behind the Redis pub/sub connection."
    );
    describe_counter!(
        REDIS_RECONNECTS,
        "Connections and reconnections of the Redis pub/sub connection."
    );
    describe_counter!(
        REDIS_PROBE_FAILURES,
        "Pub/sub probes that did not come back, each forcing a resubscribe."
    );
    describe_counter!(
        CONTROL_CALLS,
        "Control API calls this node made, by op (disconnect, unsubscribe)."
    );
    describe_counter!(
        CONTROL_APPLIED,
        "Connections on this node a control call reached, by op (closed with 4011, or \
         subscriptions ended)."
    );
    describe_counter!(
        UNSUBSCRIBED,
        "Subscriptions ended by the server with lockstep.unsubscribed, by reason (revoked by the \
         control API, or no longer allowed by a refreshed token)."
    );
    describe_counter!(
        TOKEN_REFRESHES,
        "Token refreshes over /lockstep/token, by outcome (ok, refused)."
    );
    describe_histogram!(
        REVOCATION_CHECK_SECONDS,
        Unit::Seconds,
        "Time to read a user's revocations from the broker (once per CONNECT and SUBSCRIBE)."
    );
    // Unlabelled counters exist from the start, so rate() and absence alerts work before the
    // first event.
    for name in [
        CONNECTIONS_OPENED,
        PENDING_EVICTED,
        SEND_THROTTLED,
        GAPS,
        RESETS,
        REPLAYED,
        CONFLATED,
        DELIVERIES,
        DELIVERIES_DROPPED,
        EVENTS_PUBLISHED,
        PUBLISH_FAILURES,
        BROKER_LAGGED,
        REDIS_RECONNECTS,
        REDIS_PROBE_FAILURES,
    ] {
        ::metrics::counter!(name).absolute(0);
    }
}

/// Handles the per-event and per-write paths use.
#[derive(Debug, Clone)]
pub(crate) struct HubMetrics {
    /// `frames_out{command="MESSAGE"}`: added once per write batch, not per frame.
    pub(crate) messages_out: Counter,
    /// Events the broker confirmed, and those it refused.
    pub(crate) published: Counter,
    pub(crate) publish_failures: Counter,
    /// Publish to confirmation, one sample per event.
    pub(crate) publish_seconds: Histogram,
    /// One sample per revocation read on `CONNECT` and `SUBSCRIBE`.
    pub(crate) revocation_check_seconds: Histogram,
}

impl HubMetrics {
    pub(crate) fn new() -> HubMetrics {
        HubMetrics {
            messages_out: ::metrics::counter!(FRAMES_OUT, "command" => "MESSAGE"),
            published: ::metrics::counter!(EVENTS_PUBLISHED),
            publish_failures: ::metrics::counter!(PUBLISH_FAILURES),
            publish_seconds: ::metrics::histogram!(BROKER_PUBLISH_SECONDS),
            revocation_check_seconds: ::metrics::histogram!(REVOCATION_CHECK_SECONDS),
        }
    }
}

/// Counts a frame a client sent. Unknown commands share one label, so a client cannot grow the
/// number of series.
pub(crate) fn frame_in(command: &Command) {
    ::metrics::counter!(FRAMES_IN, "command" => command_label(command)).increment(1);
}

/// Counts a frame the server sent itself (not a fan-out `MESSAGE`).
pub(crate) fn frame_out(command: &Command) {
    ::metrics::counter!(FRAMES_OUT, "command" => command_label(command)).increment(1);
}

fn command_label(command: &Command) -> &'static str {
    command.known_name().unwrap_or("other")
}

/// Counts a connection's end: the close code the server sent, or `peer`.
pub(crate) fn closed(disconnect: Option<Disconnect>) {
    let code = match disconnect {
        Some(d) => close_label(d.code),
        None => "peer",
    };
    ::metrics::counter!(CLOSES, "code" => code).increment(1);
}

/// Close codes as static labels: the ones the hub sends, anything else as `other`.
fn close_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1013 => "1013",
        4000 => "4000",
        4001 => "4001",
        4002 => "4002",
        4003 => "4003",
        4004 => "4004",
        4008 => "4008",
        4009 => "4009",
        4010 => "4010",
        4011 => "4011",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_close_code_the_hub_sends_has_its_own_label() {
        for d in Disconnect::ALL {
            assert_eq!(close_label(d.code), d.code.to_string(), "{d:?}");
        }
    }
}
