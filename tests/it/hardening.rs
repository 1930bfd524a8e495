//! The holes a review found by reading main as an attacker and as a distributed-systems
//! reviewer, then trying them against real nodes (issue 13). Each test is the attack or the
//! failure as it was tried, and fails on the code before the fix.

use crate::locks::{call, code, expect_event, lock_path, node, token_of, watcher};
use loadtest::client::{Incoming, OpenOptions, StompClient};
use protocol::{Command, Frame};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tests::postgres::Postgres;
use tests::{Lockstep, Options};

/// Short timeouts so an attack that relies on a "dead" node would strike within the test.
const FAST_NODE_DEATH: &[(&str, &str)] = &[
    ("LOCKSTEP_LOCKS_SWEEP_INTERVAL", "100ms"),
    ("LOCKSTEP_LOCKS_NODE_TIMEOUT", "1s"),
    ("LOCKSTEP_LOCKS_SESSION_GRACE", "500ms"),
];

async fn session_of(node: &Lockstep, token: &str) -> (StompClient, String) {
    let (client, connected) = StompClient::connect(&node.ws(), token).await.unwrap();
    let session = connected.header("session").expect("session").to_owned();
    (client, session)
}

/// A member of team t1 once released every session-bound lock of every team by naming a
/// made-up session: `"%.x"` made `%` a "node" that soon looked dead, and the dead-node sweep
/// matched `session LIKE '%.%'`. `_`×26 and a lower-cased real node id (SQLite's LIKE ignores
/// case) did the same. Sessions must now be ones a node issued to the caller; the victim's
/// lock and its renewals survive well past node timeout and grace.
async fn forged_sessions_release_nothing(node: &Lockstep) {
    let victim = node.token("ana", &["t2"], "locks");
    let (_victim_ws, session) = session_of(node, &victim).await;
    let (s, held) = call(
        node,
        "POST",
        &lock_path("t2", "v1"),
        &victim,
        Some(json!({"session": session, "ttl_ms": 600_000})),
    )
    .await;
    assert_eq!(s, 200, "{held}");

    let mallory = node.token("mallory", &["t1"], "locks");
    let (_mallory_ws, own) = session_of(node, &mallory).await;
    let node_id = session.split('.').next().unwrap();
    let forgeries = [
        "%.x".to_owned(),
        format!("{}.x", "_".repeat(26)),
        format!("{}.{}.x", "_".repeat(26), "_".repeat(26)),
        format!("{}.x", node_id.to_lowercase()),
        format!(
            "{}.{}",
            node_id.to_lowercase(),
            own.split_once('.').unwrap().1
        ),
        // Ana's real session, issued to her, not to Mallory.
        session.clone(),
        // Mallory's own session with its MAC altered (a character in the middle of it, which
        // carries MAC bits whatever the encoding's padding).
        altered_mac(&own),
    ];
    for (i, forged) in forgeries.iter().enumerate() {
        let (s, body) = call(
            node,
            "POST",
            &lock_path("t1", &format!("m{i}")),
            &mallory,
            Some(json!({"session": forged})),
        )
        .await;
        assert_eq!(
            (s, code(&body)),
            (422, "invalid_session"),
            "{forged}: {body}"
        );
    }
    // Her own session works.
    let (s, body) = call(
        node,
        "POST",
        &lock_path("t1", "own"),
        &mallory,
        Some(json!({"session": own})),
    )
    .await;
    assert_eq!(s, 200, "{body}");

    // Past node timeout (1 s) plus grace (0.5 s) several times over, the victim still holds
    // the lock and can renew it.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (s, body) = call(
            node,
            "PUT",
            &lock_path("t2", "v1"),
            &victim,
            Some(json!({"token": held["token"]})),
        )
        .await;
        assert_eq!(s, 200, "the victim lost the lock: {body}\n{}", node.log());
    }
    let (s, body) = call(node, "GET", &lock_path("t2", "v1"), &victim, None).await;
    assert_eq!(
        (s, &body["holder"], token_of(&body)),
        (200, &json!("ana"), token_of(&held))
    );
}

