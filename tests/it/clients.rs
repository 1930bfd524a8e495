//! Real third-party STOMP clients against a real node: @stomp/stompjs in Node and in headless
//! Chromium, and stomp.py over WebSocket. The scripts in `tests/clients/` run the scenario and
//! assert; these tests start the node, hand the scripts their configuration, and check they
//! passed. The test command installs the scripts' dependencies.

use serde_json::json;
use std::process::Command;
use tests::{Lockstep, Options, free_port, workspace};

const HEARTBEAT_MS: u32 = 500;

fn node(page_port: Option<u16>) -> Lockstep {
    node_with(page_port, &[])
}

/// [`node`] with extra `LOCKSTEP_*` settings.
fn node_with(page_port: Option<u16>, extra: &[(&str, &str)]) -> Lockstep {
    let mut options = Options::default()
        .env("LOCKSTEP_HUB_HEARTBEAT_SEND_MS", HEARTBEAT_MS)
        .env("LOCKSTEP_HUB_HEARTBEAT_RECV_MS", HEARTBEAT_MS);
    for (key, value) in extra {
        options = options.env(key, value);
    }
    if let Some(port) = page_port {
        options = options.env(
            "LOCKSTEP_ALLOWED_ORIGINS",
            format!("http://127.0.0.1:{port}"),
        );
    }
    Lockstep::start_with(options)
}

fn config(node: &Lockstep, page_port: Option<u16>) -> String {
    json!({
        "http": node.http(),
        "ws": node.ws(),
        "user": "ana",
        "team": "t1",
        "tokens": {
            "subscriber": node.token("ana", &["t1"], ""),
            "publisher": node.token("backend", &["t1"], "publish publish:global"),
            "sender": node.token("bot", &["t1"], "publish"),
        },
        "heartbeat_ms": HEARTBEAT_MS,
        "page_port": page_port,
    })
    .to_string()
}

/// Runs a client script; panics with its output and the node's log unless it printed `OK`.
pub(crate) fn run(node: &Lockstep, program: &str, script: &str, config: &str) {
    let dir = workspace().join("tests/clients");
    let output = Command::new(program)
        .arg(dir.join(script))
        .arg(config)
        .current_dir(&dir)
        .output();
    let output = output.unwrap_or_else(|e| {
        panic!(
            "cannot run {program} {script}: {e}; run the README's test command, which installs it"
        )
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.lines().any(|l| l.starts_with("OK")),
        "{script} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}\nlockstep log:\n{}",
        output.status,
        node.log()
    );
}

#[test]
fn stompjs_in_node() {
    let node = node(None);
    run(&node, "node", "node/stompjs.mjs", &config(&node, None));
}

#[test]
fn stompjs_in_headless_chromium() {
    let page_port = free_port();
    let node = node(Some(page_port));
    run(
        &node,
        "node",
        "browser/run.mjs",
        &config(&node, Some(page_port)),
    );
}

#[test]
fn stomp_py_over_websocket() {
    let node = node(None);
    run(&node, "python3", "python/stomp_py.py", &config(&node, None));
}

/// A bot that publishes above its rate keeps receiving (the session's read side once starved
/// its writes): stomp.py and stompjs, subscribed to their own user topic with 1 s heart-beats,
/// send 2,000 SENDs to it as fast as they can; all 2,000 arrive in order at the node's rate of
/// 500/s, never more than a second apart, and the connection stays up.
fn flood_node() -> Lockstep {
    Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HUB_PUBLISH_RATE", 500)
            .env("LOCKSTEP_HUB_PUBLISH_BURST", 50)
            .env("LOCKSTEP_HUB_HEARTBEAT_SEND_MS", 1000)
            .env("LOCKSTEP_HUB_HEARTBEAT_RECV_MS", 1000),
    )
}

fn flood_config(node: &Lockstep) -> String {
    json!({
        "ws": node.ws(),
        "token": node.token("bot", &[], "publish"),
        "user": "bot",
        "count": 2000,
        "rate": 500,
        "timeout_s": 20,
        "max_gap_s": 1,
    })
    .to_string()
}

#[test]
fn stomp_py_flooding_its_own_topic_keeps_receiving() {
    let node = flood_node();
    run(&node, "python3", "python/flood.py", &flood_config(&node));
}

#[test]
fn stompjs_flooding_its_own_topic_keeps_receiving() {
    let node = flood_node();
    run(&node, "node", "node/flood.mjs", &flood_config(&node));
}

/// Resume from an offset with real clients (DESIGN §12): live events, a disconnect, a resume
/// with exactly the missed events and then live ones, `last`, a quiet topic, and an unknown
/// epoch answered `x-recovered:false` (the scenario is `shared/resume_scenario.mjs` and
/// `python/resume.py`).
#[test]
fn stompjs_in_node_resumes_from_an_offset() {
    let node = node(None);
    run(&node, "node", "node/resume.mjs", &config(&node, None));
}

#[test]
fn stompjs_in_headless_chromium_resumes_from_an_offset() {
    let page_port = free_port();
    let node = node(Some(page_port));
    run(
        &node,
        "node",
        "browser/resume.mjs",
        &config(&node, Some(page_port)),
    );
}

#[test]
fn stomp_py_resumes_from_an_offset() {
    let node = node(None);
    run(&node, "python3", "python/resume.py", &config(&node, None));
}

