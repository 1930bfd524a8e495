//! Edit locks end to end (DESIGN §6, §7): real `lockstep serve` processes over SQLite (the
//! embedded default) and a private PostgreSQL, events watched by real STOMP clients.
//!
//! - the whole HTTP contract, with the events it publishes ([`lifecycle`]);
//! - safety under contention: many nodes and clients, every grant and event recorded, and a
//!   pure checker ([`history::check`]) that proves no two grants of an item overlap;
//! - exactly one `lock.expired` per expiry, also while a node is SIGKILLed;
//! - session-bound locks released after their WebSocket closes (also when its node shuts
//!   down), kept across a reconnect;
//! - a PostgreSQL crash and restart under traffic.
//!
//! Every time compared here is the lock store's (the API reports database times).

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

// ------------------------------------------------------------------------------------------
// 1. The HTTP contract and its events
// ------------------------------------------------------------------------------------------

/// The whole HTTP contract on one node with a fresh store, and the events each change
/// publishes. Watchers each hold one topic, so any event that should not exist (an extension,
/// a repeated release, a refused request, a blocked batch) shows up as a mismatch.
/// Returns the last token granted for item 812.
async fn lifecycle(node: &Lockstep) -> i64 {
    let ana = node.token("ana", &["t1"], "locks");
    let bob = node.token("bob", &["t1"], "locks");
    let root = admin_token(node, "root", "t1");
    let mut team = watcher(node, "watch", &["t1"], "/team/t1").await;
    let mut ana_inbox = watcher(node, "ana", &["t1"], "/user/ana").await;
    let mut bob_inbox = watcher(node, "bob", &["t1"], "/user/bob").await;
    let item = lock_path("t1", "812");

    // ana takes the item with the default TTL; the event carries exactly the grant.
    let (s, a1) = call(node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{a1}");
    assert_eq!(
        (&a1["team"], &a1["item"], &a1["holder"]),
        (&json!("t1"), &json!("812"), &json!("ana")),
        "{a1}"
    );
    assert!(a1.get("session").is_none(), "{a1}");
    assert_eq!(
        ms(&a1["expires_at"]) - ms(&a1["acquired_at"]),
        60_000,
        "{a1}"
    );
    let t1 = token_of(&a1);
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        a1
    );

    // Another user is refused, and told who holds it until when.
    let (s, body) = call(node, "POST", &item, &bob, Some(json!({}))).await;
    assert_eq!((s, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(
        body["error"]["details"],
        json!({"holder": "ana", "expires_at": a1["expires_at"]})
    );

    // The holder asking again keeps the token and gets a later expiry (no event).
    let (s, a2) = call(node, "POST", &item, &ana, Some(json!({"ttl_ms": 120_000}))).await;
    assert_eq!(s, 200, "{a2}");
    assert_eq!(
        (token_of(&a2), &a2["acquired_at"]),
        (t1, &a1["acquired_at"]),
        "{a2}"
    );
    assert!(ms(&a2["expires_at"]) > ms(&a1["expires_at"]), "{a1} → {a2}");

    // Renewal by the holder's token.
    let (s, r1) = call(
        node,
        "PUT",
        &item,
        &ana,
        Some(json!({"token": t1, "ttl_ms": 300_000})),
    )
    .await;
    assert_eq!(s, 200, "{r1}");
    assert_eq!((token_of(&r1), &r1["holder"]), (t1, &json!("ana")), "{r1}");
    assert!(ms(&r1["expires_at"]) > ms(&a2["expires_at"]), "{a2} → {r1}");
    // Someone else's renewal with the token is refused while ana holds it.
    let (s, body) = call(node, "PUT", &item, &bob, Some(json!({"token": t1}))).await;
    assert_eq!((s, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(body["error"]["details"]["holder"], "ana");

    // GET and the team list show the live grant as renewed.
    let (s, got) = call(node, "GET", &item, &bob, None).await;
    assert_eq!((s, &got), (200, &r1));
    let (s, list) = call(node, "GET", "/api/v1/teams/t1/locks", &bob, None).await;
    assert_eq!((s, &list["locks"]), (200, &json!([r1.clone()])), "{list}");
    // With the team topic's position read before the list.
    assert!(list["position"]["offset"].as_u64().is_some(), "{list}");

    // Release; a repeated release with the same token (here as ?token=) is 204 again, with no
    // second event; the released token cannot renew.
    let (s, body) = call(node, "DELETE", &item, &ana, Some(json!({"token": t1}))).await;
    assert_eq!(s, 204, "{body}");
    let released = expect_event(&mut team, "/team/t1", "lock.released").await;
    let released_at = ms(&released["released_at"]);
    assert_eq!(
        released,
        json!({"team": "t1", "item": "812", "holder": "ana", "token": t1, "reason": "released", "released_at": released["released_at"]})
    );
    assert!(released_at >= ms(&a1["acquired_at"]), "{released}");
    let (s, body) = call(node, "DELETE", &format!("{item}?token={t1}"), &ana, None).await;
    assert_eq!(s, 204, "{body}");
    let (s, body) = call(node, "PUT", &item, &ana, Some(json!({"token": t1}))).await;
    assert_eq!((s, code(&body)), (410, "lock_lost"), "{body}");
    let (s, body) = call(node, "GET", &item, &ana, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
    let (s, list) = call(node, "GET", "/api/v1/teams/t1/locks", &ana, None).await;
    assert_eq!((s, &list["locks"]), (200, &json!([])), "{list}");

    // bob's grant has a greater token and starts no earlier than ana's release.
    let (s, b1) = call(node, "POST", &item, &bob, None).await;
    assert_eq!(s, 200, "{b1}");
    let t2 = token_of(&b1);
    assert!(t2 > t1, "token {t2} after {t1}");
    assert!(ms(&b1["acquired_at"]) >= released_at, "{b1} vs {released}");
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        b1
    );
    // ana's stale token: renew and release answer 409 while bob holds the item.
    for method in ["PUT", "DELETE"] {
        let (s, body) = call(node, method, &item, &ana, Some(json!({"token": t1}))).await;
        assert_eq!((s, code(&body)), (409, "lock_held"), "{method}: {body}");
        assert_eq!(body["error"]["details"]["holder"], "bob");
    }

    // Takeover: a member who is not an admin may not; a team admin may.
    let force = format!("{item}?force=true");
    let (s, body) = call(node, "DELETE", &force, &bob, None).await;
    assert_eq!((s, code(&body)), (403, "forbidden"), "{body}");
    let (s, body) = call(node, "DELETE", &force, &root, None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (&body["taken_over_from"], token_of(&body)),
        (&json!("bob"), t2),
        "{body}"
    );
    let taken = expect_event(&mut team, "/team/t1", "lock.taken_over").await;
    assert_eq!(
        taken,
        json!({"team": "t1", "item": "812", "holder": "bob", "token": t2, "by": "root", "released_at": taken["released_at"]})
    );
    assert!(ms(&taken["released_at"]) >= ms(&b1["acquired_at"]));
    assert_eq!(
        expect_event(&mut bob_inbox, "/user/bob", "lock.taken_over").await,
        taken
    );
    // The taken-over token is over (410), and there is nothing left to take over.
    for method in ["PUT", "DELETE"] {
        let (s, body) = call(node, method, &item, &bob, Some(json!({"token": t2}))).await;
        assert_eq!((s, code(&body)), (410, "lock_lost"), "{method}: {body}");
    }
    let (s, body) = call(node, "DELETE", &force, &root, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
    // A third grant: tokens keep increasing across release, takeover and new grants.
    let (s, c1) = call(node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{c1}");
    let t3 = token_of(&c1);
    assert!(t3 > t2, "token {t3} after {t2}");
    assert!(ms(&c1["acquired_at"]) >= ms(&taken["released_at"]));
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        c1
    );
    let (s, _) = call(node, "DELETE", &item, &ana, Some(json!({"token": t3}))).await;
    assert_eq!(s, 204);
    expect_event(&mut team, "/team/t1", "lock.released").await;

    // Expiry: announced on the team topic and to the holder, at the grant's expiry time; the
    // expired token cannot renew.
    let short = lock_path("t1", "e1");
    let (s, e1) = call(node, "POST", &short, &ana, Some(json!({"ttl_ms": 1000}))).await;
    assert_eq!(s, 200, "{e1}");
    assert_eq!(ms(&e1["expires_at"]) - ms(&e1["acquired_at"]), 1000);
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        e1
    );
    let expired = expect_event(&mut team, "/team/t1", "lock.expired").await;
    assert_eq!(
        expired,
        json!({"team": "t1", "item": "e1", "holder": "ana", "token": e1["token"], "expired_at": e1["expires_at"]})
    );
    assert_eq!(
        expect_event(&mut ana_inbox, "/user/ana", "lock.expired").await,
        expired
    );
    let (s, body) = call(
        node,
        "PUT",
        &short,
        &ana,
        Some(json!({"token": e1["token"]})),
    )
    .await;
    assert_eq!((s, code(&body)), (410, "lock_lost"), "{body}");
    let (s, _) = call(node, "GET", &short, &ana, None).await;
    assert_eq!(s, 404);

    batches(node, &mut team, &ana, &bob).await;
    refusals(node).await;

    // Nothing else was published: no event for extensions, renewals, repeated releases,
    // refused requests or blocked batches.
    let (s, list) = call(node, "GET", "/api/v1/teams/t1/locks", &ana, None).await;
    assert_eq!((s, &list["locks"]), (200, &json!([])), "{list}");
    let quiet = Duration::from_millis(500);
    assert_no_event(&mut team, "/team/t1", quiet).await;
    assert_no_event(&mut ana_inbox, "/user/ana", quiet).await;
    assert_no_event(&mut bob_inbox, "/user/bob", quiet).await;
    t3
}

/// Batch acquire is all-or-nothing; batch release reports each item.
async fn batches(node: &Lockstep, team: &mut StompClient, ana: &str, bob: &str) {
    let batch = "/api/v1/teams/t1/locks/batch";
    let (s, b2) = call(node, "POST", &lock_path("t1", "b2"), bob, None).await;
    assert_eq!(s, 200, "{b2}");
    assert_eq!(expect_event(team, "/team/t1", "lock.acquired").await, b2);

    // One blocked item: 409 names it, and none of the free items was locked.
    let (s, body) = call(
        node,
        "POST",
        batch,
        ana,
        Some(json!({"items": ["b1", "b2", "b3"], "ttl_ms": 60_000})),
    )
    .await;
    assert_eq!((s, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(
        body["error"]["details"]["blockers"],
        json!([{"item": "b2", "holder": "bob", "expires_at": b2["expires_at"]}])
    );
    for free in ["b1", "b3"] {
        let (s, body) = call(node, "GET", &lock_path("t1", free), ana, None).await;
        assert_eq!((s, code(&body)), (404, "not_locked"), "{free}: {body}");
    }
    let (_, list) = call(node, "GET", "/api/v1/teams/t1/locks", ana, None).await;
    assert_eq!(list["locks"], json!([b2.clone()]), "{list}");

    // Once b2 is free the same batch is granted whole, answered in request order.
    let (s, _) = call(
        node,
        "DELETE",
        &lock_path("t1", "b2"),
        bob,
        Some(json!({"token": b2["token"]})),
    )
    .await;
    assert_eq!(s, 204);
    expect_event(team, "/team/t1", "lock.released").await;
    let (s, body) = call(
        node,
        "POST",
        batch,
        ana,
        Some(json!({"items": ["b3", "b1", "b2"], "ttl_ms": 60_000})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let granted = body["locks"].as_array().expect("locks").clone();
    let items: Vec<&str> = granted
        .iter()
        .map(|l| l["item"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["b3", "b1", "b2"], "{body}");
    assert!(granted.iter().all(|l| l["holder"] == "ana"), "{body}");
    assert!(
        token_of(&granted[2]) > token_of(&b2),
        "b2's token must grow: {body}"
    );
    let mut announced = BTreeMap::new();
    for _ in 0..3 {
        let data = expect_event(team, "/team/t1", "lock.acquired").await;
        announced.insert(data["item"].as_str().unwrap().to_owned(), data);
    }
    for lock in &granted {
        assert_eq!(&announced[lock["item"].as_str().unwrap()], lock);
    }
    let token = |item: &str| token_of(granted.iter().find(|l| l["item"] == item).unwrap());

    // Batch release: each item reported; a wrong token or someone else's lock is not released.
    let (s, b4) = call(node, "POST", &lock_path("t1", "b4"), bob, None).await;
    assert_eq!(s, 200, "{b4}");
    expect_event(team, "/team/t1", "lock.acquired").await;
    let (s, body) = call(
        node,
        "DELETE",
        batch,
        ana,
        Some(json!({"items": [
            {"item": "b1", "token": token("b1")},
            {"item": "b2", "token": token("b2")},
            {"item": "b3", "token": token("b3") + 7},
            {"item": "b4", "token": b4["token"]},
        ]})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["results"],
        json!([
            {"item": "b1", "released": true},
            {"item": "b2", "released": true},
            {"item": "b3", "released": false, "code": "lock_lost"},
            {"item": "b4", "released": false, "code": "lock_held", "holder": "bob"},
        ])
    );
    let mut released = BTreeSet::new();
    for _ in 0..2 {
        let data = expect_event(team, "/team/t1", "lock.released").await;
        assert_eq!(data["reason"], "released");
        released.insert(data["item"].as_str().unwrap().to_owned());
    }
    assert_eq!(released, BTreeSet::from(["b1".to_owned(), "b2".to_owned()]));
    let (_, list) = call(node, "GET", "/api/v1/teams/t1/locks", ana, None).await;
    let live: Vec<&str> = list["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["item"].as_str().unwrap())
        .collect();
    assert_eq!(live, ["b3", "b4"]);
    // Tidy up, so later checks start from an empty team.
    let (s, _) = call(
        node,
        "DELETE",
        &lock_path("t1", "b3"),
        ana,
        Some(json!({"token": token("b3")})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(
        node,
        "DELETE",
        &lock_path("t1", "b4"),
        bob,
        Some(json!({"token": b4["token"]})),
    )
    .await;
    assert_eq!(s, 204);
    expect_event(team, "/team/t1", "lock.released").await;
    expect_event(team, "/team/t1", "lock.released").await;
}

/// A refused request: method, path, token, body, then the status and error code expected.
type Refusal<'a> = (&'a str, String, &'a str, Option<Value>, u16, &'a str);

/// Every refusal: status and code; none of them may change anything (checked by the caller:
/// no event, no live lock).
async fn refusals(node: &Lockstep) {
    let ana = node.token("ana", &["t1"], "locks");
    let no_scope = node.token("ana", &["t1"], "publish");
    let outsider = node.token("eve", &["t2"], "locks");
    let other_admin = admin_token(node, "mallory", "t2");
    let item = lock_path("t1", "v1");
    let batch = "/api/v1/teams/t1/locks/batch";
    let long_item = "x".repeat(129);
    let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
    let many_release: Vec<Value> = many
        .iter()
        .map(|i| json!({"item": i, "token": 1}))
        .collect();
    let cases: Vec<Refusal<'_>> = vec![
        // TTL bounds (locks.min_ttl 1 s, locks.max_ttl 1 h).
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"ttl_ms": 999})),
            422,
            "invalid_ttl",
        ),
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"ttl_ms": 3_600_001})),
            422,
            "invalid_ttl",
        ),
        (
            "PUT",
            item.clone(),
            &ana,
            Some(json!({"token": 1, "ttl_ms": 0})),
            422,
            "invalid_ttl",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": ["v1"], "ttl_ms": 999})),
            422,
            "invalid_ttl",
        ),
        // Item ids must match [A-Za-z0-9_.:-]{1,128}.
        (
            "POST",
            lock_path("t1", &long_item),
            &ana,
            None,
            422,
            "invalid_item",
        ),
        (
            "POST",
            lock_path("t1", "bad%20item"),
            &ana,
            None,
            422,
            "invalid_item",
        ),
        (
            "GET",
            lock_path("t1", "bad*item"),
            &ana,
            None,
            422,
            "invalid_item",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": ["v1", "bad item"]})),
            422,
            "invalid_item",
        ),
        // Batch sizes (locks.max_batch 100).
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": many})),
            413,
            "batch_too_large",
        ),
        (
            "DELETE",
            batch.to_owned(),
            &ana,
            Some(json!({"items": many_release})),
            413,
            "batch_too_large",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": []})),
            422,
            "empty_batch",
        ),
        (
            "DELETE",
            batch.to_owned(),
            &ana,
            Some(json!({"items": []})),
            422,
            "empty_batch",
        ),
        // Unknown fields.
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"ttl": 5000})),
            422,
            "invalid_body",
        ),
        (
            "PUT",
            item.clone(),
            &ana,
            Some(json!({"token": 1, "force": true})),
            422,
            "invalid_body",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": ["v1"], "all": true})),
            422,
            "invalid_body",
        ),
        (
            "DELETE",
            item.clone(),
            &ana,
            Some(json!({"token": 1, "why": "done"})),
            422,
            "invalid_body",
        ),
        // Other bad input.
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"session": ""})),
            422,
            "invalid_session",
        ),
        ("DELETE", item.clone(), &ana, None, 422, "missing_token"),
        // Authorization: the `locks` scope and membership of the team.
        ("POST", item.clone(), &no_scope, None, 403, "forbidden"),
        ("GET", item.clone(), &no_scope, None, 403, "forbidden"),
        (
            "GET",
            "/api/v1/teams/t1/locks".to_owned(),
            &no_scope,
            None,
            403,
            "forbidden",
        ),
        (
            "POST",
            batch.to_owned(),
            &no_scope,
            Some(json!({"items": ["v1"]})),
            403,
            "forbidden",
        ),
        ("POST", item.clone(), &outsider, None, 403, "forbidden"),
        (
            "GET",
            "/api/v1/teams/t1/locks".to_owned(),
            &outsider,
            None,
            403,
            "forbidden",
        ),
        (
            "DELETE",
            format!("{item}?force=true"),
            &other_admin,
            None,
            403,
            "forbidden",
        ),
        ("POST", item.clone(), "", None, 401, "unauthorized"),
    ];
    for (method, path, token, body, status, want) in cases {
        let what = format!("{method} {path} {body:?}");
        let (s, answer) = call(node, method, &path, token, body).await;
        assert_eq!((s, code(&answer)), (status, want), "{what}: {answer}");
    }
}

