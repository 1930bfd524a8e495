//! Short smoke runs of every `loadtest` scenario against a real node, so the measuring tool
//! itself is known to work (its accounting has unit tests in the `loadtest` crate).

use serde_json::Value;
use std::process::{Command, Stdio};
use tests::{Lockstep, Options};

fn loadtest_bin() -> std::path::PathBuf {
    tests::lockstep_bin().with_file_name("loadtest")
}

fn node() -> (Lockstep, String) {
    let secret = "loadtest-secret-loadtest-secret-loadtest";
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_JWT_SECRET", secret)
            .env("LOCKSTEP_HUB_PUBLISH_RATE", 100_000)
            .env("LOCKSTEP_HUB_PUBLISH_BURST", 100_000),
    );
    (node, secret.to_owned())
}

fn run(secret: &str, args: &[&str]) -> Vec<Value> {
    let output = Command::new(loadtest_bin())
        .args(args)
        .env("LOADTEST_JWT_SECRET", secret)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadtest {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn fanout_smoke_over_stomp_and_http() {
    let (node, secret) = node();
    let ws = node.ws();
    let reports = run(
        &secret,
        &[
            "fanout",
            "--url",
            &ws,
            "--subscribers",
            "50",
            "--topics",
            "5",
            "--publishers",
            "2",
            "--rates",
            "100,200",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["out_of_order"], 0, "{r}");
        // Each message goes to the 10 subscribers of its topic.
        assert_eq!(
            r["expected"].as_u64().unwrap(),
            r["published"].as_u64().unwrap() * 10,
            "{r}"
        );
        assert!(r["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
        assert!(!r["timeline"].as_array().unwrap().is_empty());
    }
    let http = node.http();
    let reports = run(
        &secret,
        &[
            "fanout",
            "--url",
            &ws,
            "--subscribers",
            "20",
            "--topic-kind",
            "user",
            "--rates",
            "50",
            "--duration",
            "1s",
            "--via",
            "http",
            "--http",
            &http,
        ],
    );
    assert_eq!(reports[0]["lost"], 0, "{}", reports[0]);
    assert_eq!(reports[0]["expected"], reports[0]["published"]);
}

#[test]
fn idle_and_connect_smoke() {
    let (node, secret) = node();
    let ws = node.ws();
    let pid = node.pid().to_string();
    let idle = run(
        &secret,
        &[
            "idle",
            "--url",
            &ws,
            "--connections",
            "50",
            "--hold",
            "1s",
            "--heart-beat-ms",
            "300",
            "--server-pid",
            &pid,
        ],
    );
    assert_eq!(
        (idle[0]["opened"].as_u64(), idle[0]["still_open"].as_u64()),
        (Some(50), Some(50)),
        "{}",
        idle[0]
    );
    assert!(idle[0]["rss_per_connection_kib"].is_number());
    let connect = run(
        &secret,
        &[
            "connect",
            "--url",
            &ws,
            "--connections",
            "200",
            "--concurrency",
            "16",
            "--sources",
            "3",
        ],
    );
    assert_eq!(
        (
            connect[0]["succeeded"].as_u64(),
            connect[0]["failed"].as_u64()
        ),
        (Some(200), Some(0)),
        "{}",
        connect[0]
    );
}

#[test]
fn ceiling_server_smoke() {
    let mut server = Command::new(loadtest_bin())
        .arg("ceiling-server")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("ceiling-server listening on ")
        .unwrap()
        .to_owned();
    let reports = run(
        "",
        &[
            "fanout",
            "--target",
            "ceiling",
            "--url",
            &url,
            "--subscribers",
            "30",
            "--rates",
            "100",
            "--duration",
            "1s",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(reports[0]["lost"], 0, "{}", reports[0]);
    assert_eq!(
        reports[0]["delivered"].as_u64().unwrap(),
        reports[0]["published"].as_u64().unwrap() * 30
    );
}

#[test]
fn locks_presign_and_sign_smoke() {
    let secret = "loadtest-secret-loadtest-secret-loadtest";
    // Presigning needs a bucket but never contacts it, so nothing listens on this endpoint.
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_JWT_SECRET", secret)
            .env("LOCKSTEP_S3_BUCKET", "items")
            .env("LOCKSTEP_S3_ENDPOINT", "http://127.0.0.1:9")
            .env("LOCKSTEP_S3_PATH_STYLE", "true")
            .env("LOCKSTEP_S3_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("LOCKSTEP_S3_SECRET_ACCESS_KEY", "secret"),
    );
    let http = node.http();
    let ok_without_errors = |report: &Value| {
        assert!(report["operations"].as_u64() > Some(0), "{report}");
        assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
    };
    let locks = run(
        secret,
        &[
            "locks",
            "--http",
            &http,
            "--concurrency",
            "2",
            "--duration",
            "1s",
        ],
    );
    ok_without_errors(&locks[0]);
    let redis = tests::redis::RedisServer::start();
    let reference = run(
        secret,
        &[
            "locks",
            "--redis",
            &redis.url(),
            "--concurrency",
            "2",
            "--duration",
            "1s",
        ],
    );
    ok_without_errors(&reference[0]);
    // The raw-SQL reference, on a SQLite file and on PostgreSQL; it leaves no table behind.
    let dir = tempfile::tempdir().unwrap();
    let postgres = tests::postgres::Postgres::start();
    let pg_url = postgres.database("raw");
    for url in [
        format!("sqlite://{}", dir.path().join("raw.db").display()),
        pg_url,
    ] {
        let raw = run(
            secret,
            &[
                "locks",
                "--raw",
                &url,
                "--concurrency",
                "2",
                "--duration",
                "1s",
            ],
        );
        ok_without_errors(&raw[0]);
    }
    assert_eq!(
        postgres.psql(
            "raw",
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'raw_%'"
        ),
        Ok("0".to_owned())
    );
    for batch in ["1", "50"] {
        let presign = run(
            secret,
            &[
                "presign",
                "--http",
                &http,
                "--batch",
                batch,
                "--concurrency",
                "2",
                "--duration",
                "1s",
            ],
        );
        ok_without_errors(&presign[0]);
        assert!(
            presign[0]["urls_per_sec"].as_f64() > Some(0.0),
            "{}",
            presign[0]
        );
    }
    let sign = run(secret, &["sign", "--count", "200", "--batch", "10"]);
    assert_eq!(sign[0]["operations"].as_u64(), Some(20), "{}", sign[0]);
    assert!(sign[0]["urls_per_sec"].as_f64() > Some(0.0), "{}", sign[0]);
}
