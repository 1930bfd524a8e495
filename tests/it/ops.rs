//! What an operator relies on: `/metrics` counts what happened, logs carry their spans and
//! never a token, the command line validates configuration and answers health checks.

use crate::locks::call;
use crate::{client, envelope, http_publish};
use loadtest::client::{OpenOptions, StompClient};
use protocol::Command;
use serde_json::{Value, json};
use std::process::Command as Process;
use std::time::{Duration, Instant};
use tests::s3::S3Server;
use tests::{Lockstep, Options, lockstep_bin, now};

/// The sum of every sample of `name` whose labels include all of `labels`, from a Prometheus
/// text exposition; 0 when there is none.
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let matches = labels.iter().all(|(k, v)| {
                series_labels
                    .split(',')
                    .any(|kv| kv == format!("{k}=\"{v}\""))
            });
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

pub(crate) async fn scrape(node: &Lockstep) -> String {
    let response = reqwest::get(format!("{}/metrics", node.http()))
        .await
        .expect("scrape");
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "Prometheus text format"
    );
    response.text().await.unwrap()
}

/// Scrapes until `done` holds (state that settles after a close, such as gauges), or fails
/// with the last scrape after 10 s.
async fn scrape_until(node: &Lockstep, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(node).await;
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never settled:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_connections_frames_events_locks_presigns_and_requests() {
    let s3 = S3Server::start();
    let node = Lockstep::start_with(s3.configure(Options::default(), &s3.endpoint()));
    let scope = "publish locks presign";

    // Two subscribers of the team topic; a third client asks for a foreign topic.
    let mut ana = client(&node, "ana", &["t1"], scope).await;
    let mut bob = client(&node, "bob", &["t1"], scope).await;
    ana.subscribe("s", "/team/t1").await.unwrap();
    bob.subscribe("s", "/team/t1").await.unwrap();
    let mut eve = client(&node, "eve", &["t2"], "").await;
    eve.send(
        &protocol::Frame::new(Command::Subscribe)
            .with_header("id", "x")
            .with_header("destination", "/team/t1"),
    )
    .await
    .unwrap();
    let (error, close) = eve.expect_close().await.unwrap();
    assert!(error.is_some());
    assert_eq!(close.map(|c| c.0), Some(4004));

    // Four events to the team: STOMP SEND, HTTP, and a lock's grant and release.
    ana.publish("/team/t1", "job.progress", "{\"done\":1}", Some("p"))
        .await
        .unwrap();
    let token = node.token("backend", &["t1"], "publish");
    let (status, _) = http_publish(
        &node,
        &token,
        &json!({"topic": "/team/t1", "type": "job.progress", "data": {"done": 2}}),
    )
    .await;
    assert_eq!(status, 202);
    let ana_token = node.token("ana", &["t1"], scope);
    let bob_token = node.token("bob", &["t1"], scope);
    let lock_path = "/api/v1/teams/t1/items/i1/lock";
    let (status, lock) = call(&node, "POST", lock_path, &ana_token, None).await;
    assert_eq!(status, 200, "{lock}");
    let (status, _) = call(&node, "POST", lock_path, &bob_token, None).await;
    assert_eq!(status, 409);
    let (status, _) = call(
        &node,
        "DELETE",
        lock_path,
        &ana_token,
        Some(json!({"token": lock["token"]})),
    )
    .await;
    assert_eq!(status, 204);
    for subscriber in [&mut ana, &mut bob] {
        for expected in [
            "job.progress",
            "job.progress",
            "lock.acquired",
            "lock.released",
        ] {
            let frame = subscriber.expect_frame().await.unwrap();
            assert_eq!(envelope(&frame, "s", "/team/t1")["type"], expected);
        }
    }

    // Presigned reads: one single, one batch of three.
    let (status, _) = call(
        &node,
        "POST",
        "/api/v1/teams/t1/items/i1/presign",
        &ana_token,
        Some(json!({"method": "GET", "name": "a.json"})),
    )
    .await;
    assert_eq!(status, 200);
    let objects: Vec<Value> = (0..3)
        .map(|i| json!({"item": format!("i{i}"), "name": "a.json"}))
        .collect();
    let (status, _) = call(
        &node,
        "POST",
        "/api/v1/teams/t1/presign/batch",
        &ana_token,
        Some(json!({"method": "GET", "objects": objects})),
    )
    .await;
    assert_eq!(status, 200);

    // Gauges are read off the hub when scraped; the refused client's session may still be
    // finishing its close.
    let text = scrape_until(&node, |t| sample(t, "lockstep_ws_connections", &[]) == 2.0).await;
    let expect = |name: &str, labels: &[(&str, &str)], want: f64| {
        let got = sample(&text, name, labels);
        assert!(
            (got - want).abs() < f64::EPSILON,
            "{name}{labels:?} is {got}, expected {want}\n{text}"
        );
    };
    expect("lockstep_ws_connections_opened_total", &[], 3.0);
    expect("lockstep_ws_users", &[], 2.0);
    expect("lockstep_subscriptions", &[], 2.0);
    expect("lockstep_topics", &[], 1.0);
    expect("lockstep_frames_in_total", &[("command", "CONNECT")], 3.0);
    expect("lockstep_frames_in_total", &[("command", "SUBSCRIBE")], 3.0);
    expect("lockstep_frames_in_total", &[("command", "SEND")], 1.0);
    expect(
        "lockstep_frames_out_total",
        &[("command", "CONNECTED")],
        3.0,
    );
    expect("lockstep_frames_out_total", &[("command", "RECEIPT")], 3.0);
    expect("lockstep_frames_out_total", &[("command", "ERROR")], 1.0);
    expect("lockstep_frames_out_total", &[("command", "MESSAGE")], 8.0);
    expect("lockstep_deliveries_total", &[], 8.0);
    expect("lockstep_deliveries_dropped_total", &[], 0.0);
    expect("lockstep_ws_closes_total", &[("code", "4004")], 1.0);
    expect("lockstep_events_published_total", &[], 4.0);
    expect("lockstep_broker_publish_seconds_count", &[], 4.0);
    expect("lockstep_lock_grants_total", &[], 1.0);
    expect("lockstep_lock_releases_total", &[], 1.0);
    expect("lockstep_lock_conflicts_total", &[], 1.0);
    expect("lockstep_presigned_urls_total", &[("method", "GET")], 4.0);
    expect(
        "lockstep_http_requests_total",
        &[
            ("method", "POST"),
            ("route", "/api/v1/publish"),
            ("status", "202"),
        ],
        1.0,
    );
    expect(
        "lockstep_http_requests_total",
        &[
            ("method", "POST"),
            ("route", "/api/v1/teams/{team}/items/{item}/lock"),
            ("status", "409"),
        ],
        1.0,
    );
    // Latency is a histogram (aggregatable over nodes), with help text.
    expect(
        "lockstep_http_request_duration_seconds_bucket",
        &[("route", "/api/v1/publish"), ("le", "+Inf")],
        1.0,
    );
    for line in [
        "# TYPE lockstep_http_request_duration_seconds histogram",
        "# TYPE lockstep_broker_publish_seconds histogram",
        "# HELP lockstep_deliveries_total ",
        "# HELP lockstep_ws_closes_total ",
    ] {
        assert!(text.contains(line), "missing {line:?}\n{text}");
    }

    // Leaving moves the gauges back; a client that closes is counted under `peer`.
    ana.close().await.unwrap();
    let text = scrape_until(&node, |t| sample(t, "lockstep_ws_connections", &[]) == 1.0).await;
    assert_eq!(sample(&text, "lockstep_subscriptions", &[]), 1.0);
    assert_eq!(
        sample(&text, "lockstep_ws_closes_total", &[("code", "peer")]),
        1.0
    );
    // A path nobody routes is one `unmatched` series, never the raw path.
    let _ = reqwest::get(format!("{}/api/v1/no/such/thing-12345", node.http())).await;
    let text = scrape(&node).await;
    assert!(!text.contains("thing-12345"), "{text}");
    assert_eq!(
        sample(
            &text,
            "lockstep_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    drop(bob);
}

#[tokio::test]
async fn logs_are_json_with_spans_and_never_hold_a_token() {
    // The most verbose level there is: nothing that logs anything may log a token.
    let mut node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_LOG_LEVEL", "trace")
            .env("LOCKSTEP_LOG_FORMAT", "json"),
    );
    let secret = node.secret().to_owned();
    let mut tokens = Vec::new();

    // A token in the CONNECT frame (passcode), on the upgrade (header and query), refused ones.
    let passcode = node.token("ana", &["t1"], "publish");
    tokens.push(passcode.clone());
    let (mut ana, _) = StompClient::connect(&node.ws(), &passcode).await.unwrap();
    ana.subscribe("s", "/user/ana").await.unwrap();
    ana.publish("/user/ana", "a.b", "{}", Some("r"))
        .await
        .unwrap();
    envelope(&ana.expect_frame().await.unwrap(), "s", "/user/ana");

    let bearer = node.token("bob", &["t1"], "");
    tokens.push(bearer.clone());
    let options = OpenOptions {
        bearer: Some(bearer),
        ..OpenOptions::default()
    };
    let mut bob = StompClient::open(&node.ws(), &options).await.unwrap();
    bob.send(&protocol::Frame::new(Command::Connect).with_header("accept-version", "1.2"))
        .await
        .unwrap();
    assert_eq!(
        bob.expect_frame().await.unwrap().command,
        Command::Connected
    );

    let query = node.token("cy", &["t1"], "");
    tokens.push(query.clone());
    let url = format!("{}?access_token={query}", node.ws());
    let mut cy = StompClient::open(&url, &OpenOptions::default())
        .await
        .unwrap();
    cy.send(&protocol::Frame::new(Command::Connect).with_header("accept-version", "1.2"))
        .await
        .unwrap();
    assert_eq!(cy.expect_frame().await.unwrap().command, Command::Connected);

    let expired = node.token_with(&json!({"sub": "dan", "exp": now() - 60}));
    let forged = tests::sign(
        &json!({"sub": "dan", "exp": now() + 60}),
        b"not-the-secret-not-the-secret-not-the-secret",
    );
    for refused in [&expired, &forged] {
        tokens.push(refused.clone());
        let mut c = StompClient::open(&node.ws(), &OpenOptions::default())
            .await
            .unwrap();
        c.send(
            &protocol::Frame::new(Command::Connect)
                .with_header("accept-version", "1.2")
                .with_header("passcode", refused.as_str()),
        )
        .await
        .unwrap();
        let (_, close) = c.expect_close().await.unwrap();
        assert_eq!(close.map(|c| c.0), Some(4001));
    }

    // HTTP: a good and a forged bearer token; the answer names the request.
    let http_token = node.token("backend", &["t1"], "publish");
    tokens.push(http_token.clone());
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/publish", node.http()))
        .bearer_auth(&http_token)
        .json(&json!({"topic": "/team/t1", "type": "a.b", "data": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(request_id.len(), 26, "a ULID: {request_id}");
    let (status, _) = http_publish(
        &node,
        &forged,
        &json!({"topic": "/team/t1", "type": "a.b", "data": {}}),
    )
    .await;
    assert_eq!(status, 401);

    drop((ana, bob, cy));
    node.terminate(Duration::from_secs(15)).unwrap();
    let log = node.log();

    for token in &tokens {
        // Any part of it: the signature alone is the secret-bearing part.
        let signature = token.rsplit('.').next().unwrap();
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(signature)).collect();
        assert!(
            leaks.is_empty(),
            "a token's signature appears in the log: {leaks:#?}"
        );
    }
    assert!(!log.contains(&secret), "the JWT secret appears in the log");

    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 10, "a trace-level run logs plenty: {log}");
    // Events inside a connection carry its span: connection id, peer, and user once known.
    let in_ana_conn = lines.iter().any(|l| {
        l["spans"].as_array().is_some_and(|spans| {
            spans.iter().any(|s| {
                s["name"] == "conn"
                    && s["user.id"] == "ana"
                    && s["conn.id"].is_u64()
                    && s["peer.addr"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("127.0.0.1:"))
            })
        })
    });
    assert!(in_ana_conn, "no log line in ana's connection span:\n{log}");
    // Requests carry theirs: route template and the id the client was given.
    let in_request = lines.iter().any(|l| {
        l["span"]["name"] == "request"
            && l["span"]["route"] == "/api/v1/publish"
            && l["span"]["request.id"] == request_id.as_str()
    });
    assert!(
        in_request,
        "no log line in the publish request's span:\n{log}"
    );
}

/// The filter that keeps tungstenite's frame dumps out of the logs must not raise its level
/// either: at the default level a WebSocket's whole life logs nothing from it (the first
/// version, a `tungstenite=debug` directive, logged every close at the default level).
#[tokio::test]
async fn the_default_level_logs_nothing_of_the_websocket_library() {
    let mut node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_LOG_LEVEL", "info")
            .env("LOCKSTEP_LOG_FORMAT", "json"),
    );
    let mut ana = client(&node, "ana", &["t1"], "publish").await;
    ana.subscribe("s", "/user/ana").await.unwrap();
    ana.publish("/user/ana", "a.b", "{}", Some("r"))
        .await
        .unwrap();
    envelope(&ana.expect_frame().await.unwrap(), "s", "/user/ana");
    ana.close().await.unwrap();
    let mut refused = StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap();
    refused
        .send(&protocol::Frame::new(Command::Connect).with_header("passcode", "not-a-token"))
        .await
        .unwrap();
    refused.expect_close().await.unwrap();
    node.terminate(Duration::from_secs(15)).unwrap();
    let log = node.log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("\"target\":\"tungstenite") || l.contains("\"target\":\"tokio_tungstenite")
        })
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(!log.contains("not-a-token"), "{log}");
}

