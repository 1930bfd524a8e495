//! Resume under load (DESIGN §12): 3 nodes on Redis (and on a 3-master Redis Cluster), a
//! publisher at 2,000 events per second over 20 team topics, 200 clients (10 per topic) that
//! keep dropping their connection and resuming from their last offset on a random node, and
//! one node SIGKILLed in the middle. Every client's view must pass the stream checker, every
//! resume must be served (`x-recovered:true`: history holds what anyone missed), and every
//! client ends at its topic's last offset.

use crate::history::{Watcher, position_of};
use loadtest::client::StompClient;
use protocol::Command;
use rand::Rng as _;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tests::redis::{RedisCluster, RedisServer};
use tests::streams::{self, Seen};
use tests::{Lockstep, Options, random_secret};

const CLIENTS: usize = 200;
const TOPICS: usize = 20;

fn topic(i: usize) -> String {
    format!("/team/t{}", i % TOPICS)
}

/// The load tests take the machine; they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How the run went, for the assertions and the log.
#[derive(Debug, Default)]
struct Outcome {
    resumes: usize,
    events: usize,
    /// Events published per second.
    rate: f64,
}

async fn run(url: &str) -> Outcome {
    let _alone = ONE_AT_A_TIME.lock().await;
    let secret = random_secret();
    let options = || {
        Options::default()
            .secret(&secret)
            .env("LOCKSTEP_REDIS_URL", url)
            .env("LOCKSTEP_REDIS_PROBE_INTERVAL", "500ms")
            .env("LOCKSTEP_API_PUBLISH_RATE", "0")
            .env("LOCKSTEP_HISTORY_TEAM_EVENTS", "50000")
            .env("LOCKSTEP_HISTORY_MAX_REPLAY", "50000")
    };
    let mut nodes: Vec<Lockstep> = (0..3).map(|_| Lockstep::start_with(options())).collect();
    for node in &nodes {
        crate::locks::wait_ready(node, 200, Duration::from_secs(20)).await;
    }
    let ws: Arc<Vec<String>> = Arc::new(nodes.iter().map(Lockstep::ws).collect());
    let dead = Arc::new(AtomicUsize::new(usize::MAX));
    let teams: Vec<String> = (0..TOPICS).map(|t| format!("t{t}")).collect();
    let teams: Vec<&str> = teams.iter().map(String::as_str).collect();
    let token = nodes[0].token("ana", &teams, "");
    let publisher = nodes[0].token("backend", &teams, "publish");
    let publishing = Arc::new(AtomicBool::new(true));

    // The clients: connect to a random live node, resume from the last offset seen, read for a
    // little while, drop, again; once publishing stopped, read up to `final_top`.
    let final_top = Arc::new(tokio::sync::watch::Sender::new(vec![0u64; TOPICS]));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (ws, dead, token, publishing) =
            (ws.clone(), dead.clone(), token.clone(), publishing.clone());
        let mut final_top = final_top.subscribe();
        clients.push(tokio::spawn(async move {
            let mut log: Vec<Seen> = Vec::new();
            let mut last: Option<(u64, String)> = None;
            let mut resumes = 0;
            loop {
                let node = loop {
                    let n = rand::rng().random_range(0..ws.len());
                    if n != dead.load(Ordering::SeqCst) {
                        break n;
                    }
                };
                let Ok((client, _)) = StompClient::connect(&ws[node], &token).await else {
                    // The node just died: another one.
                    continue;
                };
                let mut w = Watcher {
                    client,
                    log: std::mem::take(&mut log),
                };
                let (start, epoch) = match &last {
                    Some((offset, epoch)) => (format!("offset={offset}"), Some(epoch.clone())),
                    None => ("next".to_owned(), None),
                };
                let subscribed = tokio::time::timeout(
                    Duration::from_secs(10),
                    try_subscribe(&mut w, &topic(c), &start, epoch.as_deref()),
                )
                .await;
                match subscribed {
                    Ok(Some((recovered, offset, e))) => {
                        assert!(
                            recovered || last.is_none(),
                            "client {c}: a resume from {last:?} on node {node} was not served"
                        );
                        if last.is_some() {
                            resumes += 1;
                        }
                        last = Some((offset, e));
                    }
                    _ => {
                        // The connection went before the outcome: try again elsewhere.
                        w.log.push(Seen::Disconnected);
                        log = w.log;
                        continue;
                    }
                }
                let stay = Duration::from_millis(rand::rng().random_range(100..600));
                let until = Instant::now() + stay;
                let finishing = !publishing.load(Ordering::SeqCst);
                loop {
                    let top = final_top.borrow_and_update()[c % TOPICS];
                    if finishing && top > 0 && last.as_ref().is_some_and(|(o, _)| *o >= top) {
                        w.log.push(Seen::Disconnected);
                        let _ = w.client.close().await;
                        return (w.log, resumes);
                    }
                    let wait = if finishing {
                        Duration::from_secs(10)
                    } else {
                        until.saturating_duration_since(Instant::now())
                    };
                    if wait.is_zero() {
                        break;
                    }
                    match w.client.expect_frame_within(wait).await {
                        Ok(frame) if frame.command == Command::Message => {
                            let (offset, epoch) = position_of(&frame);
                            if frame.header("event-type") == Some("lockstep.reset") {
                                w.log.push(Seen::Reset {
                                    offset,
                                    epoch: epoch.clone(),
                                });
                            } else {
                                w.log.push(Seen::Event {
                                    offset,
                                    epoch: epoch.clone(),
                                    conflated: 0,
                                    keyed: frame.header("x-key").is_some(),
                                });
                            }
                            last = Some((offset, epoch));
                        }
                        Ok(other) => panic!("client {c}: {}", loadtest::client::describe(&other)),
                        // Timed out (time to drop) or the node died.
                        Err(_) => break,
                    }
                }
                w.log.push(Seen::Disconnected);
                let _ = w.client.close().await;
                log = w.log;
            }
        }));
    }

    // The publisher: batches of 50 over HTTP every 25 ms (2,000 events per second), to node 0
    // (which stays), for 8 seconds; node 2 is killed after 3.
    let http = nodes[0].http();
    let started = Instant::now();
    let client = reqwest::Client::new();
    let mut published = 0u64;
    let mut tops = vec![0u64; TOPICS];
    let mut killed = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(25));
    let mut batch = 0usize;
    while started.elapsed() < Duration::from_secs(8) {
        ticker.tick().await;
        let t = batch % TOPICS;
        batch += 1;
        let events: Vec<_> = (0..50)
            .map(|i| json!({"topic": topic(t), "type": "load.tick", "data": {"i": tops[t] + i}}))
            .collect();
        let response = client
            .post(format!("{http}/api/v1/publish/batch"))
            .bearer_auth(&publisher)
            .json(&json!({ "events": events }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        let last = body["events"][49]["offset"].as_u64().unwrap();
        published += 50;
        tops[t] += 50;
        assert_eq!(last, tops[t], "offsets are contiguous from 1");
        if !killed && started.elapsed() > Duration::from_secs(3) {
            dead.store(2, Ordering::SeqCst);
            nodes[2].kill();
            killed = true;
        }
    }
    let rate = published as f64 / started.elapsed().as_secs_f64();
    publishing.store(false, Ordering::SeqCst);
    final_top.send_replace(tops.clone());
    let mut outcome = Outcome {
        rate,
        ..Outcome::default()
    };
    for (c, client) in clients.into_iter().enumerate() {
        let (log, resumes) = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .unwrap_or_else(|_| panic!("client {c} did not reach offset {}", tops[c % TOPICS]))
            .unwrap();
        let summary = streams::check(&log).unwrap_or_else(|e| {
            let at: usize = e[1..]
                .split(' ')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            panic!(
                "client {c}: {e}\n{:#?}",
                &log[at.saturating_sub(12)..(at + 2).min(log.len())]
            )
        });
        assert_eq!(
            summary.last.as_ref().map(|l| l.0),
            Some(tops[c % TOPICS]),
            "client {c} ended behind"
        );
        assert_eq!(
            summary.resets + summary.not_recovered,
            0,
            "client {c}: {summary:?}"
        );
        outcome.resumes += resumes;
        outcome.events += summary.events;
    }
    drop(nodes);
    outcome
}

/// A subscription from `start`; `None` when the connection went first.
async fn try_subscribe(
    w: &mut Watcher,
    topic: &str,
    start: &str,
    epoch: Option<&str>,
) -> Option<(bool, u64, String)> {
    let mut headers = vec![("x-stream-offset", start)];
    if let Some(e) = epoch {
        headers.push(("x-stream-epoch", e));
    }
    let resume = start
        .strip_prefix("offset=")
        .and_then(|n| n.parse().ok())
        .map(|n: u64| (n, epoch.unwrap_or_default().to_owned()));
    w.log.push(Seen::Subscribe { resume });
    w.client.subscribe_with("s", topic, &headers).await.ok()?;
    let frame = w.client.expect_frame().await.ok()?;
    assert_eq!(frame.header("event-type"), Some("lockstep.subscribed"));
    let recovered = frame.header("x-recovered") == Some("true");
    let (offset, epoch) = position_of(&frame);
    w.log.push(Seen::Subscribed {
        recovered,
        offset,
        epoch: epoch.clone(),
    });
    Some((recovered, offset, epoch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_through_drops_and_a_killed_node_on_redis() {
    let redis = RedisServer::start();
    let outcome = run(&redis.url()).await;
    eprintln!("redis: {outcome:?}");
    assert!(outcome.resumes >= CLIENTS, "{outcome:?}");
    assert!(outcome.rate >= 1500.0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_through_drops_and_a_killed_node_on_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let outcome = run(&cluster.url()).await;
    eprintln!("redis cluster: {outcome:?}");
    assert!(outcome.resumes >= CLIENTS, "{outcome:?}");
    assert!(outcome.rate >= 1500.0, "{outcome:?}");
}
