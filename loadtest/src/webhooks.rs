//! `loadtest webhooks`: how fast occupancy webhooks reach a local receiver (DESIGN §15).
//!
//! The scenario runs the receiver itself, on the address the node's `webhooks.urls` points at.
//! First a reference: this process POSTs signed bodies of one event each to that receiver, one
//! at a time, as fast as it answers (what a sender without a queue could do). Then `topics`
//! item topics are occupied, `per_connection` subscriptions per connection, `concurrency`
//! connections at a time; each is one `topic.occupied` the receiver must get. Lag is the
//! receiver's clock minus the event's `ts` (the node's clock when presence decided it; one
//! machine). Every signature is verified with the configured secret; a bad one fails the run.
//!
//! Then a backlog: the receiver answers 503 while another `topics` topics are occupied and
//! queued (the node's `lockstep_webhook_events_total` says when), then 200; the drain rate is
//! measured from the first accepted delivery of the backlog to its last event.

use crate::client::StompClient;
use crate::stats::Latency;
use crate::target::token_with_scope;
use anyhow::{Context as _, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// WebSocket URL of the node.
    pub url: String,
    /// HTTP base URL of the node (its `/metrics`).
    pub http: String,
    /// Where the receiver listens (the node's `webhooks.urls` is `http://{listen}/hook`).
    pub listen: String,
    pub jwt_secret: String,
    /// The node's `webhooks.secret`.
    pub webhook_secret: String,
    pub topics: usize,
    pub per_connection: usize,
    pub concurrency: usize,
    /// Bodies the reference sends.
    pub reference: usize,
}

#[derive(Debug, Serialize)]
pub struct WebhooksReport {
    pub scenario: &'static str,
    pub topics: usize,
    /// The reference: sequential signed POSTs of one event from this process.
    pub reference_posts_per_sec: f64,
    pub reference_latency: Latency,
    /// Occupied events received (each topic once), and the deliveries they came in.
    pub events: usize,
    pub deliveries: usize,
    pub duplicates: usize,
    /// Events per second from the first subscription to the last event received.
    pub events_per_sec: f64,
    pub deliveries_per_sec: f64,
    /// Lockstep's deliveries per second over the reference's POSTs per second.
    pub deliveries_vs_reference: f64,
    /// From the event's `ts` to its arrival at the receiver.
    pub lag: Latency,
    /// The backlog: events queued while the receiver answered 503, drained afterwards.
    pub backlog_events: usize,
    pub backlog_deliveries: usize,
    /// From the first accepted delivery of the backlog to its last event.
    pub backlog_drain_ms: f64,
    pub backlog_events_per_sec: f64,
    pub backlog_deliveries_per_sec: f64,
}

#[derive(Debug, Default)]
struct Received {
    /// Delivery ids seen.
    ids: HashSet<i64>,
    duplicates: usize,
    /// Topics occupied so far.
    topics: HashSet<String>,
    deliveries: usize,
    lag: Option<Histogram<u64>>,
    last: Option<Instant>,
    /// The first accepted delivery (reset for the backlog phase).
    first: Option<Instant>,
    bad_signatures: usize,
    /// Answer 503 (the backlog phase's outage).
    failing: bool,
    refused: usize,
}

#[derive(Debug)]
struct Receiver {
    secret: Vec<u8>,
    received: Mutex<Received>,
    changed: Notify,
}

