//! The control API and token refresh (DESIGN §15) on real nodes: a user disconnected on every
//! node of three within a second; an unsubscribe that ends a team's subscriptions with
//! `lockstep.unsubscribed` and refuses the old token, also on a node that never gets the
//! control message (a Redis ACL keeps it off the control channel); the connections survey;
//! token refresh over `/lockstep/token`; bad input.

use loadtest::client::StompClient;
use protocol::{Command, Frame};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tests::redis::RedisServer;
use tests::{Lockstep, Options, now, random_secret};

/// `n` nodes sharing `redis_url` and one secret; `urls` overrides the Redis URL per node (those
/// nodes are not waited for: the test knows what state they reach).
fn nodes(n: usize, redis_url: &str, urls: &[(usize, String)]) -> Vec<Lockstep> {
    let secret = random_secret();
    let nodes: Vec<Lockstep> = (0..n)
        .map(|i| {
            let url = urls
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(redis_url.to_owned(), |(_, u)| u.clone());
            Lockstep::start_with(
                Options::default()
                    .secret(&secret)
                    .env("LOCKSTEP_REDIS_URL", url)
                    .env("LOCKSTEP_REDIS_PROBE_INTERVAL", "500ms"),
            )
        })
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        if !urls.iter().any(|(j, _)| *j == i) {
            node.wait_readyz(200, Duration::from_secs(20)).unwrap();
        }
    }
    nodes
}

/// `GET /readyz`: status and body.
async fn readyz(node: &Lockstep) -> (u16, Value) {
    let response = reqwest::get(format!("{}/readyz", node.http()))
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The platform backend's token: scope `control`.
fn backend(node: &Lockstep) -> String {
    node.token("backend", &[], "control publish")
}

/// A token of `sub` in `teams` with `scope`, issued at `iat`.
fn issued(node: &Lockstep, sub: &str, teams: &[&str], scope: &str, iat: u64) -> String {
    node.token_with(
        &json!({"sub": sub, "teams": teams, "scope": scope, "iat": iat, "exp": now() + 3600}),
    )
}

/// `method path` with `body` as `token`: status and JSON body.
async fn call(
    node: &Lockstep,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let url = format!("{}/api/v1{path}", node.http());
    let client = reqwest::Client::new();
    let mut request = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    }
    .bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A 403 whose message says the access was revoked.
fn assert_revoked(status: u16, body: &Value) {
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("revoked"), "{body}");
}

async fn connect(node: &Lockstep, token: &str) -> StompClient {
    StompClient::connect(&node.ws(), token)
        .await
        .expect("connect")
        .0
}

/// Waits for the server's close; returns the ERROR frame before it (if any) and the code.
async fn closed(client: &mut StompClient) -> (Option<Frame>, u16) {
    let (error, close) = client.expect_close().await.expect("a close");
    (error, close.map_or(0, |(code, _)| code))
}