#[tokio::test]
async fn lifecycle_on_sqlite() {
    let node = node(None, &[]).await;
    lifecycle(&node).await;
}

#[tokio::test]
async fn lifecycle_on_postgres() {
    let pg = Postgres::start();
    let url = pg.database("lifecycle");
    let node = node(Some(&url), &[]).await;
    let last = lifecycle(&node).await;
    // The store itself agrees on the last grant's token.
    assert_eq!(
        pg.psql("lifecycle", "SELECT token FROM locks WHERE item = '812'")
            .unwrap(),
        last.to_string()
    );
}

// ------------------------------------------------------------------------------------------
// 2. Safety under contention
// ------------------------------------------------------------------------------------------

/// The safety checker: a pure function over what clients were told and what was announced.
mod history {
    use std::collections::BTreeMap;

    /// A 200 answer to an acquire or a renewal: the client was told it holds `token` on `item`
    /// until `expires_at` (database times, ms since the epoch).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Promise {
        pub(super) item: String,
        pub(super) token: i64,
        pub(super) holder: String,
        pub(super) acquired_at: i64,
        pub(super) expires_at: i64,
    }

    /// How a grant ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum End {
        Released,
        Expired,
        TakenOver,
    }

    /// A lock event seen on the team topic.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) enum Event {
        Acquired {
            item: String,
            token: i64,
            holder: String,
            acquired_at: i64,
        },
        Ended {
            item: String,
            token: i64,
            holder: String,
            how: End,
            /// `released_at` or `expired_at`.
            at: i64,
        },
    }

    impl Event {
        /// The event's item and its place in the item's history: a grant's `lock.acquired`
        /// comes before its end, and both before the next grant's.
        pub(super) fn version(&self) -> (&str, (i64, u8)) {
            match self {
                Event::Acquired { item, token, .. } => (item, (*token, 0)),
                Event::Ended { item, token, .. } => (item, (*token, 1)),
            }
        }
    }

    /// Counts, to show a run exercised what it should.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub(super) struct Summary {
        pub(super) grants: usize,
        pub(super) released: usize,
        pub(super) expired: usize,
        pub(super) taken_over: usize,
        /// Grants announced whose 200 no client saw (their request's answer was lost).
        pub(super) unseen: usize,
        /// Grants whose end event was superseded by the next grant's.
        pub(super) superseded_ends: usize,
        /// Grants whose `lock.acquired` was superseded by a newer event of the item (its own end
        /// or a later grant's, published first by another node).
        pub(super) superseded_acquires: usize,
    }

    struct Grant<'a> {
        holder: &'a str,
        /// Known from its `lock.acquired` or from a 200; unknown for a grant no client saw whose
        /// announcement was superseded.
        acquired_at: Option<i64>,
        /// Its `lock.acquired` was delivered.
        announced: bool,
        ends: Vec<(End, i64, &'a str)>,
        /// The expiry of the last promise for this grant: the holder may move its expiry
        /// earlier itself (a renewal or re-acquire with a shorter TTL sets now + TTL), so only
        /// its latest promise binds.
        promised_until: Option<i64>,
    }

    /// Checks a finished history (every grant has ended) of one team.
    ///
    /// Lock events are keyed by item and versioned in commit order, and the broker drops an
    /// event published after a newer one of its item (a slow node's, or a sweeper's after its
    /// node died): a subscriber sees a subsequence of each item's history, in order, that ends
    /// with its latest state. So:
    ///
    /// - each item's events arrive in history order (token, then acquired before ended), none
    ///   twice;
    /// - every grant a client was told about (a 200) was announced by a `lock.acquired` with the
    ///   same holder and `acquired_at`, or that announcement was superseded by a newer event of
    ///   the item that did arrive (the grant's own end or a later grant's); an end names the
    ///   grant's holder;
    /// - at most `unanswered` grants were announced that no client saw (requests whose answer
    ///   was lost may have been granted);
    /// - each grant ended at most once, by its holder's release, an expiry or a takeover, no
    ///   earlier than it began; an expiry no earlier than the holder's last promised expiry
    ///   (`promises` are in the order their holder received them). An end may be missing only
    ///   when a later grant of the item was announced; the last grant of each item must end;
    /// - per item, tokens strictly increase with time and grants do not overlap: grant k+1's
    ///   `acquired_at` ≥ grant k's end.
    ///
    /// Returns every violation found.
    pub(super) fn check(
        promises: &[Promise],
        events: &[Event],
        unanswered: usize,
    ) -> Result<Summary, Vec<String>> {
        let mut errors = Vec::new();
        let mut summary = Summary::default();
        // The newest token delivered per item, and the arrival order.
        let mut newest: BTreeMap<&str, (i64, u8)> = BTreeMap::new();
        for event in events {
            let (item, version) = event.version();
            if let Some(previous) = newest.insert(item, version)
                && previous >= version
            {
                errors.push(format!(
                    "item {item}: event {version:?} (token, phase) arrived after {previous:?}"
                ));
                newest.insert(item, previous.max(version));
            }
        }
        let mut grants: BTreeMap<(&str, i64), Grant<'_>> = BTreeMap::new();
        for event in events {
            if let Event::Acquired {
                item,
                token,
                holder,
                acquired_at,
            } = event
            {
                let grant = Grant {
                    holder,
                    acquired_at: Some(*acquired_at),
                    announced: true,
                    ends: Vec::new(),
                    promised_until: None,
                };
                if grants.insert((item, *token), grant).is_some() {
                    errors.push(format!(
                        "item {item}: token {token} announced twice by lock.acquired"
                    ));
                }
            }
        }
        for event in events {
            if let Event::Ended {
                item,
                token,
                holder,
                how,
                at,
            } = event
            {
                let grant = grants.entry((item, *token)).or_insert_with(|| Grant {
                    holder,
                    acquired_at: None,
                    announced: false,
                    ends: Vec::new(),
                    promised_until: None,
                });
                grant.ends.push((*how, *at, holder));
            }
        }
        for p in promises {
            let key = (p.item.as_str(), p.token);
            let grant = grants.entry(key).or_insert_with(|| Grant {
                holder: &p.holder,
                acquired_at: None,
                announced: false,
                ends: Vec::new(),
                promised_until: None,
            });
            let acquired_at = *grant.acquired_at.get_or_insert(p.acquired_at);
            if grant.holder != p.holder || acquired_at != p.acquired_at {
                errors.push(format!(
                    "item {}: token {} told to {} as acquired at {}, announced for {} at {}",
                    p.item, p.token, p.holder, p.acquired_at, grant.holder, acquired_at
                ));
            }
            grant.promised_until = Some(p.expires_at);
        }
        summary.grants = grants.len();
        summary.unseen = grants
            .values()
            .filter(|g| g.promised_until.is_none())
            .count();
        if summary.unseen > unanswered {
            errors.push(format!(
                "{} grants were announced that no client was told about, but only {unanswered} requests went unanswered",
                summary.unseen
            ));
        }
        // Per item, in token order (the map's order), with each grant's end.
        let mut previous: Option<(&str, i64, i64)> = None;
        for ((item, token), grant) in &grants {
            // A later grant of the item was delivered: it says this one is over.
            let followed = newest.get(item).is_some_and(|(newest, _)| newest > token);
            if !grant.announced {
                if grant.ends.is_empty() && !followed {
                    errors.push(format!(
                        "item {item}: {} was granted token {token} (200) but no lock.acquired announced it, nor anything after it",
                        grant.holder
                    ));
                } else {
                    summary.superseded_acquires += 1;
                }
            }
            let end = match grant.ends.as_slice() {
                [] if followed => {
                    summary.superseded_ends += 1;
                    None
                }
                [] => {
                    errors.push(format!("item {item}: token {token} never ended (no event)"));
                    None
                }
                [(how, at, holder)] => {
                    match how {
                        End::Released => summary.released += 1,
                        End::Expired => summary.expired += 1,
                        End::TakenOver => summary.taken_over += 1,
                    }
                    if *holder != grant.holder {
                        errors.push(format!(
                            "item {item}: token {token} held by {} ended as {holder}'s",
                            grant.holder
                        ));
                    }
                    if let Some(acquired_at) = grant.acquired_at
                        && *at < acquired_at
                    {
                        errors.push(format!(
                            "item {item}: token {token} ended at {at}, before it was acquired at {acquired_at}"
                        ));
                    }
                    if let (End::Expired, Some(promised)) = (how, grant.promised_until)
                        && *at < promised
                    {
                        errors.push(format!(
                            "item {item}: token {token} announced expired at {at}, but its holder was promised it until {promised}"
                        ));
                    }
                    Some(*at)
                }
                many => {
                    errors.push(format!(
                        "item {item}: token {token} ended {} times: {many:?}",
                        many.len()
                    ));
                    None
                }
            };
            if let Some((prev_item, prev_token, prev_end)) = previous
                && prev_item == *item
                && let Some(acquired_at) = grant.acquired_at
                && acquired_at < prev_end
            {
                errors.push(format!(
                    "item {item}: overlap: token {token} acquired at {acquired_at} while token {prev_token} lasted until {prev_end}"
                ));
            }
            // Without a known end, compare the next grant with this one's start at least.
            match end.or(grant.acquired_at) {
                Some(at) => previous = Some((item, *token, at)),
                None if previous.is_some_and(|(prev_item, _, _)| prev_item == *item) => {}
                None => previous = None,
            }
        }
        if errors.is_empty() {
            Ok(summary)
        } else {
            Err(errors)
        }
    }
}

