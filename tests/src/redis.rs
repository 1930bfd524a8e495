//! Private Redis servers for tests: standalone or a Redis Cluster of several masters, each on
//! free loopback ports with its own directory, stopped by PID on drop. They need `redis-server`
//! and `redis-cli` (Redis 7; the test command installs them).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    cluster: bool,
}

fn require(program: &str) {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        found.is_ok(),
        "{program} is not installed: run tests/run.sh, which installs redis-server and redis-cli"
    );
}

impl RedisServer {
    /// A standalone server on a free port.
    pub fn start() -> RedisServer {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut server = RedisServer {
            child: None,
            port: crate::free_port(),
            dir: tmp.path().to_owned(),
            _tmp: Some(tmp),
            cluster: false,
        };
        server.spawn();
        server
    }

    fn cluster_node(port: u16, dir: PathBuf) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            _tmp: None,
            cluster: true,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        require("redis-server");
        let mut command = Command::new("redis-server");
        command
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]);
        }
        self.child = Some(command.spawn().expect("spawn redis-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a `redis-cli` command against this server; `None` when it fails.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Sharded channels currently subscribed on this server (`PUBSUB SHARDCHANNELS`).
    pub fn shard_channels(&self) -> Vec<String> {
        self.cli(&["PUBSUB", "SHARDCHANNELS"])
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Wait until the port is really closed.
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts again on the same port (with no data: persistence is off).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Redis Cluster of `masters` nodes, no replicas.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _tmp: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the nodes and joins them with `redis-cli --cluster create`.
    pub fn start(masters: usize) -> RedisCluster {
        require("redis-cli");
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for i in 0..masters {
            // The cluster bus uses port + 10000, which must be free too.
            let port = loop {
                let p = 20_000 + rand::random_range(0..30_000u16);
                let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
                if free(p) && free(p + 10_000) {
                    break p;
                }
            };
            let dir = tmp.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).expect("node dir");
            nodes.push(RedisServer::cluster_node(port, dir));
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes, _tmp: tmp }
    }

    /// `redis-cluster://127.0.0.1:p1,127.0.0.1:p2,…`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    /// The node owning `channel`'s hash slot.
    pub fn owner(&self, channel: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", channel])
            .and_then(|s| s.parse().ok())
            .expect("keyslot");
        // Each node's own line of CLUSTER NODES lists the slot ranges it serves.
        for (i, node) in self.nodes.iter().enumerate() {
            let info = node.cli(&["CLUSTER", "NODES"]).unwrap_or_default();
            for line in info.lines().filter(|l| l.contains("myself")) {
                for range in line.split_whitespace().skip(8) {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>())
                        && (a..=b).contains(&slot)
                    {
                        return i;
                    }
                }
            }
        }
        panic!("no node owns slot {slot}");
    }

    /// Shard channels subscribed across the cluster.
    pub fn shard_channels(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .nodes
            .iter()
            .flat_map(RedisServer::shard_channels)
            .collect();
        all.sort();
        all
    }
}
