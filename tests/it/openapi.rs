//! The OpenAPI document against the live API: schemathesis (PyPI, pinned in
//! `tests/clients/python/requirements.txt`, which the test command installs) reads
//! `/api/v1/openapi.json` from a real node with object storage, generates requests from it
//! (schema-valid and schema-invalid, with and without the token) and checks every answer
//! against it: no 5xx, only documented status codes, content types, headers and bodies,
//! valid requests accepted, invalid ones refused. Its settings (seed, examples per operation,
//! the checks, the token's team) are in `tests/openapi/schemathesis.toml`.

use serde_json::{Value, json};
use tests::s3::S3Server;
use tests::{Lockstep, Options, workspace};

/// The token's team; `tests/openapi/schemathesis.toml` sets every `{team}` to it.
const TEAM: &str = "t1";

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

#[tokio::test]
async fn schemathesis_finds_no_failure() {
    let s3 = S3Server::start();
    let node = Lockstep::start_with(s3.configure(Options::default(), &s3.endpoint()));
    let token = node.token_with(&json!({
        "sub": "ana",
        "teams": [TEAM],
        "admin_of": [TEAM],
        "scope": "publish publish:global locks presign control",
        "exp": tests::now() + 3600,
    }));
    let url = format!("{}/api/v1/openapi.json", node.http());

    let doc: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    let operations = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| METHODS.iter().filter(|m| item.get(**m).is_some()).count())
        .sum::<usize>();
    assert!(operations >= 12, "{operations} operations in {doc}");

    // Runs in a scratch directory: schemathesis writes its report (and any cache) there.
    let scratch = tempfile::tempdir().expect("temp dir");
    let report_path = scratch.path().join("report.json");
    let output = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(workspace().join("tests/openapi/schemathesis.toml"))
        .arg("run")
        .arg(url)
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .args(["--no-color", "--continue-on-failure", "--report", "json"])
        .arg("--report-json-path")
        .arg(&report_path)
        .current_dir(scratch.path())
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 -m schemathesis.cli: {e}; run the README's test command, which installs it"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failed = || {
        format!(
            "schemathesis ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}\nlockstep log:\n{}\ns3s-fs log:\n{}",
            output.status,
            node.log(),
            s3.log()
        )
    };
    assert!(output.status.success(), "{}", failed());

    // A pass must come from testing every operation, not from testing none.
    let report: Value = serde_json::from_slice(
        &std::fs::read(&report_path).unwrap_or_else(|e| panic!("no report ({e}): {}", failed())),
    )
    .unwrap_or_else(|e| panic!("unreadable report ({e}): {}", failed()));
    assert_eq!(report["exit_code"], 0, "{}", failed());
    assert_eq!(
        report["operations"]["tested"].as_u64(),
        Some(operations as u64),
        "{}",
        failed()
    );
    assert_eq!(report["operations"]["errored"], 0, "{}", failed());
    assert!(
        report["test_cases"]["generated"].as_u64().unwrap_or(0) >= 10 * operations as u64,
        "{}",
        failed()
    );
    assert_eq!(report["failures"], json!([]), "{}", failed());
    assert_eq!(report["errors"], json!([]), "{}", failed());
}
