//! Webhooks (DESIGN §15) against a real receiver: a small HTTP server in the test that records
//! every delivery and answers what the test tells it. Occupancy across two nodes (reloads and
//! second tabs silent, tab closes vacate after the leave delay); retries in id order after a
//! receiver's outage, dead letters, lock events; signatures checked by `lockstep webhook
//! verify` and by Python's `hmac` (an independent implementation, as a receiver would write);
//! and a SIGKILLed node's queued deliveries delivered by the other node.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use loadtest::client::StompClient;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::process::Command as Process;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tests::postgres::Postgres;
use tests::redis::RedisServer;
use tests::{Lockstep, Options, lockstep_bin, now, random_secret};
use tokio::sync::Notify;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    id: i64,
    attempt: u32,
    signature: String,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// `(type, topic, user)` of each event.
    fn events(&self) -> Vec<(String, String, String)> {
        self.json()["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["topic"].as_str().unwrap_or_default().to_owned(),
                    e["data"]["user"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct Shared {
    deliveries: Mutex<Vec<Delivery>>,
    changed: Notify,
    /// Requests still to answer 500 before answering 200.
    failures_left: AtomicUsize,
}

/// A webhook receiver on a free loopback port.
#[derive(Debug, Clone)]
struct Receiver {
    shared: Arc<Shared>,
    url: String,
}

impl Receiver {
    async fn start(failures: usize) -> Receiver {
        let shared = Arc::new(Shared::default());
        shared.failures_left.store(failures, Ordering::SeqCst);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { shared, url }
    }

    /// From now on, answer 200 (or keep failing).
    fn fail(&self, failures: usize) {
        self.shared.failures_left.store(failures, Ordering::SeqCst);
    }

    fn all(&self) -> Vec<Delivery> {
        self.shared.deliveries.lock().clone()
    }

    /// Waits until `done` holds for the deliveries so far; fails after `within`.
    async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let deliveries = self.shared.deliveries.lock();
                if done(&deliveries) {
                    return deliveries.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, changed).await.is_err() {
                panic!(
                    "{what}: not within {within:?}; got {:#?}",
                    summary(&self.all())
                );
            }
        }
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let failing = shared
        .failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing { 500 } else { 200 };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    shared.deliveries.lock().push(Delivery {
        id: header("lockstep-webhook-id").parse().unwrap_or(-1),
        attempt: header("lockstep-webhook-attempt").parse().unwrap_or(0),
        signature: header("lockstep-signature"),
        body: body.to_vec(),
        status,
    });
    shared.changed.notify_waiters();
    StatusCode::from_u16(status).unwrap()
}

fn summary(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| {
            format!(
                "id {} attempt {} -> {}: {}",
                d.id,
                d.attempt,
                d.status,
                String::from_utf8_lossy(&d.body)
            )
        })
        .collect()
}

/// The deliveries answered 200, each id once (the first), in arrival order.
fn accepted(deliveries: &[Delivery]) -> Vec<Delivery> {
    let mut seen = std::collections::HashSet::new();
    deliveries
        .iter()
        .filter(|d| d.status == 200 && seen.insert(d.id))
        .cloned()
        .collect()
}

/// Every accepted event, in delivery order.
fn accepted_events(deliveries: &[Delivery]) -> Vec<(String, String, String)> {
    accepted(deliveries)
        .iter()
        .flat_map(Delivery::events)
        .collect()
}

/// The events of one topic, as `type user`.
fn of_topic(events: &[(String, String, String)], topic: &str) -> Vec<String> {
    events
        .iter()
        .filter(|(_, t, _)| t == topic)
        .map(|(kind, _, user)| format!("{kind} {user}").trim().to_owned())
        .collect()
}

/// Webhook settings for a node.
fn webhooks(options: Options, urls: &str, secrets: &str, events: &str) -> Options {
    options
        .env("LOCKSTEP_PRESENCE_ENABLED", "true")
        // Long enough for a reload onto another node on a loaded machine.
        .env("LOCKSTEP_PRESENCE_LEAVE_DELAY", "3s")
        .env("LOCKSTEP_WEBHOOKS_URLS", urls)
        .env("LOCKSTEP_WEBHOOKS_SECRET", secrets)
        .env("LOCKSTEP_WEBHOOKS_EVENTS", events)
        .env("LOCKSTEP_WEBHOOKS_RETRY_MIN", "100ms")
        .env("LOCKSTEP_WEBHOOKS_RETRY_MAX", "300ms")
        .env("LOCKSTEP_WEBHOOKS_LEASE", "1s")
}

/// [`webhooks`] for a node of a cluster: one JWT secret, Redis and PostgreSQL shared.
fn cluster_node(
    secret: &str,
    redis: &RedisServer,
    database: &str,
    receiver: &Receiver,
    hook_secret: &str,
    events: &str,
) -> Options {
    webhooks(
        Options::default()
            .secret(secret)
            .env("LOCKSTEP_REDIS_URL", redis.url())
            .env("LOCKSTEP_DATABASE_URL", database),
        &receiver.url,
        hook_secret,
        events,
    )
}

async fn connect(node: &Lockstep, user: &str, topics: &[&str]) -> StompClient {
    let token = node.token(user, &["t1"], "");
    let mut client = StompClient::connect(&node.ws(), &token)
        .await
        .expect("connect")
        .0;
    for (i, topic) in topics.iter().enumerate() {
        client
            .subscribe(&format!("s{i}"), topic)
            .await
            .expect("subscribe");
    }
    client
}

/// `lockstep webhook verify`: exit status and output.
fn verify_cli(secret: &str, signature: &str, body: &[u8]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body.json");
    std::fs::write(&path, body).unwrap();
    let output = Process::new(lockstep_bin())
        .env_clear()
        .args([
            "webhook",
            "verify",
            "--secret",
            secret,
            "--signature",
            signature,
        ])
        .arg("--body")
        .arg(&path)
        .output()
        .expect("run lockstep webhook verify");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Python's `hmac` on `t.body`: the tag a receiver written from the documentation computes.
fn python_tag(secret: &str, t: &str, body: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body");
    std::fs::write(&path, body).unwrap();
    let output = Process::new("python3")
        .args([
            "-c",
            "import hmac, hashlib, sys\n\
             body = open(sys.argv[3], 'rb').read()\n\
             print(hmac.new(sys.argv[1].encode(), sys.argv[2].encode() + b'.' + body, hashlib.sha256).hexdigest())",
            secret,
            t,
        ])
        .arg(&path)
        .output()
        .expect("python3");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// `(t, v1)` of a signature header.
fn parts(signature: &str) -> (String, String) {
    let mut t = String::new();
    let mut v1 = String::new();
    for part in signature.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => value.clone_into(&mut t),
            Some(("v1", value)) => value.clone_into(&mut v1),
            _ => {}
        }
    }
    (t, v1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupancy_across_two_nodes_is_first_in_last_out_and_reloads_are_silent() {
    let started = now();
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let database = pg.database("hooks_occupancy");
    let receiver = Receiver::start(0).await;
    let secret = random_secret();
    let hook_secret = random_secret();
    let nodes: Vec<Lockstep> = (0..2)
        .map(|_| {
            Lockstep::start_with(cluster_node(
                &secret,
                &redis,
                &database,
                &receiver,
                &hook_secret,
                "topic.*,presence.*",
            ))
        })
        .collect();
    for node in &nodes {
        node.wait_readyz(200, Duration::from_secs(20)).unwrap();
    }
    let (team, item) = ("/team/t1", "/team/t1/items/i1");
    let within = Duration::from_secs(10);
    let has = |kind: &'static str, topic: &'static str, user: &'static str| {
        move |d: &[Delivery]| {
            accepted_events(d)
                .iter()
                .any(|(k, t, u)| k == kind && t == topic && u == user)
        }
    };

    // Ana opens the team page and an item on node 0: both topics are occupied.
    let ana = connect(&nodes[0], "ana", &[team, item]).await;
    receiver
        .wait_until(
            "ana joins the item",
            within,
            has("presence.joined", item, "ana"),
        )
        .await;
    receiver
        .wait_until(
            "ana joins the team",
            within,
            has("presence.joined", team, "ana"),
        )
        .await;
    // Bo opens the team page on node 1: he joins, the topic was occupied already.
    let bo = connect(&nodes[1], "bo", &[team]).await;
    receiver
        .wait_until("bo joins", within, has("presence.joined", team, "bo"))
        .await;
    // Ana reloads onto the other node within the leave delay, and opens the item in a second
    // tab there too: silent.
    ana.close().await.unwrap();
    let ana = connect(&nodes[1], "ana", &[team, item]).await;
    let ana_tab = connect(&nodes[1], "ana", &[item]).await;
    // Bo closes his tab: he leaves after the delay, the team stays occupied (Ana is there).
    bo.close().await.unwrap();
    receiver
        .wait_until("bo leaves", within, has("presence.left", team, "bo"))
        .await;
    // Ana closes one tab (still there), then the other: she leaves both, both are vacated.
    ana_tab.close().await.unwrap();
    ana.close().await.unwrap();
    let deliveries = receiver
        .wait_until(
            "the team is vacated",
            within,
            has("topic.vacated", team, ""),
        )
        .await;
    let deliveries = if has("topic.vacated", item, "")(&deliveries) {
        deliveries
    } else {
        receiver
            .wait_until(
                "the item is vacated",
                within,
                has("topic.vacated", item, ""),
            )
            .await
    };
    let events = accepted_events(&deliveries);
    assert_eq!(
        of_topic(&events, team),
        [
            "topic.occupied",
            "presence.joined ana",
            "presence.joined bo",
            "presence.left bo",
            "presence.left ana",
            "topic.vacated"
        ],
        "{:#?}",
        summary(&deliveries)
    );
    assert_eq!(
        of_topic(&events, item),
        [
            "topic.occupied",
            "presence.joined ana",
            "presence.left ana",
            "topic.vacated"
        ]
    );
    // Every delivery is signed with the webhook secret, ids grow, none failed.
    let accepted = accepted(&deliveries);
    assert!(accepted.windows(2).all(|w| w[0].id < w[1].id));
    for d in &accepted {
        let (t, v1) = parts(&d.signature);
        assert_eq!(python_tag(&hook_secret, &t, &d.body), v1, "{}", d.signature);
        let body = d.json();
        assert_eq!(body["id"], json!(d.id));
        let ts = body["ts"].as_u64().unwrap() / 1000;
        assert!((started..=now()).contains(&ts), "ts {ts} outside the test");
    }
    assert!(deliveries.iter().all(|d| d.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_its_deliveries_later_in_id_order_and_a_dead_one_dead_letters() {
    let flaky = Receiver::start(3).await;
    let dead = Receiver::start(usize::MAX).await;
    let (secret_a, secret_b) = (random_secret(), random_secret());
    let node = Lockstep::start_with(
        webhooks(
            Options::default(),
            &format!("{},{}", flaky.url, dead.url),
            &format!("{secret_a},{secret_b}"),
            "topic.occupied,lock.*",
        )
        // One event per delivery, so there are several to keep in order.
        .env("LOCKSTEP_WEBHOOKS_BATCH", "1")
        .env("LOCKSTEP_WEBHOOKS_RETRY_FOR", "2s"),
    );
    node.wait_readyz(200, Duration::from_secs(20)).unwrap();
    let items: Vec<String> = (1..=5).map(|i| format!("/team/t1/items/i{i}")).collect();
    let topics: Vec<&str> = items.iter().map(String::as_str).collect();
    let _ana = connect(&node, "ana", &topics).await;
    let within = Duration::from_secs(20);

    // The flaky receiver fails the first three attempts (all of the first delivery: the
    // others wait behind it), then gets all five, in id order.
    let deliveries = flaky
        .wait_until("five deliveries accepted", within, |d| {
            accepted(d).len() == 5
        })
        .await;
    let first = &deliveries[0];
    assert_eq!(
        deliveries[..3]
            .iter()
            .map(|d| (d.id, d.attempt, d.status))
            .collect::<Vec<_>>(),
        [(first.id, 1, 500), (first.id, 2, 500), (first.id, 3, 500)],
        "{:#?}",
        summary(&deliveries)
    );
    assert!(
        deliveries[..4].iter().all(|d| d.body == first.body),
        "a retry sends the same body"
    );
    let ok = accepted(&deliveries);
    assert!(
        ok.windows(2).all(|w| w[0].id < w[1].id),
        "{:#?}",
        summary(&deliveries)
    );
    let mut occupied: Vec<String> = accepted_events(&deliveries)
        .into_iter()
        .map(|(kind, topic, _)| {
            assert_eq!(kind, "topic.occupied");
            topic
        })
        .collect();
    occupied.sort();
    assert_eq!(occupied, items);

    // Signatures: the CLI accepts the real one and refuses a tampered body, another
    // endpoint's secret, and a correctly signed but old timestamp; Python agrees on the tag.
    let d = &ok[0];
    let (t, v1) = parts(&d.signature);
    assert_eq!(python_tag(&secret_a, &t, &d.body), v1);
    let (ok, out) = verify_cli(&secret_a, &d.signature, &d.body);
    assert!(ok && out.trim() == "valid", "{out}");
    let mut tampered = d.body.clone();
    let at = tampered.iter().position(|b| *b == b'i').unwrap();
    tampered[at] = b'j';
    let (ok, out) = verify_cli(&secret_a, &d.signature, &tampered);
    assert!(!ok && out.contains("does not match"), "{out}");
    let (ok, out) = verify_cli(&secret_b, &d.signature, &d.body);
    assert!(!ok && out.contains("does not match"), "{out}");
    let old = (now() - 600).to_string();
    let old_signature = format!("t={old},v1={}", python_tag(&secret_a, &old, &d.body));
    let (ok, out) = verify_cli(&secret_a, &old_signature, &d.body);
    assert!(!ok && out.contains("old"), "{out}");

    // The always-failing endpoint: each delivery is retried for 2 s, then dead-lettered, and
    // the next one goes; all five end up there, counted.
    dead.wait_until("all five tried", within, |d| {
        d.iter()
            .map(|x| x.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
            == 5
    })
    .await;
    let deadline = Instant::now() + within;
    while node.metric("lockstep_webhook_dead_letters_total").await < 5.0 {
        assert!(
            Instant::now() < deadline,
            "five dead letters counted:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        node.metric("lockstep_webhook_deliveries_total{outcome=\"failed\"")
            .await
            >= 8.0
    );
    assert!(
        node.metric("lockstep_webhook_deliveries_total{outcome=\"delivered\"")
            .await
            >= 5.0
    );

    // Lock events go out too, from the lock outbox.
    let token = node.token("ana", &["t1"], "locks");
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/teams/t1/items/i9/lock", node.http()))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let deliveries = flaky
        .wait_until("the lock event", within, |d| {
            accepted_events(d)
                .iter()
                .any(|(kind, topic, _)| kind == "lock.acquired" && topic == "/team/t1")
        })
        .await;
    let lock = accepted(&deliveries)
        .into_iter()
        .find(|d| d.events().iter().any(|(k, _, _)| k == "lock.acquired"))
        .unwrap();
    let data = &lock.json()["events"][0]["data"];
    assert_eq!(
        (data["item"].as_str(), data["holder"].as_str()),
        (Some("i9"), Some("ana"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_queued_deliveries_are_delivered_by_another_node() {
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let database = pg.database("hooks_failover");
    let receiver = Receiver::start(usize::MAX).await;
    let secret = random_secret();
    let hook_secret = random_secret();
    let options = || {
        cluster_node(
            &secret,
            &redis,
            &database,
            &receiver,
            &hook_secret,
            "topic.occupied",
        )
        .env("LOCKSTEP_WEBHOOKS_BATCH", "1")
    };
    let within = Duration::from_secs(20);
    // Node A alone: it queues the events and holds the endpoint's lease (the receiver's
    // failing attempts can only come from it).
    let mut a = Lockstep::start_with(options());
    a.wait_readyz(200, within).unwrap();
    let items = [
        "/team/t1/items/i1",
        "/team/t1/items/i2",
        "/team/t1/items/i3",
    ];
    let _ana = connect(&a, "ana", &items).await;
    receiver
        .wait_until("node A attempts", within, |d| d.len() >= 2)
        .await;
    let b = Lockstep::start_with(options());
    b.wait_readyz(200, within).unwrap();
    a.kill();
    let killed = Instant::now();
    receiver.fail(0);
    let deliveries = receiver
        .wait_until("node B delivers A's queue", within, |d| {
            accepted(d).len() == 3
        })
        .await;
    eprintln!(
        "node B delivered A's queue {:?} after the kill",
        killed.elapsed()
    );
    let accepted = accepted(&deliveries);
    assert!(accepted.windows(2).all(|w| w[0].id < w[1].id));
    let mut topics: Vec<String> = accepted_events(&deliveries)
        .into_iter()
        .map(|(_, topic, _)| topic)
        .collect();
    topics.sort();
    assert_eq!(topics, items, "{:#?}", summary(&deliveries));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_postgres_deliver_each_event_once_in_id_order() {
    // Two nodes queue into one PostgreSQL at once: occupancy from both, and lock events the
    // outbox's deleters forward (several may delete the same rows). Each endpoint's ids must
    // still go out in order, and each lock event once (two copies under two ids could not be
    // deduped by a receiver).
    let redis = RedisServer::start();
    let pg = Postgres::start();
    let database = pg.database("hooks_concurrent");
    let receiver = Receiver::start(0).await;
    let secret = random_secret();
    let hook_secret = random_secret();
    let nodes: Vec<Lockstep> = (0..2)
        .map(|_| {
            Lockstep::start_with(
                cluster_node(
                    &secret,
                    &redis,
                    &database,
                    &receiver,
                    &hook_secret,
                    "topic.occupied,lock.acquired",
                )
                .env("LOCKSTEP_WEBHOOKS_BATCH", "1")
                .env("LOCKSTEP_PRESENCE_BATCH", "1ms"),
            )
        })
        .collect();
    for node in &nodes {
        node.wait_readyz(200, Duration::from_secs(20)).unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (n, node) in nodes.iter().enumerate() {
        for c in 0..2 {
            let ws = node.ws();
            let token = node.token(&format!("u{n}{c}"), &["t1"], "locks");
            let http = node.http();
            tasks.spawn(async move {
                let mut client = StompClient::connect(&ws, &token).await.unwrap().0;
                for i in 0..20 {
                    client
                        .subscribe(&format!("s{i}"), &format!("/team/t1/items/n{n}c{c}i{i}"))
                        .await
                        .unwrap();
                }
                let http_client = reqwest::Client::new();
                for i in 0..10 {
                    let answer = http_client
                        .post(format!(
                            "{http}/api/v1/teams/t1/items/lock-n{n}c{c}i{i}/lock"
                        ))
                        .bearer_auth(&token)
                        .json(&json!({}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(answer.status(), 200);
                }
                client
            });
        }
    }
    let mut clients = Vec::new();
    while let Some(client) = tasks.join_next().await {
        clients.push(client.unwrap());
    }
    let deliveries = receiver
        .wait_until(
            "80 occupied and 40 lock events",
            Duration::from_secs(30),
            |d| accepted_events(d).len() >= 120,
        )
        .await;
    let ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids out of order or repeated: {ids:?}"
    );
    let events = accepted_events(&deliveries);
    let occupied: std::collections::HashSet<&String> = events
        .iter()
        .filter(|(k, _, _)| k == "topic.occupied")
        .map(|(_, t, _)| t)
        .collect();
    assert_eq!(occupied.len(), 80);
    let mut locks: Vec<String> = accepted(&deliveries)
        .iter()
        .flat_map(|d| {
            d.json()["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] == "lock.acquired")
                .map(|e| e["data"]["item"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    locks.sort();
    let before = locks.len();
    locks.dedup();
    assert_eq!((before, locks.len()), (40, 40), "each lock event once");
    drop(clients);
}
