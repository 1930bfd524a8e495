//! `loadtest control`: how fast the control API reaches a user's connections on other nodes
//! (DESIGN §15). Each user connects to two nodes (subscribed to their team and an item of
//! it); the call goes to a third node; the time measured is from sending the call to the last
//! of the user's connections showing its effect: the 4011 close for `disconnect`, the
//! `lockstep.unsubscribed` of both subscriptions on both connections for `unsubscribe`.
//! Users go through in turn, `concurrency` at a time.

use crate::client::{Incoming, StompClient};
use crate::stats::Latency;
use crate::target::token_with_scope;
use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use protocol::Command;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// WebSocket URLs of the nodes: users connect to the first two.
    pub urls: Vec<String>,
    /// HTTP base URL of the node the calls go to.
    pub http: String,
    pub secret: String,
    pub users: usize,
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct ControlReport {
    pub scenario: &'static str,
    pub users: usize,
    pub concurrency: usize,
    /// Call sent to both connections closed with 4011.
    pub disconnect: Latency,
    /// Call sent to all four subscriptions ended with `lockstep.unsubscribed`.
    pub unsubscribe: Latency,
    /// Calls answered, and how long the HTTP answer took (it waits out the second of the
    /// call's cutoff, DESIGN §15; the effect does not).
    pub calls: u64,
    pub call_answer: Latency,
}

/// How long one user's effect may take before the run fails.
const EFFECT_TIMEOUT: Duration = Duration::from_secs(10);

/// # Errors
///
/// When a connection, a call or an effect fails: every one must succeed.
pub async fn run(config: &ControlConfig) -> anyhow::Result<ControlReport> {
    if config.urls.len() < 2 {
        bail!("give at least two WebSocket URLs (users connect to the first two)");
    }
    let config = Arc::new(config.clone());
    let http = reqwest::Client::new();
    let control = token_with_scope(&config.secret, "platform", &[], "control")?;
    let mut disconnect = histogram()?;
    let mut unsubscribe = histogram()?;
    let mut answer = histogram()?;
    let mut calls = 0;
    // Users of an earlier run against the same nodes stay revoked (their tokens carry no
    // `iat`): each run has users of its own.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    for op in ["disconnect", "unsubscribe"] {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for i in 0..config.users {
            let (config, http, control, semaphore) = (
                config.clone(),
                http.clone(),
                control.clone(),
                semaphore.clone(),
            );
            tasks.spawn(async move {
                let _permit = semaphore.acquire().await?;
                one(&config, &http, &control, op, &format!("{op}-{run}-{i}")).await
            });
        }
        while let Some(result) = tasks.join_next().await {
            let (effect, answered) = result??;
            let h = if op == "disconnect" {
                &mut disconnect
            } else {
                &mut unsubscribe
            };
            h.saturating_record(micros(effect));
            answer.saturating_record(micros(answered));
            calls += 1;
        }
    }
    Ok(ControlReport {
        scenario: "control",
        users: config.users,
        concurrency: config.concurrency,
        disconnect: Latency::from_micros(&disconnect),
        unsubscribe: Latency::from_micros(&unsubscribe),
        calls,
        call_answer: Latency::from_micros(&answer),
    })
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One user: connect to two nodes, call, wait for the effect on both. Answers (effect, the
/// call's own answer time).
async fn one(
    config: &ControlConfig,
    http: &reqwest::Client,
    control: &str,
    op: &str,
    user: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let token = token_with_scope(&config.secret, user, &[1], "")?;
    let mut clients = Vec::new();
    for url in &config.urls[..2] {
        let (mut client, _) = StompClient::connect(url, &token).await?;
        client.subscribe("team", "/team/t1").await?;
        client.subscribe("item", "/team/t1/items/doc-1").await?;
        clients.push(client);
    }
    let started = Instant::now();
    let request = http.post(format!("{}/api/v1/users/{user}/{op}", config.http));
    let request = if op == "unsubscribe" {
        request.json(&serde_json::json!({"topic": "/team/t1"}))
    } else {
        request
    };
    // The call answers once the second of its cutoff is over; its effect does not wait for
    // that, so the two are awaited together and timed apart.
    let answer = async {
        let response = request.bearer_auth(control).send().await?;
        if response.status() != 200 {
            bail!("{op} {user}: HTTP {}", response.status());
        }
        Ok(started.elapsed())
    };
    let effects = async {
        for client in &mut clients {
            tokio::time::timeout(EFFECT_TIMEOUT, effect(client, op))
                .await
                .with_context(|| format!("{op} {user}: no effect within {EFFECT_TIMEOUT:?}"))??;
        }
        Ok::<_, anyhow::Error>(started.elapsed())
    };
    let (answered, effected) = tokio::join!(answer, effects);
    Ok((effected?, answered?))
}

/// Waits for the call's effect on one connection.
async fn effect(client: &mut StompClient, op: &str) -> anyhow::Result<()> {
    let mut ended = 0;
    loop {
        match client.next().await? {
            Incoming::Closed(close) if op == "disconnect" => {
                let code = close.map(|c| c.0);
                if code != Some(4011) {
                    bail!("closed with {code:?}, not 4011");
                }
                return Ok(());
            }
            Incoming::Closed(close) => bail!("closed ({close:?}) instead of unsubscribed"),
            Incoming::Frame(frame)
                if frame.command == Command::Message
                    && frame.header("event-type") == Some("lockstep.unsubscribed") =>
            {
                ended += 1;
                if ended == 2 {
                    return Ok(());
                }
            }
            Incoming::Frame(frame) if frame.command == Command::Error => {
                bail!("ERROR: {}", crate::client::describe(&frame));
            }
            Incoming::Frame(_) | Incoming::HeartBeat => {}
        }
    }
}
