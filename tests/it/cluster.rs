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
    let owner = |team: &str| cluster.owner(&format!("lockstep:{{/team/{team}}}"));
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
            channels.contains(&format!("lockstep:{{/team/{team}}}")),
            "{channels:?}"
        );
    }
}

/// Redis is killed while clients are subscribed and a publisher runs, and restarted a second
/// later: the nodes go not-ready, publishes fail fast with 503, and after recovery every
/// subscription works again without any client reconnecting. Every event accepted after the
/// recovery arrives exactly once, and no event that was refused ever turns up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_every_subscription() {
    let mut redis = RedisServer::start();
    let nodes = nodes(2, &redis.url(), &[]);
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = crate::client(node, &format!("u{i}"), &["t1"], "").await;
        c.subscribe("t", "/team/t1").await.unwrap();
        clients.push(c);
    }
    // The publisher: one event every 20 ms, alternating nodes, recording each answer.
    let outcomes = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(u64, u16, Duration)>::new()));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let publisher = {
        let targets: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.http(), n.token("backend", &["t1"], "publish")))
            .collect();
        let outcomes = outcomes.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0u64.. {
                let (http, token) = &targets[n as usize % 2];
                let body = json!({"topic": "/team/t1", "type": "job.progress", "data": {"n": n}});
                let started = Instant::now();
                let status = client
                    .post(format!("{http}/api/v1/publish"))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status();
                outcomes
                    .lock()
                    .push((n, status.as_u16(), started.elapsed()));
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    let accepted =
        |outcomes: &[(u64, u16, Duration)]| outcomes.iter().filter(|o| o.1 == 202).count();
    wait_for(
        || accepted(&outcomes.lock()) >= 10,
        "10 events accepted before the outage",
    )
    .await;

    let mut reconnects_before = Vec::new();
    for node in &nodes {
        let text = crate::ops::scrape(node).await;
        reconnects_before.push(crate::ops::sample(
            &text,
            "lockstep_redis_reconnects_total",
            &[],
        ));
    }
    let killed = Instant::now();
    redis.kill();
    for node in &nodes {
        node.wait_readyz(503, Duration::from_secs(10)).unwrap();
    }
    let before_restart = outcomes.lock().len();
    // The outage lasts a second while the publisher keeps trying.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();
    let restarted = Instant::now();
    let mut recovery = Duration::ZERO;
    for node in &nodes {
        recovery = recovery.max(node.wait_readyz(200, Duration::from_secs(20)).unwrap());
    }
    let recovered_at = outcomes.lock().len();
    eprintln!(
        "redis restart: outage {:?}, every node ready {recovery:?} after the restart",
        restarted - killed
    );
    wait_for(
        || accepted(&outcomes.lock()[recovered_at..]) >= 20,
        "20 events accepted after the recovery",
    )
    .await;
    let _ = stop.send(true);
    publisher.await.unwrap();
    let outcomes = outcomes.lock().clone();

    // The operator sees it: each node counted the reconnect, and the publishes refused during
    // the outage.
    let mut failures = 0.0;
    for (node, before) in nodes.iter().zip(&reconnects_before) {
        let text = crate::ops::scrape(node).await;
        let reconnects = crate::ops::sample(&text, "lockstep_redis_reconnects_total", &[]);
        assert!(
            reconnects > *before,
            "reconnects {reconnects}, {before} before the outage:\n{text}"
        );
        failures += crate::ops::sample(&text, "lockstep_publish_failures_total", &[]);
    }
    let refused_count = outcomes.iter().filter(|o| o.1 == 503).count();
    #[allow(clippy::cast_precision_loss)]
    let refused_count = refused_count as f64;
    assert!(
        failures >= refused_count,
        "{failures} publish failures counted for {refused_count} refusals"
    );

    // Publishes during the outage were refused, and quickly.
    let refused: Vec<_> = outcomes.iter().filter(|o| o.1 != 202).collect();
    assert!(
        !refused.is_empty(),
        "no publish was refused during the outage"
    );
    assert!(refused.iter().all(|o| o.1 == 503), "{refused:?}");
    assert!(
        refused.iter().all(|o| o.2 < Duration::from_secs(3)),
        "a refusal was slow: {refused:?}"
    );
    assert!(
        outcomes[before_restart..recovered_at]
            .iter()
            .any(|o| o.1 == 503)
    );

    let after: BTreeSet<u64> = outcomes[recovered_at..]
        .iter()
        .filter(|o| o.1 == 202)
        .map(|o| o.0)
        .collect();
    let rejected: BTreeSet<u64> = refused.iter().map(|o| o.0).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut seen = BTreeSet::new();
        let mut resets = 0;
        // Read until every event accepted after the recovery arrived.
        while !after.is_subset(&seen) {
            let frame = c.expect_frame().await.unwrap_or_else(|e| {
                panic!(
                    "client {i}: {e:#}; missing {:?}",
                    after.difference(&seen).collect::<Vec<_>>()
                )
            });
            // The restarted Redis kept nothing (no persistence): the topic's history and
            // counter are gone, a new epoch begins, and the subscribers are told so once.
            if frame.header("event-type") == Some("lockstep.reset") {
                resets += 1;
                assert_eq!(resets, 1, "client {i}: a second reset");
                continue;
            }
            let n = envelope(&frame, "t", "/team/t1")["data"]["n"]
                .as_u64()
                .unwrap();
            assert!(seen.insert(n), "client {i} got event {n} twice");
            assert!(
                !rejected.contains(&n),
                "client {i} got event {n}, which was refused with 503"
            );
        }
        assert_eq!(resets, 1, "client {i}: the new epoch was not announced");
        let extra = tokio::time::timeout(Duration::from_millis(300), c.next()).await;
        assert!(
            !matches!(extra, Ok(Ok(Incoming::Frame(_)))),
            "unexpected extra event: {extra:?}"
        );
    }
    assert!(
        redis
            .shard_channels()
            .iter()
            .any(|c| c == "lockstep:{/team/t1}"),
        "/team/t1 was not resubscribed"
    );
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
            // Topic channels only: not the nodes' probes or their shared control channel.
            .filter(|c| !c.contains("probe:") && c != "lockstep:control")
            .collect::<BTreeSet<_>>()
    };
    let wanted: BTreeSet<String> = ["lockstep:{/team/t0}", "lockstep:{/user/keeper}"]
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

