//! Keyed state end to end (DESIGN §13): the latest event of every key per topic, `SUBSCRIBE`
//! with `x-stream-offset:snapshot` (state, then live from exactly its position), the HTTP
//! snapshot, bounds and refusals, and conflation for a slow reader; on the embedded broker, on
//! Redis and on a Redis Cluster across three nodes, and through a `FLUSHALL`. Every
//! subscriber's view goes through the stream checker (`tests::streams`).

use crate::history::{Watcher, position_of, seen};
use crate::locks::call;
use loadtest::client::{OpenOptions, StompClient};
use protocol::{Command, Frame};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::redis::{RedisCluster, RedisServer};
use tests::streams::{self, Seen};
use tests::{Lockstep, Options, random_secret};

/// What a backend published, by offset: (key, event type, data). Every test's expectation
/// comes from it.
#[derive(Debug, Default, Clone)]
struct Record(Arc<Mutex<BTreeMap<u64, Published>>>);

/// One published event: its key, type and data.
type Published = (Option<String>, String, Value);

impl Record {
    /// Publishes a batch through the node at `base` (its HTTP URL) and records each event at
    /// the offset it got.
    async fn publish(&self, base: &str, token: &str, events: Vec<Value>) -> Vec<u64> {
        let (status, body) = crate::locks::request(
            &reqwest::Client::new(),
            base,
            "POST",
            "/api/v1/publish/batch",
            token,
            Some(json!({ "events": events })),
        )
        .await
        .unwrap();
        assert_eq!(status, 202, "{body}");
        let mut offsets = Vec::new();
        let mut record = self.0.lock().unwrap();
        for (event, answer) in events.iter().zip(body["events"].as_array().unwrap()) {
            let offset = answer["offset"].as_u64().unwrap();
            let key = event["key"].as_str().map(str::to_owned).or_else(|| {
                // The default key of job events.
                event["type"]
                    .as_str()
                    .filter(|t| t.starts_with("job."))
                    .and_then(|_| event["data"]["job_id"].as_str())
                    .map(|job| format!("job:{job}"))
            });
            record.insert(
                offset,
                (
                    key,
                    event["type"].as_str().unwrap().to_owned(),
                    event["data"].clone(),
                ),
            );
            offsets.push(offset);
        }
        offsets
    }

    /// Each key's latest event at or below `top`: key → (offset, data).
    fn latest(&self, top: u64) -> BTreeMap<String, (u64, Value)> {
        let mut latest = BTreeMap::new();
        for (offset, (key, _, data)) in self.0.lock().unwrap().range(..=top) {
            if let Some(key) = key {
                latest.insert(key.clone(), (*offset, data.clone()));
            }
        }
        latest
    }

    fn get(&self, offset: u64) -> Option<Published> {
        self.0.lock().unwrap().get(&offset).cloned()
    }
}

fn progress(job: usize, done: u64) -> Value {
    json!({"topic": "/team/t1", "type": "job.progress", "data": {"job_id": format!("j{job}"), "done": done, "total": 1000}})
}

/// The body's `data` of a `MESSAGE`.
fn data(frame: &Frame) -> Value {
    let body: Value = serde_json::from_slice(&frame.body).unwrap();
    body["data"].clone()
}