/// `session` with one character of its MAC changed.
fn altered_mac(session: &str) -> String {
    let mut chars: Vec<char> = session.chars().collect();
    let i = chars.len() - 6;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[tokio::test]
async fn forged_sessions_release_nothing_on_sqlite() {
    let node = node(None, FAST_NODE_DEATH).await;
    forged_sessions_release_nothing(&node).await;
}

#[tokio::test]
async fn forged_sessions_release_nothing_on_postgres() {
    let pg = Postgres::start();
    let node = node(Some(&pg.database("forged")), FAST_NODE_DEATH).await;
    forged_sessions_release_nothing(&node).await;
}

/// Lock requests publish events (a batch of 100 items publishes 100), so they draw on the
/// token's event budget like `POST /publish`: 429 with `Retry-After` once it is spent, and a
/// batch larger than the burst is refused whole.
#[tokio::test]
async fn lock_requests_draw_on_the_event_budget() {
    let node = node(
        None,
        &[
            ("LOCKSTEP_API_PUBLISH_RATE", "1"),
            ("LOCKSTEP_API_PUBLISH_BURST", "3"),
        ],
    )
    .await;
    let ana = node.token("ana", &["t1"], "locks publish");
    for i in 0..3 {
        let (s, body) = call(
            &node,
            "POST",
            &lock_path("t1", &format!("i{i}")),
            &ana,
            None,
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let response = reqwest::Client::new()
        .post(format!("{}{}", node.http(), lock_path("t1", "i3")))
        .bearer_auth(&ana)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "rate_limited", "{body}");
    // Refused means unchanged: the item is free.
    let (s, _) = call(&node, "GET", &lock_path("t1", "i3"), &ana, None).await;
    assert_eq!(s, 404);
    let items: Vec<String> = (10..15).map(|i| format!("i{i}")).collect();
    let (s, body) = call(
        &node,
        "POST",
        "/api/v1/teams/t1/locks/batch",
        &ana,
        Some(json!({ "items": items })),
    )
    .await;
    assert_eq!((s, code(&body)), (413, "batch_too_large"), "{body}");
    // Another token has its own budget.
    let bob = node.token("bob", &["t1"], "locks");
    let (s, body) = call(&node, "POST", &lock_path("t1", "b0"), &bob, None).await;
    assert_eq!(s, 200, "{body}");
    let metrics = reqwest::get(format!("{}/metrics", node.http()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lockstep_http_rate_limited_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate-limited counter in:\n{metrics}"));
    assert!(refused >= 2.0, "{refused}");
}

/// A node that stalls (SIGSTOP) for longer than `locks.node_timeout` is taken for dead and its
/// sessions' locks are released. Once it runs again it must not let those sessions carry on as
/// if they still held their locks: it finds its row gone, closes them with 4010 ("reconnect"),
/// and registers again, so the client reconnects and locks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_closes_its_sessions_when_it_comes_back() {
    let pg = Postgres::start();
    let url = pg.database("stall");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(node(Some(&url), FAST_NODE_DEATH).await);
    }
    // The same secret is not needed: each node verifies its own tokens, and the lock is
    // requested on the node that issued the session.
    let (a, b) = (&nodes[0], &nodes[1]);
    let ana = a.token("ana", &["t1"], "locks");
    let (mut ws, session) = session_of(a, &ana).await;
    let (s, held) = call(
        a,
        "POST",
        &lock_path("t1", "doc"),
        &ana,
        Some(json!({"session": session, "ttl_ms": 600_000})),
    )
    .await;
    assert_eq!(s, 200, "{held}");

    tests::signal(a.pid(), libc::SIGSTOP);
    // Node timeout (1 s) and grace (0.5 s) pass while it is stopped: the other node takes it
    // for dead and releases the lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    let bob = b.token("bob", &["t1"], "locks");
    loop {
        let (s, body) = call(b, "GET", &lock_path("t1", "doc"), &bob, None).await;
        if s == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled node's lock was not released: {body}\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tests::signal(a.pid(), libc::SIGCONT);
    let (_, close) = ws.expect_close().await.unwrap_or_else(|e| {
        panic!(
            "the session of the stalled node stayed open: {e:#}\n{}",
            a.log()
        )
    });
    assert_eq!(
        close,
        Some((4010, "node lost its cluster lease; reconnect".to_owned()))
    );
    // The client reconnects to the same node and locks again, with a new token.
    let (_ws, session) = session_of(a, &ana).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, body) = call(
            a,
            "POST",
            &lock_path("t1", "doc"),
            &ana,
            Some(json!({"session": session})),
        )
        .await;
        if s == 200 {
            assert!(token_of(&body) > token_of(&held), "{body}");
            break;
        }
        // Until the node registered again, its sessions cannot take locks.
        assert_eq!((s, code(&body)), (410, "session_closed"), "{body}");
        assert!(Instant::now() < deadline, "{body}\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A lock acquired with a session that had already closed (a stale id from a previous page)
/// is released after the grace, like the lock of a session that closes later; it used to
/// live until its TTL.
#[tokio::test]
async fn a_lock_bound_to_a_closed_session_is_released() {
    let node = node(None, FAST_NODE_DEATH).await;
    let ana = node.token("ana", &["t1"], "locks");
    let mut team = watcher(&node, "watch", &["t1"], "/team/t1").await;
    let (ws, session) = session_of(&node, &ana).await;
    ws.close().await.unwrap();
    let (s, held) = call(
        &node,
        "POST",
        &lock_path("t1", "late"),
        &ana,
        Some(json!({"session": session, "ttl_ms": 600_000})),
    )
    .await;
    assert_eq!(s, 200, "{held}");
    expect_event(&mut team, "/team/t1", "lock.acquired").await;
    let released = tokio::time::timeout(
        Duration::from_secs(10),
        expect_event(&mut team, "/team/t1", "lock.released"),
    )
    .await
    .unwrap_or_else(|_| panic!("the lock of a closed session was kept\n{}", node.log()));
    assert_eq!(
        (&released["item"], &released["reason"], &released["token"]),
        (&json!("late"), &json!("session_closed"), &held["token"])
    );
}

/// Frames of a connection's queue are bounded in bytes, not only in count: 20 subscribers
/// that stop reading while 1,100 events of 55 KiB go out must not pin gigabytes (1,024 queued
/// frames × 55 KiB × 20 was over a gigabyte); they are closed with 4008 and the node's peak
/// RSS stays under 300 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscribers_of_large_events_cost_bounded_memory() {
    let node = node(
        None,
        &[
            ("LOCKSTEP_API_PUBLISH_RATE", "0"),
            ("LOCKSTEP_HUB_WRITE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut client = crate::client(&node, &format!("u{i}"), &["t1"], "").await;
        // Distinct subscription ids: no two subscribers share frame bytes.
        client
            .subscribe(&format!("sub-{i}"), "/team/t1")
            .await
            .unwrap();
        stalled.push(client);
    }
    let publisher = node.token("backend", &["t1"], "publish");
    let blob = "x".repeat(55 * 1024);
    let client = reqwest::Client::new();
    for n in 0..1100 {
        let (status, body) = crate::http_publish_with(
            &client,
            &node,
            &publisher,
            &json!({"topic": "/team/t1", "type": "blob.part", "data": {"n": n, "blob": blob}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    let peak = peak_rss_kib(node.pid());
    for (i, mut client) in stalled.into_iter().enumerate() {
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(30), client.next()).await {
                Ok(Ok(Incoming::Closed(close))) => break close,
                Ok(Ok(_)) => {}
                other => panic!("subscriber {i}: no close: {other:?}"),
            }
        };
        assert_eq!(closed.map(|c| c.0), Some(4008), "subscriber {i}");
    }
    // The figure the closing note reports (`--nocapture`).
    eprintln!("peak RSS with 20 stalled subscribers: {} MiB", peak / 1024);
    assert!(
        peak < 300 * 1024,
        "peak RSS {} MiB with 20 stalled subscribers",
        peak / 1024
    );
}

/// The peak resident set size of a process (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no VmHWM for {pid}"))
}

/// Silent and half-sent upgrades used to take a connection slot each (and up to 256 KiB) for
/// 10 s: 200 of them locked a real client out of a node with room for 100. Now they wait in a
/// small pool of their own, the oldest making room, and a real client connects, subscribes and
/// receives at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upgrades_do_not_lock_out_real_clients() {
    let node = node(
        None,
        &[
            ("LOCKSTEP_HUB_MAX_CONNECTIONS", "100"),
            ("LOCKSTEP_HUB_MAX_PENDING_CONNECTIONS", "50"),
            ("LOCKSTEP_HUB_CONNECT_TIMEOUT", "30s"),
        ],
    )
    .await;
    let mut silent = Vec::new();
    for i in 0..200 {
        let mut client = StompClient::open(&node.ws(), &OpenOptions::default())
            .await
            .unwrap();
        if i % 2 == 1 {
            // Half a CONNECT frame, never finished.
            client
                .send_text("CONNECT\naccept-version:1.2\npasscode:")
                .await
                .unwrap();
        }
        silent.push(client);
    }
    let token = node.token("ana", &["t1"], "");
    let (mut ana, _) = StompClient::connect(&node.ws(), &token)
        .await
        .unwrap_or_else(|e| panic!("a real client was locked out: {e:#}\n{}", node.log()));
    ana.subscribe("s", "/team/t1").await.unwrap();
    let publisher = node.token("backend", &["t1"], "publish");
    let (status, _) = crate::http_publish(
        &node,
        &publisher,
        &json!({"topic": "/team/t1", "type": "job.progress", "data": {"done": 1}}),
    )
    .await;
    assert_eq!(status, 202);
    let frame = ana
        .expect_frame_within(Duration::from_secs(5))
        .await
        .unwrap();
    crate::envelope(&frame, "s", "/team/t1");
    // The oldest silent ones were closed to make room, with a reason.
    let (error, close) = silent[0].expect_close().await.unwrap();
    assert_eq!(close.map(|c| c.0), Some(4001));
    assert_eq!(
        error.as_ref().and_then(|f| f.header("message")),
        Some("connect timeout")
    );
    // A frame larger than a CONNECT needs is refused before authentication.
    let mut big = StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap();
    big.send_text(&format!(
        "CONNECT\naccept-version:1.2\npasscode:{}\n\n\0",
        "x".repeat(20_000)
    ))
    .await
    .unwrap();
    let (error, close) = big.expect_close().await.unwrap();
    assert_eq!(close.map(|c| c.0), Some(4003));
    assert_eq!(
        error.as_ref().and_then(|f| f.header("message")),
        Some("frame too large")
    );
}

/// A token's SEND rate holds across its connections: two connections of one token share one
/// budget (each had its own, so N connections gave N times the rate). A service token may
/// carry its own `publish_rate`, within `hub.max_claimed_rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_rate_is_per_token_across_connections() {
    let node = node(
        None,
        &[
            ("LOCKSTEP_HUB_PUBLISH_RATE", "20"),
            ("LOCKSTEP_HUB_PUBLISH_BURST", "20"),
            ("LOCKSTEP_HUB_MAX_CLAIMED_RATE", "5000"),
        ],
    )
    .await;
    let bot = node.token("bot", &["t1"], "publish");
    let started = Instant::now();
    let sends = (0..2).map(|_| {
        let (url, bot) = (node.ws(), bot.clone());
        tokio::spawn(async move { send_with_receipts(&url, &bot, 60).await })
    });
    for send in sends {
        send.await.unwrap();
    }
    // 120 SENDs with a burst of 20 at 20/s take at least 5 s on one budget (2.0 s on two).
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(4800), "{took:?}: two budgets");

    // A claimed rate, capped at 5000/s: 300 SENDs need far less than the 14 s of 20/s.
    let fast = node.token_with(&json!({
        "sub": "importer", "teams": ["t1"], "scope": "publish", "publish_rate": 100_000,
        "exp": tests::now() + 3600,
    }));
    let started = Instant::now();
    send_with_receipts(&node.ws(), &fast, 300).await;
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
}

/// `n` SENDs to `/team/t1`, each with a receipt; waits for every receipt.
async fn send_with_receipts(url: &str, token: &str, n: usize) {
    let (mut client, _) = StompClient::connect(url, token).await.unwrap();
    for i in 0..n {
        let frame = Frame::new(Command::Send)
            .with_header("destination", "/team/t1")
            .with_header("event-type", "bot.tick")
            .with_header("receipt", format!("r{i}"))
            .with_body(format!("{{\"i\":{i}}}"));
        client.send(&frame).await.unwrap();
    }
    for i in 0..n {
        client
            .expect_receipt(&format!("r{i}"))
            .await
            .unwrap_or_else(|e| panic!("receipt r{i}: {e:#}"));
    }
}

/// `hub.publish_rate = 0` means unlimited, as `api.publish_rate = 0` does (it used to mean one
/// SEND a minute after the burst).
#[tokio::test]
async fn a_zero_send_rate_is_unlimited() {
    let node = node(
        None,
        &[
            ("LOCKSTEP_HUB_PUBLISH_RATE", "0"),
            ("LOCKSTEP_HUB_PUBLISH_BURST", "1"),
        ],
    )
    .await;
    let bot = node.token("bot", &["t1"], "publish");
    let started = Instant::now();
    send_with_receipts(&node.ws(), &bot, 500).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A token's expiry is enforced to the millisecond (it was rounded to whole seconds, so a
/// token could outlive its `exp` by up to a second).
#[tokio::test]
async fn token_expiry_is_enforced_to_the_millisecond() {
    let node = Lockstep::start();
    // Connect at .700 of a second: whole-second rounding would keep the token 700 ms too long.
    let now = now_ms();
    let connect_at = (now / 1000 + 1) * 1000 + 700;
    tokio::time::sleep(Duration::from_millis(connect_at - now)).await;
    let exp = connect_at / 1000 + 2;
    let token = node.token_with(&json!({"sub": "ana", "teams": ["t1"], "exp": exp}));
    let (mut client, _) = StompClient::connect(&node.ws(), &token).await.unwrap();
    let (error, close) = client.expect_close().await.unwrap();
    let closed_at = now_ms();
    assert_eq!(close.map(|c| c.0), Some(4002));
    assert_eq!(
        error.as_ref().and_then(|f| f.header("message")),
        Some("token expired")
    );
    assert!(
        closed_at <= exp * 1000 + 400,
        "closed {} ms after exp",
        closed_at.saturating_sub(exp * 1000)
    );
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Absurd or unusable claims are refused at CONNECT with a clear ERROR, and nothing else on
/// the node notices: an `exp` near 2^63 used to panic the session task (an `Instant`
/// overflow); a `sub` that is not an id (`auth0|123`, an e-mail) silently lost the lock events
/// sent to its user topic.
#[tokio::test]
async fn absurd_claims_are_refused_at_connect() {
    let node = Lockstep::start();
    let mut bystander = crate::client(&node, "bob", &["t1"], "").await;
    bystander.subscribe("s", "/team/t1").await.unwrap();
    for (claims, expected) in [
        (
            json!({"sub": "ana", "teams": ["t1"], "exp": i64::MAX - 1}),
            "year 9999",
        ),
        (
            json!({"sub": "auth0|123", "teams": ["t1"], "exp": tests::now() + 60}),
            "user topic",
        ),
        (
            json!({"sub": "ana@example.com", "teams": ["t1"], "exp": tests::now() + 60}),
            "user topic",
        ),
    ] {
        let token = node.token_with(&claims);
        let mut client = StompClient::open(&node.ws(), &OpenOptions::default())
            .await
            .unwrap();
        client
            .send(
                &Frame::new(Command::Connect)
                    .with_header("accept-version", "1.2")
                    .with_header("passcode", token.as_str()),
            )
            .await
            .unwrap();
        let (error, close) = client.expect_close().await.unwrap();
        let error = error.unwrap_or_else(|| panic!("no ERROR for {claims}"));
        assert_eq!(error.header("message"), Some("unauthorized"));
        let body = String::from_utf8_lossy(&error.body).into_owned();
        assert!(body.contains(expected), "{claims}: {body}");
        assert_eq!(close.map(|c| c.0), Some(4001));
        // The HTTP API says the same.
        let (status, body) = call(&node, "GET", "/api/v1/teams/t1/locks", &token, None).await;
        assert_eq!(status, 401, "{body}");
    }
    // The node and its other clients are unharmed.
    let publisher = node.token("backend", &["t1"], "publish");
    let (status, _) = crate::http_publish(
        &node,
        &publisher,
        &json!({"topic": "/team/t1", "type": "job.progress", "data": {}}),
    )
    .await;
    assert_eq!(status, 202);
    bystander
        .expect_frame_within(Duration::from_secs(5))
        .await
        .unwrap();
}

/// A client that asks for heart-beats so rare (`4294967295`) or none at all used to disable
/// dead-peer detection for good. The silence a connection may keep is capped by
/// `hub.idle_timeout`; past half of it the server pings, so a live client (whose WebSocket
/// answers pings by itself) stays, and a dead one is closed with 4003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peers_are_found_whatever_heart_beats_they_ask_for() {
    let node = Lockstep::start_with(Options::default().env("LOCKSTEP_HUB_IDLE_TIMEOUT", "2s"));
    let token = node.token("ana", &["t1"], "");
    for heart_beat in ["4294967295,0", "0,0"] {
        // Live: reads (and so answers pings) but never sends a frame.
        let connect = Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("heart-beat", heart_beat)
            .with_header("passcode", token.as_str());
        let mut live = StompClient::open(&node.ws(), &OpenOptions::default())
            .await
            .unwrap();
        live.send(&connect).await.unwrap();
        assert_eq!(
            live.expect_frame().await.unwrap().command,
            Command::Connected
        );
        // Dead: never reads again, so never answers a ping.
        let mut dead = StompClient::open(&node.ws(), &OpenOptions::default())
            .await
            .unwrap();
        dead.send(&connect).await.unwrap();
        assert_eq!(
            dead.expect_frame().await.unwrap().command,
            Command::Connected
        );
        let started = Instant::now();
        // Three idle timeouts of reading: the live one is pinged and stays.
        let quiet = tokio::time::timeout(Duration::from_secs(6), live.next()).await;
        assert!(
            quiet.is_err(),
            "{heart_beat}: the live client got {quiet:?}"
        );
        // The dead one was closed as a dead peer after one idle timeout.
        let (_, close) = dead.expect_close().await.unwrap();
        assert_eq!(
            close,
            Some((4003, "heart-beat timeout".to_owned())),
            "{heart_beat}"
        );
        assert!(started.elapsed() >= Duration::from_secs(6));
    }
}

/// STOMP 1.0 has no header escaping, so a 1.0 client must see `destination:/team/t:1` and
/// its own subscription id as they are, not `t\c1` (what a 1.2 client gets).
#[tokio::test]
async fn stomp_1_0_clients_get_headers_without_escapes() {
    let node = Lockstep::start();
    let token = node.token("ana", &["t:1"], "publish");
    let mut client = StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap();
    // No accept-version: a 1.0 client.
    client
        .send(&Frame::new(Command::Connect).with_header("passcode", token.as_str()))
        .await
        .unwrap();
    let connected = client.expect_frame().await.unwrap();
    assert_eq!(connected.header("version"), Some("1.0"));
    client
        .send_text("SUBSCRIBE\nid:a:b\ndestination:/team/t:1\nreceipt:r:1\n\n\0")
        .await
        .unwrap();
    let receipt = raw_text(&mut client).await;
    assert!(
        receipt.starts_with("RECEIPT\nreceipt-id:r:1\n"),
        "{receipt:?}"
    );
    let (status, _) = crate::http_publish(
        &node,
        &token,
        &json!({"topic": "/team/t:1", "type": "job.progress", "data": {}}),
    )
    .await;
    assert_eq!(status, 202);
    let message = raw_text(&mut client).await;
    assert!(
        message.starts_with("MESSAGE\nsubscription:a:b\n")
            && message.contains("\ndestination:/team/t:1\n"),
        "{message:?}"
    );
}

/// The next text message as it came over the wire.
async fn raw_text(client: &mut StompClient) -> String {
    use futures_util::StreamExt as _;
    let ws = client.ws_mut();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))))
                if text.trim() != "" =>
            {
                return text.to_string();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no message: {other:?}"),
        }
    }
}

