//! `loadtest resume`: how long resuming takes when many clients resume at once (DESIGN §12).
//!
//! `missed` events are published to one team topic over HTTP; then `clients` connections,
//! all open first, each send `SUBSCRIBE` with `x-stream-offset:offset=<top - missed>` at the
//! same moment. The latency of one client is from sending its `SUBSCRIBE` to receiving the last
//! replayed event (offset `top`), so it covers the history read, the merge and writing every
//! replayed frame.
//!
//! With `snapshot`, `missed` is a number of keys instead: one event is published for each key
//! (`x-key`), and the clients subscribe with `x-stream-offset:snapshot`; a client's latency is
//! to its last state frame (DESIGN §13).

use crate::client::StompClient;
use crate::stats::Latency;
use anyhow::Context as _;
use hdrhistogram::Histogram;
use protocol::{Command, Frame};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct ResumeConfig {
    /// WebSocket URLs; client i connects to URL i mod n.
    pub ws: Vec<String>,
    /// The HTTP base URL events are published through.
    pub http: String,
    pub secret: String,
    pub clients: usize,
    /// Events each client missed.
    pub missed: u64,
    pub payload: usize,
    /// Keys and `snapshot` instead of missed events and `offset=`.
    pub snapshot: bool,
}

#[derive(Debug, Serialize)]
pub struct ResumeReport {
    pub scenario: &'static str,
    pub clients: usize,
    pub missed: u64,
    pub recovered: u64,
    pub failed: u64,
    /// Why resumes failed, with how many failed that way (`x-recovered:false`, an `ERROR`'s
    /// message, a close code, a timeout).
    pub failures: BTreeMap<String, u64>,
    /// From `SUBSCRIBE` to the last replayed event.
    pub latency: Latency,
    pub elapsed_s: f64,
}

/// # Errors
///
/// Setup errors (publishing, tokens); failed resumes are counted.
pub async fn run(config: &ResumeConfig) -> anyhow::Result<ResumeReport> {
    let topic = "/team/t0";
    let publisher =
        crate::target::token_with_scope(&config.secret, "loadtest-publisher", &[0], "publish")?;
    let http = reqwest::Client::new();
    let pad = "x".repeat(config.payload);
    let mut answer = serde_json::Value::Null;
    let mut left = config.missed;
    while left > 0 {
        let n = left.min(100);
        let events: Vec<_> = (0..n)
            .map(|i| {
                let mut event = serde_json::json!({"topic": topic, "type": "load.resume", "data": {"i": i, "pad": pad}});
                if config.snapshot {
                    event["key"] = serde_json::json!(format!("k{}", config.missed - left + i));
                }
                event
            })
            .collect();
        let response = http
            .post(format!("{}/api/v1/publish/batch", config.http))
            .bearer_auth(&publisher)
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().as_u16() == 202,
            "publish: {}",
            response.status()
        );
        answer = response.json().await?;
        left -= n;
    }
    let last = &answer["events"][answer["events"]
        .as_array()
        .map_or(0, Vec::len)
        .saturating_sub(1)];
    let top = last["offset"]
        .as_u64()
        .context("no offset in the publish answer")?;
    let epoch = last["epoch"].as_str().context("no epoch")?.to_owned();
    let from = top - config.missed;

    let token = crate::target::token(&config.secret, "loadtest-resume", &[0])?;
    let barrier = Arc::new(Barrier::new(config.clients));
    let mut tasks = JoinSet::new();
    for i in 0..config.clients {
        let (url, token, epoch, barrier) = (
            config.ws[i % config.ws.len()].clone(),
            token.clone(),
            epoch.clone(),
            barrier.clone(),
        );
        let (snapshot, keys) = (config.snapshot, config.missed);
        tasks.spawn(async move {
            let connected = StompClient::connect(&url, &token).await;
            // Everyone waits for everyone, connected or not, so the resumes start together.
            barrier.wait().await;
            let (mut client, _) = connected.map_err(|e| format!("connect: {e}"))?;
            let frame = if snapshot {
                Frame::new(Command::Subscribe)
                    .with_header("id", "r")
                    .with_header("destination", topic)
                    .with_header("x-stream-offset", "snapshot")
            } else {
                Frame::new(Command::Subscribe)
                    .with_header("id", "r")
                    .with_header("destination", topic)
                    .with_header("x-stream-offset", format!("offset={from}"))
                    .with_header("x-stream-epoch", epoch.as_str())
            };
            let mut state = 0;
            let begun = Instant::now();
            client
                .send(&frame)
                .await
                .map_err(|e| format!("send: {e}"))?;
            loop {
                let frame = client
                    .expect_frame_within(Duration::from_secs(60))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                if frame.command == Command::Error {
                    return Err(format!(
                        "ERROR {}: {}",
                        frame.header("message").unwrap_or_default(),
                        String::from_utf8_lossy(&frame.body)
                    ));
                }
                if frame.header("event-type") == Some("lockstep.subscribed") {
                    if frame.header("x-recovered") != Some("true") {
                        return Err("x-recovered:false".to_owned());
                    }
                    continue;
                }
                if snapshot {
                    if frame.header("x-snapshot") == Some("true") {
                        state += 1;
                    }
                    if state >= keys {
                        return Ok(begun.elapsed());
                    }
                    continue;
                }
                let offset: u64 = frame
                    .header("x-stream-offset")
                    .and_then(|o| o.parse().ok())
                    .ok_or("a MESSAGE without x-stream-offset")?;
                if offset >= top {
                    return Ok(begun.elapsed());
                }
            }
        });
    }
    let started = Instant::now();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 2)?;
    let (mut recovered, mut failed) = (0, 0);
    let mut failures = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        match result.map_err(|e| format!("task: {e}")).flatten() {
            Ok(took) => {
                recovered += 1;
                histogram.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
            }
            Err(why) => {
                failed += 1;
                *failures.entry(why).or_default() += 1;
            }
        }
    }
    Ok(ResumeReport {
        scenario: if config.snapshot {
            "snapshot"
        } else {
            "resume"
        },
        clients: config.clients,
        missed: config.missed,
        recovered,
        failed,
        failures,
        latency: Latency::from_micros(&histogram),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}
