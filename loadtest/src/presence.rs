//! `loadtest presence`: what presence (DESIGN §14) costs and how fast it answers.
//!
//! One watcher subscribes to a team topic on the last URL; `members` users then join it, one
//! connection each, at `rate` per second, spread over the other URLs (all URLs when only one
//! is given). Members subscribe with `x-presence:false` (they count as present, but 2,000 of
//! them would otherwise each receive every other's join); the watcher gets every
//! `presence.joined`. Reported:
//!
//! - join latency: from a member's `SUBSCRIBE` to the watcher's `presence.joined` of that user
//!   (across nodes when several URLs are given: join on node A, event on node B);
//! - the list: `GET /api/v1/topics/{topic}/presence` read whole (pages of 1,000), `lists` times
//!   one after another, with its latency, and whether the count and users are right;
//! - with `--redis`, the Redis commands (those inside scripts included) and script calls per
//!   second while the members are only held (what the nodes' refreshes cost), read from
//!   `INFO commandstats` before and after `hold`;
//! - with `--server-pid`, that process's RSS before the members joined and after, per member.

use crate::client::{Incoming, OpenOptions, StompClient};
use crate::stats::Latency;
use anyhow::{Context as _, bail};
use fred::interfaces::ClientLike as _;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// WebSocket URLs; the watcher uses the last, members the others (or the only one).
    pub urls: Vec<String>,
    /// HTTP base URL to read the list from.
    pub http: String,
    pub secret: String,
    pub members: usize,
    /// Joins per second.
    pub rate: u32,
    /// Full reads of the list.
    pub lists: usize,
    /// How long the members are held after joining, to count Redis commands.
    pub hold: Duration,
    pub redis: Option<String>,
    pub server_pid: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct PresenceReport {
    pub scenario: &'static str,
    pub members: usize,
    pub rate: u32,
    pub nodes: usize,
    pub joined: usize,
    pub join_latency: Latency,
    pub list_latency: Latency,
    /// Every list read counted `members` + 1 (the watcher) and named each user once.
    pub list_correct: bool,
    pub held_s: f64,
    /// Commands Redis ran per second while the members were held, those inside scripts
    /// included.
    pub redis_commands_per_sec: Option<f64>,
    /// Script calls (one per topic update) per second while held.
    pub redis_scripts_per_sec: Option<f64>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_member_kib: Option<f64>,
}

const TOPIC: &str = "/team/t0";
const WATCHER: &str = "presence-watcher";