/// A decision that waited for an item's row judges expiry by the database's clock when it got
/// the row, not when it started waiting: Ana's 1 s lock is held open (a row lock from another
/// transaction) past its expiry while Bob's acquire waits; once the row is free, Bob gets the
/// item. (The clock used to be read in the row-locking query itself, before the wait, so Bob was
/// told Ana still held it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_that_waited_for_the_row_uses_the_time_it_got_it() {
    use std::io::{BufRead as _, Write as _};
    let pg = Postgres::start();
    let node = node(Some(&pg.database("clock")), &[]).await;
    let ana = node.token("ana", &["t1"], "locks");
    let bob = node.token("bob", &["t1"], "locks");
    let (s, held) = call(
        &node,
        "POST",
        &lock_path("t1", "w"),
        &ana,
        Some(json!({"ttl_ms": 1000})),
    )
    .await;
    assert_eq!(s, 200, "{held}");
    let mut psql = pg.interactive("clock");
    let mut input = psql.stdin.take().unwrap();
    let mut output = std::io::BufReader::new(psql.stdout.take().unwrap());
    writeln!(
        input,
        "BEGIN; SELECT token FROM locks WHERE team = 't1' AND item = 'w' FOR UPDATE;"
    )
    .unwrap();
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "1", "psql holds the row");
    let waiting = {
        let (url, path, bob) = (node.http(), lock_path("t1", "w"), bob.clone());
        tokio::spawn(async move {
            crate::locks::request(&reqwest::Client::new(), &url, "POST", &path, &bob, None).await
        })
    };
    // The scenario: the row stays locked until Ana's lock has expired.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "Bob's decision did not wait for the row"
    );
    writeln!(input, "COMMIT;").unwrap();
    drop(input);
    let (s, body) = waiting.await.unwrap().unwrap();
    assert_eq!(
        (s, &body["holder"]),
        (200, &json!("bob")),
        "Bob was judged by the time he started waiting: {body}"
    );
    assert_eq!(token_of(&body), 2);
    let _ = psql.wait();
}

/// The public key file is read again when it changes: a key added to the JWKS is accepted
/// within the reload interval, without a restart.
#[tokio::test]
async fn a_rotated_jwks_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let testdata = tests::workspace().join("protocol/src/auth/testdata");
    std::fs::copy(testdata.join("jwks.json"), &jwks).unwrap();
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_JWT_PUBLIC_KEYS", jwks.display())
            .env("LOCKSTEP_JWT_RELOAD_INTERVAL", "100ms"),
    );
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(testdata.join("rsa2_private.pem")).unwrap(),
    )
    .unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"sub": "ana", "teams": ["t1"], "scope": "locks", "exp": tests::now() + 600}),
        &key,
    )
    .unwrap();
    let (s, _) = call(&node, "GET", "/api/v1/teams/t1/locks", &token, None).await;
    assert_eq!(s, 401, "a key the node does not have yet");
    std::fs::copy(testdata.join("jwks_rotation.json"), &jwks).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, body) = call(&node, "GET", "/api/v1/teams/t1/locks", &token, None).await;
        if s == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new key was not picked up: {s} {body}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
