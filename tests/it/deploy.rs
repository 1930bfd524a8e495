//! `deploy/local-cluster` end to end: `start 2` brings up a whole cluster on loopback (a
//! private Redis, PostgreSQL and s3s-fs, two nodes, nginx in front), the entry URL it prints
//! serves the API, WebSocket upgrades and presigned storage, and `stop` leaves no process
//! behind. The script's printed lines are the interface under test: `NAME URL PID` per
//! process, then `entry URL`.

use crate::envelope;
use loadtest::client::StompClient;
use protocol::Command as Stomp;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::{lockstep_bin, workspace};

/// One process line of `local-cluster start`.
#[derive(Debug)]
struct Process {
    name: String,
    url: String,
    pid: u32,
    /// `/proc/PID/stat` field 22 when it was printed, so a reused PID is not taken for it.
    started: String,
}

/// A `deploy/local-cluster` state directory; stops the cluster on drop, so a test that fails
/// half-way leaves no process behind.
struct Cluster {
    state: tempfile::TempDir,
    /// The programs the script is told to use, found (or the test failed) before anything
    /// started.
    tools: Vec<(&'static str, PathBuf)>,
    stopped: bool,
}

impl Cluster {
    /// # Panics
    ///
    /// When lockstep, s3s-fs or nginx is missing, with what to install.
    fn new() -> Cluster {
        let tools = vec![
            ("LOCKSTEP_BIN", lockstep_bin()),
            ("S3S_FS_BIN", tests::s3::s3s_fs_bin()),
            ("NGINX_BIN", tests::nginx::nginx_bin()),
        ];
        Cluster {
            state: tempfile::tempdir().expect("temp dir"),
            tools,
            stopped: false,
        }
    }

    fn state(&self) -> &Path {
        self.state.path()
    }

