//! Session-bound locks: released after their WebSocket closes (also when its node shuts down),
//! kept across a reconnect.

use super::*;

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
