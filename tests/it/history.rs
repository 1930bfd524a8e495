//! History and resume end to end (DESIGN §12): offsets and epochs on every event and publish
//! answer, resume on SUBSCRIBE with an explicit outcome, HTTP position and history, idempotent
//! publishing; on the embedded broker, on Redis across nodes, and through a Redis `FLUSHALL`
//! and a killed pub/sub connection. Every subscriber's view goes through the stream checker
//! (`tests::streams`).

use crate::locks::{call, node};
use loadtest::client::StompClient;
use protocol::{Command, Frame};
use serde_json::{Value, json};
use std::time::Duration;
use tests::redis::RedisServer;
use tests::streams::{self, Seen};
use tests::{Lockstep, Options, random_secret};

/// A subscriber that records what it sees for the checker.
pub(crate) struct Watcher {
    pub(crate) client: StompClient,
    pub(crate) log: Vec<Seen>,
}

/// The stream position headers of a `MESSAGE`.
pub(crate) fn position_of(frame: &Frame) -> (u64, String) {
    let offset = frame
        .header("x-stream-offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no x-stream-offset in {}",
                loadtest::client::describe(frame)
            )
        });
    let epoch = frame
        .header("x-stream-epoch")
        .unwrap_or_else(|| panic!("no x-stream-epoch in {}", loadtest::client::describe(frame)))
        .to_owned();
    (offset, epoch)
}

/// What the checker makes of a `MESSAGE`: a snapshot's state event, a reset or an event.
pub(crate) fn seen(frame: &Frame) -> Seen {
    let (offset, epoch) = position_of(frame);
    if frame.header("x-snapshot") == Some("true") {
        Seen::State { offset, epoch }
    } else if frame.header("event-type") == Some("lockstep.reset") {
        Seen::Reset { offset, epoch }
    } else {
        Seen::Event {
            offset,
            epoch,
            conflated: frame
                .header("x-conflated")
                .map_or(0, |n| n.parse().expect("x-conflated is a number")),
            keyed: frame.header("x-key").is_some(),
        }
    }
}

impl Watcher {
    pub(crate) async fn connect(node: &Lockstep, token: &str) -> Watcher {
        let (client, _) = StompClient::connect(&node.ws(), token).await.unwrap();
        Watcher {
            client,
            log: Vec::new(),
        }
    }

    /// Subscribes from `start` (`next`, `last`, `offset=N` with `epoch`); returns the
    /// `lockstep.subscribed` frame's (recovered, offset, epoch).
    pub(crate) async fn subscribe(
        &mut self,
        id: &str,
        destination: &str,
        start: &str,
        epoch: Option<&str>,
    ) -> (bool, u64, String) {
        let mut headers = vec![("x-stream-offset", start)];
        if let Some(e) = epoch {
            headers.push(("x-stream-epoch", e));
        }
        let resume = start
            .strip_prefix("offset=")
            .and_then(|n| n.parse().ok())
            .map(|n: u64| (n, epoch.unwrap_or_default().to_owned()));
        self.log.push(Seen::Subscribe { resume });
        self.client
            .subscribe_with(id, destination, &headers)
            .await
            .unwrap_or_else(|e| panic!("SUBSCRIBE {destination} from {start}: {e:#}"));
        let frame = self.frame().await;
        assert_eq!(
            frame.header("event-type"),
            Some("lockstep.subscribed"),
            "{}",
            loadtest::client::describe(&frame)
        );
        let recovered = match frame.header("x-recovered") {
            Some("true") => true,
            Some("false") => false,
            other => panic!("x-recovered {other:?}"),
        };
        let (offset, epoch) = position_of(&frame);
        let body: Value = serde_json::from_slice(&frame.body).unwrap();
        assert_eq!(
            body["data"],
            json!({"recovered": recovered, "offset": offset, "epoch": epoch})
        );
        self.log.push(Seen::Subscribed {
            recovered,
            offset,
            epoch: epoch.clone(),
        });
        (recovered, offset, epoch)
    }

