//! Edit locks end to end (DESIGN §6, §7): real `lockstep serve` processes over SQLite (the
//! embedded default) and a private PostgreSQL, events watched by real STOMP clients. The
//! helpers shared by every file are here; by concern:
//!
//! - [`contract`]: the whole HTTP contract, with the events it publishes;
//! - [`contention`]: safety under contention: many nodes and clients (annotators, bots locking
//!   in batches, tabs closing with session-bound locks, an admin taking over), every grant and
//!   event recorded, and a pure checker (`history::check`) that proves no two grants of an item
//!   overlap;
//! - [`expiry`]: exactly one `lock.expired` per expiry, also while a node is SIGKILLed;
//! - [`sessions`]: session-bound locks released after their WebSocket closes (also when its
//!   node shuts down), kept across a reconnect;
//! - [`crash`]: a PostgreSQL crash and restart under traffic.
//!
//! Every time compared here is the lock store's (the API reports database times).

mod contention;
mod contract;
mod crash;
mod expiry;
mod sessions;

use crate::envelope;
use loadtest::client::{Incoming, StompClient};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::postgres::Postgres;
use tests::redis::RedisServer;
use tests::{Lockstep, Options, random_secret};

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// A small HTTP helper: method, path, token, optional JSON body → (status, JSON body).
pub(crate) async fn call(
    node: &Lockstep,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    request(
        &reqwest::Client::new(),
        &node.http(),
        method,
        path,
        token,
        body,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One request with a bounded wait; a transport error or timeout is returned, not a panic, so
/// load tests can count requests whose outcome is unknown.
pub(crate) async fn request(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let mut request = client
        .request(method.parse().expect("method"), format!("{base}{path}"))
        .timeout(Duration::from_secs(15));
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((
        status,
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        },
    ))
}

pub(crate) fn lock_path(team: &str, item: &str) -> String {
    format!("/api/v1/teams/{team}/items/{item}/lock")
}

/// The error code of an error body.
pub(crate) fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

pub(crate) fn token_of(body: &Value) -> i64 {
    body["token"]
        .as_i64()
        .unwrap_or_else(|| panic!("no token in {body}"))
}

/// A token for a team admin (`admin_of`), who is not listed in `teams`.
pub(crate) fn admin_token(node: &Lockstep, sub: &str, team: &str) -> String {
    node.token_with(
        &json!({"sub": sub, "admin_of": [team], "scope": "locks", "exp": tests::now() + 3600}),
    )
}

/// Parses the API's timestamps (RFC 3339, milliseconds, UTC: `2026-11-25T10:00:00.123Z`) into
/// milliseconds since the epoch. Any other shape panics, so this also checks the format.
pub(crate) fn ms(value: &Value) -> i64 {
    value
        .as_str()
        .and_then(parse_ms)
        .unwrap_or_else(|| panic!("not RFC 3339 with milliseconds in UTC: {value}"))
}

fn parse_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let shape = b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z';
    if !shape {
        return None;
    }
    let n = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = &s[r];
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())
            .flatten()
    };
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    // Days since 1970-01-01 from a civil date (H. Hinnant's `days_from_civil`).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + n(11..13)?) * 60 + n(14..16)?) * 60_000 + n(17..19)? * 1000 + n(20..23)?)
}

/// A STOMP client for `sub` subscribed (as subscription `s`) to exactly one destination, so
/// everything it receives is in that topic's publish order.
pub(crate) async fn watcher(
    node: &Lockstep,
    sub: &str,
    teams: &[&str],
    destination: &str,
) -> StompClient {
    let mut client = crate::client(node, sub, teams, "").await;
    client.subscribe("s", destination).await.unwrap();
    client
}

/// The next event on a [`watcher`]: (type, data).
pub(crate) async fn next_event(client: &mut StompClient, destination: &str) -> (String, Value) {
    let frame = client
        .expect_frame()
        .await
        .unwrap_or_else(|e| panic!("waiting for an event on {destination}: {e:#}"));
    let envelope = envelope(&frame, "s", destination);
    (
        envelope["type"].as_str().expect("type").to_owned(),
        envelope["data"].clone(),
    )
}

/// The next event on a [`watcher`], which must be of `event_type`; returns its data.
pub(crate) async fn expect_event(
    client: &mut StompClient,
    destination: &str,
    event_type: &str,
) -> Value {
    let (got, data) = next_event(client, destination).await;
    assert_eq!(got, event_type, "unexpected event on {destination}: {data}");
    data
}

/// Asserts that nothing arrives on `client` for `quiet` (a deliberate wait: absence cannot be
/// awaited).
pub(crate) async fn assert_no_event(client: &mut StompClient, what: &str, quiet: Duration) {
    let extra = tokio::time::timeout(quiet, client.next()).await;
    assert!(
        !matches!(extra, Ok(Ok(Incoming::Frame(_)))),
        "unexpected event on {what}: {extra:?}"
    );
}

/// Polls `/readyz` (asynchronously, so other tasks of the test keep running) until it answers
/// `status`; returns how long that took.
pub(crate) async fn wait_ready(node: &Lockstep, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        let got = client
            .get(format!("{}/readyz", node.http()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        if got == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/readyz did not answer {status} within {within:?} (last {got}); log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `condition` every 50 ms until it holds; panics after `within`.
async fn wait_until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One node, ready, with the lock store at `database` (`None`: SQLite in its data dir).
pub(crate) async fn node(database: Option<&str>, extra: &[(&str, &str)]) -> Lockstep {
    let mut options = Options::default();
    if let Some(url) = database {
        options = options.env("LOCKSTEP_DATABASE_URL", url);
    }
    for (k, v) in extra {
        options = options.env(k, v);
    }
    let node = Lockstep::start_with(options);
    wait_ready(&node, 200, Duration::from_secs(20)).await;
    node
}

/// `n` nodes of one cluster: one secret, one PostgreSQL database, one Redis; all ready.
pub(crate) async fn cluster(
    n: usize,
    database: &str,
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> Vec<Lockstep> {
    let secret = random_secret();
    let nodes: Vec<Lockstep> = (0..n)
        .map(|_| {
            let mut options = Options::default()
                .secret(&secret)
                .env("LOCKSTEP_DATABASE_URL", database)
                .env("LOCKSTEP_REDIS_URL", redis.url())
                .env("LOCKSTEP_REDIS_PROBE_INTERVAL", "500ms");
            for (k, v) in extra {
                options = options.env(k, v);
            }
            Lockstep::start_with(options)
        })
        .collect();
    for node in &nodes {
        wait_ready(node, 200, Duration::from_secs(20)).await;
    }
    nodes
}

/// How many rows wait in the PostgreSQL outbox (events committed but not yet published and
/// deleted). Once it is 0 no event can be published again by a sweeper.
fn outbox_rows(pg: &Postgres, database: &str) -> usize {
    pg.psql(database, "SELECT count(*) FROM lock_events")
        .expect("count the outbox")
        .parse()
        .expect("a count")
}

#[test]
fn timestamps_parse_as_utc_milliseconds() {
    assert_eq!(ms(&json!("1970-01-01T00:00:00.000Z")), 0);
    assert_eq!(ms(&json!("2000-03-01T00:00:00.001Z")), 951_868_800_001);
    assert_eq!(ms(&json!("2026-11-25T10:00:00.123Z")), 1_795_600_800_123);
    for bad in [
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00.123+00:00",
        "2026-11-25 10:00:00.123Z",
        "2026-11-25T10:00:00.12xZ",
    ] {
        assert_eq!(parse_ms(bad), None, "{bad}");
    }
}