#[test]
fn config_check_reports_every_problem_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n",
    )
    .unwrap();
    let run = |file: &std::path::Path, extra: &[(&str, &str)]| {
        let mut command = Process::new(lockstep_bin());
        command
            .args(["config", "check"])
            .arg(file)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in extra {
            command.env(k, v);
        }
        command.output().expect("run lockstep config check")
    };
    // Valid, even though nothing listens on that Redis port: checking connects to nothing.
    let output = run(&good, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("redis://127.0.0.1:1"), "{stdout}");
    // Valid, but a cluster broker with per-node lock files and secrets is not what anyone means.
    assert!(
        stdout.contains("warning: a cluster broker (redis.url) with a SQLite lock store"),
        "{stdout}"
    );
    assert!(stdout.contains("with a generated JWT secret"), "{stdout}");

    // Every problem at once, from the file and the environment, and exit 64.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"nowhere\"\nlisten_typo = 1\n[log]\nlevel = \"info,[\"\n[jwt]\npublic_keys = \"/no/such/keys.pem\"\n",
    )
    .unwrap();
    let output = run(&bad, &[("LOCKSTEP_HUB_MAX_CONNECTIONS", "0")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    for needle in [
        "listen",
        "listen_typo",
        "log.level",
        "LOCKSTEP_HUB_MAX_CONNECTIONS",
    ] {
        assert!(stderr.contains(needle), "{needle} not reported:\n{stderr}");
    }
    // The keys file is only looked at once the rest is valid; then it is reported too.
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "[jwt]\npublic_keys = \"/no/such/keys.pem\"\n").unwrap();
    let output = run(&keys, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("/no/such/keys.pem"), "{stderr}");

    // --ignore-env checks the file alone.
    let output = Process::new(lockstep_bin())
        .args(["config", "check", "--ignore-env"])
        .arg(&good)
        .env("LOCKSTEP_HUB_MAX_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn healthcheck_command_follows_the_node() {
    let mut node = Lockstep::start();
    let check = |args: &[&str]| {
        Process::new(lockstep_bin())
            .arg("healthcheck")
            .args(args)
            .env_clear()
            .output()
            .expect("run lockstep healthcheck")
    };
    let url = node.http();
    let alive = check(&["--url", &url]);
    assert!(alive.status.success(), "{alive:?}");
    let ready = check(&["--ready", "--url", &url]);
    assert!(ready.status.success(), "{ready:?}");
    // The configured listen address is used when no URL is given.
    let by_config = Process::new(lockstep_bin())
        .arg("healthcheck")
        .env_clear()
        .env("LOCKSTEP_LISTEN", node.addr.to_string())
        .output()
        .unwrap();
    assert!(by_config.status.success(), "{by_config:?}");
    node.terminate(Duration::from_secs(15)).unwrap();
    let gone = check(&["--url", &url, "--timeout", "1s"]);
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert!(!String::from_utf8_lossy(&gone.stderr).is_empty());
}

#[test]
fn every_command_has_complete_help() {
    let help = |args: &[&str]| {
        let output = Process::new(lockstep_bin())
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let top = help(&[]);
    for command in ["serve", "migrate", "token", "config", "healthcheck"] {
        assert!(
            top.contains(command),
            "{command} missing from --help:\n{top}"
        );
        let text = help(&[command]);
        assert!(
            text.lines().count() > 3,
            "{command} --help is bare:\n{text}"
        );
    }
    assert!(help(&["config", "check"]).contains("--ignore-env"));
    assert!(help(&["token"]).contains("--scope"));
    assert!(help(&["serve"]).contains("--listen"));
}
