//! `loadtest locks` and `loadtest presign`: request rate and latency of the HTTP API at a given
//! concurrency, closed loop (each worker sends its next request when the previous answered).
//! `loadtest locks --redis` runs the same acquire+release pattern as `SET key val NX PX` + `DEL`
//! against Redis, the raw-store reference.

use crate::stats::Latency;
use crate::target::token_with_scope;
use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Debug, Serialize)]
pub struct ApiReport {
    pub scenario: &'static str,
    pub target: String,
    pub concurrency: usize,
    pub duration_s: f64,
    /// Completed operations (an acquire+release pair, or one presign request).
    pub operations: u64,
    pub errors: u64,
    pub operations_per_sec: f64,
    /// URLs signed per second (presign only).
    pub urls_per_sec: Option<f64>,
    pub latency: Latency,
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    Latency {
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Runs `operation(worker)` in `concurrency` workers for `duration`; each call is one timed
/// operation returning whether it succeeded.
pub(crate) async fn closed_loop<F, Fut>(
    concurrency: usize,
    duration: Duration,
    operation: F,
) -> anyhow::Result<(u64, u64, f64, Histogram<u64>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let operation = Arc::new(operation);
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let operation = operation.clone();
        workers.spawn(async move {
            let mut h =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("histogram bounds");
            let (mut ok, mut failed) = (0u64, 0u64);
            while started.elapsed() < duration {
                let begun = Instant::now();
                if operation(w).await {
                    ok += 1;
                    h.saturating_record(
                        u64::try_from(begun.elapsed().as_micros())
                            .unwrap_or(u64::MAX)
                            .max(1),
                    );
                } else {
                    failed += 1;
                }
            }
            (ok, failed, h)
        });
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
    let (mut ok, mut failed) = (0, 0);
    while let Some(result) = workers.join_next().await {
        let (o, f, h) = result?;
        ok += o;
        failed += f;
        total.add(&h)?;
    }
    // A run where nothing succeeded measured nothing: say so instead of printing a zero rate.
    anyhow::ensure!(
        ok > 0,
        "all {failed} operations failed: is the server running and configured for this scenario?"
    );
    Ok((ok, failed, started.elapsed().as_secs_f64(), total))
}

pub(crate) fn report(
    scenario: &'static str,
    target: String,
    concurrency: usize,
    run: (u64, u64, f64, Histogram<u64>),
    urls_per_op: Option<u64>,
) -> ApiReport {
    let (ok, errors, secs, h) = run;
    let per_sec = (ok as f64 / secs * 10.0).round() / 10.0;
    ApiReport {
        scenario,
        target,
        concurrency,
        duration_s: (secs * 100.0).round() / 100.0,
        operations: ok,
        errors,
        operations_per_sec: per_sec,
        urls_per_sec: urls_per_op.map(|n| (per_sec * n as f64).round()),
        latency: latency(&h),
    }
}

/// Acquire+release pairs against Lockstep's HTTP API (`urls`: one or more nodes; worker `w`
/// uses node `w mod n` and its own item, so pairs never contend).
///
/// # Errors
///
/// On setup failure.
pub async fn locks(
    urls: Vec<String>,
    secret: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<ApiReport> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let tokens: Vec<String> = (0..concurrency)
        .map(|w| token_with_scope(secret, &format!("lt{w}"), &[0], "locks"))
        .collect::<anyhow::Result<_>>()?;
    let tokens = Arc::new(tokens);
    let nodes = Arc::new(urls.clone());
    let run = closed_loop(concurrency, duration, move |w| {
        let (client, tokens, nodes) = (client.clone(), tokens.clone(), nodes.clone());
        async move {
            let base = &nodes[w % nodes.len()];
            let url = format!("{base}/api/v1/teams/t0/items/lt-{w}/lock");
            let Ok(response) = client.post(&url).bearer_auth(&tokens[w]).send().await else {
                return false;
            };
            if !response.status().is_success() {
                return false;
            }
            let Ok(lock) = response.json::<serde_json::Value>().await else {
                return false;
            };
            let token = lock["token"].as_i64().unwrap_or(0);
            client
                .delete(&url)
                .bearer_auth(&tokens[w])
                .json(&serde_json::json!({"token": token}))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 204)
        }
    })
    .await?;
    Ok(report(
        "locks",
        format!("lockstep x{}", urls.len()),
        concurrency,
        run,
        None,
    ))
}

/// The same pattern on Redis: `SET lt:{w} v NX PX 60000`, then `DEL lt:{w}`.
///
/// # Errors
///
/// When Redis cannot be reached.
pub async fn locks_redis(
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<ApiReport> {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(url)?).build()?;
    client.init().await.context("connecting to Redis")?;
    let run = closed_loop(concurrency, duration, move |w| {
        let client = client.clone();
        async move {
            let key = format!("lt:{w}");
            let set: Result<Option<String>, _> = client
                .set(
                    &key,
                    "v",
                    Some(Expiration::PX(60_000)),
                    Some(SetOptions::NX),
                    false,
                )
                .await;
            if !matches!(set, Ok(Some(_))) {
                return false;
            }
            let deleted: Result<i64, _> = client.del(&key).await;
            deleted.is_ok_and(|n| n == 1)
        }
    })
    .await?;
    Ok(report(
        "locks",
        "redis SET NX PX + DEL".to_owned(),
        concurrency,
        run,
        None,
    ))
}

/// Presign requests against the HTTP API: single GET URLs, or batches of `batch`.
///
/// # Errors
///
/// On setup failure.
pub async fn presign(
    url: String,
    secret: &str,
    concurrency: usize,
    duration: Duration,
    batch: usize,
) -> anyhow::Result<ApiReport> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let token = Arc::new(token_with_scope(secret, "presigner", &[0], "presign")?);
    let body = (batch > 1).then(|| {
        let objects: Vec<serde_json::Value> = (0..batch)
            .map(|i| serde_json::json!({"item": "seq-1", "name": format!("frames/{i:06}.pcd")}))
            .collect();
        serde_json::json!({"method": "GET", "objects": objects}).to_string()
    });
    let body = Arc::new(body);
    let base = Arc::new(url);
    let run = closed_loop(concurrency, duration, move |w| {
        let (client, token, body, base) =
            (client.clone(), token.clone(), body.clone(), base.clone());
        async move {
            let request = match body.as_ref() {
                Some(body) => client
                    .post(format!("{base}/api/v1/teams/t0/presign/batch"))
                    .body(body.clone()),
                None => client
                    .post(format!("{base}/api/v1/teams/t0/items/seq-1/presign"))
                    .body(format!(r#"{{"method":"GET","name":"frames/{w:06}.pcd"}}"#)),
            };
            request
                .bearer_auth(token.as_str())
                .header("content-type", "application/json")
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await?;
    Ok(report(
        "presign",
        format!("lockstep batch={batch}"),
        concurrency,
        run,
        Some(batch.max(1) as u64),
    ))
}

/// Signing itself, on one core: `count` GET URLs signed by the same code the API uses.
///
/// # Errors
///
/// When signing fails.
pub fn sign_on_one_core(count: u64, batch: usize) -> anyhow::Result<ApiReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let storage = api::presign::Storage::new(api::presign::StorageConfig {
            endpoint: Some("http://127.0.0.1:9000".to_owned()),
            region: "us-east-1".to_owned(),
            bucket: "items".to_owned(),
            path_style: true,
            access_key_id: Some("AKIDEXAMPLE".to_owned()),
            secret_access_key: Some("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned()),
            ..api::presign::StorageConfig::default()
        })
        .await;
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
        let started = Instant::now();
        let batches = count / batch.max(1) as u64;
        for b in 0..batches {
            let begun = Instant::now();
            for i in 0..batch.max(1) {
                let url = storage
                    .sign_get(
                        "t0",
                        "seq-1",
                        &format!("frames/{:06}.pcd", b as usize * batch + i),
                        Duration::from_secs(300),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                std::hint::black_box(url);
            }
            h.saturating_record(
                u64::try_from(begun.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
        let secs = started.elapsed().as_secs_f64();
        Ok(ApiReport {
            scenario: "sign",
            target: format!("aws-sdk-s3 (lockstep's signer), batch={batch}, 1 core"),
            concurrency: 1,
            duration_s: (secs * 100.0).round() / 100.0,
            operations: batches,
            errors: 0,
            operations_per_sec: ((batches as f64 / secs) * 10.0).round() / 10.0,
            urls_per_sec: Some((batches as f64 * batch.max(1) as f64 / secs).round()),
            latency: latency(&h),
        })
    })
}