    async fn frame(&mut self) -> Frame {
        let frame = self
            .client
            .expect_frame_within(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            frame.command,
            Command::Message,
            "{}",
            loadtest::client::describe(&frame)
        );
        frame
    }

    /// The next event (resets are recorded and returned too); its offset and `data`.
    pub(crate) async fn event(&mut self) -> (u64, Value) {
        let frame = self.message().await;
        let body: Value = serde_json::from_slice(&frame.body).unwrap();
        (position_of(&frame).0, body)
    }

    /// The next `MESSAGE`, recorded for the checker.
    pub(crate) async fn message(&mut self) -> Frame {
        let frame = self.frame().await;
        self.log.push(seen(&frame));
        frame
    }

    /// Asserts nothing arrives for `quiet`.
    pub(crate) async fn quiet(&mut self, quiet: Duration) {
        if let Ok(Ok(frame)) = self
            .client
            .expect_frame_within(quiet)
            .await
            .map(Ok::<_, ()>)
        {
            panic!("unexpected {}", loadtest::client::describe(&frame));
        }
    }

    pub(crate) async fn disconnect(self) -> Vec<Seen> {
        let _ = self.client.close().await;
        let mut log = self.log;
        log.push(Seen::Disconnected);
        log
    }
}

/// Publishes `n` of `data` over HTTP; returns each answer (`{id, offset, epoch}`).
pub(crate) async fn publish(node: &Lockstep, token: &str, topic: &str, n: u64) -> Value {
    let (status, body) = crate::http_publish(
        node,
        token,
        &json!({"topic": topic, "type": "history.test", "data": {"n": n}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body
}

/// The whole story on one node: live, disconnect, resume with exactly the missed events, live
/// again, the checker over everything; `last` and a quiet topic.
async fn resume_story(publisher_node: &Lockstep, subscriber_node: &Lockstep, topic: &str) {
    let publisher = publisher_node.token("backend", &["t1"], "publish");
    let ana = subscriber_node.token("ana", &["t1"], "");
    let mut w = Watcher::connect(subscriber_node, &ana).await;
    let (recovered, p0, epoch) = w.subscribe("s", topic, "next", None).await;
    assert!(recovered);
    for n in 1..=3 {
        let answer = publish(publisher_node, &publisher, topic, n).await;
        assert_eq!(
            (&answer["offset"], &answer["epoch"]),
            (&json!(p0 + n), &json!(epoch)),
            "{answer}"
        );
        let (offset, body) = w.event().await;
        assert_eq!((offset, &body["data"]["n"]), (p0 + n, &json!(n)));
        assert_eq!(body["id"], answer["id"]);
    }
    let mut log = w.disconnect().await;
    for n in 4..=7 {
        publish(publisher_node, &publisher, topic, n).await;
    }
    let mut w = Watcher::connect(subscriber_node, &ana).await;
    w.log = std::mem::take(&mut log);
    let (recovered, from, e) = w
        .subscribe("s", topic, &format!("offset={}", p0 + 3), Some(&epoch))
        .await;
    assert_eq!(
        (recovered, from, e.as_str()),
        (true, p0 + 3, epoch.as_str())
    );
    for n in 4..=7 {
        let (offset, body) = w.event().await;
        assert_eq!((offset, &body["data"]["n"]), (p0 + n, &json!(n)));
    }
    publish(publisher_node, &publisher, topic, 8).await;
    assert_eq!(w.event().await.0, p0 + 8);
    // `last`: the latest event first, then live.
    let mut last = Watcher::connect(subscriber_node, &ana).await;
    let (recovered, offset, _) = last.subscribe("l", topic, "last", None).await;
    assert_eq!((recovered, offset), (true, p0 + 7));
    let (offset, body) = last.event().await;
    assert_eq!((offset, &body["data"]["n"]), (p0 + 8, &json!(8)));
    last.quiet(Duration::from_millis(300)).await;
    let team = streams::check(&w.log).unwrap_or_else(|e| panic!("{e}\n{:?}", w.log));
    assert_eq!((team.events, team.recovered), (8, 2), "{team:?}");
    // A quiet topic resumes as "nothing missed".
    let (recovered, quiet_top, quiet_epoch) = w.subscribe("q", "/user/ana", "last", None).await;
    assert!(recovered);
    let (recovered, offset, _) = w
        .subscribe(
            "q2",
            "/user/ana",
            &format!("offset={quiet_top}"),
            Some(&quiet_epoch),
        )
        .await;
    assert_eq!((recovered, offset), (true, quiet_top));
    w.quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn resume_on_the_embedded_broker() {
    let node = Lockstep::start();
    resume_story(&node, &node, "/team/t1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_nodes_on_redis() {
    let redis = RedisServer::start();
    let secret = random_secret();
    let options = || {
        Options::default()
            .secret(&secret)
            .env("LOCKSTEP_REDIS_URL", redis.url())
    };
    let a = Lockstep::start_with(options());
    let b = Lockstep::start_with(options());
    crate::locks::wait_ready(&a, 200, Duration::from_secs(20)).await;
    crate::locks::wait_ready(&b, 200, Duration::from_secs(20)).await;
    resume_story(&a, &b, "/team/t1").await;
    // An idempotent publish retried through another node publishes once.
    let backend = a.token("backend", &["t1", "t2"], "publish");
    let event = json!({"topic": "/team/t2", "type": "history.test", "data": {"n": 1}, "idempotency_key": "k-1"});
    let (_, first) = crate::http_publish(&a, &backend, &event).await;
    let (_, again) = crate::http_publish(&b, &backend, &event).await;
    assert_eq!(
        (&again["id"], &again["offset"], &again["duplicate"]),
        (&first["id"], &first["offset"], &json!(true)),
        "{first} {again}"
    );
    let (_, next) = crate::http_publish(
        &b,
        &backend,
        &json!({"topic": "/team/t2", "type": "history.test", "data": {"n": 2}}),
    )
    .await;
    assert_eq!(next["offset"], json!(first["offset"].as_u64().unwrap() + 1));
}

/// Every way a resume cannot be served is answered plainly, and nothing else is disturbed: an
/// unknown epoch, an offset beyond the top, more missed events than the maximum, trimmed
/// history (`x-recovered:false`, nothing replayed); malformed headers are an `ERROR`, on that
/// connection only.
#[tokio::test]
async fn unservable_resumes_are_explicit() {
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HISTORY_MAX_REPLAY", 5)
            .env("LOCKSTEP_HISTORY_TEAM_EVENTS", 8),
    );
    let publisher = node.token("backend", &["t1"], "publish");
    let ana = node.token("ana", &["t1"], "");
    let mut bystander = Watcher::connect(&node, &ana).await;
    let (_, _, epoch) = bystander.subscribe("b", "/team/t1", "next", None).await;
    for n in 1..=20 {
        publish(&node, &publisher, "/team/t1", n).await;
        assert_eq!(bystander.event().await.0, n);
    }
    let mut w = Watcher::connect(&node, &ana).await;
    for (start, asked, why) in [
        ("offset=18", "not-the-epoch", "unknown epoch"),
        ("offset=25", epoch.as_str(), "beyond the top"),
        ("offset=14", epoch.as_str(), "6 missed, 5 at most"),
        ("offset=3", epoch.as_str(), "trimmed: 8 kept"),
    ] {
        let (recovered, offset, e) = w.subscribe(why, "/team/t1", start, Some(asked)).await;
        assert_eq!((recovered, offset, &e), (false, 20, &epoch), "{why}");
    }
    w.quiet(Duration::from_millis(300)).await;
    // 5 missed is within the maximum.
    let (recovered, offset, _) = w
        .subscribe("ok", "/team/t1", "offset=15", Some(&epoch))
        .await;
    assert_eq!((recovered, offset), (true, 15));
    for n in 16..=20 {
        assert_eq!(w.event().await.0, n);
    }
    for (headers, message) in [
        (vec![("x-stream-offset", "offset=x")], "malformed frame"),
        (vec![("x-stream-offset", "offset=3")], "malformed frame"),
        (vec![("x-stream-offset", "sometime")], "malformed frame"),
    ] {
        let mut bad = Watcher::connect(&node, &ana).await;
        let mut frame = Frame::new(Command::Subscribe)
            .with_header("id", "x")
            .with_header("destination", "/team/t1");
        for (name, value) in &headers {
            frame = frame.with_header(*name, *value);
        }
        bad.client.send(&frame).await.unwrap();
        let (error, close) = bad.client.expect_close().await.unwrap();
        assert_eq!(
            error.as_ref().and_then(|f| f.header("message")),
            Some(message),
            "{headers:?}"
        );
        assert_eq!(close.map(|c| c.0), Some(4003));
    }
    // The others are unharmed.
    publish(&node, &publisher, "/team/t1", 21).await;
    assert_eq!(bystander.event().await.0, 21);
    assert_eq!(w.event().await.0, 21);
}

/// Publish answers carry the position; `GET …/position`, `GET …/events` and the lock list give
/// what a page needs to load state over HTTP and subscribe from exactly there; an idempotency
/// key publishes once.
#[tokio::test]
async fn http_positions_history_and_idempotent_publishing() {
    let node = node(None, &[]).await;
    let backend = node.token("backend", &["t1"], "publish locks");
    let first = publish(&node, &backend, "/team/t1", 1).await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    assert_eq!(first["offset"], 1);
    let (s, position) = call(
        &node,
        "GET",
        "/api/v1/topics/%2Fteam%2Ft1/position",
        &backend,
        None,
    )
    .await;
    assert_eq!((s, &position), (200, &json!({"offset": 1, "epoch": epoch})));
    for n in 2..=4 {
        publish(&node, &backend, "/team/t1", n).await;
    }
    let (s, page) = call(
        &node,
        "GET",
        &format!("/api/v1/topics/%2Fteam%2Ft1/events?after=1&epoch={epoch}&limit=2"),
        &backend,
        None,
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(
        (
            &page["recovered"],
            &page["more"],
            &page["position"]["offset"]
        ),
        (&json!(true), &json!(true), &json!(4))
    );
    let offsets: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3]);
    assert_eq!(page["events"][0]["event"]["data"], json!({"n": 2}));
    let (s, page) = call(
        &node,
        "GET",
        "/api/v1/topics/%2Fteam%2Ft1/events?after=1&epoch=other",
        &backend,
        None,
    )
    .await;
    assert_eq!(
        (s, &page["recovered"], &page["events"]),
        (200, &json!(false), &json!([]))
    );
    // Reading a topic needs what subscribing needs.
    let (s, body) = call(
        &node,
        "GET",
        "/api/v1/topics/%2Fteam%2Ft9/position",
        &backend,
        None,
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, body) = call(
        &node,
        "GET",
        "/api/v1/topics/%2Fnowhere/position",
        &backend,
        None,
    )
    .await;
    assert_eq!(s, 422, "{body}");

    // Idempotent: the same key answers the first publish and publishes nothing.
    let ana = node.token("ana", &["t1"], "");
    let mut w = Watcher::connect(&node, &ana).await;
    w.subscribe("s", "/team/t1", "next", None).await;
    let event = json!({"topic": "/team/t1", "type": "history.test", "data": {"n": 5}, "idempotency_key": "import-7-step-3"});
    let (s1, a) = crate::http_publish(&node, &backend, &event).await;
    let (s2, b) = crate::http_publish(&node, &backend, &event).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!((&a["id"], &a["offset"]), (&b["id"], &b["offset"]));
    assert_eq!(b["duplicate"], json!(true));
    assert_eq!(w.event().await.0, 5);
    w.quiet(Duration::from_millis(300)).await;
    // Another caller's same key is its own.
    let other = node.token("importer", &["t1"], "publish");
    let (_, c) = crate::http_publish(&node, &other, &event).await;
    assert_eq!(c["offset"], 6);

    // The lock list carries the team topic's position read before it.
    let (s, list) = call(&node, "GET", "/api/v1/teams/t1/locks", &backend, None).await;
    assert_eq!((s, &list["position"]["offset"]), (200, &json!(6)), "{list}");
}

/// `FLUSHALL` loses every topic's history and counter: the next event opens a new epoch, the
/// subscribers get `lockstep.reset` first, and a resume across it is `x-recovered:false`;
/// offsets never repeat within an epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_is_a_new_epoch() {
    let redis = RedisServer::start();
    let node = Lockstep::start_with(Options::default().env("LOCKSTEP_REDIS_URL", redis.url()));
    crate::locks::wait_ready(&node, 200, Duration::from_secs(20)).await;
    let publisher = node.token("backend", &["t1"], "publish");
    let ana = node.token("ana", &["t1"], "");
    let mut w = Watcher::connect(&node, &ana).await;
    let (_, _, epoch) = w.subscribe("s", "/team/t1", "next", None).await;
    for n in 1..=3 {
        publish(&node, &publisher, "/team/t1", n).await;
        w.event().await;
    }
    redis.cli(&["FLUSHALL"]);
    let answer = publish(&node, &publisher, "/team/t1", 4).await;
    assert_eq!(answer["offset"], 1);
    assert_ne!(answer["epoch"], json!(epoch));
    let (offset, reset) = w.event().await;
    assert_eq!(
        (offset, &reset["type"]),
        (0, &json!("lockstep.reset")),
        "{reset}"
    );
    assert_eq!(reset["data"]["reason"], "epoch_changed");
    let (offset, body) = w.event().await;
    assert_eq!((offset, &body["data"]["n"]), (1, &json!(4)));
    streams::check(&w.log).unwrap();
    let mut late = Watcher::connect(&node, &ana).await;
    let (recovered, offset, e) = late
        .subscribe("s", "/team/t1", "offset=3", Some(&epoch))
        .await;
    assert_eq!((recovered, offset), (false, 1));
    assert_eq!(json!(e), answer["epoch"]);
    late.quiet(Duration::from_millis(300)).await;
}

/// A pub/sub connection killed under the node (`CLIENT KILL TYPE pubsub`) loses the events
/// published until it is back; the node fills the gap from history once for the topic, so its
/// subscribers see every offset and no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_is_healed_from_history() {
    let redis = RedisServer::start();
    let secret = random_secret();
    let options = || {
        Options::default()
            .secret(&secret)
            .env("LOCKSTEP_REDIS_URL", redis.url())
            .env("LOCKSTEP_REDIS_PROBE_INTERVAL", "200ms")
    };
    let subscriber_node = Lockstep::start_with(options());
    let publisher_node = Lockstep::start_with(options());
    for node in [&subscriber_node, &publisher_node] {
        crate::locks::wait_ready(node, 200, Duration::from_secs(20)).await;
    }
    let publisher = publisher_node.token("backend", &["t1"], "publish");
    let ana = subscriber_node.token("ana", &["t1"], "");
    let mut w = Watcher::connect(&subscriber_node, &ana).await;
    w.subscribe("s", "/team/t1", "next", None).await;
    publish(&publisher_node, &publisher, "/team/t1", 1).await;
    assert_eq!(w.event().await.0, 1);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // Published while the subscriber node's pub/sub connection is down.
    for n in 2..=10 {
        publish(&publisher_node, &publisher, "/team/t1", n).await;
    }
    for n in 2..=10 {
        let (offset, body) = w.event().await;
        assert_eq!(
            (offset, &body["type"]),
            (n, &json!("history.test")),
            "{body}"
        );
    }
    let summary = streams::check(&w.log).unwrap();
    assert_eq!((summary.events, summary.resets), (10, 0));
}

/// One item's lock events reach every subscriber in token order, even when the node that
/// releases publishes late: node A's publish queue is flooded, so its `lock.released` (token
/// n) reaches Redis after node B's `lock.acquired` (token n + 1). Lock events are keyed by item
/// and versioned by their outbox id, so the late release is superseded instead of overtaking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_events_arrive_in_token_order_despite_a_slow_node() {
    let pg = tests::postgres::Postgres::start();
    let url = pg.database("order");
    let redis = RedisServer::start();
    let nodes = crate::locks::cluster(
        2,
        &url,
        &redis,
        &[
            ("LOCKSTEP_HUB_PUBLISH_RATE", "1000000"),
            ("LOCKSTEP_HUB_PUBLISH_BURST", "1000000"),
        ],
    )
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let ana = a.token("ana", &["t1"], "locks");
    let bob = b.token("bob", &["t1"], "locks");
    let mut w = crate::locks::watcher(b, "carol", &["t1"], "/team/t1").await;
    // Flood node A's publish queue with events to another topic: connections that keep
    // hundreds of SENDs in flight each (a session pipelines up to 256), so A's queue to Redis
    // holds thousands of events ahead of its lock events.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut floods = Vec::new();
    for i in 0..16 {
        let (url, stop) = (a.ws(), stop.clone());
        // Many topics: each is one script call in every pipeline to Redis.
        let teams: Vec<String> = (0..200).map(|t| format!("f{t}")).collect();
        let token = a.token_with(&json!({
            "sub": format!("flooder{i}"), "teams": teams, "scope": "publish",
            "exp": tests::now() + 3600,
        }));
        floods.push(tokio::spawn(async move {
            let (mut client, _) = StompClient::connect(&url, &token).await.unwrap();
            let body = json!({"pad": "x".repeat(200)}).to_string();
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let frame = Frame::new(Command::Send)
                    .with_header("destination", format!("/team/f{}", n % 200))
                    .with_header("event-type", "flood.event")
                    .with_body(body.clone());
                if client.send(&frame).await.is_err() {
                    break;
                }
            }
        }));
    }
    let rounds = 40;
    let path = crate::locks::lock_path("t1", "contested");
    for _ in 0..rounds {
        let (s, held) = call(a, "POST", &path, &ana, Some(json!({"ttl_ms": 60_000}))).await;
        assert_eq!(s, 200, "{held}");
        // Bob waits for the item on the other node and takes it the moment Ana's release
        // commits, while her node is still publishing the release behind its flood.
        let waiting = {
            let (url, bob, path) = (b.http(), bob.clone(), path.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                loop {
                    let (s, body) = crate::locks::request(
                        &client,
                        &url,
                        "POST",
                        &path,
                        &bob,
                        Some(json!({"ttl_ms": 60_000})),
                    )
                    .await
                    .unwrap();
                    if s == 200 {
                        return body;
                    }
                    assert_eq!(s, 409, "{body}");
                }
            })
        };
        let (s, _) = call(
            a,
            "DELETE",
            &path,
            &ana,
            Some(json!({"token": held["token"]})),
        )
        .await;
        assert_eq!(s, 204);
        let taken = waiting.await.unwrap();
        let (s, _) = call(
            b,
            "DELETE",
            &path,
            &bob,
            Some(json!({"token": taken["token"]})),
        )
        .await;
        assert_eq!(s, 204);
    }
    stop.cancel();
    for flood in floods {
        let _ = flood.await;
    }
    // Every event of the item, as the watcher saw them, until the last grant's release.
    let last_token = rounds * 2;
    let mut seen: Vec<(i64, &'static str)> = Vec::new();
    loop {
        let (event_type, data) = crate::locks::next_event(&mut w, "/team/t1").await;
        let phase = match event_type.as_str() {
            "lock.acquired" => "acquired",
            "lock.released" => "released",
            other => panic!("{other}: {data}"),
        };
        let token = data["token"].as_i64().unwrap();
        if let Some((previous, previous_phase)) = seen.last() {
            let order = |t: i64, p: &str| (t, i64::from(p == "released"));
            assert!(
                order(token, phase) > order(*previous, previous_phase),
                "{phase} {token} after {previous_phase} {previous}: {seen:?}"
            );
        }
        seen.push((token, phase));
        if token == last_token && phase == "released" {
            break;
        }
    }
    eprintln!(
        "lock events seen: {} of {} (the rest superseded)",
        seen.len(),
        rounds * 4
    );
}
