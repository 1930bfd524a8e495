//! `loadtest idle`: many connections holding subscriptions, doing nothing but heart-beats;
//! how many stay open, and what they cost the server in resident memory.

use crate::target::{Target, TopicKind};
use crate::wire::WsMessage;
use anyhow::Context as _;
use serde::Serialize;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct IdleConfig {
    pub connections: usize,
    /// Subscriptions per connection: own user topic, then a team topic, then `/global`, then
    /// more team topics.
    pub subscriptions: usize,
    pub hold: Duration,
    pub heart_beat_ms: u32,
    pub server_pid: Option<u32>,
    pub sources: Vec<IpAddr>,
    pub connect_concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub target: &'static str,
    pub connections: usize,
    pub subscriptions: usize,
    pub held_s: f64,
    pub opened: u64,
    pub failed_to_open: u64,
    pub still_open: u64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_connection_kib: Option<f64>,
}

/// # Errors
///
/// Never for individual connection failures (they are counted); only for setup errors.
pub async fn run(target: &Target, config: &IdleConfig) -> anyhow::Result<IdleReport> {
    let rss_before = config.server_pid.map(rss_kib).transpose()?;
    let open = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(
        config.connect_concurrency.max(1),
    ));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(config.connections.max(1));
    let stop = tokio::sync::watch::Sender::new(false);
    let mut tasks = JoinSet::new();
    for i in 0..config.connections {
        let target = target.clone();
        let source = (!config.sources.is_empty()).then(|| config.sources[i % config.sources.len()]);
        let (semaphore, open, closed, failed, ready_tx, mut stop) = (
            semaphore.clone(),
            open.clone(),
            closed.clone(),
            failed.clone(),
            ready_tx.clone(),
            stop.subscribe(),
        );
        let subscriptions = config.subscriptions;
        let heart_beat = Duration::from_millis(config.heart_beat_ms.into());
        let heart_beat_ms = config.heart_beat_ms;
        tasks.spawn(async move {
            let team = i % 100;
            let setup = async {
                let _permit = semaphore.acquire().await?;
                let teams: Vec<usize> = (0..subscriptions).map(|k| (team + k) % 100).collect();
                let mut ws = target.open(i, &teams, source, heart_beat_ms, 512).await?;
                for (k, &extra_team) in teams.iter().enumerate() {
                    let destination = match k {
                        0 => target.destination(TopicKind::User, i),
                        1 => target.destination(TopicKind::Team, team),
                        2 => target.destination(TopicKind::Global, 0),
                        _ => target.destination(TopicKind::Team, extra_team),
                    };
                    target.subscribe(&mut ws, k, &destination).await?;
                }
                Ok::<_, anyhow::Error>(ws)
            };
            let mut ws = match setup.await {
                Ok(ws) => ws,
                Err(err) => {
                    tracing::debug!(%err, "connection failed");
                    failed.fetch_add(1, Ordering::Relaxed);
                    let _ = ready_tx.send(()).await;
                    return;
                }
            };
            open.fetch_add(1, Ordering::Relaxed);
            let _ = ready_tx.send(()).await;
            let mut beat = tokio::time::interval(heart_beat);
            beat.tick().await;
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = beat.tick() => {
                        if ws.send_text(b"\n").await.is_err() {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    message = ws.next() => match message {
                        Ok(WsMessage::Data(_)) => {}
                        Ok(WsMessage::Closed(_)) | Err(_) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
        });
    }
    drop(ready_tx);
    for _ in 0..config.connections {
        ready_rx
            .recv()
            .await
            .context("connection tasks ended early")?;
    }
    let started = Instant::now();
    tokio::time::sleep(config.hold).await;
    let rss_after = config.server_pid.map(rss_kib).transpose()?;
    let opened = open.load(Ordering::Relaxed);
    let still_open = opened - closed.load(Ordering::Relaxed);
    let held_s = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let per_connection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => {
            Some(((a.saturating_sub(b)) as f64 / opened as f64 * 100.0).round() / 100.0)
        }
        _ => None,
    };
    Ok(IdleReport {
        scenario: "idle",
        target: target.name(),
        connections: config.connections,
        subscriptions: config.subscriptions,
        held_s: (held_s * 10.0).round() / 10.0,
        opened,
        failed_to_open: failed.load(Ordering::Relaxed),
        still_open,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_kib: per_connection,
    })
}

/// `VmRSS` of a process, KiB.
///
/// # Errors
///
/// When `/proc/PID/status` cannot be read.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}
