//! `loadtest fanout`: N subscribers over T topics, P open-loop publishers at R messages per
//! second, end-to-end latency from a send timestamp in each payload.
//!
//! A run may sweep several rates on the same connections (`--rates 500,1000,2000`); each rate
//! is one step with its own report line. Between steps the run waits until every expected
//! delivery arrived (or stopped arriving), so steps do not bleed into each other.

use crate::stats::{Collector, Expected, Latency, Second, SubscriberStats, field};
use crate::target::{Target, TopicKind};
use crate::wire::WsMessage;
use anyhow::Context as _;
use parking_lot::Mutex;
use serde::Serialize;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;

/// How publishers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// STOMP `SEND` on a WebSocket.
    Stomp,
    /// `POST /api/v1/publish` (Lockstep only).
    Http,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    pub subscribers: usize,
    pub topics: usize,
    pub kind: TopicKind,
    pub publishers: usize,
    pub rates: Vec<u64>,
    pub payload: usize,
    pub duration: Duration,
    pub via: Via,
    /// Lockstep's HTTP base URL, for `--via http`.
    pub http: Option<String>,
    pub sources: Vec<IpAddr>,
    /// Parallel connection setups.
    pub connect_concurrency: usize,
    /// Processes whose CPU time is reported per step (`name`, PID): servers, Redis.
    pub cpu_pids: Vec<(String, u32)>,
    /// Events carry one of this many keys per publisher (`x-key`, `--via stomp`); 0: unkeyed.
    pub keys: usize,
}

/// One step's result: one JSON line.
#[derive(Debug, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub target: &'static str,
    pub subscribers: usize,
    pub topics: usize,
    pub topic_kind: TopicKind,
    pub publishers: usize,
    pub via: Via,
    /// Messages per second, all publishers together.
    pub rate: u64,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub subscribers_closed: u64,
    pub deliveries_per_sec: f64,
    pub latency: Latency,
    /// CPU time of the watched processes during the step.
    pub cpu: Vec<CpuUse>,
    pub timeline: Vec<Second>,
}

/// CPU a process used during a step.
#[derive(Debug, Serialize)]
pub struct CpuUse {
    pub name: String,
    pub seconds: f64,
    /// Of the whole step's wall time, in cores (1.0 = one core busy).
    pub cores: f64,
    pub us_per_published: f64,
    pub us_per_delivery: f64,
}

struct Subscriber {
    stats: Arc<Mutex<SubscriberStats>>,
}