/// The checker accepts a clean history and finds each kind of violation in doctored ones, so
/// the contention tests built on it can fail.
#[test]
fn lock_history_checker_finds_violations() {
    use history::{End, Event, Promise, check};
    let promise = |token: i64, holder: &str, acquired_at: i64, expires_at: i64| Promise {
        item: "a".to_owned(),
        token,
        holder: holder.to_owned(),
        acquired_at,
        expires_at,
    };
    let acquired = |token: i64, holder: &str, acquired_at: i64| Event::Acquired {
        item: "a".to_owned(),
        token,
        holder: holder.to_owned(),
        acquired_at,
    };
    let ended = |token: i64, holder: &str, how: End, at: i64| Event::Ended {
        item: "a".to_owned(),
        token,
        holder: holder.to_owned(),
        how,
        at,
    };
    // ana holds token 1 from 1000, renews to 2500, and it expires at 2500; bob takes token 2 at
    // 2500 and releases it at 2700; an admin takes token 3 from carol.
    let promises = vec![
        promise(1, "ana", 1000, 2000),
        promise(1, "ana", 1000, 2500),
        promise(2, "bob", 2500, 4000),
        promise(3, "carol", 2800, 5000),
    ];
    let events = vec![
        acquired(1, "ana", 1000),
        ended(1, "ana", End::Expired, 2500),
        acquired(2, "bob", 2500),
        ended(2, "bob", End::Released, 2700),
        acquired(3, "carol", 2800),
        ended(3, "carol", End::TakenOver, 2900),
    ];
    let summary = check(&promises, &events, 0).expect("a clean history");
    assert_eq!(
        (
            summary.grants,
            summary.released,
            summary.expired,
            summary.taken_over
        ),
        (3, 1, 1, 1)
    );
    let fails = |promises: &[Promise], events: &[Event], unanswered: usize, needle: &str| {
        let errors = check(promises, events, unanswered).expect_err(needle);
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "expected '{needle}' in {errors:?}"
        );
    };
    // Overlap: bob's grant starts while ana's lasts.
    let mut overlapping = events.clone();
    overlapping[2] = acquired(2, "bob", 2400);
    let mut overlapping_promises = promises.clone();
    overlapping_promises[2] = promise(2, "bob", 2400, 4000);
    fails(&overlapping_promises, &overlapping, 0, "overlap");
    // An expiry announced before the latest renewal's expiry.
    let mut early = events.clone();
    early[1] = ended(1, "ana", End::Expired, 2000);
    fails(&promises, &early, 0, "promised it until 2500");
    // But a holder may shorten its own grant: a later renewal with a shorter TTL binds.
    let mut shortened = promises.clone();
    shortened.insert(2, promise(1, "ana", 1000, 2000));
    assert!(check(&shortened, &early, 0).is_ok());
    // A grant announced twice, and one ended twice.
    let mut doubled = events.clone();
    doubled.push(acquired(2, "bob", 2500));
    fails(&promises, &doubled, 0, "announced twice");
    let mut ended_twice = events.clone();
    ended_twice.push(ended(1, "ana", End::Expired, 2500));
    fails(&promises, &ended_twice, 0, "ended 2 times");
    // A 200 grant nobody announced, with nothing newer of its item either; a grant nobody saw
    // beyond the unanswered requests.
    fails(&promises, &events[..4], 0, "no lock.acquired announced it");
    fails(&promises[..2], &events, 0, "no client was told about");
    assert!(check(&promises[..2], &events, 2).is_ok());
    // An announcement superseded by a newer event of the item that another node published
    // first: by the grant's own end, or by the next grant's.
    let mut own_end = events.clone();
    own_end.remove(4);
    let summary = check(&promises, &own_end, 0).expect("acquire superseded by its end");
    assert_eq!(summary.superseded_acquires, 1);
    let mut next_grant = events.clone();
    next_grant.drain(2..4);
    let summary = check(&promises, &next_grant, 0).expect("grant superseded by the next");
    assert_eq!(
        (summary.superseded_acquires, summary.superseded_ends),
        (1, 1)
    );
    // Its end must still name its holder.
    let mut wrong_holder = own_end.clone();
    wrong_holder[4] = ended(3, "dan", End::TakenOver, 2900);
    fails(&promises, &wrong_holder, 0, "told to carol");
    // An item's events never arrive out of history order.
    let mut swapped = events.clone();
    swapped.swap(0, 1);
    fails(&promises, &swapped, 0, "arrived after");
    let mut late = events.clone();
    late.swap(3, 4);
    fails(&promises, &late, 0, "arrived after");
    // A grant that never ended, and a token reused out of time order.
    fails(&promises, &events[..5], 0, "never ended");
    // An end superseded by the next grant's announcement is fine; the last one must end.
    let mut superseded = events;
    superseded.remove(3);
    assert_eq!(
        check(&promises, &superseded, 0)
            .expect("superseded end")
            .superseded_ends,
        1
    );
    let reordered = vec![
        acquired(1, "ana", 3000),
        ended(1, "ana", End::Released, 3100),
        acquired(2, "bob", 1000),
        ended(2, "bob", End::Released, 1100),
    ];
    fails(&[], &reordered, 2, "overlap");
}

