//! Private PostgreSQL servers for tests: `initdb` into a temporary directory, started with
//! `pg_ctl` on a free loopback port, stopped on drop. Run as the `postgres` user when the tests
//! run as root (PostgreSQL refuses to run as root). Needs Debian's PostgreSQL server package
//! (the test command installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A running PostgreSQL cluster.
#[derive(Debug)]
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    running: bool,
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL server binaries not found under /usr/lib/postgresql: run tests/run.sh, which installs them")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a PostgreSQL program as the `postgres` user when we are root.
fn as_postgres(program: &Path, args: &[&str]) -> Output {
    let output = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args)
            .output()
    } else {
        Command::new(program).args(args).output()
    };
    output.unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

impl Postgres {
    /// Creates and starts a cluster with trust authentication for `postgres`.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "chown to postgres failed"
            );
        }
        let data = dir.path().join("data");
        let data_str = data.to_str().expect("utf-8 path");
        let out = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data_str,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port: crate::free_port(),
            bin,
            data,
            _dir: dir,
            running: false,
        };
        pg.start_server();
        pg
    }

    fn start_server(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        let out = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap_or_default(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.psql("postgres", "SELECT 1").is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL on port {} does not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops like a crash: no checkpoint, connections dropped (`pg_ctl stop -m immediate`).
    pub fn crash(&mut self) {
        if self.running {
            let _ = as_postgres(
                &self.bin.join("pg_ctl"),
                &[
                    "-D",
                    self.data.to_str().unwrap_or_default(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
            self.running = false;
        }
    }

    /// Starts again after [`Postgres::crash`], on the same port and data.
    pub fn restart(&mut self) {
        self.crash();
        self.start_server();
    }

    /// Creates a database and returns its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
        self.url(name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// psql on `database` as `postgres`: unaligned rows without headers, stopping at the first
    /// error.
    fn psql_command(&self, database: &str) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            database,
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
        ]);
        command
    }

    /// A psql session reading statements from its stdin and writing unaligned rows to its
    /// stdout, for tests that must hold a transaction open while something else runs.
    ///
    /// # Panics
    ///
    /// When psql cannot be started.
    pub fn interactive(&self, database: &str) -> std::process::Child {
        self.psql_command(database)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("psql")
    }

    /// Runs SQL with psql; returns its unaligned output.
    ///
    /// # Errors
    ///
    /// psql's error output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let output = self
            .psql_command(database)
            .args(["-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.crash();
    }
}