/// A dashboard opened in the middle of a run (DESIGN §13): the script is the platform backend
/// (job progress at ~200 events/s over HTTP batches, 30 locks taken by three users, some
/// released and retaken) and opens a page in headless Chromium whose @stomp/stompjs subscribes
/// with `x-stream-offset:snapshot` mid-run: the state frames are exactly each key's latest
/// event as of the snapshot's offset, live frames follow from the next offset with no gap or
/// duplicate, and the dashboard ends equal to the backend's state
/// (`shared/dashboard_scenario.mjs`).
#[test]
fn stompjs_in_headless_chromium_opens_a_dashboard_mid_run() {
    let page_port = free_port();
    let node = node(Some(page_port));
    let config = json!({
        "http": node.http(),
        "ws": node.ws(),
        "user": "ana",
        "team": "t1",
        "tokens": {
            "subscriber": node.token("ana", &["t1"], ""),
            "publisher": node.token("backend", &["t1"], "publish"),
            "holder-ivan": node.token("ivan", &["t1"], "locks"),
            "holder-mei": node.token("mei", &["t1"], "locks"),
            "holder-olu": node.token("olu", &["t1"], "locks"),
        },
        "heartbeat_ms": HEARTBEAT_MS,
        "page_port": page_port,
    })
    .to_string();
    run(&node, "node", "browser/dashboard.mjs", &config);
}

/// Token refresh over the open socket (DESIGN §15) with the real stompjs: three refreshes,
/// each before the current token's `exp`, over a connection that outlives three tokens
/// without reconnecting and without missing an event; the third drops a team and ends that
/// subscription with `lockstep.unsubscribed`; then the control API ends the other
/// (`shared/refresh_scenario.mjs`).
fn refresh_config(node: &Lockstep, page_port: Option<u16>) -> String {
    let start = tests::now();
    // Four seconds per token, each refreshed two before its exp: a margin a loaded machine's
    // timers and round trips keep, and a run that outlives three tokens in about 14 s. The
    // first lives longer in Chromium, which takes a few seconds to start before the page
    // connects.
    let lead = if page_port.is_some() { 9 } else { 4 };
    let expires: Vec<u64> = (0..4).map(|i| start + lead + 4 * i).collect();
    let token = |i: usize, teams: &[&str]| {
        node.token_with(&json!({
            "sub": "ana", "teams": teams, "iat": start, "exp": expires[i],
        }))
    };
    json!({
        "http": node.http(),
        "ws": node.ws(),
        "user": "ana",
        "team": "t1",
        "team2": "t2",
        "tokens": {
            "t0": token(0, &["t1", "t2"]),
            "t1": token(1, &["t1", "t2"]),
            "t2": token(2, &["t1", "t2"]),
            "t3": token(3, &["t1"]),
            "publisher": node.token("backend", &["t1", "t2"], "publish"),
            "control": node.token("platform", &[], "control"),
        },
        "expires": expires,
        "heartbeat_ms": HEARTBEAT_MS,
        "page_port": page_port,
    })
    .to_string()
}

#[test]
fn stompjs_in_node_refreshes_its_token() {
    let node = node(None);
    run(
        &node,
        "node",
        "node/refresh.mjs",
        &refresh_config(&node, None),
    );
}

#[test]
fn stompjs_in_headless_chromium_refreshes_its_token() {
    let page_port = free_port();
    let node = node(Some(page_port));
    run(
        &node,
        "node",
        "browser/refresh.mjs",
        &refresh_config(&node, Some(page_port)),
    );
}

/// The client library (clients/js, DESIGN §16) with the real stompjs: resume after a dropped
/// socket with no gap or duplicate, a token refreshed over the socket before its `exp`, a lock
/// renewed, refused, lost to a takeover and released, presence, `onReset` for a stored position
/// of another epoch (`shared/library_scenario.mjs`).
fn library_config(node: &Lockstep, page_port: Option<u16>) -> String {
    let start = tests::now();
    // Chromium takes a few seconds to start before the page connects.
    let lead = if page_port.is_some() { 9 } else { 4 };
    let expires = [start + lead + 3, start + lead + 7, start + 3600];
    let token = |exp: u64| {
        node.token_with(&json!({
            "sub": "ana", "teams": ["t1"], "scope": "locks", "iat": start, "exp": exp,
        }))
    };
    json!({
        "http": node.http(),
        "ws": node.ws(),
        "user": "ana",
        "team": "t1",
        "tokens": {
            "user0": token(expires[0]),
            "user1": token(expires[1]),
            "user2": token(expires[2]),
            "publisher": node.token("backend", &["t1"], "publish"),
            "admin": node.token_with(&json!({
                "sub": "lead", "teams": ["t1"], "admin_of": ["t1"], "scope": "locks", "exp": start + 3600,
            })),
        },
        "expires": expires,
        "heartbeat_ms": HEARTBEAT_MS,
        "page_port": page_port,
    })
    .to_string()
}

fn library_node(page_port: Option<u16>) -> Lockstep {
    node_with(
        page_port,
        &[
            ("LOCKSTEP_PRESENCE_ENABLED", "true"),
            ("LOCKSTEP_LOCKS_MIN_TTL", "1s"),
            // A lock whose socket closed is released after 1 s: the scenario shows the library
            // binding it to the new connection's session in time.
            ("LOCKSTEP_LOCKS_SESSION_GRACE", "1s"),
        ],
    )
}

#[test]
fn the_client_library_in_node() {
    let node = library_node(None);
    run(
        &node,
        "node",
        "node/library.mjs",
        &library_config(&node, None),
    );
}

#[test]
fn the_client_library_in_headless_chromium() {
    let page_port = free_port();
    let node = library_node(Some(page_port));
    run(
        &node,
        "node",
        "browser/library.mjs",
        &library_config(&node, Some(page_port)),
    );
}
