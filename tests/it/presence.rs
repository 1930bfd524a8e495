//! Presence (DESIGN §14) on real nodes: who subscribes to a team or item topic, on one node and
//! across three sharing Redis or a Redis Cluster; the leave delay that keeps reloads and second
//! tabs silent; a SIGKILLed node's users leaving exactly once; 2,000 members; the HTTP list and
//! who may read it.

use loadtest::client::{Incoming, StompClient};
use protocol::Command;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tests::redis::{RedisCluster, RedisServer};
use tests::{Lockstep, Options, random_secret};

const ITEM: &str = "/team/t1/items/doc-1";
const LEAVE_DELAY: Duration = Duration::from_millis(600);

/// `n` nodes with a short leave delay and presence timeout, sharing `redis_url` (or one
/// embedded node when `None`) and one secret.
fn nodes(n: usize, redis_url: Option<&str>, extra: &[(&str, &str)]) -> Vec<Lockstep> {
    let secret = random_secret();
    let nodes: Vec<Lockstep> = (0..n)
        .map(|_| {
            let mut options = Options::default()
                .secret(&secret)
                .env("LOCKSTEP_PRESENCE_ENABLED", "true")
                .env("LOCKSTEP_PRESENCE_LEAVE_DELAY", "600ms")
                .env("LOCKSTEP_PRESENCE_TIMEOUT", "3s")
                .env("LOCKSTEP_REDIS_PROBE_INTERVAL", "500ms");
            if let Some(url) = redis_url {
                options = options.env("LOCKSTEP_REDIS_URL", url);
            }
            for (k, v) in extra {
                options = options.env(k, v);
            }
            Lockstep::start_with(options)
        })
        .collect();
    for node in &nodes {
        node.wait_readyz(200, Duration::from_secs(20)).unwrap();
    }
    nodes
}

/// A connection of `user` (member of t1) subscribed to `topic` with `headers`.
async fn member(node: &Lockstep, user: &str, topic: &str, headers: &[(&str, &str)]) -> StompClient {
    let mut client = crate::client(node, user, &["t1"], "").await;
    client.subscribe_with("p", topic, headers).await.unwrap();
    client
}

/// (event type, user) of a presence MESSAGE; `None` for any other frame.
fn presence_of(frame: &protocol::Frame) -> Option<(String, String)> {
    let kind = frame.header("event-type")?;
    if frame.command != Command::Message || !kind.starts_with("presence.") {
        return None;
    }
    let env: Value = serde_json::from_slice(&frame.body).unwrap();
    let user = env["data"]["user"].as_str().unwrap().to_owned();
    assert_eq!(
        frame.header("x-key"),
        Some(format!("presence:{user}").as_str())
    );
    Some((kind.to_owned(), user))
}

/// Reads until `n` presence events arrived (other frames are skipped); fails after `within`.
async fn presence_events(
    client: &mut StompClient,
    n: usize,
    within: Duration,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = client
            .expect_frame_within(left)
            .await
            .unwrap_or_else(|e| panic!("{e:#}: waiting for {n} presence events, got {got:?}"));
        got.extend(presence_of(&frame));
    }
    got
}

/// Asserts no presence event arrives for `window` (the point of the wait: proving silence).
async fn no_presence_event(client: &mut StompClient, window: Duration) {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.next()).await {
            Err(_) => return,
            Ok(Ok(Incoming::Frame(frame))) => {
                assert_eq!(
                    presence_of(&frame),
                    None,
                    "{}",
                    loadtest::client::describe(&frame)
                );
            }
            Ok(Ok(Incoming::HeartBeat)) => {}
            Ok(other) => panic!("connection ended while waiting: {other:?}"),
        }
    }
}

fn pair(kind: &str, user: &str) -> (String, String) {
    (format!("presence.{kind}"), user.to_owned())
}