    /// `deploy/local-cluster ARGS` with only the environment given here (a DATABASE_URL or
    /// LOCKSTEP_* variable of the caller would change what it starts).
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(workspace().join("deploy/local-cluster"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("STATE", self.state())
            // Every child's output goes to files in the state directory, so the pipes close
            // when the script exits, not when the cluster does.
            .stdin(Stdio::null());
        for (name, path) in &self.tools {
            command.env(name, path);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .expect("run deploy/local-cluster")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.command(&["stop"]).output();
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `(stat field 3, field 22)`: the state letter and the start time, or `None` when there is no
/// such process.
fn stat(pid: u32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(((*fields.first()?).to_owned(), (*fields.get(19)?).to_owned()))
}

/// Whether the process that was printed has exited: no such PID, a zombie (exited, not yet
/// reaped by whoever inherited it), or the PID now names a newer process.
fn gone(process: &Process) -> bool {
    stat(process.pid).is_none_or(|(state, started)| state == "Z" || started != process.started)
}

/// The `NAME URL PID` lines and the `entry URL` line of `start`'s output.
fn parse(stdout: &str) -> (Vec<Process>, Option<String>) {
    let mut processes = Vec::new();
    let mut entry = None;
    for line in stdout.lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["entry", url] => entry = Some((*url).to_owned()),
            [name, url, pid] => {
                if let Ok(pid) = pid.parse::<u32>() {
                    let started = stat(pid).map(|(_, s)| s).unwrap_or_default();
                    processes.push(Process {
                        name: (*name).to_owned(),
                        url: (*url).to_owned(),
                        pid,
                        started,
                    });
                }
            }
            _ => {}
        }
    }
    (processes, entry)
}

async fn get_status(url: &str) -> u16 {
    reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
        .as_u16()
}

/// One API call through `base`; returns the status and the JSON body (`null` when empty).
async fn call(base: &str, method: &str, path: &str, token: &str, body: &Value) -> (u16, Value) {
    crate::locks::request(
        &reqwest::Client::new(),
        base,
        method,
        path,
        token,
        Some(body.clone()),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path} via {base}: {e}"))
}

/// `lockstep token` signed with the cluster's shared secret, as the script's summary says.
fn mint(state: &Path, sub: &str, team: &str, scope: &str) -> String {
    let secret = std::fs::read_to_string(state.join("jwt-secret"))
        .expect("the cluster's shared secret in $STATE/jwt-secret");
    let output = Command::new(lockstep_bin())
        .args(["token", "--sub", sub, "--team", team, "--scope", scope])
        .env_clear()
        .env("LOCKSTEP_JWT_SECRET", secret.trim())
        .output()
        .expect("run lockstep token");
    assert!(output.status.success(), "lockstep token: {}", text(&output));
    String::from_utf8(output.stdout)
        .expect("utf-8 token")
        .trim()
        .to_owned()
}

/// Reads `/team/t1` events until one of `kind` arrives; returns its envelope.
async fn next_event(client: &mut StompClient, kind: &str) -> Value {
    loop {
        let frame = client
            .expect_frame()
            .await
            .unwrap_or_else(|e| panic!("waiting for {kind}: {e}"));
        assert_eq!(
            frame.command,
            Stomp::Message,
            "{}",
            loadtest::client::describe(&frame)
        );
        let event = envelope(&frame, "t", "/team/t1");
        if event["type"] == kind {
            return event;
        }
    }
}

#[tokio::test]
async fn local_cluster_starts_serves_through_nginx_and_stops_everything() {
    let mut cluster = Cluster::new();
    let state = cluster.state().to_owned();

    let output = cluster.run(&["start", "2"]);
    assert!(
        output.status.success(),
        "local-cluster start 2 failed:\n{}",
        text(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (processes, entry) = parse(&stdout);
    let names: BTreeSet<&str> = processes.iter().map(|p| p.name.as_str()).collect();
    let want: BTreeSet<&str> = ["redis", "postgres", "s3", "node1", "node2", "nginx"].into();
    assert_eq!(
        names,
        want,
        "one NAME URL PID line per process expected:\n{}",
        text(&output)
    );
    assert_eq!(
        processes.len(),
        want.len(),
        "a process printed twice:\n{stdout}"
    );
    for p in &processes {
        assert!(
            !gone(p),
            "{} ({}) is not running right after start:\n{stdout}",
            p.name,
            p.pid
        );
    }
    let by_name = |name: &str| processes.iter().find(|p| p.name == name).expect("printed");
    let entry = entry.unwrap_or_else(|| panic!("no `entry URL` line:\n{stdout}"));
    assert_eq!(
        entry,
        by_name("nginx").url,
        "with nginx installed the entry is nginx:\n{stdout}"
    );
    assert!(
        by_name("redis").url.starts_with("redis://127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        by_name("postgres").url.starts_with("postgres://"),
        "{stdout}"
    );
    assert!(
        stdout.contains("presign: on"),
        "s3s-fs was given, so presign is on:\n{stdout}"
    );
    assert!(
        stdout.contains(" token --sub "),
        "the summary says how to mint a token:\n{stdout}"
    );

    // Starting again while it runs is refused and changes nothing.
    let again = cluster.run(&["start", "2"]);
    assert!(
        !again.status.success(),
        "a second start must refuse:\n{}",
        text(&again)
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already running"),
        "{}",
        text(&again)
    );

    // Every node, and nginx in front of them, is ready.
    for node in ["node1", "node2"] {
        let url = &by_name(node).url;
        assert_eq!(
            get_status(&format!("{url}/readyz")).await,
            200,
            "{node} {url}/readyz"
        );
    }
    // nginx spreads requests: ask several times, every answer must be 200.
    for _ in 0..4 {
        assert_eq!(
            get_status(&format!("{entry}/readyz")).await,
            200,
            "{entry}/readyz through nginx"
        );
    }

    // A subscriber over a WebSocket upgraded through nginx.
    let ana = mint(&state, "ana", "t1", "publish locks presign");
    let ws = format!("ws://{}/ws", entry.trim_start_matches("http://"));
    let (mut subscriber, _) = StompClient::connect(&ws, &ana)
        .await
        .unwrap_or_else(|e| panic!("STOMP over {ws} (nginx must pass the upgrade): {e}"));
    subscriber
        .subscribe("t", "/team/t1")
        .await
        .expect("subscribe /team/t1");

    // Presign round trip through the entry URL: lock, signed PUT straight to s3s-fs, signed GET,
    // commit (the node checks the object in storage and announces it).
    let item = "frames-1";
    let (status, lock) = call(
        &entry,
        "POST",
        &format!("/api/v1/teams/t1/items/{item}/lock"),
        &ana,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "lock through {entry}: {lock}");
    let fence = lock["token"].as_u64().expect("fencing token");
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let (status, put) = call(
        &entry,
        "POST",
        &format!("/api/v1/teams/t1/items/{item}/presign"),
        &ana,
        &json!({
            "method": "PUT",
            "name": "frame.bin",
            "content_type": "application/octet-stream",
            "token": fence,
        }),
    )
    .await;
    assert_eq!(status, 200, "presign PUT: {put}");
    let s3 = &by_name("s3").url;
    assert!(
        put["url"]
            .as_str()
            .is_some_and(|u| u.starts_with(s3.as_str())),
        "the URL points at the cluster's s3s-fs {s3}: {put}"
    );
    let stored = crate::presign::send(&put, Some(bytes.clone())).await;
    assert_eq!(
        stored.status,
        200,
        "PUT to storage: {}",
        String::from_utf8_lossy(&stored.body)
    );
    // s3s-fs keeps object KEY of bucket `items` as a file under $STATE/s3/root/items.
    let stored = std::fs::read(state.join(format!("s3/root/items/t1/{item}/frame.bin")));
    assert_eq!(
        stored.ok().as_deref(),
        Some(bytes.as_slice()),
        "the object on the storage server's disk"
    );
    let (status, get) = call(
        &entry,
        "POST",
        &format!("/api/v1/teams/t1/items/{item}/presign"),
        &ana,
        &json!({"method": "GET", "name": "frame.bin"}),
    )
    .await;
    assert_eq!(status, 200, "presign GET: {get}");
    let fetched = crate::presign::send(&get, None).await;
    let (status, read) = (fetched.status, fetched.body);
    assert_eq!((status, read.len()), (200, bytes.len()), "GET from storage");
    assert!(
        read == bytes,
        "the bytes read back differ from those written"
    );
    let (status, committed) = call(
        &entry,
        "POST",
        &format!("/api/v1/teams/t1/items/{item}/commit"),
        &ana,
        &json!({"token": fence, "name": "frame.bin"}),
    )
    .await;
    assert_eq!(status, 200, "commit: {committed}");
    assert_eq!(committed["size"], bytes.len(), "{committed}");

    // An event published over HTTP through nginx reaches the subscriber (whichever nodes
    // nginx picked for each: the cluster fans out through Redis).
    let (status, published) = call(
        &entry,
        "POST",
        "/api/v1/publish",
        &ana,
        &json!({
            "topic": "/team/t1",
            "type": "job.progress",
            "data": {"job_id": "deploy", "done": 1, "total": 1},
        }),
    )
    .await;
    assert_eq!(status, 202, "publish through {entry}: {published}");
    assert_eq!(
        next_event(&mut subscriber, "lock.acquired").await["data"]["item"],
        item
    );
    assert_eq!(
        next_event(&mut subscriber, "item.updated").await["data"]["name"],
        "frame.bin"
    );
    let progress = next_event(&mut subscriber, "job.progress").await;
    assert_eq!(progress["id"], published["id"], "{progress}");
    drop(subscriber);

    // stop ends every printed process, nodes first, and a second stop has nothing to do.
    let output = cluster.run(&["stop"]);
    cluster.stopped = true;
    assert!(
        output.status.success(),
        "local-cluster stop failed:\n{}",
        text(&output)
    );
    // `stop` returns only once each process is gone (a zombie awaiting its reaper counts).
    let alive: Vec<&Process> = processes.iter().filter(|p| !gone(p)).collect();
    assert!(
        alive.is_empty(),
        "still running after stop: {alive:?}\n{}",
        text(&output)
    );
    let stop_log = String::from_utf8_lossy(&output.stdout);
    for p in &processes {
        assert!(
            stop_log.contains(&format!("stopped {} ({})", p.name, p.pid)),
            "stop did not report {}:\n{stop_log}",
            p.name
        );
    }
    let stopped_at = |name: &str| {
        stop_log
            .find(&format!("stopped {name} "))
            .expect("reported")
    };
    assert!(
        stopped_at("node1") < stopped_at("nginx") && stopped_at("node2") < stopped_at("nginx"),
        "nodes stop before nginx:\n{stop_log}"
    );
    assert!(
        stopped_at("nginx") < stopped_at("postgres")
            && stopped_at("postgres") < stopped_at("redis"),
        "then nginx, PostgreSQL, Redis:\n{stop_log}"
    );
    let again = cluster.run(&["stop"]);
    assert!(
        again.status.success(),
        "stop with nothing running:\n{}",
        text(&again)
    );
    let status = cluster.run(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("not running"),
        "status after stop:\n{}",
        text(&status)
    );
}