/// A dashboard opened mid-run: jobs report progress (a backend keeps publishing meanwhile),
/// one stage key, unkeyed notes; `snapshot` on `subscriber` gets each key's latest at its
/// position, then every event after it with no gap and no duplicate; the HTTP snapshot on
/// `reader` agrees. Publishes go through `publisher`.
async fn snapshot_story(publisher: &Lockstep, subscriber: &Lockstep, reader: &Lockstep) {
    let backend = publisher.token("backend", &["t1"], "publish");
    let record = Record::default();
    for done in 1..=5 {
        let mut batch: Vec<Value> = (0..10).map(|j| progress(j, done * 10)).collect();
        batch.push(json!({"topic": "/team/t1", "type": "note.added", "data": {"done": done}}));
        record.publish(&publisher.http(), &backend, batch).await;
    }
    record
        .publish(
            &publisher.http(),
            &backend,
            vec![
                json!({"topic": "/team/t1", "type": "stage.changed", "key": "stage", "data": {"stage": "ingest"}}),
                json!({"topic": "/team/t1", "type": "job.completed", "data": {"job_id": "j3"}}),
                json!({"topic": "/team/t1", "type": "stage.changed", "key": "stage", "data": {"stage": "review"}}),
            ],
        )
        .await;
    // The backend keeps publishing while the dashboard opens.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let background = tokio::spawn({
        let (record, running, node, backend) = (
            record.clone(),
            running.clone(),
            publisher.http(),
            backend.clone(),
        );
        async move {
            let mut done = 100;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                done += 1;
                let batch = (0..10)
                    .filter(|j| *j != 3)
                    .map(|j| progress(j, done))
                    .collect();
                record.publish(&node, &backend, batch).await;
            }
        }
    });
    // Let a few background batches go out before the dashboard opens.
    let started = record.0.lock().unwrap().len();
    while record.0.lock().unwrap().len() < started + 27 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ana = subscriber.token("ana", &["t1"], "");
    let mut w = Watcher::connect(subscriber, &ana).await;
    let (recovered, top, epoch) = w.subscribe("s", "/team/t1", "snapshot", None).await;
    assert!(recovered, "a snapshot is always served");
    let mut state = BTreeMap::new();
    // 10 jobs and the stage: one state event each, first.
    for _ in 0..11 {
        let frame = w.message().await;
        assert_eq!(frame.header("x-snapshot"), Some("true"), "{frame:?}");
        let key = frame.header("x-key").expect("a state event has its key");
        state.insert(key.to_owned(), (position_of(&frame).0, data(&frame)));
    }
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    background.await.unwrap();
    // Compared once the backend stopped: a batch in flight may hold offsets below the top.
    let expected = record.latest(top);
    assert_eq!(state, expected, "the state at offset {top}");
    assert_eq!(state["job:j3"].1, json!({"job_id": "j3"}));
    assert_eq!(state["stage"].1, json!({"stage": "review"}));
    let last = record
        .publish(
            &publisher.http(),
            &backend,
            vec![json!({"topic": "/team/t1", "type": "test.done", "data": {}})],
        )
        .await[0];
    // Live from exactly the snapshot's position: every event after it, once, in order.
    let mut live = 0;
    loop {
        let frame = w.message().await;
        let (offset, e) = position_of(&frame);
        assert_eq!(e, epoch);
        let (key, _, expected) = record.get(offset).expect("a recorded offset");
        assert_eq!(data(&frame), expected, "offset {offset}");
        assert_eq!(frame.header("x-key"), key.as_deref(), "offset {offset}");
        live += 1;
        if offset == last {
            break;
        }
    }
    let summary = streams::check(&w.log).unwrap();
    assert_eq!((summary.events, summary.conflated), (live, 0));
    assert_eq!(live as u64, last - top, "live events after the snapshot");
    // The HTTP snapshot, on another node, is the latest of every key now.
    let (status, body) = call(
        reader,
        "GET",
        "/api/v1/topics/%2Fteam%2Ft1/snapshot",
        &reader.token("ana", &["t1"], ""),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["position"], json!({"offset": last, "epoch": epoch}));
    let http: BTreeMap<String, (u64, Value)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                (e["offset"].as_u64().unwrap(), e["event"]["data"].clone()),
            )
        })
        .collect();
    assert_eq!(http, record.latest(last));
    let offsets: Vec<u64> = http.values().map(|(o, _)| *o).collect();
    let events_order: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    let mut sorted = offsets;
    sorted.sort_unstable();
    assert_eq!(events_order, sorted, "oldest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_on_the_embedded_broker() {
    let node = Lockstep::start();
    snapshot_story(&node, &node, &node).await;
}

