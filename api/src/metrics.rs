//! The API's Prometheus metrics: names, help texts, and the request-counting middleware.
//!
//! Lock state changes are counted from the events they publish after commit (every grant,
//! release, expiry and takeover publishes one event to the team topic), so the sum over all
//! nodes is the cluster's count, whichever node announced an expiry or a dead node's events.
//! Events are at-least-once at two rare points (a node dies, or cannot delete the outbox row,
//! after publishing), and so are these counts.

use ::metrics::{Unit, describe_counter, describe_histogram};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;

pub const HTTP_REQUESTS: &str = "lockstep_http_requests_total";
pub const HTTP_SECONDS: &str = "lockstep_http_request_duration_seconds";
pub const LOCK_GRANTS: &str = "lockstep_lock_grants_total";
pub const LOCK_RELEASES: &str = "lockstep_lock_releases_total";
pub const LOCK_EXPIRIES: &str = "lockstep_lock_expiries_total";
pub const LOCK_TAKEOVERS: &str = "lockstep_lock_takeovers_total";
pub const LOCK_CONFLICTS: &str = "lockstep_lock_conflicts_total";
pub const LOCK_LOST: &str = "lockstep_lock_lost_total";
pub const PRESIGNED_URLS: &str = "lockstep_presigned_urls_total";
pub const UPLOADS_COMMITTED: &str = "lockstep_uploads_committed_total";
pub const RATE_LIMITED: &str = "lockstep_http_rate_limited_total";
/// The hub's publish failure counter (`hub::metrics::PUBLISH_FAILURES`, described there): the
/// API adds the publishes it refuses before they reach the hub because the broker is away.
pub const PUBLISH_FAILURES: &str = "lockstep_publish_failures_total";
pub const WEBHOOK_EVENTS: &str = "lockstep_webhook_events_total";
pub const WEBHOOK_DROPPED: &str = "lockstep_webhook_events_dropped_total";
pub const WEBHOOK_DELIVERIES: &str = "lockstep_webhook_deliveries_total";
pub const WEBHOOK_DEAD_LETTERS: &str = "lockstep_webhook_dead_letters_total";
pub const WEBHOOK_LAG: &str = "lockstep_webhook_delivery_lag_seconds";
pub const WEBHOOK_ATTEMPT_SECONDS: &str = "lockstep_webhook_attempt_duration_seconds";
pub const WEBHOOK_QUEUE_DEPTH: &str = "lockstep_webhook_queue_depth";

/// Registers help texts and units. Call once, after the recorder is installed.
pub fn describe() {
    describe_counter!(
        WEBHOOK_EVENTS,
        "Webhook events queued for every endpoint, by source (presence: occupancy and presence decided on this node; locks: lock events moved from the outbox)."
    );
    describe_counter!(
        WEBHOOK_DROPPED,
        "Webhook events dropped because this node's queue to the database was full (the database was away)."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook delivery attempts, by outcome (delivered: 2xx; failed: any other answer, a timeout or a connection error)."
    );
    describe_counter!(
        WEBHOOK_DEAD_LETTERS,
        "Webhook deliveries given up after webhooks.retry_for and moved to webhook_dead_letters, by endpoint."
    );
    describe_histogram!(
        WEBHOOK_LAG,
        Unit::Seconds,
        "Time from a delivery being queued to its successful attempt (retries included)."
    );
    describe_histogram!(
        WEBHOOK_ATTEMPT_SECONDS,
        Unit::Seconds,
        "Duration of one webhook delivery attempt."
    );
    ::metrics::describe_gauge!(
        WEBHOOK_QUEUE_DEPTH,
        "Deliveries waiting for an endpoint, as last seen by the node delivering it."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        HTTP_SECONDS,
        Unit::Seconds,
        "HTTP request latency, by method and route template."
    );
    describe_counter!(
        LOCK_GRANTS,
        "Locks granted to a new holder (lock.acquired events published)."
    );
    describe_counter!(
        LOCK_RELEASES,
        "Locks released by their holder or after their session closed."
    );
    describe_counter!(
        LOCK_EXPIRIES,
        "Locks whose TTL ran out (lock.expired events published)."
    );
    describe_counter!(LOCK_TAKEOVERS, "Locks ended by an admin's forced takeover.");
    describe_counter!(
        LOCK_CONFLICTS,
        "Lock API requests (acquire, renew, release, batch acquire) refused because another user holds the item (409 lock_held)."
    );
    describe_counter!(
        LOCK_LOST,
        "Lock API requests (renew, release) with a token whose grant is over (410 lock_lost)."
    );
    describe_counter!(PRESIGNED_URLS, "Presigned object URLs issued, by method.");
    describe_counter!(
        UPLOADS_COMMITTED,
        "Uploads confirmed by a commit (item.updated published)."
    );
    describe_counter!(
        RATE_LIMITED,
        "API requests refused because the token's event budget was spent (429, or 413 for a batch above the burst)."
    );
    // Unlabelled counters exist from the start, so rate() and absence alerts work before the
    // first event.
    for name in [
        LOCK_GRANTS,
        LOCK_RELEASES,
        LOCK_EXPIRIES,
        LOCK_TAKEOVERS,
        LOCK_CONFLICTS,
        LOCK_LOST,
        UPLOADS_COMMITTED,
        RATE_LIMITED,
    ] {
        ::metrics::counter!(name).absolute(0);
    }
}

/// Counts a lock event that went out, if it is a team-topic state change. The copy of an
/// expiry or takeover sent to the previous holder's user topic is the same change, not counted.
pub(crate) fn lock_event(topic: &str, event_type: &str) {
    if !topic.starts_with("/team/") {
        return;
    }
    let name = match event_type {
        "lock.acquired" => LOCK_GRANTS,
        "lock.released" => LOCK_RELEASES,
        "lock.expired" => LOCK_EXPIRIES,
        "lock.taken_over" => LOCK_TAKEOVERS,
        _ => return,
    };
    ::metrics::counter!(name).increment(1);
}

pub(crate) fn lock_conflict() {
    ::metrics::counter!(LOCK_CONFLICTS).increment(1);
}

pub(crate) fn lock_lost() {
    ::metrics::counter!(LOCK_LOST).increment(1);
}

pub(crate) fn presigned(method: &'static str, urls: usize) {
    ::metrics::counter!(PRESIGNED_URLS, "method" => method).increment(urls as u64);
}

pub(crate) fn rate_limited() {
    ::metrics::counter!(RATE_LIMITED).increment(1);
}

pub(crate) fn upload_committed() {
    ::metrics::counter!(UPLOADS_COMMITTED).increment(1);
}

/// Counts every request by route template (never the raw path, which would let clients create
/// series) and records its latency.
pub(crate) async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = crate::route(&request).to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    ::metrics::counter!(HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!(HTTP_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed());
    response
}

/// Standard methods by name; anything else (clients may invent methods) as `other`.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "other",
    }
}
