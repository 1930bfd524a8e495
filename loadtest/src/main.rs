//! `loadtest`: measures Lockstep, RabbitMQ Web-STOMP and the ceiling server with the same
//! scenarios. Each run prints one JSON line per result on stdout and a short summary on stderr.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use loadtest::target::{Target, TopicKind};
use loadtest::wire::Endpoint;
use loadtest::{api_load, ceiling, connect, fanout, idle, resume};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    about = "Load scenarios for Lockstep and its references"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N subscribers over T topics, P open-loop publishers; one report line per rate.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Number of team topics (ignored for user and global topics).
        #[arg(long, default_value_t = 1)]
        topics: usize,
        #[arg(long, value_enum, default_value_t = TopicKind::Team)]
        topic_kind: TopicKind,
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Messages per second (all publishers together); several values sweep.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        rates: Vec<u64>,
        /// Approximate payload (`data`) size in bytes.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Seconds per rate.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, value_enum, default_value_t = fanout::Via::Stomp)]
        via: fanout::Via,
        /// Lockstep's HTTP base URL for `--via http`.
        #[arg(long)]
        http: Option<String>,
        /// Report a process's CPU use per step: NAME=PID (repeatable).
        #[arg(long = "cpu-pid", value_parser = parse_cpu_pid)]
        cpu_pids: Vec<(String, u32)>,
        /// Key every event with one of this many keys per publisher (`x-key`); 0: unkeyed.
        #[arg(long, default_value_t = 0)]
        keys: usize,
    },
    /// N connections x K subscriptions held with heart-beats; server RSS per connection.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 3)]
        subscriptions: usize,
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        hold: Duration,
        #[arg(long, default_value_t = 10_000)]
        heart_beat_ms: u32,
        /// The server's PID, to read its RSS from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Connection + CONNECT + SUBSCRIBE-with-receipt rate.
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// The control API across nodes: users connected to two nodes, the call to a third; time
    /// from the call to its effect on every connection (4011 close, `lockstep.unsubscribed`).
    Control {
        /// WebSocket URLs; users connect to the first two.
        #[arg(long, value_delimiter = ',', required = true)]
        url: Vec<String>,
        /// HTTP base URL of the node the calls go to.
        #[arg(long)]
        http: String,
        #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
        jwt_secret: String,
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Occupancy webhooks to a receiver this process runs: throughput and lag, against a
    /// reference of sequential signed POSTs to the same receiver.
    Webhooks {
        /// WebSocket URL of the node.
        #[arg(long)]
        url: String,
        /// HTTP base URL of the node (its /metrics).
        #[arg(long)]
        http: String,
        /// Receiver address; the node's `webhooks.urls` must be `http://{listen}/hook`.
        #[arg(long)]
        listen: String,
        #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
        jwt_secret: String,
        /// The node's `webhooks.secret`.
        #[arg(long, env = "LOADTEST_WEBHOOK_SECRET")]
        webhook_secret: String,
        #[arg(long, default_value_t = 5000)]
        topics: usize,
        #[arg(long, default_value_t = 50)]
        per_connection: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 2000)]
        reference: usize,
    },
    /// Many clients resuming at once: SUBSCRIBE with an offset `missed` events back, time to
    /// the last replayed event.
    Resume {
        /// WebSocket URLs (comma-separated; client i uses URL i mod n).
        #[arg(long, value_delimiter = ',', required = true)]
        url: Vec<String>,
        /// HTTP base URL to publish through.
        #[arg(long)]
        http: String,
        #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
        jwt_secret: String,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Events missed; several values run one after another.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        missed: Vec<u64>,
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Instead of missed events, publish one event for each of `missed` keys and subscribe
        /// with `x-stream-offset:snapshot`: the latency is to the last state frame.
        #[arg(long)]
        snapshot: bool,
    },
    /// Presence: `members` users join a team topic at `rate`/s; join latency to a watcher on
    /// the last URL, the list's latency and correctness, Redis commands/s and RSS while held.
    Presence {
        /// WebSocket URLs (comma-separated): the watcher uses the last, members the others.
        #[arg(long, value_delimiter = ',', required = true)]
        url: Vec<String>,
        /// HTTP base URL to read the list from.
        #[arg(long)]
        http: String,
        #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
        jwt_secret: String,
        #[arg(long, default_value_t = 2000)]
        members: usize,
        /// Joins per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Full reads of the list.
        #[arg(long, default_value_t = 50)]
        lists: usize,
        /// Members held this long after joining, to count Redis commands.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Count this Redis's commands during the hold (standalone Redis: one INFO).
        #[arg(long)]
        redis: Option<String>,
        /// The server's PID, to read its RSS from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Acquire+release pairs per second through the HTTP API (or Redis SET NX PX + DEL, or the
    /// same decisions as plain SQL).
    Locks {
        /// Lockstep base URLs (http://host:port), comma-separated for several nodes.
        #[arg(long, value_delimiter = ',')]
        http: Vec<String>,
        /// Instead: the same pattern against this Redis (redis://…), the raw-store reference.
        #[arg(long)]
        redis: Option<String>,
        /// Instead: the same decisions as plain SQL straight to this database (postgres://…
        /// or sqlite://path), the database's own speed.
        #[arg(long)]
        raw: Option<String>,
        /// PostgreSQL connections of `--raw` (Lockstep's `database.max_connections`).
        #[arg(long, default_value_t = 16)]
        pool: u32,
        #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
        jwt_secret: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Presign requests per second through the HTTP API, single or batches.
    Presign {
        #[arg(long)]
        http: String,
        #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
        jwt_secret: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Objects per request (1: the single-object endpoint).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Presigned URLs signed per second on one core, by the code the API uses (no HTTP).
    Sign {
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// URLs per timed batch (latency is reported per batch).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Run the reference broadcast server.
    CeilingServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// lockstep, rabbitmq or ceiling.
    #[arg(long, default_value = "lockstep")]
    target: String,
    /// WebSocket URL, e.g. ws://127.0.0.1:8080/ws; several comma-separated for a cluster
    /// (client i connects to URL i mod n).
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Lockstep's HS256 secret, to mint tokens.
    #[arg(long, env = "LOADTEST_JWT_SECRET", default_value = "")]
    jwt_secret: String,
    #[arg(long, default_value = "guest")]
    login: String,
    #[arg(long, default_value = "guest")]
    passcode: String,
    /// Spread client connections over 127.0.0.1..=127.0.0.N.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Parallel connection setups.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
}

impl TargetArgs {
    async fn target(&self) -> anyhow::Result<Target> {
        let mut ws = Vec::new();
        for url in &self.url {
            ws.push(Endpoint::parse(url).await?);
        }
        Ok(match self.target.as_str() {
            "lockstep" => {
                anyhow::ensure!(
                    !self.jwt_secret.is_empty(),
                    "lockstep needs --jwt-secret (or LOADTEST_JWT_SECRET)"
                );
                Target::Lockstep {
                    ws,
                    secret: self.jwt_secret.clone(),
                }
            }
            "rabbitmq" => Target::Rabbit {
                ws,
                login: self.login.clone(),
                passcode: self.passcode.clone(),
            },
            "ceiling" => Target::Ceiling { ws },
            other => anyhow::bail!("unknown target {other}: use lockstep, rabbitmq or ceiling"),
        })
    }

    fn sources(&self) -> Vec<IpAddr> {
        if self.sources <= 1 {
            return Vec::new();
        }
        (1..=self.sources)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    }
}

fn parse_cpu_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    Ok((
        name.to_owned(),
        pid.parse().map_err(|_| format!("'{pid}' is not a PID"))?,
    ))
}

#[allow(clippy::print_stdout)] // JSON lines are the output.
fn emit<T: serde::Serialize>(report: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOADTEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Signing is measured on one core: its own single-threaded runtime.
    if let Command::Sign { count, batch } = cli.command {
        let report = loadtest::api_load::sign_on_one_core(count, batch)?;
        eprintln!("{}: {:?} URLs/s", report.target, report.urls_per_sec);
        return emit(&report);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Fanout {
            target,
            subscribers,
            topics,
            topic_kind,
            publishers,
            rates,
            payload,
            duration,
            via,
            http,
            cpu_pids,
            keys,
        } => {
            let config = fanout::FanoutConfig {
                subscribers,
                topics,
                kind: topic_kind,
                publishers,
                rates,
                payload,
                duration,
                via,
                http,
                sources: target.sources(),
                connect_concurrency: target.connect_concurrency,
                cpu_pids,
                keys,
            };
            let t = target.target().await?;
            for report in fanout::run(&t, &config).await? {
                eprintln!(
                    "{} fanout {} subs/{} topics, {} msg/s: {:.0} deliveries/s, p50 {} ms, p99 {} ms, lost {}, out of order {}",
                    report.target,
                    report.subscribers,
                    report.topics,
                    report.rate,
                    report.deliveries_per_sec,
                    report.latency.p50_ms,
                    report.latency.p99_ms,
                    report.lost,
                    report.out_of_order
                );
                emit(&report)?;
            }
        }
        Command::Idle {
            target,
            connections,
            subscriptions,
            hold,
            heart_beat_ms,
            server_pid,
        } => {
            let config = idle::IdleConfig {
                connections,
                subscriptions,
                hold,
                heart_beat_ms,
                server_pid,
                sources: target.sources(),
                connect_concurrency: target.connect_concurrency,
            };
            let report = idle::run(&target.target().await?, &config).await?;
            eprintln!(
                "{} idle: {}/{} open after {} s, {:?} KiB RSS per connection",
                report.target,
                report.still_open,
                report.connections,
                report.held_s,
                report.rss_per_connection_kib
            );
            emit(&report)?;
        }
        Command::Connect {
            target,
            connections,
            concurrency,
        } => {
            let config = connect::ConnectConfig {
                connections,
                concurrency,
                sources: target.sources(),
            };
            let report = connect::run(&target.target().await?, &config).await?;
            eprintln!(
                "{} connect: {} connections/s ({} ok, {} failed), p99 setup {} ms",
                report.target,
                report.connections_per_sec,
                report.succeeded,
                report.failed,
                report.setup_latency.p99_ms
            );
            emit(&report)?;
        }
        Command::Webhooks {
            url,
            http,
            listen,
            jwt_secret,
            webhook_secret,
            topics,
            per_connection,
            concurrency,
            reference,
        } => {
            let report = loadtest::webhooks::run(&loadtest::webhooks::WebhooksConfig {
                url,
                http,
                listen,
                jwt_secret,
                webhook_secret,
                topics,
                per_connection,
                concurrency,
                reference,
            })
            .await?;
            eprintln!(
                "webhooks: {} events in {} deliveries, {} events/s, lag p50 {} ms p99 {} ms; backlog drained at {} events/s; reference {} POSTs/s",
                report.events,
                report.deliveries,
                report.events_per_sec,
                report.lag.p50_ms,
                report.lag.p99_ms,
                report.backlog_events_per_sec,
                report.reference_posts_per_sec
            );
            emit(&report)?;
        }
        Command::Control {
            url,
            http,
            jwt_secret,
            users,
            concurrency,
        } => {
            let report = loadtest::control::run(&loadtest::control::ControlConfig {
                urls: url,
                http,
                secret: jwt_secret,
                users,
                concurrency,
            })
            .await?;
            eprintln!(
                "control: disconnect p50 {} ms p99 {} ms; unsubscribe p50 {} ms p99 {} ms ({} calls)",
                report.disconnect.p50_ms,
                report.disconnect.p99_ms,
                report.unsubscribe.p50_ms,
                report.unsubscribe.p99_ms,
                report.calls
            );
            emit(&report)?;
        }
        Command::Resume {
            url,
            http,
            jwt_secret,
            clients,
            missed,
            payload,
            snapshot,
        } => {
            for missed in missed {
                let config = resume::ResumeConfig {
                    ws: url.clone(),
                    http: http.clone(),
                    secret: jwt_secret.clone(),
                    clients,
                    missed,
                    payload,
                    snapshot,
                };
                let report = resume::run(&config).await?;
                eprintln!(
                    "{}: {} clients, {} missed/keys: {} recovered, {} failed, p50 {} ms, p99 {} ms",
                    report.scenario,
                    report.clients,
                    report.missed,
                    report.recovered,
                    report.failed,
                    report.latency.p50_ms,
                    report.latency.p99_ms
                );
                emit(&report)?;
            }
        }
        Command::Presence {
            url,
            http,
            jwt_secret,
            members,
            rate,
            lists,
            hold,
            redis,
            server_pid,
        } => {
            let config = loadtest::presence::PresenceConfig {
                urls: url,
                http,
                secret: jwt_secret,
                members,
                rate,
                lists,
                hold,
                redis,
                server_pid,
            };
            let report = loadtest::presence::run(&config).await?;
            eprintln!(
                "presence x{} over {} nodes: join p50 {} ms p99 {} ms, list p50 {} ms p99 {} ms (correct: {}), redis {:?} cmd/s, {:?} KiB RSS per member",
                report.members,
                report.nodes,
                report.join_latency.p50_ms,
                report.join_latency.p99_ms,
                report.list_latency.p50_ms,
                report.list_latency.p99_ms,
                report.list_correct,
                report.redis_commands_per_sec,
                report.rss_per_member_kib
            );
            emit(&report)?;
        }
        Command::Locks {
            http,
            redis,
            raw,
            pool,
            jwt_secret,
            concurrency,
            duration,
        } => {
            let report = match (redis, raw) {
                (Some(url), _) => api_load::locks_redis(&url, concurrency, duration).await?,
                (None, Some(url)) => {
                    loadtest::raw_locks::locks_raw(&url, concurrency, duration, pool).await?
                }
                (None, None) => {
                    anyhow::ensure!(
                        !http.is_empty(),
                        "give --http URL(s), --redis URL or --raw URL"
                    );
                    api_load::locks(http, &jwt_secret, concurrency, duration).await?
                }
            };
            eprintln!(
                "{} locks x{}: {} pairs/s, p50 {} ms, p99 {} ms, {} errors",
                report.target,
                report.concurrency,
                report.operations_per_sec,
                report.latency.p50_ms,
                report.latency.p99_ms,
                report.errors
            );
            emit(&report)?;
        }
        Command::Presign {
            http,
            jwt_secret,
            concurrency,
            duration,
            batch,
        } => {
            let report = api_load::presign(http, &jwt_secret, concurrency, duration, batch).await?;
            eprintln!(
                "{} x{}: {} requests/s ({:?} URLs/s), p50 {} ms, p99 {} ms, {} errors",
                report.target,
                report.concurrency,
                report.operations_per_sec,
                report.urls_per_sec,
                report.latency.p50_ms,
                report.latency.p99_ms,
                report.errors
            );
            emit(&report)?;
        }
        Command::Sign { .. } => unreachable!("handled before the runtime starts"),
        Command::CeilingServer { listen } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "ceiling-server listening on ws://{}/",
                    listener.local_addr()?
                );
            }
            ceiling::serve(listener).await?;
        }
    }
    Ok(())
}