/// Three nodes on one Redis (`redis` a standalone server's or a cluster's URL).
async fn three_nodes(redis: &str) -> Vec<Lockstep> {
    let secret = random_secret();
    let nodes: Vec<Lockstep> = (0..3)
        .map(|_| {
            Lockstep::start_with(
                Options::default()
                    .secret(&secret)
                    .env("LOCKSTEP_REDIS_URL", redis),
            )
        })
        .collect();
    for node in &nodes {
        crate::locks::wait_ready(node, 200, Duration::from_secs(20)).await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_across_three_nodes_on_redis() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    snapshot_story(&nodes[0], &nodes[1], &nodes[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_across_three_nodes_on_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let nodes = three_nodes(&cluster.url()).await;
    snapshot_story(&nodes[0], &nodes[1], &nodes[2]).await;
}

/// After `FLUSHALL` the state is gone with the history: a snapshot subscriber gets the reset
/// of the new epoch, and a new snapshot holds only what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_empties_the_state() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    let backend = nodes[0].token("backend", &["t1"], "publish");
    let ana = nodes[1].token("ana", &["t1"], "");
    let record = Record::default();
    record
        .publish(
            &nodes[0].http(),
            &backend,
            (0..3).map(|j| progress(j, 1)).collect(),
        )
        .await;
    let mut w = Watcher::connect(&nodes[1], &ana).await;
    let (_, top, epoch) = w.subscribe("s", "/team/t1", "snapshot", None).await;
    assert_eq!(top, 3);
    for _ in 0..3 {
        w.message().await;
    }
    redis.cli(&["FLUSHALL"]);
    record
        .publish(&nodes[0].http(), &backend, vec![progress(7, 2)])
        .await;
    let (offset, reset) = w.event().await;
    assert_eq!((offset, &reset["type"]), (0, &json!("lockstep.reset")));
    let (offset, event) = w.event().await;
    assert_eq!((offset, &event["data"]["job_id"]), (1, &json!("j7")));
    streams::check(&w.log).unwrap();
    let mut late = Watcher::connect(&nodes[2], &ana).await;
    let (_, top, new_epoch) = late.subscribe("s", "/team/t1", "snapshot", None).await;
    assert_ne!(new_epoch, epoch);
    assert_eq!(top, 1);
    let frame = late.message().await;
    assert_eq!(frame.header("x-key"), Some("job:j7"));
    late.quiet(Duration::from_millis(300)).await;
    streams::check(&late.log).unwrap();
}

/// Keys per topic are bounded (the least recently updated goes first), idle keys are
/// forgotten, and invalid, huge and reserved keys are refused with a clear error, on HTTP and
/// STOMP, without disturbing anyone else.
async fn bounds_story(node: &Lockstep) {
    let backend = node.token("backend", &["t1"], "publish");
    let ana = node.token("ana", &["t1"], "");
    let snapshot = || async {
        let (status, body) = call(
            node,
            "GET",
            "/api/v1/topics/%2Fteam%2Ft1/snapshot",
            &ana,
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut bystander = Watcher::connect(node, &ana).await;
    bystander.subscribe("b", "/team/t1", "next", None).await;
    let record = Record::default();
    // 200 keys into a topic that keeps 5.
    for round in 0..2 {
        let batch = (0..100)
            .map(|k| json!({"topic": "/team/t1", "type": "cell.set", "key": format!("cell-{}", round * 100 + k), "data": {"k": k}}))
            .collect();
        record.publish(&node.http(), &backend, batch).await;
    }
    assert_eq!(
        snapshot().await,
        (195..200).map(|k| format!("cell-{k}")).collect::<Vec<_>>()
    );
    // Updating an old key makes it the most recent.
    record
        .publish(
            &node.http(),
            &backend,
            vec![json!({"topic": "/team/t1", "type": "cell.set", "key": "cell-195", "data": {}})],
        )
        .await;
    assert_eq!(
        snapshot().await,
        ["cell-196", "cell-197", "cell-198", "cell-199", "cell-195"]
    );
    for (key, code) in [
        (json!("a b"), "invalid_key"),
        (json!("k".repeat(129)), "invalid_key"),
        (json!(""), "invalid_key"),
        (json!("lock:item-1"), "invalid_key"),
        (json!("presence:ana"), "invalid_key"),
        (json!(7), "invalid_body"),
    ] {
        let (status, body) = call(
            node,
            "POST",
            "/api/v1/publish",
            &backend,
            Some(json!({"topic": "/team/t1", "type": "cell.set", "key": key, "data": {}})),
        )
        .await;
        assert_eq!(
            (status, crate::locks::code(&body)),
            (422, code),
            "{key}: {body}"
        );
    }
    let (status, body) = call(
        node,
        "POST",
        "/api/v1/publish/batch",
        &backend,
        Some(json!({"events": [
            {"topic": "/team/t1", "type": "cell.set", "key": "fine", "data": {}},
            {"topic": "/team/t1", "type": "cell.set", "key": "lock:x", "data": {}},
        ]})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["details"]["index"], 1, "{body}");
    // Over STOMP: an ERROR for that connection only.
    for key in ["a b", "lock:item-1"] {
        let bot = node.token("bot", &["t1"], "publish");
        let (mut client, _) = StompClient::connect(&node.ws(), &bot).await.unwrap();
        client
            .send(
                &Frame::new(Command::Send)
                    .with_header("destination", "/team/t1")
                    .with_header("event-type", "cell.set")
                    .with_header("x-key", key)
                    .with_header("content-type", "application/json")
                    .with_body("{}"),
            )
            .await
            .unwrap();
        let (error, _) = client.expect_close().await.unwrap();
        let error = error.expect("an ERROR frame");
        assert_eq!(error.header("message"), Some("invalid x-key"), "{key}");
    }
    // A valid x-key is the event's key.
    let bot = node.token("bot", &["t1"], "publish");
    let (mut client, _) = StompClient::connect(&node.ws(), &bot).await.unwrap();
    client
        .send(
            &Frame::new(Command::Send)
                .with_header("destination", "/team/t1")
                .with_header("event-type", "cell.set")
                .with_header("x-key", "from-stomp")
                .with_header("receipt", "r1")
                .with_header("content-type", "application/json")
                .with_body("{}"),
        )
        .await
        .unwrap();
    client.expect_receipt("r1").await.unwrap();
    // The bystander saw every accepted event and nothing else.
    for _ in 0..202 {
        bystander.message().await;
    }
    let last = bystander.log.last().cloned();
    assert!(
        matches!(last, Some(Seen::Event { keyed: true, .. })),
        "{last:?}"
    );
    streams::check(&bystander.log).unwrap();
    assert_eq!(
        snapshot().await.last().map(String::as_str),
        Some("from-stomp")
    );
    // Idle keys are forgotten (key_idle is 2 s here); polled, as expiry is a time.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let keys = snapshot().await;
        if keys.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "idle keys kept: {keys:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn bounded(options: Options) -> Options {
    options
        .env("LOCKSTEP_HISTORY_MAX_KEYS", 5)
        .env("LOCKSTEP_HISTORY_KEY_IDLE", "2s")
        .env("LOCKSTEP_API_PUBLISH_RATE", 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_bounded_and_checked_on_the_embedded_broker() {
    let node = Lockstep::start_with(bounded(Options::default()));
    bounds_story(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_bounded_and_checked_on_redis() {
    let redis = RedisServer::start();
    let node = Lockstep::start_with(bounded(
        Options::default().env("LOCKSTEP_REDIS_URL", redis.url()),
    ));
    crate::locks::wait_ready(&node, 200, Duration::from_secs(20)).await;
    bounds_story(&node).await;
}

/// A slow reader (20 frames/s behind a small socket buffer) of 10 jobs reporting 1,000
/// progress events/s in all, with a few unkeyed notes between: it is never closed, gets every
/// note in order, gets each job's final value soon after it was published, and every offset
/// it skipped is accounted for by `x-conflated`. A fast subscriber of the same topic gets
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_latest_progress_instead_of_a_close() {
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HUB_OUTBOUND_QUEUE", 64)
            .env("LOCKSTEP_SEND_BUFFER_BYTES", 4096)
            .env("LOCKSTEP_API_PUBLISH_RATE", 0),
    );
    let backend = node.token("backend", &["t1"], "publish");
    let ana = node.token("ana", &["t1"], "");
    let slow_options = OpenOptions {
        recv_buffer: Some(8 * 1024),
        read_buffer: Some(4096),
        ..OpenOptions::default()
    };
    let (mut slow, _) = StompClient::connect_with(&node.ws(), &slow_options, &ana, "0,0")
        .await
        .unwrap();
    slow.subscribe("s", "/team/t1").await.unwrap();
    let mut fast = Watcher::connect(&node, &ana).await;
    fast.subscribe("f", "/team/t1", "next", None).await;
    let record = Record::default();
    // When each offset was handed to the API (the latest value's lag is measured from it).
    let sent_at: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let publishing = Duration::from_secs(3);
    let backend_task = tokio::spawn({
        let (record, sent_at, node, backend) = (
            record.clone(),
            sent_at.clone(),
            node.http(),
            backend.clone(),
        );
        async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0u64;
            while start.elapsed() < publishing {
                tick.tick().await;
                n += 1;
                // Progress as importers report it, with the file being worked on.
                let mut batch: Vec<Value> = (0..10)
                    .map(|j| {
                        let mut event = progress(j, n);
                        event["data"]["file"] = json!(format!(
                            "/imports/2026-12/batch-{j}/{n:06}/{}.tiff",
                            "scan-page-".repeat(30)
                        ));
                        event
                    })
                    .collect();
                if n.is_multiple_of(10) {
                    batch
                        .push(json!({"topic": "/team/t1", "type": "note.added", "data": {"n": n}}));
                }
                let at = Instant::now();
                let offsets = record.publish(&node, &backend, batch).await;
                let mut sent = sent_at.lock().unwrap();
                for offset in offsets {
                    sent.insert(offset, at);
                }
            }
            // The end: one more note, after every job's final value.
            record
                .publish(
                    &node,
                    &backend,
                    vec![json!({"topic": "/team/t1", "type": "note.added", "data": {"n": "end"}})],
                )
                .await[0]
        }
    });
    // The fast subscriber reads everything as it comes.
    let fast_task = tokio::spawn(async move {
        loop {
            let frame = fast.message().await;
            if data(&frame)["n"] == json!("end") {
                return fast;
            }
        }
    });
    // The slow reader: 20 frames/s (the pause is the reader's speed, not a wait for anything).
    let mut log = vec![Seen::Subscribe { resume: None }];
    let mut received: Vec<(Frame, Instant)> = Vec::new();
    loop {
        let frame = slow
            .expect_frame_within(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "slow reader after {} frames: {e:#}\n{}",
                    received.len(),
                    node.log()
                )
            });
        assert_eq!(frame.command, Command::Message, "{frame:?}");
        let end = data(&frame)["n"] == json!("end");
        log.push(seen(&frame));
        received.push((frame, Instant::now()));
        if end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = backend_task.await.unwrap();
    let fast = fast_task.await.unwrap();
    // The fast subscriber got every offset.
    let fast_summary = streams::check(&fast.log).unwrap();
    // The slow reader: increasing offsets, every skip accounted for by x-conflated.
    let summary = streams::check(&log).unwrap();
    let offsets: BTreeSet<u64> = received.iter().map(|(f, _)| position_of(f).0).collect();
    let first = *offsets.first().unwrap();
    let record_all = record.0.lock().unwrap().clone();
    for (offset, (key, event_type, _)) in record_all.range(first..=last) {
        if key.is_none() {
            assert!(
                offsets.contains(offset),
                "unkeyed {event_type} at {offset} never reached the slow reader"
            );
        }
    }
    // Each job's final value reached it; the lag from publication to arrival, per frame.
    let sent_at = sent_at.lock().unwrap();
    let mut lags: Vec<Duration> = received
        .iter()
        .filter_map(|(f, at)| Some(at.duration_since(*sent_at.get(&position_of(f).0)?)))
        .collect();
    let finals = record.latest(last);
    for (key, (offset, _)) in &finals {
        let (_, at) = received
            .iter()
            .find(|(f, _)| position_of(f).0 == *offset)
            .unwrap_or_else(|| panic!("{key}'s final value (offset {offset}) never arrived"));
        let lag = at.duration_since(sent_at[offset]);
        eprintln!(
            "{key}: final value arrived {} ms after publication",
            lag.as_millis()
        );
        // What lies ahead of it is bounded: the kernel's buffers (8 KiB here, 4 KiB at the
        // node; about 40 frames, 2 s at 20 frames/s) and half the queue, not the 3,000 events
        // published (without conflation it came 150 s late).
        assert!(
            lag < Duration::from_secs(6),
            "{key}'s final value came {} ms after publication",
            lag.as_millis()
        );
    }
    lags.sort_unstable();
    let p99 = lags[lags.len() * 99 / 100];
    let bytes: usize = received.iter().map(|(f, _)| f.body.len()).sum();
    eprintln!(
        "slow reader: {} frames ({} body bytes) for {} offsets, {} replaced (x-conflated), latest-value lag p99 {} ms; fast subscriber: {} events, {} replaced",
        received.len(),
        bytes,
        last - first + 1,
        summary.conflated,
        p99.as_millis(),
        fast_summary.events,
        fast_summary.conflated
    );
    assert!(
        summary.conflated > 0,
        "the slow reader never needed conflation"
    );
}

/// STOMP 1.0 has no header escaping: its state frames and conflated frames carry keys as they
/// are (`x-key:job:j1`), like its live frames, not `job\cj1`.
#[tokio::test]
async fn stomp_1_0_gets_keys_unescaped_in_state_frames() {
    use futures_util::StreamExt as _;
    let node = Lockstep::start();
    let backend = node.token("backend", &["t1"], "publish");
    Record::default()
        .publish(&node.http(), &backend, vec![progress(1, 5)])
        .await;
    let mut client = StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap();
    // No accept-version: STOMP 1.0.
    client
        .send(&Frame::new(Command::Connect).with_header("passcode", node.token("ana", &["t1"], "")))
        .await
        .unwrap();
    assert_eq!(
        client.expect_frame().await.unwrap().header("version"),
        Some("1.0")
    );
    client
        .send(
            &Frame::new(Command::Subscribe)
                .with_header("id", "s")
                .with_header("destination", "/team/t1")
                .with_header("x-stream-offset", "snapshot"),
        )
        .await
        .unwrap();
    let mut texts = Vec::new();
    while texts.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), client.ws_mut().next())
            .await
            .expect("a frame in time")
            .expect("the connection stays open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            texts.push(text.to_string());
        }
    }
    assert!(
        texts[0].contains("event-type:lockstep.subscribed\n"),
        "{}",
        texts[0]
    );
    assert!(texts[1].contains("x-snapshot:true\n"), "{}", texts[1]);
    assert!(texts[1].contains("\nx-key:job:j1\n"), "{}", texts[1]);
}