/// # Errors
///
/// When a connection, a subscription or a list read fails, or the watcher misses a join.
pub async fn run(config: &PresenceConfig) -> anyhow::Result<PresenceReport> {
    let (watcher_url, member_urls) = match config.urls.split_last() {
        Some((last, [])) => (last, std::slice::from_ref(last)),
        Some((last, rest)) => (last, rest),
        None => bail!("give at least one --url"),
    };
    let rss_before = config.server_pid.map(crate::idle::rss_kib).transpose()?;
    let token = |user: &str| crate::target::token_with_scope(&config.secret, user, &[0], "");
    let (mut watcher, _) = StompClient::connect_with(
        watcher_url,
        &OpenOptions::default(),
        &token(WATCHER)?,
        "0,0",
    )
    .await
    .context("watcher")?;
    watcher.subscribe("w", TOPIC).await.context("watcher")?;
    // Users still present from an earlier run (a node stopped within the leave delay keeps its
    // entries until the delay is over) would join silently: the watcher would wait for them.
    let http = reqwest::Client::new();
    let reader = token(WATCHER)?;
    let path = format!(
        "{}/api/v1/topics/%2Fteam%2Ft0/presence",
        config.http.trim_end_matches('/')
    );
    let (_, before) = read_list(&http, &path, &reader).await?;
    let others = before.iter().filter(|u| *u != WATCHER).count();
    if others > 0 {
        bail!(
            "{TOPIC} already has {others} users present (left by an earlier run within the leave \
             delay?): give each run a fresh Redis"
        );
    }

    // When each member sent its SUBSCRIBE; the watcher matches the joins against it.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let sent = sent.clone();
        let members = config.members;
        tokio::spawn(async move {
            let mut latency =
                Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram");
            let mut seen = 0;
            while seen < members {
                let frame = match tokio::time::timeout(Duration::from_secs(30), watcher.next())
                    .await
                    .context("the watcher waited 30 s for a join")??
                {
                    Incoming::Frame(frame) => frame,
                    Incoming::HeartBeat => continue,
                    Incoming::Closed(close) => bail!("the watcher was closed: {close:?}"),
                };
                let arrived = Instant::now();
                if frame.header("event-type") != Some("presence.joined") {
                    continue;
                }
                let Some(user) = frame
                    .header("x-key")
                    .and_then(|k| k.strip_prefix("presence:"))
                else {
                    bail!("a presence.joined without its key");
                };
                if user == WATCHER {
                    continue;
                }
                let Some(at) = sent.lock().get(user).copied() else {
                    bail!("{user} joined before it subscribed");
                };
                latency.saturating_record(arrived.duration_since(at).as_micros() as u64);
                seen += 1;
            }
            Ok((watcher, latency))
        })
    };

    let mut members = JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(config.rate.max(1)));
    let mut tick = tokio::time::interval(gap);
    for i in 0..config.members {
        tick.tick().await;
        let url = member_urls[i % member_urls.len()].clone();
        let user = format!("m{i}");
        let token = token(&user)?;
        let sent = sent.clone();
        members.spawn(async move {
            let options = OpenOptions {
                read_buffer: Some(4096),
                ..OpenOptions::default()
            };
            let (mut client, _) = StompClient::connect_with(&url, &options, &token, "0,0").await?;
            sent.lock().insert(user, Instant::now());
            client
                .subscribe_with("s", TOPIC, &[("x-presence", "false")])
                .await?;
            anyhow::Ok(client)
        });
    }
    let mut held = Vec::with_capacity(config.members);
    while let Some(member) = members.join_next().await {
        held.push(member??);
    }
    let (watcher, join_latency) = watch.await??;

    let mut list = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut list_correct = true;
    for _ in 0..config.lists {
        let start = Instant::now();
        let (count, users) = read_list(&http, &path, &reader).await?;
        list.saturating_record(start.elapsed().as_micros() as u64);
        list_correct &= count == config.members as u64 + 1 && users.len() == config.members + 1;
    }

    let redis_before = match &config.redis {
        Some(url) => Some((redis_commands(url).await?, Instant::now())),
        None => None,
    };
    tokio::time::sleep(config.hold).await;
    let (redis_commands_per_sec, redis_scripts_per_sec) = match (&config.redis, redis_before) {
        (Some(url), Some(((before, scripts_before), at))) => {
            let (after, scripts_after) = redis_commands(url).await?;
            let secs = at.elapsed().as_secs_f64();
            // Minus the INFO of the first reading.
            (
                Some((after - before).saturating_sub(1) as f64 / secs),
                Some((scripts_after - scripts_before) as f64 / secs),
            )
        }
        _ => (None, None),
    };
    let rss_after = config.server_pid.map(crate::idle::rss_kib).transpose()?;
    drop(held);
    drop(watcher);
    Ok(PresenceReport {
        scenario: "presence",
        members: config.members,
        rate: config.rate,
        nodes: config.urls.len(),
        joined: join_latency.len() as usize,
        join_latency: Latency::from_micros(&join_latency),
        list_latency: Latency::from_micros(&list),
        list_correct,
        held_s: config.hold.as_secs_f64(),
        redis_commands_per_sec,
        redis_scripts_per_sec,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_member_kib: rss_before
            .zip(rss_after)
            .map(|(b, a)| (a.saturating_sub(b)) as f64 / config.members.max(1) as f64),
    })
}

/// Reads the whole list, pages of 1,000: the count the last page gave, and every user named.
async fn read_list(
    http: &reqwest::Client,
    path: &str,
    token: &str,
) -> anyhow::Result<(u64, Vec<String>)> {
    let mut users = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = http
            .get(path)
            .bearer_auth(token)
            .query(&[("limit", "1000")]);
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let page: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
        users.extend(
            page["users"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u["user"].as_str().map(str::to_owned)),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok((page["count"].as_u64().unwrap_or(0), users)),
        }
    }
}

/// Commands Redis has run (`INFO commandstats`, summed, so commands inside scripts count
/// too; `INFO` itself included), and of them the script calls (`EVALSHA`, `EVAL`).
async fn redis_commands(url: &str) -> anyhow::Result<(u64, u64)> {
    let client =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(url)?).build()?;
    client.init().await?;
    let info: String = client
        .info(Some(fred::types::InfoKind::CommandStats))
        .await?;
    client.quit().await?;
    let calls = |line: &str| {
        line.split("calls=")
            .nth(1)
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = info.lines().map(calls).sum();
    let scripts = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .map(calls)
        .sum();
    Ok((total, scripts))
}