fn unix_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let now_ms = unix_ms();
    let signature = headers
        .get(api::webhooks::sign::HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let valid = api::webhooks::sign::verify(
        &receiver.secret,
        signature,
        &body,
        u64::try_from(now_ms / 1000).unwrap_or(0),
        api::webhooks::sign::DEFAULT_TOLERANCE,
    )
    .is_ok();
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut r = receiver.received.lock();
    if !valid {
        r.bad_signatures += 1;
    }
    if r.failing {
        r.refused += 1;
        drop(r);
        receiver.changed.notify_waiters();
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if r.first.is_none() {
        r.first = Some(Instant::now());
    }
    let id = parsed["id"].as_i64().unwrap_or(-1);
    if !r.ids.insert(id) {
        r.duplicates += 1;
    } else {
        r.deliveries += 1;
        for event in parsed["events"].as_array().into_iter().flatten() {
            if event["type"] == "topic.occupied"
                && let Some(topic) = event["topic"].as_str()
                && r.topics.insert(topic.to_owned())
            {
                let lag = now_ms - event["ts"].as_i64().unwrap_or(now_ms);
                if let Some(h) = r.lag.as_mut() {
                    h.saturating_record(u64::try_from(lag.max(0) * 1000).unwrap_or(0).max(1));
                }
            }
        }
    }
    r.last = Some(Instant::now());
    drop(r);
    receiver.changed.notify_waiters();
    StatusCode::OK
}

/// # Errors
///
/// When the receiver cannot bind, a connection fails, a signature does not verify, or the
/// events do not all arrive within a minute of the last subscription.
pub async fn run(config: &WebhooksConfig) -> anyhow::Result<WebhooksReport> {
    let receiver = Arc::new(Receiver {
        secret: config.webhook_secret.as_bytes().to_vec(),
        received: Mutex::new(Received {
            lag: Some(Histogram::new_with_bounds(1, 600_000_000, 2)?),
            ..Received::default()
        }),
        changed: Notify::new(),
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .route(
            "/reference",
            axum::routing::post(|| async { StatusCode::OK }),
        )
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding the receiver on {}", config.listen))?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The reference: the same kind of body, signed, one POST at a time.
    let http = reqwest::Client::new();
    let mut reference = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
    let started = Instant::now();
    for i in 0..config.reference {
        let body = format!(
            r#"{{"id":{i},"ts":{},"events":[{{"type":"topic.occupied","topic":"/team/t1/items/r{i}","ts":{},"data":{{}}}}]}}"#,
            unix_ms(),
            unix_ms()
        );
        let t = u64::try_from(unix_ms() / 1000).unwrap_or(0);
        let signature = api::webhooks::sign::sign(&receiver.secret, t, body.as_bytes());
        let one = Instant::now();
        let answer = http
            .post(format!("http://{}/reference", config.listen))
            .header("content-type", "application/json")
            .header(api::webhooks::sign::HEADER, signature)
            .body(body)
            .send()
            .await?;
        if !answer.status().is_success() {
            bail!("the reference receiver answered {}", answer.status());
        }
        reference.saturating_record(micros(one.elapsed()));
    }
    let reference_rate = config.reference as f64 / started.elapsed().as_secs_f64();

    // Live: occupy the topics, every event delivered as it comes.
    let started = Instant::now();
    let clients = occupy(config, "live").await?;
    wait_for_topics(&receiver, config.topics).await?;
    drop(clients);
    let (events, deliveries, duplicates, elapsed, lag) = {
        let r = receiver.received.lock();
        let elapsed = r
            .last
            .map_or(started.elapsed(), |l| l.duration_since(started))
            .as_secs_f64();
        (
            r.topics.len(),
            r.deliveries,
            r.duplicates,
            elapsed,
            r.lag.as_ref().map(Latency::from_micros).unwrap_or_default(),
        )
    };
    let deliveries_per_sec = deliveries as f64 / elapsed;

    // The backlog: queued while the receiver is down, drained once it is back.
    let queued_before = events_queued(&config.http).await?;
    {
        let mut r = receiver.received.lock();
        r.failing = true;
        r.first = None;
    }
    let clients = occupy(config, "backlog").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while events_queued(&config.http).await? < queued_before + config.topics as f64 {
        if Instant::now() > deadline {
            bail!("the backlog's events were not queued within a minute");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries_before = {
        let mut r = receiver.received.lock();
        r.failing = false;
        r.deliveries
    };
    wait_for_topics(&receiver, 2 * config.topics).await?;
    drop(clients);
    let r = receiver.received.lock();
    if r.bad_signatures > 0 {
        bail!("{} deliveries had a bad signature", r.bad_signatures);
    }
    let drain = match (r.first, r.last) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64().max(1e-6),
        _ => bail!("the backlog was not delivered"),
    };
    let backlog_deliveries = r.deliveries - deliveries_before;
    Ok(WebhooksReport {
        scenario: "webhooks",
        topics: config.topics,
        reference_posts_per_sec: round(reference_rate),
        reference_latency: Latency::from_micros(&reference),
        events,
        deliveries,
        duplicates: duplicates.max(r.duplicates),
        events_per_sec: round(events as f64 / elapsed),
        deliveries_per_sec: round(deliveries_per_sec),
        deliveries_vs_reference: round(deliveries_per_sec / reference_rate),
        lag,
        backlog_events: config.topics,
        backlog_deliveries,
        backlog_drain_ms: round(drain * 1000.0),
        backlog_events_per_sec: round(config.topics as f64 / drain),
        backlog_deliveries_per_sec: round(backlog_deliveries as f64 / drain),
    })
}

/// Opens connections subscribing `config.topics` fresh item topics; they stay open (closing
/// would vacate the topics).
async fn occupy(config: &WebhooksConfig, phase: &str) -> anyhow::Result<Vec<StompClient>> {
    let token = token_with_scope(&config.jwt_secret, "webhook-load", &[1], "")?;
    let per = config.per_connection.max(1);
    let connections = config.topics.div_ceil(per);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let run = unix_ms();
    for c in 0..connections {
        let (url, token, semaphore) = (config.url.clone(), token.clone(), semaphore.clone());
        let topics: Vec<String> = (c * per..((c + 1) * per).min(config.topics))
            .map(|i| format!("/team/t1/items/hook-{phase}-{run}-{i}"))
            .collect();
        tasks.spawn(async move {
            let _permit = semaphore.acquire().await?;
            let (mut client, _) = StompClient::connect(&url, &token).await?;
            for (i, topic) in topics.iter().enumerate() {
                client.subscribe(&format!("s{i}"), topic).await?;
            }
            anyhow::Ok(client)
        });
    }
    let mut clients = Vec::new();
    while let Some(result) = tasks.join_next().await {
        clients.push(result??);
    }
    Ok(clients)
}

/// Waits until the receiver has `n` distinct occupied topics; fails after a minute.
async fn wait_for_topics(receiver: &Receiver, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let changed = receiver.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if receiver.received.lock().topics.len() >= n {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, changed).await.is_err() {
            bail!(
                "only {} of {n} occupied events arrived within a minute",
                receiver.received.lock().topics.len()
            );
        }
    }
}

/// The node's `lockstep_webhook_events_total` (all sources).
async fn events_queued(http: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{http}/metrics"))
        .await?
        .text()
        .await?;
    Ok(crate::stats::metric_sum(
        &text,
        "lockstep_webhook_events_total",
    ))
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}
