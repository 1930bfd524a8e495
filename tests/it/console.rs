//! The console (`/console`, DESIGN §16) in headless Chromium against a real node
//! (`tests/clients/browser/console.mjs`): on the embedded defaults with the dev-token button,
//! and on a node with a configured secret, where the button and the endpoint are absent.
//! Screenshots are written under the target directory as test artifacts.

use serde_json::json;
use std::path::PathBuf;
use tests::{Lockstep, Options, workspace};

/// Where the screenshots go: `$CARGO_TARGET_DIR/console-shots/<test>` (kept after the run).
fn shots(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    let dir = target.join("console-shots").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(node: &Lockstep, config: &serde_json::Value) -> String {
    let dir = workspace().join("tests/clients");
    let output = std::process::Command::new("node")
        .arg(dir.join("browser/console.mjs"))
        .arg(config.to_string())
        .current_dir(&dir)
        .output()
        .expect("run node browser/console.mjs (the README's test command installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && stdout.starts_with("OK"),
        "console.mjs failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}\nlockstep log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        node.log()
    );
    eprintln!("console: {stdout}");
    stdout
}

#[test]
fn the_console_shows_jobs_locks_and_presence_live_and_after_a_reload() {
    // The embedded default: the secret is generated into the data directory.
    let data = tempfile::tempdir().unwrap();
    let node = Lockstep::start_with(
        Options::default()
            .data_dir(data.path())
            .env("LOCKSTEP_PRESENCE_ENABLED", "true"),
    );
    let config = json!({
        "http": node.http(),
        "dev": true,
        "shots": shots("embedded"),
        "tokens": {
            "publisher": node.token("backend", &["t1"], "publish"),
            "holder": node.token("ivan", &["t1"], "locks"),
        },
    });
    run(&node, &config);
}

#[test]
fn the_console_offers_no_dev_token_when_a_secret_is_configured() {
    let node = Lockstep::start();
    let config = json!({
        "http": node.http(),
        "dev": false,
        "shots": shots("configured"),
        "tokens": {},
    });
    // The script also checks that POST /console/dev-token answers 404.
    run(&node, &config);
}

#[test]
fn the_console_offers_no_dev_token_when_public_keys_verify_tokens() {
    // No secret at all: tokens come from an identity provider (RS256 keys in a JWKS file).
    let data = tempfile::tempdir().unwrap();
    // The harness reads a generated secret from here after start; the node, verifying with
    // public keys only, never uses one.
    std::fs::write(
        data.path().join("jwt-secret"),
        "unused by a node with public keys",
    )
    .unwrap();
    let node = Lockstep::start_with(
        Options::default().data_dir(data.path()).env(
            "LOCKSTEP_JWT_PUBLIC_KEYS",
            workspace()
                .join("protocol/src/auth/testdata/jwks.json")
                .display(),
        ),
    );
    let config = json!({
        "http": node.http(),
        "dev": false,
        "shots": shots("public-keys"),
        "tokens": {},
    });
    run(&node, &config);
}