/// Reads until a MESSAGE of `event_type` for subscription `sub` arrives; fails after `within`.
async fn message_of(
    client: &mut StompClient,
    sub: &str,
    event_type: &str,
    within: Duration,
) -> Frame {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = client
            .expect_frame_within(left)
            .await
            .unwrap_or_else(|e| panic!("{e:#}: waiting for {event_type} on {sub}"));
        if frame.command == Command::Message
            && frame.header("subscription") == Some(sub)
            && frame.header("event-type") == Some(event_type)
        {
            return frame;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A user connected to two of three nodes is closed with 4011 on both within a second of the
/// call made on the third; their old token is refused on CONNECT afterwards, a later one is
/// not; another user is untouched. Twelve users in turn give latency figures (the release
/// figures come from `loadtest control`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_a_user_everywhere_within_a_second() {
    let redis = RedisServer::start();
    let nodes = nodes(3, &redis.url(), &[]);
    let control = backend(&nodes[2]);
    let mut bo = connect(&nodes[0], &nodes[0].token("bo", &["t1"], "")).await;
    bo.subscribe("t", "/team/t1").await.unwrap();

    let mut latencies = Vec::new();
    for round in 0..12 {
        let user = format!("ana{round}");
        let token = issued(&nodes[0], &user, &["t1"], "", now() - 10);
        let mut a = connect(&nodes[0], &token).await;
        let mut b = connect(&nodes[1], &token).await;
        a.subscribe("t", "/team/t1").await.unwrap();
        b.subscribe("u", &format!("/user/{user}")).await.unwrap();
        let started = Instant::now();
        // The call answers once its second is over; its effect does not wait for that.
        let path = format!("/users/{user}/disconnect");
        let answer = call(&nodes[2], &control, "POST", &path, None);
        let closes = async {
            let deadline = tokio::time::Instant::from_std(started + Duration::from_secs(1));
            for client in [&mut a, &mut b] {
                let (_, code) = tokio::time::timeout_at(deadline, closed(client))
                    .await
                    .expect("closed within a second of the call");
                assert_eq!(code, 4011);
            }
            started.elapsed()
        };
        let ((status, body), took) = tokio::join!(answer, closes);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user"], user.as_str());
        assert!(body.get("topic").is_none(), "{body}");
        latencies.push(took);
        if round == 0 {
            // The old token is refused on every node, with a reason.
            for node in &nodes {
                let refused = StompClient::connect(&node.ws(), &token)
                    .await
                    .map(|_| ())
                    .expect_err("the revoked token connects")
                    .to_string();
                assert!(refused.contains("token revoked"), "{refused}");
            }
            // A token issued once the call answered connects (the answer waits out the call's
            // second, so this one is issued after the cutoff).
            let later = issued(&nodes[0], &user, &["t1"], "", now());
            let mut fresh = connect(&nodes[1], &later).await;
            fresh.subscribe("t", "/team/t1").await.unwrap();
        }
    }
    // Bo was never touched: his subscription still delivers.
    let publisher = nodes[1].token("pub", &["t1"], "publish");
    let (status, _) = crate::http_publish(
        &nodes[1],
        &publisher,
        &json!({"topic": "/team/t1", "type": "ping.sent", "data": {}}),
    )
    .await;
    assert_eq!(status, 202);
    message_of(&mut bo, "t", "ping.sent", Duration::from_secs(5)).await;

    latencies.sort();
    eprintln!(
        "disconnect across 3 nodes, call to both closes: p50 {:?} p99 {:?} max {:?} ({} users)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        latencies.len()
    );
}

/// After `unsubscribe` from a team, the user's team and item subscriptions end with
/// `lockstep.unsubscribed` on the nodes that get the control message; a node kept off the
/// control channel (a Redis ACL user without it: the message is really lost there) still
/// refuses a new SUBSCRIBE to the team with the old token, on an existing connection and a new
/// one; other topics stay allowed, and a token issued later may subscribe again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_ends_a_team_and_holds_on_a_node_that_missed_it() {
    let redis = RedisServer::start();
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "deaf",
            "on",
            ">deaf-pw",
            "~*",
            "resetchannels",
            "&lockstep:{*",
            "&lockstep:probe:*",
            "+@all",
        ])
        .expect("ACL SETUSER");
    let deaf_url = format!("redis://deaf:deaf-pw@127.0.0.1:{}", redis.port);
    let nodes = nodes(3, &redis.url(), &[(1, deaf_url)]);
    // The deaf node connects to Redis, fails to subscribe to the control channel, and says
    // so on /readyz once its own announcements stay away.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readyz(&nodes[1]).await;
        if status == 503
            && body["checks"]["broker"] == "ok"
            && body["checks"]["control"] == "unavailable"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deaf node readiness: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        nodes[1]
            .log()
            .contains("control channel subscription failed"),
        "the deaf node could subscribe to the control channel:\n{}",
        nodes[1].log()
    );
    let token = issued(&nodes[0], "ana", &["t1", "t2"], "publish locks", now() - 10);
    let mut a = connect(&nodes[0], &token).await;
    a.subscribe("team", "/team/t1").await.unwrap();
    a.subscribe("item", "/team/t1/items/doc-1").await.unwrap();
    a.subscribe("other", "/team/t2").await.unwrap();
    let mut deaf = connect(&nodes[1], &token).await;
    deaf.subscribe("team", "/team/t1").await.unwrap();

    let control = backend(&nodes[2]);
    let (status, body) = call(
        &nodes[2],
        &control,
        "POST",
        "/users/ana/unsubscribe",
        Some(r#"{"topic":"/team/t1"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], "/team/t1");
    // Both of the team's subscriptions end, each with its own final frame.
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let frame = a.expect_frame_within(Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            frame.header("event-type"),
            Some("lockstep.unsubscribed"),
            "{}",
            loadtest::client::describe(&frame)
        );
        let envelope: Value = serde_json::from_slice(&frame.body).unwrap();
        assert_eq!(envelope["data"]["reason"], "revoked");
        ended.push((
            frame.header("subscription").unwrap().to_owned(),
            frame.header("destination").unwrap().to_owned(),
        ));
    }
    ended.sort();
    assert_eq!(
        ended,
        [
            ("item".to_owned(), "/team/t1/items/doc-1".to_owned()),
            ("team".to_owned(), "/team/t1".to_owned())
        ]
    );
    // Events to t1 no longer reach node 0's connection; t2 still does.
    let publisher = nodes[2].token("pub", &["t1", "t2"], "publish");
    for topic in ["/team/t1", "/team/t2"] {
        let (status, _) = crate::http_publish(
            &nodes[2],
            &publisher,
            &json!({"topic": topic, "type": "ping.sent", "data": {}}),
        )
        .await;
        assert_eq!(status, 202);
    }
    let frame = message_of(&mut a, "other", "ping.sent", Duration::from_secs(5)).await;
    assert_eq!(frame.header("destination"), Some("/team/t2"));
    // The deaf node never heard of it: its subscription goes on (the message was really lost)…
    let frame = message_of(&mut deaf, "team", "ping.sent", Duration::from_secs(5)).await;
    assert_eq!(frame.header("destination"), Some("/team/t1"));
    // …but a new SUBSCRIBE to the team with the old token is refused there, on this connection
    // and on a new one, while other topics are still allowed.
    let mut fresh = connect(&nodes[1], &token).await;
    fresh.subscribe("u", "/user/ana").await.unwrap();
    fresh.subscribe("t2", "/team/t2").await.unwrap();
    for client in [&mut deaf, &mut fresh] {
        let refused = client.subscribe("again", "/team/t1/items/doc-2").await;
        let error = refused
            .expect_err("an item of the revoked team is refused")
            .to_string();
        assert!(error.contains("revoked"), "{error}");
        let (_, code) = closed(client).await;
        assert_eq!(code, 4004);
    }
    // The old token may neither publish to the team nor read it over HTTP, on any node.
    let (status, body) = crate::http_publish(
        &nodes[1],
        &token,
        &json!({"topic": "/team/t1/items/doc-1", "type": "note.added", "data": {}}),
    )
    .await;
    assert_revoked(status, &body);
    let (status, _) = call(
        &nodes[0],
        &token,
        "GET",
        "/topics/%2Fteam%2Ft1/events",
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &nodes[0],
        &token,
        "GET",
        "/topics/%2Fteam%2Ft2/events",
        None,
    )
    .await;
    assert_eq!(status, 200, "another team is still readable");
    // Nor take a lock in the team (the lock API checks the same revocations), while the other
    // team's items still lock.
    let (status, body) = call(
        &nodes[2],
        &token,
        "POST",
        "/teams/t1/items/doc-1/lock",
        None,
    )
    .await;
    assert_revoked(status, &body);
    let (status, body) = call(
        &nodes[2],
        &token,
        "POST",
        "/teams/t2/items/doc-1/lock",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A token minted once the call answered (maybe in the second of the cutoff: the answer
    // waited that second out) may subscribe again, on the deaf node too.
    let later = issued(&nodes[0], "ana", &["t1"], "", now());
    let mut back = connect(&nodes[1], &later).await;
    back.subscribe("team", "/team/t1").await.unwrap();
    // On node 0, which heard the unsubscribe, a SEND to the team with the old token is
    // refused without a broker read.
    a.publish("/team/t1/items/doc-1", "note.added", "{}", None)
        .await
        .unwrap();
    let (error, code) = closed(&mut a).await;
    assert_eq!(code, 4004);
    assert!(String::from_utf8_lossy(&error.unwrap().body).contains("revoked"));

    // A disconnect the deaf node never hears of: its connection stays, but the first refresh
    // finds the connection's own token revoked and closes it with 4011.
    let (status, body) = call(&nodes[0], &control, "POST", "/users/ana/disconnect", None).await;
    assert_eq!(status, 200, "{body}");
    back.send(&frame_to_token(&later)).await.unwrap();
    let (error, code) = closed(&mut back).await;
    assert_eq!(code, 4011);
    assert_eq!(error.unwrap().header("message"), Some("token revoked"));
}

/// `GET /users/{id}/connections` lists a user's connections on every node: node, session,
/// since, topics; a user with none is an empty list, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_listed_across_nodes() {
    let redis = RedisServer::start();
    let nodes = nodes(3, &redis.url(), &[]);
    let token = nodes[0].token("ana", &["t1"], "");
    let mut a = connect(&nodes[0], &token).await;
    a.subscribe("t", "/team/t1").await.unwrap();
    a.subscribe("u", "/user/ana").await.unwrap();
    for node in &nodes {
        let (status, body) = readyz(node).await;
        assert_eq!(
            (status, &body["checks"]["control"]),
            (200, &json!("ok")),
            "{body}"
        );
    }
    let mut b = connect(&nodes[2], &token).await;
    b.subscribe("t", "/team/t1/items/doc-1").await.unwrap();
    let control = backend(&nodes[1]);
    // Nodes learn of each other from their announcements (one a second): wait until all
    // three answer, which is what a caller sees once the cluster has been up a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = call(&nodes[1], &control, "GET", "/users/ana/connections", None).await;
        assert_eq!(status, 200, "{body}");
        if body["nodes_answered"] == 3 || Instant::now() > deadline {
            break body;
        }
    };
    assert_eq!(body["nodes_answered"], 3, "{body}");
    assert_eq!(body["nodes_missing"], json!([]));
    let list = body["connections"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    let mut topics: Vec<Value> = list.iter().map(|c| c["topics"].clone()).collect();
    topics.sort_by_key(Value::to_string);
    assert_eq!(
        topics,
        [
            json!(["/team/t1", "/user/ana"]),
            json!(["/team/t1/items/doc-1"])
        ]
    );
    for c in list {
        assert!(
            c["session"]
                .as_str()
                .unwrap()
                .starts_with(c["node"].as_str().unwrap()),
            "{c}"
        );
        assert!(c["since"].as_str().unwrap().ends_with('Z'), "{c}");
    }
    let (status, body) = call(
        &nodes[1],
        &control,
        "GET",
        "/users/nobody/connections",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["connections"], json!([]));
    drop((a, b));
}

/// Bad input: a foreign scope is 403, malformed bodies and ids are 400/422, an unknown user
/// is an empty result; nothing of it disturbs a connected user.
#[tokio::test]
async fn control_api_refuses_bad_input() {
    let node = Lockstep::start();
    let mut ana = connect(&node, &node.token("ana", &["t1"], "")).await;
    ana.subscribe("t", "/team/t1").await.unwrap();
    let control = backend(&node);
    let publisher = node.token("pub", &["t1"], "publish publish:global locks");
    for (method, path, body) in [
        ("POST", "/users/ana/disconnect", None),
        (
            "POST",
            "/users/ana/unsubscribe",
            Some(r#"{"topic":"/team/t1"}"#),
        ),
        ("GET", "/users/ana/connections", None),
    ] {
        let (status, answer) = call(&node, &publisher, method, path, body).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "forbidden", "{answer}");
    }
    let cases: [(&str, &str, Option<&str>, u16); 6] = [
        ("POST", "/users/ana/unsubscribe", Some("{"), 400),
        (
            "POST",
            "/users/ana/unsubscribe",
            Some(r#"{"topic":"/nowhere"}"#),
            422,
        ),
        (
            "POST",
            "/users/ana/unsubscribe",
            Some(r#"{"topic":"/team/t1","x":1}"#),
            422,
        ),
        ("POST", "/users/ana/unsubscribe", Some("{}"), 422),
        ("POST", "/users/a%20b/disconnect", None, 422),
        ("GET", "/users/a%2Fb/connections", None, 422),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = call(&node, &control, method, path, body).await;
        assert_eq!(status, want, "{method} {path} {body:?}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    let (status, answer) = call(&node, &control, "GET", "/users/nobody/connections", None).await;
    assert_eq!(status, 200);
    assert_eq!(answer["connections"], json!([]));
    assert_eq!(answer["nodes_answered"], 1);
    // An unknown user's disconnect is not an error either: it revokes their tokens.
    let (status, _) = call(&node, &control, "POST", "/users/nobody/disconnect", None).await;
    assert_eq!(status, 200);
    // Ana's connection went on through all of it.
    let (status, _) = crate::http_publish(
        &node,
        &publisher,
        &json!({"topic": "/team/t1", "type": "ping.sent", "data": {}}),
    )
    .await;
    assert_eq!(status, 202);
    message_of(&mut ana, "t", "ping.sent", Duration::from_secs(5)).await;
}

/// `SEND` to `/lockstep/token` with a refresh token.
/// Answers the first frame that is not a MESSAGE, and the MESSAGEs before it.
async fn refresh(client: &mut StompClient, token: &str, receipt: &str) -> (Frame, Vec<Frame>) {
    let frame = Frame::new(Command::Send)
        .with_header("destination", "/lockstep/token")
        .with_header("passcode", token)
        .with_header("receipt", receipt);
    client.send(&frame).await.unwrap();
    let mut messages = Vec::new();
    loop {
        let frame = client
            .expect_frame_within(Duration::from_secs(5))
            .await
            .unwrap();
        if frame.command != Command::Message {
            return (frame, messages);
        }
        messages.push(frame);
    }
}

/// Token refresh over the open socket: the connection outlives its first token's `exp`; a
/// refresh that drops a team ends that subscription with `lockstep.unsubscribed`; another
/// user's token, an expired one and garbage get an ERROR frame and the connection goes on
/// with the token it has.
#[tokio::test]
async fn a_token_refresh_extends_the_connection_and_narrows_it() {
    let node = Lockstep::start();
    let short = node.token_with(&json!({"sub": "ana", "teams": ["t1", "t2"], "exp": now() + 3}));
    let mut ana = connect(&node, &short).await;
    ana.subscribe("t1", "/team/t1").await.unwrap();
    ana.subscribe("t2", "/team/t2").await.unwrap();

    for (bad, why) in [
        (node.token("bo", &["t1"], ""), "another user's"),
        (
            node.token_with(&json!({"sub": "ana", "exp": now() - 10})),
            "expired",
        ),
        ("not-a-token".to_owned(), "malformed"),
    ] {
        let (frame, _) = refresh(&mut ana, &bad, "r-bad").await;
        assert_eq!(
            frame.command,
            Command::Error,
            "{why}: {}",
            loadtest::client::describe(&frame)
        );
        assert_eq!(frame.header("message"), Some("token refused"));
        assert_eq!(frame.header("receipt-id"), Some("r-bad"));
        let body = String::from_utf8_lossy(&frame.body).to_string();
        assert!(body.contains("keeps its current token"), "{why}: {body}");
    }
    // Still connected and subscribed after the refused refreshes.
    let longer = node.token_with(&json!({"sub": "ana", "teams": ["t1"], "exp": now() + 3600}));
    let (frame, before) = refresh(&mut ana, &longer, "r-ok").await;
    assert_eq!(
        frame.command,
        Command::Receipt,
        "{}",
        loadtest::client::describe(&frame)
    );
    // The new token lacks t2: that subscription ended, before the receipt came.
    let [ended] = before.as_slice() else {
        panic!("{} frames before the receipt", before.len());
    };
    assert_eq!(ended.header("subscription"), Some("t2"));
    assert_eq!(ended.header("event-type"), Some("lockstep.unsubscribed"));
    let envelope: Value = serde_json::from_slice(&ended.body).unwrap();
    assert_eq!(envelope["data"]["reason"], "token");
    // Past the first token's exp, the connection goes on and t1 still delivers.
    let publisher = node.token("pub", &["t1", "t2"], "publish");
    let wait_until = Instant::now() + Duration::from_millis(2500);
    let mut sent = 0;
    while Instant::now() < wait_until {
        let (status, _) = crate::http_publish(
            &node,
            &publisher,
            &json!({"topic": "/team/t1", "type": "ping.sent", "data": {"n": sent}}),
        )
        .await;
        assert_eq!(status, 202);
        message_of(&mut ana, "t1", "ping.sent", Duration::from_secs(2)).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent > 5);
    // A subscription to the dropped team is refused now.
    let refused = ana.subscribe("again", "/team/t2").await;
    assert!(refused.is_err());
    let (_, code) = closed(&mut ana).await;
    assert_eq!(code, 4004);

    // Without a refresh, the short token still ends the connection at its exp.
    let short = node.token_with(&json!({"sub": "ana", "teams": ["t1"], "exp": now() + 1}));
    let mut once = connect(&node, &short).await;
    once.subscribe("t1", "/team/t1").await.unwrap();
    let (error, code) = tokio::time::timeout(Duration::from_secs(4), closed(&mut once))
        .await
        .unwrap();
    assert_eq!(code, 4002);
    assert_eq!(error.unwrap().header("message"), Some("token expired"));
    // A refresh with no token at all is refused by name.
    let mut c = connect(&node, &node.token("ana", &["t1"], "")).await;
    let frame = Frame::new(Command::Send).with_header("destination", "/lockstep/token");
    c.send(&frame).await.unwrap();
    let frame = c.expect_frame_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame.command, Command::Error);
    assert!(String::from_utf8_lossy(&frame.body).contains("no token"));
    // The connection goes on after the refused refresh, but not after five in a row: 4001.
    c.subscribe("t1", "/team/t1").await.unwrap();
    for _ in 2..5 {
        c.send(&frame_to_token("garbage")).await.unwrap();
        let frame = c.expect_frame_within(Duration::from_secs(5)).await.unwrap();
        assert_eq!(frame.command, Command::Error);
    }
    c.send(&frame_to_token("garbage")).await.unwrap();
    let (error, code) = closed(&mut c).await;
    assert_eq!(code, 4001);
    assert!(String::from_utf8_lossy(&error.unwrap().body).contains("5 refreshes in a row"));
}

fn frame_to_token(token: &str) -> Frame {
    Frame::new(Command::Send)
        .with_header("destination", "/lockstep/token")
        .with_header("passcode", token)
}
