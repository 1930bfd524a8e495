//! A private nginx as a CORS front for a storage server that has no CORS support (s3s-fs), so
//! a browser page can use presigned URLs as it would against a bucket with CORS rules.
//!
//! It answers preflights itself (`OPTIONS` → 204 with `Access-Control-Allow-*`), adds
//! `Access-Control-Allow-Origin` and `Access-Control-Expose-Headers: ETag` to every other
//! response, errors included (`always`), and proxies everything else unchanged, with the
//! client's `Host` header: the signature covers the host, so the URLs must be signed for the
//! proxy's address and reach the storage server with that same `Host`.
//!
//! It runs as one process (`master_process off`, `daemon off`) with its pid file, logs and
//! temporary files in its own directory, on a free loopback port, killed by PID on drop. It
//! needs nginx at `/usr/sbin/nginx` (Debian's package; the test command installs it) or
//! `$NGINX_BIN`.
//!
//! It logs as the shipped configurations do (`deploy/compose-nginx.conf`), since a presigned
//! URL's query string is a credential: the access log has the path alone (`$uri`), and the error
//! log, whose per-request messages quote the whole request line, only `crit` and above.
//! `tests/deploy/check_deploy.py` checks this template with the others.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One nginx process.
#[derive(Debug)]
pub struct CorsProxy {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// nginx: `NGINX_BIN`, or Debian's.
///
/// # Panics
///
/// When it is not installed, with what to do.
pub fn nginx_bin() -> PathBuf {
    let bin = std::env::var_os("NGINX_BIN").map_or_else(|| "/usr/sbin/nginx".into(), PathBuf::from);
    assert!(
        bin.is_file(),
        "nginx is not installed at {} (set NGINX_BIN to use another path): run tests/run.sh, \
         which installs Debian's nginx",
        bin.display()
    );
    bin
}

impl CorsProxy {
    /// Proxies `127.0.0.1:<port>` to `upstream` (`host:port`), allowing `origin` (e.g.
    /// `http://127.0.0.1:8123`) to GET, PUT and HEAD with a `content-type` header.
    ///
    /// # Panics
    ///
    /// When nginx is missing, rejects the configuration or does not listen within 10 s.
    pub fn start(upstream: &str, origin: &str) -> CorsProxy {
        let bin = nginx_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = crate::free_port();
        let d = dir.path().display();
        // A preflight is answered here and never reaches the storage server, which would
        // refuse the unsigned OPTIONS. `add_header` inside `if` replaces the location's
        // headers, so both lists are complete.
        let config = format!(
            r#"
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log crit;
events {{ worker_connections 512; }}
http {{
    log_format lockstep '$remote_addr [$time_local] "$request_method $uri $server_protocol" '
                        '$status $body_bytes_sent $request_time upstream=$upstream_addr '
                        '"$http_user_agent"';
    access_log {d}/access.log lockstep;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            if ($request_method = OPTIONS) {{
                add_header Access-Control-Allow-Origin "{origin}" always;
                add_header Access-Control-Allow-Methods "GET, PUT, HEAD" always;
                add_header Access-Control-Allow-Headers "content-type, x-amz-meta-lockstep-token" always;
                add_header Access-Control-Max-Age 600 always;
                add_header Vary Origin always;
                return 204;
            }}
            add_header Access-Control-Allow-Origin "{origin}" always;
            add_header Access-Control-Expose-Headers "ETag" always;
            add_header Vary Origin always;
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"#
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).expect("nginx.conf");
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            // Without -e nginx first opens the packaged log path, before reading `error_log`.
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nginx");
        let mut proxy = CorsProxy {
            child: Some(child),
            port,
            dir,
        };
        proxy.wait_until_listening();
        proxy
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
                "nginx exited ({exited:?}) before listening on port {}; log:\n{}",
                self.port,
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on port {} within 10 s; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// nginx's stderr, error log and access log so far.
    pub fn log(&self) -> String {
        ["stderr.log", "error.log", "access.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                format!("--- {f}\n{text}")
            })
            .collect()
    }
}

impl Drop for CorsProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