/// Publishes `event_type` events numbered from 0 (`data.n`) to `/team/t1` through `node`'s HTTP
/// API every 20 ms until `true` is sent on the returned channel; the task answers how many.
fn numbered_publisher(
    node: &Lockstep,
    event_type: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<u64>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let (http, token, event_type) = (
        node.http(),
        node.token("backend", &["t1"], "publish"),
        event_type.to_owned(),
    );
    let publisher = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut n = 0u64;
        loop {
            let body = json!({"topic": "/team/t1", "type": event_type, "data": {"n": n}});
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
    });
    (stop, publisher)
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
    let (stop, publisher) = numbered_publisher(&nodes[1], "job.progress");
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

/// The client library (clients/js) under a node kill: its subscription resumes on the other
/// node from the last offset it delivered, and the stream checker finds nothing missed or
/// repeated in what it saw, while the handler got every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_resumes_on_another_node_after_a_kill() {
    use tests::streams::{Seen, check};
    let redis = RedisServer::start();
    let nodes = nodes(2, &redis.url(), &[]);
    let (stop, publisher) = numbered_publisher(&nodes[1], "job.step");
    let config = json!({
        "urls": [nodes[0].ws(), nodes[1].ws()],
        "http": nodes[1].http(),
        "kill_pid": nodes[0].pid(),
        "token": nodes[0].token("ana", &["t1"], ""),
        "topic": "/team/t1",
    });
    let script = tests::workspace().join("tests/clients/node/library_failover.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(config.to_string())
        .current_dir(tests::workspace().join("tests/clients"))
        .output()
        .await
        .unwrap();
    let _ = stop.send(true);
    publisher.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim().strip_prefix("OK ").unwrap()).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
    let log: Vec<Seen> = report["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["kind"].as_str().unwrap() {
            "subscribe" => Seen::Subscribe {
                resume: e["resume"]
                    .as_object()
                    .map(|r| (r["offset"].as_u64().unwrap(), text(&r["epoch"]))),
            },
            "subscribed" => Seen::Subscribed {
                recovered: e["recovered"].as_bool().unwrap(),
                offset: e["offset"].as_u64().unwrap(),
                epoch: text(&e["epoch"]),
            },
            "event" => Seen::Event {
                offset: e["offset"].as_u64().unwrap(),
                epoch: text(&e["epoch"]),
                conflated: e["conflated"].as_u64().unwrap(),
                keyed: e["keyed"].as_bool().unwrap(),
            },
            "state" => Seen::State {
                offset: e["offset"].as_u64().unwrap(),
                epoch: text(&e["epoch"]),
            },
            "reset" => Seen::Reset {
                offset: e["offset"].as_u64().unwrap(),
                epoch: text(&e["epoch"]),
            },
            _ => Seen::Disconnected,
        })
        .collect();
    let summary = check(&log).unwrap_or_else(|e| panic!("stream checker: {e}\n{log:#?}"));
    assert_eq!(summary.subscriptions, 2, "{summary:?}");
    assert_eq!(
        (summary.recovered, summary.not_recovered, summary.resets),
        (2, 0, 0),
        "the resume on the other node recovered everything: {summary:?}"
    );
    // And at the application's level: every n once, in order, none skipped.
    let ns: Vec<u64> = report["ns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let first = ns[0];
    assert_eq!(ns, (first..first + ns.len() as u64).collect::<Vec<_>>());
    eprintln!("library failover: {summary:?}, {} events", ns.len());
}
