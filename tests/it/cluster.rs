//! Cluster fan-out through Redis: several nodes, real Redis and Redis Cluster processes on free
//! ports, Redis and node crashes, subscription churn.

use crate::{envelope, http_publish};
use loadtest::client::{Incoming, StompClient};
use protocol::Command;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tests::redis::{RedisCluster, RedisServer};
use tests::{Lockstep, Options, random_secret};

/// `n` nodes sharing `redis_url` and one secret, all ready.
fn nodes(n: usize, redis_url: &str, extra: &[(&str, &str)]) -> Vec<Lockstep> {
    let secret = random_secret();
    let nodes: Vec<Lockstep> = (0..n)
        .map(|_| {
            let mut options = Options::default()
                .secret(&secret)
                .env("LOCKSTEP_REDIS_URL", redis_url)
                .env("LOCKSTEP_REDIS_PROBE_INTERVAL", "500ms")
                .env("LOCKSTEP_HUB_PUBLISH_RATE", 10_000)
                .env("LOCKSTEP_HUB_PUBLISH_BURST", 10_000);
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

/// Reads frames until `expected` MESSAGEs arrived, then checks nothing else comes; returns the
/// `(destination, data.n)` pairs.
async fn receive_exactly(client: &mut StompClient, expected: usize) -> BTreeSet<(String, u64)> {
    let mut got = BTreeSet::new();
    for _ in 0..expected {
        let frame = client.expect_frame().await.unwrap();
        assert_eq!(
            frame.command,
            Command::Message,
            "{}",
            loadtest::client::describe(&frame)
        );
        let destination = frame.header("destination").unwrap().to_owned();
        let env = envelope(&frame, frame.header("subscription").unwrap(), &destination);
        assert!(
            got.insert((destination, env["data"]["n"].as_u64().unwrap())),
            "duplicate delivery"
        );
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), client.next()).await;
    assert!(
        !matches!(extra, Ok(Ok(Incoming::Frame(_)))),
        "an event arrived twice or unexpectedly: {extra:?}"
    );
    got
}

/// Clients spread over three nodes; events published on each node (HTTP and SEND) reach every
/// subscriber of their topic on every node exactly once.
async fn exactly_once_across_nodes(nodes: &[Lockstep], teams: [&str; 2]) -> Vec<StompClient> {
    let [ta, tb] = teams;
    // ana on node 0: her user topic, team A, global. bob on node 1: teams A and B, global.
    // carol on node 2: team B, global.
    let mut ana = crate::client(&nodes[0], "ana", &[ta], "").await;
    for (id, d) in [
        ("u", "/user/ana".to_owned()),
        ("a", format!("/team/{ta}")),
        ("g", "/global".to_owned()),
    ] {
        ana.subscribe(id, &d).await.unwrap();
    }
    let mut bob = crate::client(&nodes[1], "bob", &[ta, tb], "").await;
    for (id, d) in [
        ("a", format!("/team/{ta}")),
        ("b", format!("/team/{tb}")),
        ("g", "/global".to_owned()),
    ] {
        bob.subscribe(id, &d).await.unwrap();
    }
    let mut carol = crate::client(&nodes[2], "carol", &[tb], "").await;
    for (id, d) in [("b", format!("/team/{tb}")), ("g", "/global".to_owned())] {
        carol.subscribe(id, &d).await.unwrap();
    }
    let backend = nodes[0].token("backend", &[ta, tb], "publish publish:global");
    let team_a = format!("/team/{ta}");
    let team_b = format!("/team/{tb}");
    // HTTP on node 0 and node 2, STOMP SEND on node 1.
    for (node, topic, n) in [
        (0, "/user/ana", 1),
        (2, team_a.as_str(), 2),
        (0, "/global", 4),
    ] {
        let (status, body) = http_publish(
            &nodes[node],
            &backend,
            &json!({"topic": topic, "type": "job.progress", "data": {"n": n}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    let mut sender = crate::client(&nodes[1], "bot", &[tb], "publish").await;
    sender
        .publish(&team_b, "task.assigned", r#"{"n":3}"#, Some("s"))
        .await
        .unwrap();

    let want = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|(d, n)| ((*d).to_owned(), *n))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        receive_exactly(&mut ana, 3).await,
        want(&[("/user/ana", 1), (&team_a, 2), ("/global", 4)])
    );
    assert_eq!(
        receive_exactly(&mut bob, 3).await,
        want(&[(&team_a, 2), (&team_b, 3), ("/global", 4)])
    );
    assert_eq!(
        receive_exactly(&mut carol, 2).await,
        want(&[(&team_b, 3), ("/global", 4)])
    );
    vec![ana, bob, carol]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_exactly_once_through_redis() {
    let redis = RedisServer::start();
    let nodes = nodes(3, &redis.url(), &[]);
    exactly_once_across_nodes(&nodes, ["t1", "t2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_exactly_once_through_redis_cluster() {
    let cluster = RedisCluster::start(3);
    // Two team topics whose channels live on different shards.
    let owner = |team: &str| cluster.owner(&format!("lockstep:/team/{team}"));
    let first = "t1".to_owned();
    let second = (2..100)
        .map(|i| format!("t{i}"))
        .find(|t| owner(t) != owner(&first))
        .expect("a team on another shard");
    let nodes = nodes(3, &cluster.url(), &[]);
    let _clients = exactly_once_across_nodes(&nodes, [&first, &second]).await;
    // Each channel is subscribed only on the shard that owns it.
    for node in 0..3 {
        for channel in cluster.nodes[node].shard_channels() {
            assert_eq!(
                cluster.owner(&channel),
                node,
                "{channel} subscribed on the wrong shard"
            );
        }
    }
    let channels = cluster.shard_channels();
    for team in [&first, &second] {
        assert!(
            channels.contains(&format!("lockstep:/team/{team}")),
            "{channels:?}"
        );
    }
}

/// Redis is killed while clients are subscribed and a publisher runs, then restarted: the nodes
/// go not-ready, publishes fail fast with 503, and after recovery every subscription works
/// again without any client reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_every_subscription() {
    let mut redis = RedisServer::start();
    let nodes = nodes(2, &redis.url(), &[]);
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = crate::client(node, &format!("u{i}"), &["t1"], "").await;
        c.subscribe("t", "/team/t1").await.unwrap();
        c.subscribe("g", "/global").await.unwrap();
        clients.push(c);
    }
    let backend = nodes[0].token("backend", &["t1"], "publish publish:global");
    let event = |n: u64| json!({"topic": "/team/t1", "type": "job.progress", "data": {"n": n}});
    assert_eq!(http_publish(&nodes[0], &backend, &event(0)).await.0, 202);
    for c in &mut clients {
        assert_eq!(receive_exactly(c, 1).await.len(), 1);
    }

    let killed = Instant::now();
    redis.kill();
    for node in &nodes {
        node.wait_readyz(503, Duration::from_secs(10)).unwrap();
    }
    // A publish during the outage fails fast with a clear 503.
    let started = Instant::now();
    let (status, body) = http_publish(&nodes[0], &backend, &event(1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "publish took {:?}",
        started.elapsed()
    );

    redis.restart();
    let restarted = Instant::now();
    let mut recovery = Duration::ZERO;
    for node in &nodes {
        recovery = recovery.max(node.wait_readyz(200, Duration::from_secs(20)).unwrap());
    }
    eprintln!(
        "redis restart: outage {:?}, ready again {:?} after the restart",
        restarted - killed,
        recovery
    );
    // Every subscription works again, on the same connections.
    for n in 2..12 {
        assert_eq!(
            http_publish(&nodes[n as usize % 2], &backend, &event(n))
                .await
                .0,
            202
        );
    }
    for c in &mut clients {
        let got = receive_exactly(c, 10).await;
        assert_eq!(
            got.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            (2..12).collect::<Vec<_>>()
        );
    }
    let channels = redis.shard_channels();
    for topic in ["lockstep:/team/t1", "lockstep:/global"] {
        assert!(
            channels.iter().any(|c| c == topic),
            "{topic} not resubscribed: {channels:?}"
        );
    }
}

/// Thousands of clients join and leave topics; afterwards Redis holds no channel without a
/// local subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_churn_leaves_no_orphan_channels() {
    let redis = RedisServer::start();
    let nodes = nodes(2, &redis.url(), &[("LOCKSTEP_HUB_MAX_SUBSCRIPTIONS", "8")]);
    // A client that stays while the others churn.
    let mut keeper = crate::client(&nodes[0], "keeper", &["t0"], "").await;
    keeper.subscribe("u", "/user/keeper").await.unwrap();
    keeper.subscribe("t", "/team/t0").await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2000usize {
        let node = &nodes[i % 2];
        let (ws, token) = (
            node.ws(),
            node.token(&format!("u{i}"), &[&format!("t{}", i % 40)], ""),
        );
        tasks.spawn(async move {
            let (mut c, _) = StompClient::connect(&ws, &token).await.unwrap();
            c.subscribe("u", &format!("/user/u{i}")).await.unwrap();
            c.subscribe("t", &format!("/team/t{}", i % 40))
                .await
                .unwrap();
            if i % 2 == 0 {
                // Half leave a topic explicitly, the rest just disconnect.
                c.send(
                    &protocol::Frame::new(Command::Unsubscribe)
                        .with_header("id", "u")
                        .with_header("receipt", "x"),
                )
                .await
                .unwrap();
                c.expect_receipt("x").await.unwrap();
            }
            c
        });
        // At most 64 clients at a time: each finished one disconnects.
        if tasks.len() >= 64 {
            drop(tasks.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(c) = tasks.join_next().await {
        drop(c.unwrap());
    }
    let topics = |c: Vec<String>| {
        c.into_iter()
            .filter(|c| !c.contains("probe:"))
            .collect::<BTreeSet<_>>()
    };
    let wanted: BTreeSet<String> = ["lockstep:/team/t0", "lockstep:/user/keeper"]
        .map(str::to_owned)
        .into();
    wait_for(
        || topics(redis.shard_channels()) == wanted,
        "only the keeper's topics stay subscribed",
    )
    .await;
    drop(keeper);
    wait_for(
        || topics(redis.shard_channels()).is_empty(),
        "no topic channel stays subscribed",
    )
    .await;
}

async fn wait_for(condition: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node is SIGKILLed: its stompjs client reconnects to another node by itself and receives
/// events again, and clients of the surviving nodes see no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_clients_reconnect_elsewhere() {
    let redis = RedisServer::start();
    let nodes = nodes(3, &redis.url(), &[]);
    let mut witness = crate::client(&nodes[2], "witness", &["t1"], "").await;
    witness.subscribe("t", "/team/t1").await.unwrap();
    // A publisher on node 1 sends a numbered event every 20 ms until told to stop.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let publisher = {
        let (http, token) = (
            nodes[1].http(),
            nodes[1].token("backend", &["t1"], "publish"),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            loop {
                let body = json!({"topic": "/team/t1", "type": "job.progress", "data": {"n": n}});
                let response = client
                    .post(format!("{http}/api/v1/publish"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 202);
                n += 1;
                tokio::select! {
                    _ = stopped.changed() => return n,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    let config = json!({
        "urls": [nodes[0].ws(), nodes[1].ws()],
        "kill_pid": nodes[0].pid(),
        "token": nodes[0].token("ana", &["t1"], ""),
        "topic": "/team/t1",
    });
    let script = tests::workspace().join("tests/clients/node/failover.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(config.to_string())
        .output()
        .await
        .unwrap();
    let _ = stop.send(true);
    let published = publisher.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("failover: {stdout}");
    // The witness on a surviving node got every event, in order, with no gap.
    for n in 0..published {
        let frame = witness.expect_frame().await.unwrap();
        assert_eq!(envelope(&frame, "t", "/team/t1")["data"]["n"], n);
    }
}
