//! `loadtest connect`: how fast connections are set up: TCP, WebSocket upgrade, `CONNECT`, and
//! one `SUBSCRIBE` confirmed by its receipt.

use crate::stats::Latency;
use crate::target::{Target, TopicKind};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct ConnectConfig {
    pub connections: usize,
    pub concurrency: usize,
    pub sources: Vec<IpAddr>,
}

#[derive(Debug, Serialize)]
pub struct ConnectReport {
    pub scenario: &'static str,
    pub target: &'static str,
    pub connections: usize,
    pub concurrency: usize,
    pub succeeded: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub connections_per_sec: f64,
    pub setup_latency: Latency,
}

/// # Errors
///
/// Only for setup errors; failed connections are counted.
pub async fn run(target: &Target, config: &ConnectConfig) -> anyhow::Result<ConnectReport> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..config.connections {
        let (target, semaphore) = (target.clone(), semaphore.clone());
        let source = (!config.sources.is_empty()).then(|| config.sources[i % config.sources.len()]);
        tasks.spawn(async move {
            let _permit = semaphore.acquire().await.ok()?;
            let begun = Instant::now();
            let mut ws = target.open(i, &[], source, 0, 1024).await.ok()?;
            target
                .subscribe(&mut ws, 0, &target.destination(TopicKind::User, i))
                .await
                .ok()?;
            // Keep the connection until the run ends, as real clients would.
            Some((begun.elapsed(), ws))
        });
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut held = Vec::with_capacity(config.connections);
    while let Some(result) = tasks.join_next().await {
        match result.ok().flatten() {
            Some((took, ws)) => {
                ok += 1;
                histogram
                    .saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
                held.push(ws);
            }
            None => failed += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(held);
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    Ok(ConnectReport {
        scenario: "connect",
        target: target.name(),
        connections: config.connections,
        concurrency: config.concurrency,
        succeeded: ok,
        failed,
        elapsed_s: (elapsed * 100.0).round() / 100.0,
        connections_per_sec: (ok as f64 / elapsed).round(),
        setup_latency: Latency {
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p90_ms: ms(histogram.value_at_quantile(0.9)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        },
    })
}