/// What the clients of a contention run saw.
#[derive(Debug, Default)]
struct Tally {
    promises: Vec<history::Promise>,
    /// Acquire requests without a definitive answer (transport error, 5xx): they may have been
    /// granted without anyone seeing it.
    unanswered_acquires: usize,
    /// Answers by (request kind, status).
    statuses: BTreeMap<(&'static str, u16), usize>,
    /// Answers no correct server gives here.
    unexpected: Vec<String>,
}

impl Tally {
    fn promise(&mut self, body: &Value) -> i64 {
        let token = token_of(body);
        self.promises.push(history::Promise {
            item: body["item"].as_str().expect("item").to_owned(),
            token,
            holder: body["holder"].as_str().expect("holder").to_owned(),
            acquired_at: ms(&body["acquired_at"]),
            expires_at: ms(&body["expires_at"]),
        });
        token
    }

    /// Counts an answer; returns its status, or `None` when there was none.
    fn answer(
        &mut self,
        kind: &'static str,
        answer: &Result<(u16, Value), reqwest::Error>,
        expected: &[u16],
    ) -> Option<u16> {
        match answer {
            Ok((status, body)) => {
                *self.statuses.entry((kind, *status)).or_default() += 1;
                if !expected.contains(status) {
                    self.unexpected.push(format!("{kind}: {status} {body}"));
                }
                Some(*status)
            }
            Err(err) => {
                *self.statuses.entry((kind, 0)).or_default() += 1;
                self.unexpected.push(format!("{kind}: {err}"));
                None
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.promises.extend(other.promises);
        self.unanswered_acquires += other.unanswered_acquires;
        for (k, n) in other.statuses {
            *self.statuses.entry(k).or_default() += n;
        }
        self.unexpected.extend(other.unexpected);
    }
}

const CONTENTION_ITEMS: usize = 20;
const CONTENTION_CLIENTS: usize = 200;

/// One annotator until `deadline`: takes a random item on a random node with a 1–3 s TTL,
/// works on it (renewing, now and then re-acquiring, sometimes too late), then releases it or
/// walks away and lets it expire.
async fn annotator(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    team: String,
    user: String,
    token: String,
    deadline: Instant,
    seed: u64,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let path = lock_path(
            &team,
            &format!("i{}", rng.random_range(0..CONTENTION_ITEMS)),
        );
        let mut base = &bases[rng.random_range(0..bases.len())];
        let mut ttl: u64 = rng.random_range(1000..=3000);
        let answer = request(
            &http,
            base,
            "POST",
            &path,
            &token,
            Some(json!({"ttl_ms": ttl})),
        )
        .await;
        let mut held = match tally.answer("acquire", &answer, &[200, 409]) {
            Some(200) => {
                let body = &answer.as_ref().expect("answered").1;
                assert_eq!(body["holder"], user.as_str(), "{body}");
                tally.promise(body)
            }
            Some(409) => {
                // Busy: think a moment before trying another item (keeps the run from being
                // only 409s; not a synchronization).
                let pause = rng.random_range(20..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            _ => {
                tally.unanswered_acquires += 1;
                continue;
            }
        };
        let mut lost = false;
        for _ in 0..rng.random_range(0..=3) {
            // Simulated work between renewals; one time in seven past the TTL, so the renewal
            // finds the grant expired (410) or taken by someone else (409).
            let work = if rng.random_bool(1.0 / 7.0) {
                ttl * 13 / 10
            } else {
                rng.random_range(100..ttl * 6 / 10)
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(work).min(left)).await;
            base = &bases[rng.random_range(0..bases.len())];
            ttl = rng.random_range(1000..=3000);
            let reacquire = rng.random_bool(0.2);
            let answer = if reacquire {
                request(
                    &http,
                    base,
                    "POST",
                    &path,
                    &token,
                    Some(json!({"ttl_ms": ttl})),
                )
                .await
            } else {
                request(
                    &http,
                    base,
                    "PUT",
                    &path,
                    &token,
                    Some(json!({"token": held, "ttl_ms": ttl})),
                )
                .await
            };
            let (kind, expected): (&'static str, &[u16]) = if reacquire {
                ("re-acquire", &[200, 409])
            } else {
                ("renew", &[200, 409, 410])
            };
            match tally.answer(kind, &answer, expected) {
                Some(200) => {
                    let body = &answer.as_ref().expect("answered").1;
                    // A re-acquire after the grant expired unnoticed is a new grant (a new
                    // token); otherwise the same token with a later expiry.
                    held = tally.promise(body);
                }
                status => {
                    if reacquire && !matches!(status, Some(409)) {
                        tally.unanswered_acquires += 1;
                    }
                    lost = true;
                    break;
                }
            }
        }
        if !lost && Instant::now() < deadline && rng.random_bool(0.65) {
            base = &bases[rng.random_range(0..bases.len())];
            let answer = request(
                &http,
                base,
                "DELETE",
                &path,
                &token,
                Some(json!({"token": held})),
            )
            .await;
            // 410/409: the grant expired or was taken over while we worked.
            tally.answer("release", &answer, &[204, 409, 410]);
        }
        // Otherwise walk away: the lock expires by its TTL.
    }
    tally
}

/// A team admin who, until `deadline`, now and then takes over a random item.
async fn admin(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    team: String,
    token: String,
    deadline: Instant,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(7);
    let mut tally = Tally::default();
    loop {
        let pause = Duration::from_millis(rng.random_range(150..400));
        let left = deadline.saturating_duration_since(Instant::now());
        if left <= pause {
            return tally;
        }
        tokio::time::sleep(pause).await;
        let path = format!(
            "{}?force=true",
            lock_path(
                &team,
                &format!("i{}", rng.random_range(0..CONTENTION_ITEMS))
            )
        );
        let base = &bases[rng.random_range(0..bases.len())];
        let answer = request(&http, base, "DELETE", &path, &token, None).await;
        tally.answer("takeover", &answer, &[200, 404]);
    }
}

/// A bot until `deadline`: locks two random items in one batch on a random node,
/// holds them a moment and releases them in one batch (those still its own are released).
async fn bot(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    team: String,
    token: String,
    deadline: Instant,
    seed: u64,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let path = format!("/api/v1/teams/{team}/locks/batch");
    while Instant::now() < deadline {
        let mut items: Vec<String> = (0..2)
            .map(|_| format!("i{}", rng.random_range(0..CONTENTION_ITEMS)))
            .collect();
        items.sort();
        items.dedup();
        let base = &bases[rng.random_range(0..bases.len())];
        let ttl: u64 = rng.random_range(1000..=3000);
        let body = json!({"items": items, "ttl_ms": ttl});
        let answer = request(&http, base, "POST", &path, &token, Some(body)).await;
        match tally.answer("batch acquire", &answer, &[200, 409]) {
            Some(200) => {}
            Some(_) => {
                let pause = rng.random_range(20..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            None => {
                tally.unanswered_acquires += items.len();
                continue;
            }
        }
        let granted = answer.expect("answered").1;
        let held: Vec<Value> = granted["locks"]
            .as_array()
            .expect("locks")
            .iter()
            .map(|lock| json!({"item": lock["item"], "token": tally.promise(lock)}))
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        let work = Duration::from_millis(rng.random_range(100..ttl * 8 / 10));
        tokio::time::sleep(work.min(left)).await;
        let base = &bases[rng.random_range(0..bases.len())];
        let answer = request(
            &http,
            base,
            "DELETE",
            &path,
            &token,
            Some(json!({"items": held})),
        )
        .await;
        tally.answer("batch release", &answer, &[200]);
    }
    tally
}

/// A browser tab until `deadline`: connects to a random node, locks a random item bound to its
/// WebSocket session, and is closed while it holds the lock, so the lock is released after the
/// session grace (unless it expires or is taken over first).
async fn tab(
    http: reqwest::Client,
    nodes: Arc<Vec<(String, String)>>,
    team: String,
    token: String,
    deadline: Instant,
    seed: u64,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let (base, ws) = &nodes[rng.random_range(0..nodes.len())];
        let (socket, connected) = match StompClient::connect(ws, &token).await {
            Ok(open) => open,
            Err(err) => {
                tally.unexpected.push(format!("tab: connect: {err:#}"));
                continue;
            }
        };
        let session = connected.header("session").expect("session").to_owned();
        let path = lock_path(
            &team,
            &format!("i{}", rng.random_range(0..CONTENTION_ITEMS)),
        );
        let body = json!({"session": session, "ttl_ms": 3000});
        let answer = request(&http, base, "POST", &path, &token, Some(body)).await;
        match tally.answer("tab acquire", &answer, &[200, 409]) {
            Some(200) => {
                tally.promise(&answer.expect("answered").1);
                let left = deadline.saturating_duration_since(Instant::now());
                let open = Duration::from_millis(rng.random_range(50..300));
                tokio::time::sleep(open.min(left)).await;
            }
            Some(_) => {
                let pause = rng.random_range(20..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            None => tally.unanswered_acquires += 1,
        }
        // The tab closes: its socket goes.
        drop(socket);
    }
    tally
}

/// Events of `/team/{team}` collected by a background reader.
#[derive(Debug, Default)]
struct Collected {
    events: Vec<history::Event>,
    /// `lock.released` events of grants whose session closed.
    session_closed: usize,
    /// Why the reader stopped, if it did (it must not).
    stopped: Option<String>,
}

fn parse_event(event_type: &str, data: &Value) -> history::Event {
    let item = data["item"].as_str().expect("item").to_owned();
    let token = token_of(data);
    let holder = data["holder"].as_str().expect("holder").to_owned();
    let ended = |how, at: &Value| history::Event::Ended {
        item: item.clone(),
        token,
        holder: holder.clone(),
        how,
        at: ms(at),
    };
    match event_type {
        "lock.acquired" => history::Event::Acquired {
            acquired_at: ms(&data["acquired_at"]),
            item,
            token,
            holder,
        },
        "lock.released" => ended(history::End::Released, &data["released_at"]),
        "lock.expired" => ended(history::End::Expired, &data["expired_at"]),
        "lock.taken_over" => ended(history::End::TakenOver, &data["released_at"]),
        other => panic!("unexpected event type {other}: {data}"),
    }
}

fn collect(
    mut client: StompClient,
    destination: String,
) -> (Arc<Mutex<Collected>>, tokio::task::JoinHandle<()>) {
    let collected = Arc::new(Mutex::new(Collected::default()));
    let sink = collected.clone();
    let task = tokio::spawn(async move {
        loop {
            let stop = match client.next().await {
                Ok(Incoming::Frame(frame)) => {
                    let envelope = envelope(&frame, "s", &destination);
                    let event =
                        parse_event(envelope["type"].as_str().expect("type"), &envelope["data"]);
                    let mut sink = sink.lock();
                    sink.events.push(event);
                    if envelope["data"]["reason"] == "session_closed" {
                        sink.session_closed += 1;
                    }
                    continue;
                }
                Ok(Incoming::HeartBeat) => continue,
                Ok(Incoming::Closed(close)) => format!("closed: {close:?}"),
                Err(err) => format!("{err:#}"),
            };
            sink.lock().stopped = Some(stop);
            return;
        }
    });
    (collected, task)
}

/// Items whose history has not fully arrived: their newest event is not the end of a grant at
/// least as new as every grant a client was told about. (Events superseded by newer ones of
/// their item never arrive, so waiting for each grant's own events could not finish.)
fn outstanding(promises: &[history::Promise], events: &[history::Event]) -> usize {
    let mut newest: BTreeMap<&str, (i64, u8)> = BTreeMap::new();
    for event in events {
        let (item, version) = event.version();
        let entry = newest.entry(item).or_insert(version);
        *entry = (*entry).max(version);
    }
    let mut promised: BTreeMap<&str, i64> = BTreeMap::new();
    for p in promises {
        let entry = promised.entry(&p.item).or_insert(p.token);
        *entry = (*entry).max(p.token);
    }
    let unsettled = newest
        .iter()
        .filter(|(item, (token, phase))| {
            *phase == 0 || promised.get(*item).is_some_and(|p| p > token)
        })
        .count();
    unsettled
        + promised
            .keys()
            .filter(|item| !newest.contains_key(*item))
            .count()
}

/// The contention tests take most of the two cores: they run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Who else takes part in a contention run beside the annotators and the admin.
#[derive(Debug, Clone, Copy, Default)]
struct Mix {
    /// Annotators taking one item at a time.
    annotators: usize,
    /// Clients locking and releasing in batches.
    bots: usize,
    /// Browser tabs whose session-bound locks are released when they close.
    tabs: usize,
}

/// `mix.annotators` annotators (distinct users, 200 in the plain runs), an admin and the
/// mix's bots and tabs hammer 20 items of one team through `nodes` for `run`; every grant and
/// renewal is recorded from the answers, every event from a subscriber of the team topic, and
/// [`history::check`] must find no violation.
async fn contention(
    nodes: &[Lockstep],
    outbox: Option<(&Postgres, &str)>,
    run: Duration,
    mix: Mix,
) {
    let team = "crowd";
    let bases: Arc<Vec<String>> = Arc::new(nodes.iter().map(Lockstep::http).collect());
    let subscriber = watcher(&nodes[0], "watch", &[team], &format!("/team/{team}")).await;
    let (collected, reader) = collect(subscriber, format!("/team/{team}"));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONTENTION_CLIENTS)
        .build()
        .expect("HTTP client");
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..mix.annotators {
        let user = format!("u{i}");
        let token = nodes[0].token(&user, &[team], "locks");
        tasks.spawn(annotator(
            http.clone(),
            bases.clone(),
            team.to_owned(),
            user,
            token,
            deadline,
            i as u64,
        ));
    }
    tasks.spawn(admin(
        http.clone(),
        bases.clone(),
        team.to_owned(),
        admin_token(&nodes[0], "lead", team),
        deadline,
    ));
    for i in 0..mix.bots {
        let token = nodes[0].token(&format!("bot{i}"), &[team], "locks");
        tasks.spawn(bot(
            http.clone(),
            bases.clone(),
            team.to_owned(),
            token,
            deadline,
            1000 + i as u64,
        ));
    }
    let sockets: Arc<Vec<(String, String)>> =
        Arc::new(nodes.iter().map(|n| (n.http(), n.ws())).collect());
    for i in 0..mix.tabs {
        let token = nodes[0].token(&format!("tab{i}"), &[team], "locks");
        tasks.spawn(tab(
            http.clone(),
            sockets.clone(),
            team.to_owned(),
            token,
            deadline,
            2000 + i as u64,
        ));
    }
    let mut tally = Tally::default();
    // Each task stops at the deadline; its last request is bounded by the client timeout.
    let joined = tokio::time::timeout(run + Duration::from_secs(30), async {
        while let Some(t) = tasks.join_next().await {
            tally.merge(t.expect("client task"));
        }
    })
    .await;
    assert!(joined.is_ok(), "client tasks did not finish");
    let ran = started.elapsed();

    // Let every grant end (TTLs are at most 3 s) and every event arrive.
    let lead = admin_token(&nodes[0], "lead", team);
    let list = format!("/api/v1/teams/{team}/locks");
    let drain = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, body) = call(&nodes[0], "GET", &list, &lead, None).await;
        assert_eq!(s, 200, "{body}");
        if body["locks"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < drain, "locks still live: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle = Instant::now() + Duration::from_secs(15);
    while outstanding(&tally.promises, &collected.lock().events) > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some((pg, database)) = outbox {
        // Once the outbox is empty no sweeper can publish anything again.
        wait_until(Duration::from_secs(15), "the outbox drains", || {
            outbox_rows(pg, database) == 0
        })
        .await;
    }
    // In-flight deliveries (a late duplicate would be caught by the checker).
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    let collected = std::mem::take(&mut *collected.lock());
    assert_eq!(collected.stopped, None, "the team subscriber stopped");

    let result = history::check(
        &tally.promises,
        &collected.events,
        tally.unanswered_acquires,
    );
    eprintln!(
        "contention on {} node(s): {ran:?}, {} answers {:?}, {} events, {:?}",
        nodes.len(),
        tally.statuses.values().sum::<usize>(),
        tally.statuses,
        collected.events.len(),
        result.as_ref().map_err(Vec::len),
    );
    let summary = result.unwrap_or_else(|errors| {
        panic!(
            "{} violations, first ones:\n{}",
            errors.len(),
            errors
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert!(
        tally.unexpected.is_empty(),
        "{} unexpected answers, first ones: {:#?}",
        tally.unexpected.len(),
        &tally.unexpected[..tally.unexpected.len().min(20)]
    );
    // The run exercised contention and every way a grant ends.
    let refused = tally.statuses.get(&("acquire", 409)).copied().unwrap_or(0);
    let lost = [409, 410]
        .iter()
        .filter_map(|s| tally.statuses.get(&("renew", *s)))
        .sum::<usize>();
    assert!(summary.grants >= 100, "{summary:?}");
    assert!(
        refused >= 200,
        "only {refused} acquires found the item held"
    );
    assert!(lost > 0, "no renewal found its grant over or taken");
    assert!(
        summary.released > 0 && summary.expired > 0 && summary.taken_over > 0,
        "{summary:?}"
    );
    if mix.bots > 0 {
        let batches = tally.statuses.get(&("batch acquire", 200)).copied();
        assert!(batches.unwrap_or(0) > 0, "no batch was granted");
    }
    if mix.tabs > 0 {
        assert!(
            collected.session_closed > 0,
            "no lock was released by its session's end: {summary:?}"
        );
    }
    // The checker allows what the broker's versions allow (a late event dropped behind a
    // newer one of its item), but every decision publishes its item's earlier outbox rows
    // first, so none is: a subscriber sees every grant and every end.
    assert_eq!(
        (summary.superseded_acquires, summary.superseded_ends),
        (0, 0),
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_is_safe_on_three_postgres_nodes() {
    let _heavy = HEAVY.lock().await;
    let pg = Postgres::start();
    let url = pg.database("contention");
    let redis = RedisServer::start();
    let nodes = cluster(3, &url, &redis, &[]).await;
    contention(
        &nodes,
        Some((&pg, "contention")),
        Duration::from_secs(10),
        Mix {
            annotators: CONTENTION_CLIENTS,
            ..Mix::default()
        },
    )
    .await;
}

/// Grace for session-bound locks in the mixed runs: shorter than the tabs' 3 s TTL, so closed
/// tabs' locks end by their session's end.
const MIXED: &[(&str, &str)] = &[("LOCKSTEP_LOCKS_SESSION_GRACE", "500ms")];

/// The contention run with bots locking in batches and tabs closing while they hold
/// session-bound locks, beside the annotators and the admin's takeovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_contention_is_safe_on_three_postgres_nodes() {
    let _heavy = HEAVY.lock().await;
    let pg = Postgres::start();
    let url = pg.database("mixed");
    let redis = RedisServer::start();
    let nodes = cluster(3, &url, &redis, MIXED).await;
    let mix = Mix {
        annotators: 20,
        bots: 8,
        tabs: 8,
    };
    contention(&nodes, Some((&pg, "mixed")), Duration::from_secs(10), mix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_contention_is_safe_on_sqlite() {
    let _heavy = HEAVY.lock().await;
    let node = node(None, MIXED).await;
    let mix = Mix {
        annotators: 20,
        bots: 8,
        tabs: 8,
    };
    contention(
        std::slice::from_ref(&node),
        None,
        Duration::from_secs(10),
        mix,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_is_safe_on_sqlite() {
    let _heavy = HEAVY.lock().await;
    let node = node(None, &[]).await;
    contention(
        std::slice::from_ref(&node),
        None,
        Duration::from_secs(10),
        Mix {
            annotators: CONTENTION_CLIENTS,
            ..Mix::default()
        },
    )
    .await;
}

// ------------------------------------------------------------------------------------------
// 3. Expiry events, exactly once across nodes
// ------------------------------------------------------------------------------------------

/// Reads from a [`watcher`] of `destination` until `n` `lock.expired` and `acquired`
/// `lock.acquired` events arrived; returns the expiries by item. An item announced twice
/// fails, as does any other event.
async fn expiries(
    client: &mut StompClient,
    destination: &str,
    n: usize,
    acquired: usize,
) -> BTreeMap<String, Value> {
    let mut got = BTreeMap::new();
    let mut grants = BTreeSet::new();
    while got.len() < n || grants.len() < acquired {
        // A killed node's claimed events are published by another node once their claim
        // (5 s) lapses, so allow for more than that.
        let frame = client
            .expect_frame_within(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{destination}: {} of {n} expiries, {} of {acquired} grants, then {e:#}",
                    got.len(),
                    grants.len()
                )
            });
        let envelope = envelope(&frame, "s", destination);
        let data = envelope["data"].clone();
        let item = data["item"].as_str().expect("item").to_owned();
        match envelope["type"].as_str() {
            Some("lock.expired") => {
                if let Some(first) = got.insert(item, data.clone()) {
                    panic!("{destination}: expiry announced twice: {first} and {data}");
                }
            }
            Some("lock.acquired") if grants.len() < acquired => {
                assert!(
                    grants.insert(item),
                    "{destination}: grant announced twice: {data}"
                );
            }
            _ => panic!("{destination}: unexpected event {envelope}"),
        }
    }
    got
}

/// One round: 30 items locked for six users through every node with staggered short TTLs; if
/// `kill` says so, that node is SIGKILLed after the delay, while expiries are being announced.
/// Every expiry must reach both team watchers and its holder's inbox exactly once.
async fn expiry_round(
    nodes: &mut [Lockstep],
    outbox: (&Postgres, &str),
    watchers: &mut [StompClient],
    inboxes: &mut [StompClient],
    round: &str,
    kill: Option<(usize, Duration)>,
) {
    let mut expected = BTreeMap::new();
    for i in 0..30usize {
        let node = &nodes[i % nodes.len()];
        let user = format!("u{}", i % inboxes.len());
        let token = node.token(&user, &["t1"], "locks");
        let item = format!("{round}-{i}");
        // Expiries spread over 1.5 s, so a kill lands among them.
        let ttl = 1000 + 50 * i;
        let (s, lock) = call(
            node,
            "POST",
            &lock_path("t1", &item),
            &token,
            Some(json!({"ttl_ms": ttl})),
        )
        .await;
        assert_eq!(s, 200, "{lock}");
        expected.insert(
            item.clone(),
            json!({"team": "t1", "item": item, "holder": user, "token": lock["token"], "expired_at": lock["expires_at"]}),
        );
    }
    let started = Instant::now();
    if let Some((victim, after)) = kill {
        // A deliberate wait: the point is to kill the node in the middle of the expiries.
        tokio::time::sleep(after).await;
        nodes[victim].kill();
    }
    for (i, w) in watchers.iter_mut().enumerate() {
        let got = expiries(w, "/team/t1", expected.len(), expected.len()).await;
        assert_eq!(got, expected, "team watcher {i}, round {round}");
    }
    for (k, inbox) in inboxes.iter_mut().enumerate() {
        let user = format!("u{k}");
        let mine: BTreeMap<String, Value> = expected
            .iter()
            .filter(|(_, e)| e["holder"] == user.as_str())
            .map(|(i, e)| (i.clone(), e.clone()))
            .collect();
        let destination = format!("/user/{user}");
        let got = expiries(inbox, &destination, mine.len(), 0).await;
        assert_eq!(got, mine, "{destination}, round {round}");
    }
    eprintln!(
        "expiry round {round}: every expiry announced {:?} after the grants",
        started.elapsed()
    );
    // Once the outbox is empty nothing can be published again; then no duplicate may arrive.
    let (pg, database) = outbox;
    wait_until(Duration::from_secs(20), "the outbox drains", || {
        outbox_rows(pg, database) == 0
    })
    .await;
    let quiet = Duration::from_millis(500);
    for w in watchers.iter_mut() {
        assert_no_event(w, "/team/t1 (a duplicate expiry)", quiet).await;
    }
    for inbox in inboxes.iter_mut() {
        assert_no_event(inbox, "a user topic (a duplicate expiry)", quiet).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiries_are_announced_exactly_once_even_when_a_node_dies() {
    let pg = Postgres::start();
    let url = pg.database("expiry");
    let redis = RedisServer::start();
    let mut nodes = cluster(3, &url, &redis, &[]).await;
    // Everyone listens on nodes 0 and 1; node 2 is the one that dies.
    let mut watchers = vec![
        watcher(&nodes[0], "watch0", &["t1"], "/team/t1").await,
        watcher(&nodes[1], "watch1", &["t1"], "/team/t1").await,
    ];
    let mut inboxes = Vec::new();
    for k in 0..6 {
        let user = format!("u{k}");
        inboxes.push(watcher(&nodes[k % 2], &user, &["t1"], &format!("/user/{user}")).await);
    }
    expiry_round(
        &mut nodes,
        (&pg, "expiry"),
        &mut watchers,
        &mut inboxes,
        "calm",
        None,
    )
    .await;
    expiry_round(
        &mut nodes,
        (&pg, "expiry"),
        &mut watchers,
        &mut inboxes,
        "kill",
        Some((2, Duration::from_millis(1200))),
    )
    .await;
}

// ------------------------------------------------------------------------------------------
// 4. Session-bound locks
// ------------------------------------------------------------------------------------------

/// A lock bound to a WebSocket session is released `locks.session_grace` (1 s) after that
/// WebSocket closes, with reason `session_closed`; an unbound lock of the same user stays.
async fn session_release(node: &Lockstep) {
    let grace = Duration::from_secs(1);
    let token = node.token("ana", &["t1"], "locks");
    let mut team = watcher(node, "watch", &["t1"], "/team/t1").await;
    let (ana_ws, connected) = StompClient::connect(&node.ws(), &token).await.unwrap();
    let session = connected
        .header("session")
        .expect("CONNECTED carries a session header")
        .to_owned();
    let (s, bound) = call(
        node,
        "POST",
        &lock_path("t1", "s1"),
        &token,
        Some(json!({"session": session})),
    )
    .await;
    assert_eq!((s, &bound["session"]), (200, &json!(session)), "{bound}");
    let announced = expect_event(&mut team, "/team/t1", "lock.acquired").await;
    assert_eq!(announced["token"], bound["token"]);
    let (s, unbound) = call(node, "POST", &lock_path("t1", "s2"), &token, None).await;
    assert_eq!(s, 200, "{unbound}");
    expect_event(&mut team, "/team/t1", "lock.acquired").await;

    let closed = Instant::now();
    ana_ws.close().await.unwrap();
    let released = expect_event(&mut team, "/team/t1", "lock.released").await;
    let after = closed.elapsed();
    assert!(
        after >= grace,
        "released {after:?} after the close, within the grace"
    );
    assert_eq!(
        released,
        json!({"team": "t1", "item": "s1", "holder": "ana", "token": bound["token"], "reason": "session_closed", "released_at": released["released_at"]})
    );
    assert!(ms(&released["released_at"]) >= ms(&bound["acquired_at"]) + 1000);
    let (s, body) = call(node, "GET", &lock_path("t1", "s1"), &token, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
    let (s, body) = call(node, "GET", &lock_path("t1", "s2"), &token, None).await;
    assert_eq!((s, token_of(&body)), (200, token_of(&unbound)), "{body}");
    assert_no_event(&mut team, "/team/t1", Duration::from_millis(500)).await;
}

const ONE_SECOND_GRACE: &[(&str, &str)] = &[("LOCKSTEP_LOCKS_SESSION_GRACE", "1s")];

#[tokio::test]
async fn session_lock_is_released_after_the_grace_on_sqlite() {
    let node = node(None, ONE_SECOND_GRACE).await;
    session_release(&node).await;
}

#[tokio::test]
async fn session_lock_is_released_after_the_grace_on_postgres() {
    let pg = Postgres::start();
    let url = pg.database("session");
    let node = node(Some(&url), ONE_SECOND_GRACE).await;
    session_release(&node).await;
}

/// A page reload: the WebSocket closes, the user reconnects to another node within the grace
/// and re-acquires with the new session. The lock keeps its token and outlives the first
/// session's grace; closing the second session then releases it, announced on a third node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lock_survives_a_reconnect_to_another_node() {
    // Longer than the 1 s of the single-node case, so the reconnect fits in the grace even on
    // a loaded machine.
    let grace = Duration::from_secs(2);
    let pg = Postgres::start();
    let url = pg.database("reload");
    let redis = RedisServer::start();
    let nodes = cluster(3, &url, &redis, &[("LOCKSTEP_LOCKS_SESSION_GRACE", "2s")]).await;
    let token = nodes[0].token("ana", &["t1"], "locks");
    let mut team = watcher(&nodes[2], "watch", &["t1"], "/team/t1").await;
    let item = lock_path("t1", "page");
    let pending = |session: &str| -> usize {
        pg.psql(
            "reload",
            &format!("SELECT count(*) FROM closed_sessions WHERE session = '{session}'"),
        )
        .unwrap()
        .parse()
        .unwrap()
    };

    let (first, connected) = StompClient::connect(&nodes[0].ws(), &token).await.unwrap();
    let s1 = connected.header("session").expect("session").to_owned();
    let (s, a) = call(
        &nodes[0],
        "POST",
        &item,
        &token,
        Some(json!({"session": s1})),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await["token"],
        a["token"]
    );

    let closed = Instant::now();
    first.close().await.unwrap();
    // The close is on record (its release pending) before the reconnect, so the re-acquire
    // really races the release.
    wait_until(
        Duration::from_secs(5),
        "the first session's close is recorded",
        || pending(&s1) == 1,
    )
    .await;
    let (second, connected) = StompClient::connect(&nodes[1].ws(), &token).await.unwrap();
    let s2 = connected.header("session").expect("session").to_owned();
    assert_ne!(s1, s2);
    let (s, b) = call(
        &nodes[1],
        "POST",
        &item,
        &token,
        Some(json!({"session": s2})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (&b["token"], &b["session"], &b["acquired_at"]),
        (&a["token"], &json!(s2), &a["acquired_at"]),
        "{b}"
    );
    assert!(ms(&b["expires_at"]) >= ms(&a["expires_at"]), "{a} → {b}");
    let reacquired = closed.elapsed();
    assert!(
        reacquired < grace,
        "the re-acquire took {reacquired:?}, longer than the grace"
    );

    // A sweeper handles the first session's close once its grace passed, and releases nothing.
    wait_until(
        Duration::from_secs(10),
        "the first session's close is handled",
        || pending(&s1) == 0,
    )
    .await;
    assert!(closed.elapsed() >= grace);
    let (s, held) = call(&nodes[2], "GET", &item, &token, None).await;
    assert_eq!(s, 200, "{held}");
    assert_eq!(
        (&held["token"], &held["holder"], &held["session"]),
        (&a["token"], &json!("ana"), &json!(s2))
    );
    assert_no_event(
        &mut team,
        "/team/t1 (no release)",
        Duration::from_millis(300),
    )
    .await;

    // The lock now follows the second session.
    let closed = Instant::now();
    second.close().await.unwrap();
    let released = expect_event(&mut team, "/team/t1", "lock.released").await;
    assert!(closed.elapsed() >= grace);
    assert_eq!(
        (&released["token"], &released["reason"]),
        (&a["token"], &json!("session_closed")),
        "{released}"
    );
    let (s, body) = call(&nodes[0], "GET", &item, &token, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
}

/// A rolling restart: the node holding the WebSocket is stopped with SIGTERM and closes it with
/// 4010 ("reconnect elsewhere"). The user does not come back, so the session-bound lock must
/// still be released after the grace, by the surviving node (DESIGN §7: released shortly after
/// that WebSocket closes), not held for its whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lock_is_released_when_its_node_shuts_down() {
    let pg = Postgres::start();
    let url = pg.database("shutdown");
    let redis = RedisServer::start();
    let mut nodes = cluster(2, &url, &redis, ONE_SECOND_GRACE).await;
    let token = nodes[0].token("ana", &["t1"], "locks");
    let mut team = watcher(&nodes[1], "watch", &["t1"], "/team/t1").await;
    let (mut ana_ws, connected) = StompClient::connect(&nodes[0].ws(), &token).await.unwrap();
    let session = connected.header("session").expect("session").to_owned();
    let item = lock_path("t1", "deploy");
    let (s, lock) = call(
        &nodes[0],
        "POST",
        &item,
        &token,
        Some(json!({"session": session})),
    )
    .await;
    assert_eq!(s, 200, "{lock}");
    expect_event(&mut team, "/team/t1", "lock.acquired").await;

    // The client answers the server's close, as a browser would.
    let client = tokio::spawn(async move { ana_ws.expect_close().await.map(|(_, close)| close) });
    let stopped = Instant::now();
    // `terminate` waits synchronously; let the runtime's other worker serve the client.
    let (status, _) = tokio::task::block_in_place(|| nodes[0].terminate(Duration::from_secs(20)))
        .expect("SIGTERM");
    assert!(status.success(), "{status:?}");
    let close = client
        .await
        .unwrap()
        .expect("the server closes the WebSocket");
    assert_eq!(close.map(|c| c.0), Some(4010));

    let frame = team
        .expect_frame_within(Duration::from_secs(6))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no lock.released {:?} after the node shut down ({e:#}); GET says {:?}; closed_sessions: {:?}; the stopped node's log:\n{}",
                stopped.elapsed(),
                pg.psql("shutdown", "SELECT item, holder, token, session, state FROM locks"),
                pg.psql("shutdown", "SELECT * FROM closed_sessions"),
                nodes[0].log()
            )
        });
    let released = envelope(&frame, "s", "/team/t1");
    assert_eq!(
        (
            &released["type"],
            &released["data"]["reason"],
            &released["data"]["token"]
        ),
        (
            &json!("lock.released"),
            &json!("session_closed"),
            &lock["token"]
        ),
        "{released}"
    );
    let (s, body) = call(&nodes[1], "GET", &item, &token, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
}

/// A node killed with SIGKILL records nothing: the other nodes notice it stopped sweeping
/// (`locks.node_timeout`), count its sessions as closed, and release their locks after the
/// grace; a session of a live node keeps its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lock_is_released_when_its_node_is_killed() {
    let pg = Postgres::start();
    let url = pg.database("killed");
    let redis = RedisServer::start();
    let extra = [
        ("LOCKSTEP_LOCKS_SESSION_GRACE", "1s"),
        // Generous for a machine running every test at once: a live node that stalls longer
        // than this would be taken for dead.
        ("LOCKSTEP_LOCKS_NODE_TIMEOUT", "4s"),
    ];
    let mut nodes = cluster(2, &url, &redis, &extra).await;
    let token = nodes[0].token("ana", &["t1"], "locks");
    let bob = nodes[1].token("bob", &["t1"], "locks");
    let mut team = watcher(&nodes[1], "watch", &["t1"], "/team/t1").await;
    // Ana's session is on the node that will die, Bob's on the one that lives.
    let (_ana_ws, connected) = StompClient::connect(&nodes[0].ws(), &token).await.unwrap();
    let ana_session = connected.header("session").expect("session").to_owned();
    let (_bob_ws, connected) = StompClient::connect(&nodes[1].ws(), &bob).await.unwrap();
    let bob_session = connected.header("session").expect("session").to_owned();
    let doomed = lock_path("t1", "doomed");
    let kept = lock_path("t1", "kept");
    let (s, lock) = call(
        &nodes[1],
        "POST",
        &doomed,
        &token,
        Some(json!({"session": ana_session, "ttl_ms": 600_000})),
    )
    .await;
    assert_eq!(s, 200, "{lock}");
    expect_event(&mut team, "/team/t1", "lock.acquired").await;
    let (s, body) = call(
        &nodes[1],
        "POST",
        &kept,
        &bob,
        Some(json!({"session": bob_session, "ttl_ms": 600_000})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    expect_event(&mut team, "/team/t1", "lock.acquired").await;

    let killed = Instant::now();
    nodes[0].kill();
    // Node timeout (4 s) plus grace (1 s) plus sweeps; far less than the 10-minute TTL.
    let frame = team
        .expect_frame_within(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no lock.released {:?} after the node was killed ({e:#}); locks: {:?}; nodes: {:?}; closed_sessions: {:?}; the live node's log:\n{}\nthe killed node's log:\n{}",
                killed.elapsed(),
                pg.psql("killed", "SELECT item, holder, token, session, state FROM locks"),
                pg.psql("killed", "SELECT * FROM nodes"),
                pg.psql("killed", "SELECT * FROM closed_sessions"),
                nodes[1].log(),
                nodes[0].log()
            )
        });
    let released = envelope(&frame, "s", "/team/t1");
    assert_eq!(
        (
            &released["type"],
            &released["data"]["item"],
            &released["data"]["reason"],
            &released["data"]["token"]
        ),
        (
            &json!("lock.released"),
            &json!("doomed"),
            &json!("session_closed"),
            &lock["token"]
        ),
        "{released}"
    );
    // The clock starts at the dead node's last stamp, which can precede the kill by up to one
    // heartbeat (a tenth of the node timeout, 400 ms): timeout 4 s + grace 1 s - 400 ms.
    assert!(
        killed.elapsed() >= Duration::from_millis(4600),
        "released {:?} after the kill, before node timeout + grace",
        killed.elapsed()
    );
    let (s, body) = call(&nodes[1], "GET", &doomed, &token, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
    // The live node's session keeps its lock through the same sweeps.
    let (s, body) = call(&nodes[1], "GET", &kept, &bob, None).await;
    assert_eq!((s, &body["holder"]), (200, &json!("bob")), "{body}");
}

// ------------------------------------------------------------------------------------------
// 5. PostgreSQL crash and restart
// ------------------------------------------------------------------------------------------

/// One batch attempt of the background batcher: its number, status, error code, duration.
type Attempt = (usize, u16, String, Duration);

/// PostgreSQL crashes (immediate stop) while a client keeps acquiring batches, and comes back:
/// requests during the outage answer 503 `lock_store_unavailable` within 5 s; no batch is half
/// written; the node is ready again by itself; grants survive and tokens continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_answers_503_then_recovers() {
    let mut pg = Postgres::start();
    let url = pg.database("restart");
    let node = node(Some(&url), &[]).await;
    let ana = node.token("ana", &["t1"], "locks");
    let item = lock_path("t1", "r1");
    let batch = "/api/v1/teams/t1/locks/batch";
    let list = "/api/v1/teams/t1/locks";

    // A few grants, and one kept across the outage.
    let mut last = 0;
    for _ in 0..3 {
        let (s, lock) = call(&node, "POST", &item, &ana, None).await;
        assert_eq!(s, 200, "{lock}");
        assert!(token_of(&lock) > last);
        last = token_of(&lock);
        let (s, _) = call(&node, "DELETE", &item, &ana, Some(json!({"token": last}))).await;
        assert_eq!(s, 204);
    }
    let (s, kept) = call(&node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{kept}");
    let kept_token = token_of(&kept);
    assert!(kept_token > last);

    // The batcher: a batch of four fresh items every 20 ms, each answer recorded.
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let batcher = {
        let (base, token, attempts) = (node.http(), ana.clone(), attempts.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 0usize.. {
                let items: Vec<String> = (0..4).map(|k| format!("b{n}-{k}")).collect();
                let started = Instant::now();
                let answer = request(
                    &http,
                    &base,
                    "POST",
                    batch,
                    &token,
                    Some(json!({"items": items, "ttl_ms": 600_000})),
                )
                .await;
                let (status, code) = match &answer {
                    Ok((s, body)) => (
                        *s,
                        body["error"]["code"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    Err(e) => (0, e.to_string()),
                };
                attempts.lock().push((n, status, code, started.elapsed()));
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    let granted = |a: &[Attempt]| a.iter().filter(|a| a.1 == 200).count();
    wait_until(Duration::from_secs(10), "5 batches granted", || {
        granted(&attempts.lock()) >= 5
    })
    .await;

    // `restart()` is crash + start; done in two steps so requests can be made in between.
    pg.crash();
    let crashed_at = attempts.lock().len();
    let outage: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", lock_path("t1", "r2"), None),
        ("PUT", item.clone(), Some(json!({"token": kept_token}))),
        ("DELETE", item.clone(), Some(json!({"token": kept_token}))),
        ("DELETE", format!("{item}?force=true"), None),
        ("GET", item.clone(), None),
        ("GET", list.to_owned(), None),
        (
            "POST",
            batch.to_owned(),
            Some(json!({"items": ["x0", "x1", "x2"]})),
        ),
        (
            "DELETE",
            batch.to_owned(),
            Some(json!({"items": [{"item": "r1", "token": kept_token}]})),
        ),
    ];
    let root = admin_token(&node, "root", "t1");
    let answers = futures_util::future::join_all(outage.into_iter().map(|(method, path, body)| {
        let (node, token) = (&node, if path.contains("force") { &root } else { &ana });
        async move {
            let started = Instant::now();
            let (s, answer) = call(node, method, &path, token, body).await;
            (format!("{method} {path}"), s, answer, started.elapsed())
        }
    }))
    .await;
    for (what, s, answer, took) in &answers {
        assert_eq!(
            (*s, code(answer)),
            (503, "lock_store_unavailable"),
            "{what}: {answer}"
        );
        assert!(*took < Duration::from_secs(5), "{what} took {took:?}");
    }
    wait_ready(&node, 503, Duration::from_secs(10)).await;
    wait_until(
        Duration::from_secs(10),
        "a batch attempted during the outage",
        || attempts.lock().len() > crashed_at + 1,
    )
    .await;

    pg.restart();
    let recovered = wait_ready(&node, 200, Duration::from_secs(30)).await;
    // The node serves again by itself, and the grant made before the crash is intact.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let (s, body) = call(&node, "GET", &item, &ana, None).await;
        if s == 200 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still {s} after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held, kept);
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(20), batcher)
        .await
        .expect("the batcher stops")
        .unwrap();
    eprintln!("postgres restart: ready {recovered:?} after the restart");

    // All or nothing: every batch has all four items locked or none; a granted one all four.
    let (s, body) = call(&node, "GET", list, &ana, None).await;
    assert_eq!(s, 200, "{body}");
    let live: BTreeSet<String> = body["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["item"].as_str().unwrap().to_owned())
        .collect();
    let attempts = attempts.lock().clone();
    let mut refused = 0;
    for (n, status, code, took) in &attempts {
        let locked = (0..4)
            .filter(|k| live.contains(&format!("b{n}-{k}")))
            .count();
        if *status == 200 {
            assert_eq!(
                locked, 4,
                "batch {n} was granted but {locked} of its items are locked"
            );
        } else {
            refused += 1;
            assert!(
                locked == 0 || locked == 4,
                "batch {n} ({status} {code}) is half written: {locked} of 4 items locked"
            );
            assert_eq!(
                (*status, code.as_str()),
                (503, "lock_store_unavailable"),
                "batch {n}"
            );
            assert!(*took < Duration::from_secs(5), "batch {n} took {took:?}");
        }
    }
    assert!(
        refused > 0,
        "no batch was attempted during the outage: {attempts:?}"
    );
    for never in ["x0", "x1", "x2", "r2"] {
        assert!(
            !live.contains(never),
            "{never} was locked during the outage"
        );
    }

    // Tokens continue from where they were.
    let (s, _) = call(
        &node,
        "DELETE",
        &item,
        &ana,
        Some(json!({"token": kept_token})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, next) = call(&node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{next}");
    assert!(
        token_of(&next) > kept_token,
        "token {} after {kept_token}",
        token_of(&next)
    );
}

/// Lock events read the same, byte for byte, whichever database decides: on PostgreSQL the
/// decision functions write the data in SQL, on SQLite (and in every sweep) `LockEvent` writes
/// it in Rust. Each data object must be compact JSON with sorted keys (exactly what serde_json
/// writes for the parsed value) with the same fields on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_event_data_is_the_same_on_both_databases() {
    let pg = Postgres::start();
    let url = pg.database("bytes");
    // No sweep runs during the few seconds of the test (the first is at start): the expiry is
    // announced by the next grant's decision. (The heartbeat, a tenth of the node timeout,
    // still registers the node quickly.)
    let no_sweeps = [
        ("LOCKSTEP_LOCKS_SWEEP_INTERVAL", "20s"),
        ("LOCKSTEP_LOCKS_NODE_TIMEOUT", "80s"),
    ];
    let mut shapes = Vec::new();
    for database in [None, Some(url.as_str())] {
        let node = node(database, &no_sweeps).await;
        let mut watch = watcher(&node, "w", &["t1"], "/team/t1").await;
        let ana = node.token("ana", &["t1"], "locks");
        let bob = node.token("bob", &["t1"], "locks");
        let lead = admin_token(&node, "lead", "t1");
        let path = lock_path("t1", "i1");
        let (s, _) = call(&node, "POST", &path, &ana, Some(json!({"ttl_ms": 1000}))).await;
        assert_eq!(s, 200);
        let list = "/api/v1/teams/t1/locks";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, body) = call(&node, "GET", list, &lead, None).await;
            assert_eq!(s, 200, "{body}");
            if body["locks"].as_array().is_some_and(Vec::is_empty) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ana's grant never expired: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (s, granted) = call(&node, "POST", &path, &bob, Some(json!({"ttl_ms": 5000}))).await;
        assert_eq!(s, 200, "{granted}");
        let release = json!({"token": granted["token"]});
        let (s, body) = call(&node, "DELETE", &path, &bob, Some(release)).await;
        assert_eq!(s, 204, "{body}");
        let (s, _) = call(&node, "POST", &path, &ana, Some(json!({"ttl_ms": 5000}))).await;
        assert_eq!(s, 200);
        let (s, body) = call(&node, "DELETE", &format!("{path}?force=true"), &lead, None).await;
        assert_eq!(s, 200, "{body}");

        let mut shape = Vec::new();
        for _ in 0..6 {
            let frame = watch.expect_frame().await.expect("a lock event");
            let raw = String::from_utf8(frame.body.to_vec()).expect("UTF-8 body");
            let envelope = envelope(&frame, "s", "/team/t1");
            let data = &envelope["data"];
            let canonical = serde_json::to_string(data).expect("JSON");
            assert!(
                raw.contains(&format!("\"data\":{canonical}")),
                "{database:?}: data is not compact with sorted keys: {raw}"
            );
            let keys: Vec<String> = data.as_object().expect("object").keys().cloned().collect();
            shape.push((envelope["type"].as_str().expect("type").to_owned(), keys));
        }
        shapes.push(shape);
    }
    let types: Vec<&str> = shapes[0].iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "lock.acquired",
            "lock.expired",
            "lock.acquired",
            "lock.released",
            "lock.acquired",
            "lock.taken_over"
        ]
    );
    assert_eq!(shapes[0], shapes[1]);
}