/// `GET /api/v1/topics/{topic}/presence{query}` as `token`: status and body.
async fn list(node: &Lockstep, token: &str, topic: &str, query: &str) -> (u16, Value) {
    let topic = topic.replace('/', "%2F");
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/topics/{topic}/presence{query}",
            node.http()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// user → connections, from a list answer.
fn users(body: &Value) -> BTreeMap<String, u64> {
    body["users"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|u| {
            (
                u["user"].as_str().unwrap().to_owned(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Polls the list until it names exactly `want` (the store is updated in batches).
async fn wait_for_list(node: &Lockstep, token: &str, topic: &str, want: &[(&str, u64)]) -> Value {
    let want: BTreeMap<String, u64> = want.iter().map(|(u, c)| ((*u).to_owned(), *c)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = list(node, token, topic, "").await;
        assert_eq!(status, 200, "{body}");
        if users(&body) == want {
            assert_eq!(body["count"].as_u64(), Some(want.len() as u64), "{body}");
            return body;
        }
        assert!(Instant::now() < deadline, "list is {body}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reload_and_a_second_tab_are_silent_and_a_close_leaves_once() {
    let node = &nodes(1, None, &[])[0];
    let reader = node.token("ana", &["t1"], "");
    let mut ana = member(node, "ana", ITEM, &[]).await;
    assert_eq!(
        presence_events(&mut ana, 1, Duration::from_secs(5)).await,
        [pair("joined", "ana")],
        "her own join"
    );
    let bo = member(node, "bo", ITEM, &[]).await;
    assert_eq!(
        presence_events(&mut ana, 1, Duration::from_secs(5)).await,
        [pair("joined", "bo")]
    );
    wait_for_list(node, &reader, ITEM, &[("ana", 1), ("bo", 1)]).await;

    // A second tab of Bo's, then the first one closes: no event, the count follows.
    let bo_tab = member(node, "bo", ITEM, &[]).await;
    wait_for_list(node, &reader, ITEM, &[("ana", 1), ("bo", 2)]).await;
    bo.close().await.unwrap();
    wait_for_list(node, &reader, ITEM, &[("ana", 1), ("bo", 1)]).await;
    // A reload: the tab's connection goes and a new one subscribes well within the delay.
    bo_tab.close().await.unwrap();
    let bo = member(node, "bo", ITEM, &[]).await;
    no_presence_event(&mut ana, LEAVE_DELAY * 3).await;

    // The tab closes: one leave, after the delay.
    let closed = Instant::now();
    bo.close().await.unwrap();
    assert_eq!(
        presence_events(&mut ana, 1, Duration::from_secs(5)).await,
        [pair("left", "bo")]
    );
    let waited = closed.elapsed();
    assert!(waited >= LEAVE_DELAY, "left after {waited:?}");
    no_presence_event(&mut ana, LEAVE_DELAY * 2).await;
    wait_for_list(node, &reader, ITEM, &[("ana", 1)]).await;
}

#[tokio::test]
async fn opting_out_snapshots_pages_and_who_may_read_presence() {
    let node = &nodes(1, None, &[])[0];
    let reader = node.token("ana", &["t1"], "");
    let _ana = member(node, "ana", "/team/t1", &[]).await;
    let _bo = member(node, "bo", "/team/t1", &[]).await;
    // Carol does not want presence events, but is present.
    let mut carol = member(node, "carol", "/team/t1", &[("x-presence", "false")]).await;
    wait_for_list(
        node,
        &reader,
        "/team/t1",
        &[("ana", 1), ("bo", 1), ("carol", 1)],
    )
    .await;
    let publisher = node.token("backend", &["t1"], "publish");
    let body =
        json!({"topic": "/team/t1", "type": "job.progress", "data": {"job_id": "j1", "done": 1}});
    assert_eq!(crate::http_publish(node, &publisher, &body).await.0, 202);
    let first = carol.expect_frame().await.unwrap();
    assert_eq!(
        first.header("event-type"),
        Some("job.progress"),
        "presence events skipped"
    );

    // A snapshot holds each user's latest presence event (keyed presence:{user}).
    let mut late = crate::client(node, "dan", &["t1"], "").await;
    late.subscribe_with("s", "/team/t1", &[("x-stream-offset", "snapshot")])
        .await
        .unwrap();
    let mut keys = BTreeSet::new();
    loop {
        let frame = late.expect_frame().await.unwrap();
        if frame.header("x-snapshot") != Some("true") {
            if frame.header("event-type") == Some("lockstep.subscribed") {
                continue;
            }
            break;
        }
        keys.extend(frame.header("x-key").map(str::to_owned));
    }
    for user in ["ana", "bo", "carol"] {
        assert!(keys.contains(&format!("presence:{user}")), "{keys:?}");
    }
    // Opted out: no presence in the snapshot either.
    let mut quiet = crate::client(node, "erin", &["t1"], "").await;
    quiet
        .subscribe_with(
            "s",
            "/team/t1",
            &[("x-stream-offset", "snapshot"), ("x-presence", "false")],
        )
        .await
        .unwrap();
    loop {
        let frame = quiet.expect_frame().await.unwrap();
        assert_eq!(
            presence_of(&frame),
            None,
            "{}",
            loadtest::client::describe(&frame)
        );
        if frame.header("event-type") == Some("job.progress") {
            break;
        }
    }

    // Pages, sorted by user id.
    wait_for_list(
        node,
        &reader,
        "/team/t1",
        &[("ana", 1), ("bo", 1), ("carol", 1), ("dan", 1), ("erin", 1)],
    )
    .await;
    let (status, page) = list(node, &reader, "/team/t1", "?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(users(&page).into_keys().collect::<Vec<_>>(), ["ana", "bo"]);
    assert_eq!(
        (page["count"].as_u64(), page["next"].as_str()),
        (Some(5), Some("bo"))
    );
    let (_, page) = list(node, &reader, "/team/t1", "?limit=2&after=bo").await;
    assert_eq!(
        users(&page).into_keys().collect::<Vec<_>>(),
        ["carol", "dan"]
    );
    let (_, page) = list(node, &reader, "/team/t1", "?limit=2&after=dan").await;
    assert_eq!(users(&page).into_keys().collect::<Vec<_>>(), ["erin"]);
    assert!(page.get("next").is_none(), "{page}");
    assert!(page["users"][0]["since"].as_str().unwrap().ends_with('Z'));

    // Bad input and foreign topics.
    let outsider = node.token("mallory", &["t2"], "");
    for topic in ["/team/t1", ITEM] {
        let (status, body) = list(node, &outsider, topic, "").await;
        assert_eq!(status, 403, "{topic}: {body}");
        let mut client = crate::client(node, "mallory", &["t2"], "").await;
        client
            .send(
                &protocol::Frame::new(Command::Subscribe)
                    .with_header("id", "0")
                    .with_header("destination", topic),
            )
            .await
            .unwrap();
        let (error, close) = client.expect_close().await.unwrap();
        assert_eq!(error.unwrap().header("message"), Some("forbidden"));
        assert_eq!(close.unwrap().0, 4004);
    }
    for (query, code) in [
        ("?limit=0", "invalid_limit"),
        ("?limit=1001", "invalid_limit"),
        ("?after=a%20b", "invalid_after"),
    ] {
        let (status, body) = list(node, &reader, "/team/t1", query).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some(code)),
            "{query}"
        );
    }
    let (status, body) = list(node, &reader, "/user/ana", "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("no_presence"))
    );
    let (status, _) = list(node, "not-a-token", "/team/t1", "").await;
    assert_eq!(status, 401);
    // A malformed x-presence is a protocol error.
    let mut client = crate::client(node, "ana", &["t1"], "").await;
    client
        .send(
            &protocol::Frame::new(Command::Subscribe)
                .with_header("id", "0")
                .with_header("destination", "/team/t1")
                .with_header("x-presence", "maybe"),
        )
        .await
        .unwrap();
    let (error, close) = client.expect_close().await.unwrap();
    assert!(
        String::from_utf8_lossy(&error.unwrap().body).contains("x-presence"),
        "names the header"
    );
    assert_eq!(close.unwrap().0, 4003);
}

/// Users on three nodes; node 0 is SIGKILLed: its users leave within the timeout, exactly
/// once each, except those still connected elsewhere.
async fn a_killed_nodes_users_leave_once(redis_url: &str) {
    let mut nodes = nodes(3, Some(redis_url), &[]);
    let reader = nodes[2].token("olga", &["t1"], "");
    let mut olga = member(&nodes[2], "olga", "/team/t1", &[]).await;
    assert_eq!(
        presence_events(&mut olga, 1, Duration::from_secs(5)).await,
        [pair("joined", "olga")]
    );
    let _ana = member(&nodes[0], "ana", "/team/t1", &[]).await;
    let _bo0 = member(&nodes[0], "bo", "/team/t1", &[]).await;
    let _bo1 = member(&nodes[1], "bo", "/team/t1", &[]).await;
    let _carol = member(&nodes[1], "carol", "/team/t1", &[]).await;
    let joined: BTreeSet<_> = presence_events(&mut olga, 3, Duration::from_secs(5))
        .await
        .into_iter()
        .collect();
    assert_eq!(
        joined,
        [
            pair("joined", "ana"),
            pair("joined", "bo"),
            pair("joined", "carol")
        ]
        .into(),
        "one join per user, whatever the number of nodes"
    );
    wait_for_list(
        &nodes[1],
        &reader,
        "/team/t1",
        &[("ana", 1), ("bo", 2), ("carol", 1), ("olga", 1)],
    )
    .await;

    let killed = Instant::now();
    nodes[0].kill();
    assert_eq!(
        presence_events(&mut olga, 1, Duration::from_secs(10)).await,
        [pair("left", "ana")]
    );
    let took = killed.elapsed();
    // The timeout is 3 s: entries live 2 s past their last refresh, refreshed every second.
    assert!(
        took <= Duration::from_secs(4),
        "ana left {took:?} after the kill"
    );
    no_presence_event(&mut olga, Duration::from_secs(3)).await;
    wait_for_list(
        &nodes[2],
        &reader,
        "/team/t1",
        &[("bo", 1), ("carol", 1), ("olga", 1)],
    )
    .await;
    eprintln!("presence.left {took:?} after SIGKILL");
}

#[tokio::test]
async fn a_killed_nodes_users_leave_once_with_redis() {
    let redis = RedisServer::start();
    a_killed_nodes_users_leave_once(&redis.url()).await;
}

#[tokio::test]
async fn a_killed_nodes_users_leave_once_with_redis_cluster() {
    let cluster = RedisCluster::start(3);
    a_killed_nodes_users_leave_once(&cluster.url()).await;
}

/// Two users in headless Chromium (@stomp/stompjs) open the same item on different nodes of
/// three: each sees the other; a reload onto the third node is silent; a closed tab leaves
/// once, after the leave delay; the HTTP list agrees (`tests/clients/browser/presence.mjs`).
fn item_pages_in_chromium(redis_url: &str) {
    let page_port = tests::free_port();
    let origin = format!("http://127.0.0.1:{page_port}");
    let nodes = nodes(
        3,
        Some(redis_url),
        &[
            ("LOCKSTEP_ALLOWED_ORIGINS", &origin),
            // A reload in Chromium takes a few hundred milliseconds here; the delay must cover
            // it with room to spare.
            ("LOCKSTEP_PRESENCE_LEAVE_DELAY", "2s"),
        ],
    );
    let config = json!({
        "nodes": nodes.iter().map(|n| json!({"http": n.http(), "ws": n.ws()})).collect::<Vec<_>>(),
        "team": "t1",
        "item": "doc-1",
        "tokens": {
            "ana": nodes[0].token("ana", &["t1"], ""),
            "ben": nodes[0].token("ben", &["t1"], ""),
            "publisher": nodes[0].token("backend", &["t1"], "publish"),
        },
        "leave_delay_ms": 2000,
        "page_port": page_port,
    })
    .to_string();
    crate::clients::run(&nodes[0], "node", "browser/presence.mjs", &config);
}

#[test]
fn stompjs_in_chromium_sees_item_presence_across_three_nodes_with_redis() {
    let redis = RedisServer::start();
    item_pages_in_chromium(&redis.url());
}

#[test]
fn stompjs_in_chromium_sees_item_presence_across_three_nodes_with_redis_cluster() {
    let cluster = RedisCluster::start(3);
    item_pages_in_chromium(&cluster.url());
}

#[tokio::test]
async fn two_thousand_members_are_listed_counted_and_joined_in_batches() {
    const MEMBERS: usize = 2000;
    let redis = RedisServer::start();
    let nodes = nodes(
        2,
        Some(&redis.url()),
        &[("LOCKSTEP_PRESENCE_MAX_LISTED", "2500")],
    );
    let reader = nodes[0].token("olga", &["t1"], "");
    let mut olga = member(&nodes[0], "olga", "/team/t1", &[]).await;
    presence_events(&mut olga, 1, Duration::from_secs(5)).await;
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let user = format!("u{i:04}");
        members.push(member(&nodes[i % 2], &user, "/team/t1", &[("x-presence", "false")]).await);
    }
    let joined: BTreeSet<String> = presence_events(&mut olga, MEMBERS, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|(kind, user)| {
            assert_eq!(kind, "presence.joined");
            user
        })
        .collect();
    assert_eq!(joined.len(), MEMBERS, "each member joined once");

    let mut listed = BTreeSet::new();
    let mut after = String::new();
    loop {
        let query = if after.is_empty() {
            "?limit=1000".to_owned()
        } else {
            format!("?limit=1000&after={after}")
        };
        let (status, page) = list(&nodes[1], &reader, "/team/t1", &query).await;
        assert_eq!(status, 200);
        assert_eq!(
            page["count"].as_u64(),
            Some(MEMBERS as u64 + 1),
            "{}",
            page["count"]
        );
        listed.extend(users(&page).into_keys());
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(listed.len(), MEMBERS + 1);
    // Updates went in batches: far fewer store updates than joins.
    let updates = nodes[0].metric("lockstep_presence_updates_total").await
        + nodes[1].metric("lockstep_presence_updates_total").await;
    assert!(
        updates < (MEMBERS / 4) as f64,
        "{updates} updates for {MEMBERS} joins"
    );
    // Above the listing maximum, the count only.
    let small = self::nodes(
        1,
        Some(&redis.url()),
        &[("LOCKSTEP_PRESENCE_MAX_LISTED", "100")],
    );
    let token = small[0].token("olga", &["t1"], "");
    let (status, body) = list(&small[0], &token, "/team/t1", "").await;
    assert_eq!(status, 200);
    assert_eq!(body["counts_only"], true);
    assert_eq!(body["count"].as_u64(), Some(MEMBERS as u64 + 1));
    assert_eq!(body["users"], json!([]));
    drop(members);
}
