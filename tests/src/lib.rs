//! The end-to-end test harness: starts real `lockstep` processes (and real Redis, PostgreSQL
//! and S3-compatible servers) on free loopback ports, mints tokens, and stops everything it
//! started by PID.
//!
//! The `lockstep` binary must be built first (`cargo build --bin lockstep`, which the test
//! command does); set `LS_BIN` to use another one.
//!
//! # Layout
//!
//! - [`Lockstep`]: a running node and its tokens.
//! - [`redis`]: private Redis servers and Redis Clusters on free ports.
//! - [`postgres`]: private PostgreSQL clusters on free ports.
//! - [`s3`]: private S3-compatible servers (s3s-fs) on free ports.
//! - [`nginx`]: a private nginx answering CORS in front of a storage server, for browsers.
//! - [`streams`]: the checker that proves a subscriber never missed an event silently.
//! - `it/`: the tests themselves, one binary, a module per area.

pub mod nginx;
pub mod postgres;
pub mod redis;
pub mod s3;
pub mod streams;

use anyhow::{Context as _, bail};
use jsonwebtoken::{EncodingKey, Header};
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The `lockstep` binary next to the test executable (`target/<profile>/lockstep`).
pub fn lockstep_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LS_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> → target/<profile>/lockstep
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("lockstep");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bin lockstep` before the tests",
        bin.display()
    );
    bin
}

/// A running `lockstep serve` process, killed on drop.
#[derive(Debug)]
pub struct Lockstep {
    child: Option<Child>,
    pub addr: SocketAddr,
    secret: String,
    dir: tempfile::TempDir,
}

/// Settings for [`Lockstep::start_with`].
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// `LOCKSTEP_*` variables (full names).
    pub env: Vec<(String, String)>,
    /// Use this data directory and its generated secret instead of a fresh one and a
    /// configured secret.
    pub data_dir: Option<PathBuf>,
    /// The HS256 secret (nodes of one cluster share it); random when unset.
    pub secret: Option<String>,
}

impl Options {
    #[must_use]
    pub fn secret(mut self, secret: &str) -> Options {
        self.secret = Some(secret.to_owned());
        self
    }

    #[must_use]
    pub fn data_dir(mut self, dir: &Path) -> Options {
        self.data_dir = Some(dir.to_owned());
        self
    }

    #[must_use]
    pub fn env(mut self, key: &str, value: impl std::fmt::Display) -> Options {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }
}

impl Lockstep {
    /// Starts a node on a free loopback port with a fresh data directory.
    ///
    /// # Panics
    ///
    /// When the node does not start; the message includes its log.
    pub fn start() -> Lockstep {
        Lockstep::start_with(Options::default())
    }

    /// Like [`Lockstep::start`], with extra configuration.
    ///
    /// # Panics
    ///
    /// When the node does not start; the message includes its log.
    #[allow(clippy::needless_pass_by_value)] // Builder-style call sites read better.
    pub fn start_with(options: Options) -> Lockstep {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = options.secret.clone().unwrap_or_else(random_secret);
        let mut command = Command::new(lockstep_bin());
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOCKSTEP_LOG_LEVEL", "info,hub=debug,api=debug");
        let secret = match &options.data_dir {
            Some(data) => {
                command.env("LOCKSTEP_DATA_DIR", data);
                // The node generates or reuses the secret; read it after start.
                None
            }
            None => {
                command
                    .env("LOCKSTEP_DATA_DIR", dir.path().join("data"))
                    .env("LOCKSTEP_JWT_SECRET", &secret);
                Some(secret)
            }
        };
        command
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("lockstep.log")).expect("log file"));
        // Presence is on by default (DESIGN §14), but its `presence.*` events would land in
        // every delivery test that counts the events on a team topic; those tests count only
        // their own events, so presence tests opt back in.
        command.env("LOCKSTEP_PRESENCE_ENABLED", "false");
        for (k, v) in &options.env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn lockstep");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = match lines.next() {
            Some(Ok(line)) => line
                .strip_prefix("lockstep listening on http://")
                .and_then(|a| a.parse().ok()),
            _ => None,
        };
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("lockstep.log")).unwrap_or_default();
            panic!("lockstep did not start:\n{log}");
        };
        let secret = secret.unwrap_or_else(|| {
            let data = options.data_dir.as_ref().expect("data dir");
            std::fs::read_to_string(data.join("jwt-secret"))
                .expect("generated secret")
                .trim()
                .to_owned()
        });
        Lockstep {
            child: Some(child),
            addr,
            secret,
            dir,
        }
    }

    /// The node's HS256 secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lockstep.log")).unwrap_or_default()
    }

    /// A token for `sub` with `teams` and space-separated `scope`, valid for an hour.
    pub fn token(&self, sub: &str, teams: &[&str], scope: &str) -> String {
        self.token_with(
            &serde_json::json!({"sub": sub, "teams": teams, "scope": scope, "exp": now() + 3600}),
        )
    }

    /// A token with exactly these claims, signed with the node's secret.
    pub fn token_with(&self, claims: &serde_json::Value) -> String {
        sign(claims, self.secret.as_bytes())
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status and how long it took.
    ///
    /// # Errors
    ///
    /// When the process does not exit within `timeout`.
    pub fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take().context("already stopped")?;
        signal(child.id(), libc::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("lockstep did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /readyz`'s status code (0 when the node does not answer).
    pub fn readyz(&self) -> u16 {
        let Ok(mut stream) = std::net::TcpStream::connect(self.addr) else {
            return 0;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "GET /readyz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        if std::io::Write::write_all(&mut stream, request.as_bytes()).is_err() {
            return 0;
        }
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// Polls `/readyz` until it answers `status` or `timeout` passes; returns how long it took.
    ///
    /// # Errors
    ///
    /// On timeout.
    pub fn wait_readyz(&self, status: u16, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.readyz() == status {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "/readyz did not answer {status} within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills the node with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process's resident memory, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// The sum of this node's `/metrics` samples whose line starts with `prefix`.
    ///
    /// # Panics
    ///
    /// When `/metrics` cannot be read.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.http()))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("/metrics body");
        loadtest::stats::metric_sum(&text, prefix)
    }
}

impl Drop for Lockstep {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A random 48-character secret.
pub fn random_secret() -> String {
    (0..48)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect()
}

/// Sends a signal to a process.
pub fn signal(pid: u32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "kill -{signal} {pid} failed"
    );
}

/// `VmRSS` of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs claims with HS256.
pub fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign token")
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for servers started right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
