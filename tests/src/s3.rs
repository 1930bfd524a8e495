//! Private S3-compatible servers for tests: `s3s-fs` (0.14.1, which verifies SigV4 signatures
//! and presigned-URL expiry) on a free loopback port, serving a fresh temporary directory with
//! one bucket, with random credentials, killed by PID on drop.
//!
//! The binary is `$S3S_FS_BIN`, else `$HOME/.cache/lockstep-tools/bin/s3s-fs`, where the test
//! command installs it with
//! `cargo install s3s-fs@0.14.1 --features binary --locked --root $HOME/.cache/lockstep-tools`.

use crate::Options;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `s3s-fs` version the tests are written against.
pub const S3S_FS_VERSION: &str = "0.14.1";

/// One `s3s-fs` process with one bucket.
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// The served root: each directory in it is a bucket, each file under a bucket an object.
    root: PathBuf,
    dir: tempfile::TempDir,
}

/// Where the `s3s-fs` binary is.
///
/// # Panics
///
/// When it is not installed, with the command that installs it.
pub fn s3s_fs_bin() -> PathBuf {
    let bin = std::env::var_os("S3S_FS_BIN").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/lockstep-tools/bin/s3s-fs")
        },
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "s3s-fs is not installed at {} (set S3S_FS_BIN to use another path): run tests/run.sh, or \
         `cargo install s3s-fs@{S3S_FS_VERSION} --features binary --locked --root $HOME/.cache/lockstep-tools`",
        bin.display()
    );
    bin
}

impl S3Server {
    /// Starts `s3s-fs` on a free port with the bucket `items` and random credentials; returns
    /// once it accepts connections.
    ///
    /// # Panics
    ///
    /// When the binary is missing or the server does not come up within 10 s (with its log).
    pub fn start() -> S3Server {
        let bin = s3s_fs_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        let bucket = "items".to_owned();
        // s3s-fs serves existing directories as buckets; it creates none by itself here.
        std::fs::create_dir_all(root.join(&bucket)).expect("bucket dir");
        let mut server = S3Server {
            child: None,
            port: crate::free_port(),
            bucket,
            access_key: format!("AK{}", crate::random_secret()[..18].to_uppercase()),
            secret_key: crate::random_secret(),
            root,
            dir,
        };
        let log = std::fs::File::create(server.log_path()).expect("log file");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &server.port.to_string()])
            .args(["--access-key", &server.access_key])
            .args(["--secret-key", &server.secret_key])
            .arg(&server.root)
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn s3s-fs");
        server.child = Some(child);
        server.wait_until_listening();
        server
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "s3s-fs exited ({exited:?}) before listening on port {}; log:\n{}",
                self.port,
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on port {} within 10 s; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("s3s-fs.log")
    }

    /// The server's output so far (it logs refused requests with the reason).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `options` plus the `LOCKSTEP_S3_*` settings for this server's bucket and credentials,
    /// with URLs signed for `endpoint` (this server's own, or a proxy in front of it).
    #[must_use]
    pub fn configure(&self, options: Options, endpoint: &str) -> Options {
        options
            .env("LOCKSTEP_S3_BUCKET", &self.bucket)
            .env("LOCKSTEP_S3_ENDPOINT", endpoint)
            .env("LOCKSTEP_S3_PATH_STYLE", "true")
            .env("LOCKSTEP_S3_ACCESS_KEY_ID", &self.access_key)
            .env("LOCKSTEP_S3_SECRET_ACCESS_KEY", &self.secret_key)
    }

    /// The file holding object `key`: s3s-fs stores object `k` of bucket `b` as `root/b/k`.
    fn object_path(&self, key: &str) -> PathBuf {
        assert!(
            !key.split('/')
                .any(|s| s.is_empty() || s == "." || s == ".."),
            "test keys are plain relative paths: {key:?}"
        );
        self.root.join(&self.bucket).join(key)
    }

    /// The bytes stored under `key`, read from the server's disk (not through any URL), or
    /// `None` when there is no such object.
    pub fn stored(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.object_path(key)).ok()
    }

    /// Places an object directly on the server's disk (s3s-fs serves plain files as objects),
    /// for objects the test must not create through Lockstep (another team's, say).
    pub fn put_file(&self, key: &str, bytes: &[u8]) {
        let path = self.object_path(key);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("object dir");
        std::fs::write(path, bytes).expect("write object");
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