/// Runs the sweep; returns one report per rate.
///
/// # Errors
///
/// When connections cannot be set up.
pub async fn run(target: &Target, config: &FanoutConfig) -> anyhow::Result<Vec<FanoutReport>> {
    let topics = match config.kind {
        TopicKind::Team => config.topics.max(1),
        TopicKind::User => config.subscribers,
        TopicKind::Global => 1,
    };
    // Start of the current step on the shared clock; latencies' seconds count from it.
    let step_epoch = Arc::new(AtomicU64::new(unix_ns()));
    let closed = Arc::new(AtomicU64::new(0));
    let mut per_topic = vec![0u64; topics];
    let collector = Arc::new(Collector::default());
    let semaphore = Arc::new(tokio::sync::Semaphore::new(
        config.connect_concurrency.max(1),
    ));
    let mut setups = JoinSet::new();
    for i in 0..config.subscribers {
        let topic = match config.kind {
            TopicKind::Team => i % topics,
            TopicKind::User => i,
            TopicKind::Global => 0,
        };
        per_topic[topic] += 1;
        let target = target.clone();
        let source = pick(&config.sources, i);
        let semaphore = semaphore.clone();
        let stats = Arc::new(Mutex::new(SubscriberStats::new(
            config.publishers,
            collector.clone(),
        )));
        let kind = config.kind;
        let closed = closed.clone();
        let step_epoch = step_epoch.clone();
        setups.spawn(async move {
            let permit = semaphore.acquire_owned().await?;
            let mut ws = target.open(i, &[topic], source, 0, 64 * 1024).await?;
            target
                .subscribe(&mut ws, 0, &target.destination(kind, topic))
                .await?;
            drop(permit);
            let reader_stats = stats.clone();
            tokio::spawn(async move {
                loop {
                    match ws.next().await {
                        Ok(WsMessage::Data(message)) if target.is_event(&message) => {
                            let now = unix_ns();
                            let (Some(sent), Some(publisher), Some(seq)) = (
                                field(&message, br#""t":"#),
                                field(&message, br#""p":"#),
                                field(&message, br#""s":"#),
                            ) else {
                                continue;
                            };
                            let publisher = usize::try_from(publisher).unwrap_or(usize::MAX);
                            let epoch = step_epoch.load(Ordering::Relaxed);
                            reader_stats.lock().record(
                                publisher,
                                seq,
                                sent.saturating_sub(epoch),
                                now.saturating_sub(epoch),
                            );
                        }
                        Ok(WsMessage::Data(_)) => {}
                        Ok(WsMessage::Closed(_)) | Err(_) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
            Ok::<_, anyhow::Error>(Subscriber { stats })
        });
    }
    let mut subscribers = Vec::with_capacity(config.subscribers);
    while let Some(result) = setups.join_next().await {
        subscribers.push(result?.context("subscriber setup")?);
    }
    let mut publishers = Vec::new();
    for p in 0..config.publishers {
        let all_teams: Vec<usize> = (0..topics).collect();
        let teams = if config.kind == TopicKind::Team {
            &all_teams[..]
        } else {
            &[]
        };
        publishers.push(
            target
                .open(1_000_000 + p, teams, pick(&config.sources, p), 0, 16 * 1024)
                .await?,
        );
    }

    let mut reports = Vec::new();
    let mut seq_base = 0u64;
    let mut publishers = Some(publishers);
    for &rate in &config.rates {
        let collector = Arc::new(Collector::default());
        for s in &subscribers {
            let mut stats = s.stats.lock();
            stats.flush();
            *stats = SubscriberStats::new(config.publishers, collector.clone());
        }
        step_epoch.store(unix_ns(), Ordering::Relaxed);
        let cpu_before: Vec<f64> = config
            .cpu_pids
            .iter()
            .map(|(_, pid)| cpu_seconds(*pid))
            .collect();
        let started = Instant::now();
        let (published, expected, back) = publish(
            target,
            config,
            rate,
            &per_topic,
            publishers.take().unwrap_or_default(),
            seq_base,
        )
        .await?;
        publishers = Some(back);
        seq_base += published + 1;
        let publish_secs = started.elapsed().as_secs_f64();
        // Wait for the deliveries owed, or until they stop coming.
        let mut last = (0, Instant::now());
        let delivered = loop {
            let delivered: u64 = subscribers.iter().map(|s| s.stats.lock().delivered).sum();
            if delivered >= expected {
                break delivered;
            }
            if delivered != last.0 {
                last = (delivered, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(3) {
                break delivered;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let wall = started.elapsed().as_secs_f64();
        let cpu = config
            .cpu_pids
            .iter()
            .zip(cpu_before)
            .map(|((name, pid), before)| {
                let seconds = cpu_seconds(*pid) - before;
                CpuUse {
                    name: name.clone(),
                    seconds: round2(seconds),
                    cores: round2(seconds / wall),
                    us_per_published: round2(seconds * 1e6 / published.max(1) as f64),
                    us_per_delivery: round2(seconds * 1e6 / delivered.max(1) as f64),
                }
            })
            .collect();
        let mut out_of_order = 0;
        for s in &subscribers {
            let mut stats = s.stats.lock();
            stats.flush();
            out_of_order += stats.out_of_order;
        }
        reports.push(FanoutReport {
            scenario: "fanout",
            target: target.name(),
            subscribers: config.subscribers,
            topics,
            topic_kind: config.kind,
            publishers: config.publishers,
            via: config.via,
            rate,
            payload_bytes: config.payload,
            duration_s: round2(publish_secs),
            published,
            expected,
            delivered,
            lost: expected.saturating_sub(delivered),
            out_of_order,
            subscribers_closed: closed.load(Ordering::Relaxed),
            deliveries_per_sec: round2(delivered as f64 / publish_secs),
            latency: collector.latency(),
            cpu,
            timeline: collector.timeline(),
        });
    }
    Ok(reports)
}

/// Publishes at `rate` for the configured duration, open loop: on every 1 ms tick each
/// publisher sends whatever its schedule says is due, whether or not earlier messages arrived.
async fn publish(
    target: &Target,
    config: &FanoutConfig,
    rate: u64,
    per_topic: &[u64],
    publishers: Vec<crate::wire::RawWs>,
    seq_base: u64,
) -> anyhow::Result<(u64, u64, Vec<crate::wire::RawWs>)> {
    let padding = "x".repeat(config.payload.saturating_sub(60));
    let per_publisher = rate as f64 / config.publishers.max(1) as f64;
    let topics = per_topic.len();
    let mut tasks = JoinSet::new();
    let http = match config.via {
        Via::Http => Some((
            reqwest::Client::new(),
            config.http.clone().context("--via http needs --http")?,
        )),
        Via::Stomp => None,
    };
    for (p, mut ws) in publishers.into_iter().enumerate() {
        let target = target.clone();
        let padding = padding.clone();
        let duration = config.duration;
        let per_topic = per_topic.to_vec();
        let kind = config.kind;
        let keys = config.keys;
        let http = http.clone();
        let token = match &target {
            Target::Lockstep { secret, .. } => {
                let all: Vec<usize> = (0..topics).collect();
                Some(crate::target::token(
                    secret,
                    &format!("u{}", 1_000_000 + p),
                    if kind == TopicKind::Team { &all } else { &[] },
                )?)
            }
            _ => None,
        };
        tasks.spawn(async move {
            let mut expected = Expected::new(per_topic);
            let started = Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0u64;
            let mut in_flight = JoinSet::new();
            loop {
                ticker.tick().await;
                let elapsed = started.elapsed();
                let due = if elapsed >= duration {
                    (duration.as_secs_f64() * per_publisher) as u64
                } else {
                    (elapsed.as_secs_f64() * per_publisher) as u64
                };
                while sent < due {
                    // Spread messages over topics: publisher p starts at topic p.
                    let topic = (p + sent as usize) % topics;
                    let body = format!(r#"{{"t":{},"p":{p},"s":{},"x":"{padding}"}}"#, unix_ns(), seq_base + sent);
                    let destination = target.destination(kind, topic);
                    match &http {
                        None => {
                            let key = (keys > 0).then(|| format!("p{p}-k{}", sent as usize % keys));
                            target.queue_publish(&mut ws, &destination, &body, key.as_deref());
                        }
                        Some((client, base)) => {
                            let request = client
                                .post(format!("{base}/api/v1/publish"))
                                .bearer_auth(token.as_deref().unwrap_or_default())
                                .header("content-type", "application/json")
                                .body(format!(r#"{{"topic":"{destination}","type":"load.test","data":{body}}}"#));
                            in_flight.spawn(async move { request.send().await.map(|r| r.status().is_success()).unwrap_or(false) });
                        }
                    }
                    expected.published(topic);
                    sent += 1;
                }
                ws.flush().await?;
                // HTTP publishes that failed are owed to nobody.
                while let Some(done) = in_flight.try_join_next() {
                    if !done.unwrap_or(false) {
                        anyhow::bail!("an HTTP publish failed");
                    }
                }
                if elapsed >= duration {
                    break;
                }
            }
            while let Some(done) = in_flight.join_next().await {
                if !done.unwrap_or(false) {
                    anyhow::bail!("an HTTP publish failed");
                }
            }
            Ok::<_, anyhow::Error>((p, sent, expected.total(), ws))
        });
    }
    let (mut published, mut expected) = (0, 0);
    let mut back = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (p, sent, owed, ws) = result??;
        published += sent;
        expected += owed;
        back.push((p, ws));
    }
    back.sort_by_key(|(p, _)| *p);
    Ok((
        published,
        expected,
        back.into_iter().map(|(_, ws)| ws).collect(),
    ))
}

/// User plus system CPU seconds of a process and all its threads (`/proc/PID/stat`; Linux
/// reports them in ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn pick(sources: &[IpAddr], i: usize) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[i % sources.len()])
}

/// Nanoseconds since the Unix epoch: the clock every process on this machine shares.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
