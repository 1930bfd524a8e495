//! The process: configuration errors, the generated secret, `lockstep token`, SIGTERM.

use crate::envelope;
use loadtest::client::StompClient;
use std::process::Command;
use std::time::Duration;
use tests::{Lockstep, Options, lockstep_bin};

#[test]
fn invalid_configuration_is_reported_in_full_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lockstep.toml");
    std::fs::write(
        &config,
        "[hub]\nmax_conections = 3\n[api]\nmax_batch = \"many\"\n",
    )
    .unwrap();
    let output = Command::new(lockstep_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env_clear()
        .env("LOCKSTEP_LISTEN", "127.0.0.1:notaport")
        .env("LOCKSTEP_HUB_WRITE_TIMEOUT", "forever")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(
        output.stdout.is_empty(),
        "it must not bind: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "invalid configuration (4 problems)",
        "unknown key 'hub.max_conections'; did you mean 'hub.max_connections'?",
        "'api.max_batch' (config file): 'many' is invalid",
        "LOCKSTEP_LISTEN (environment): '127.0.0.1:notaport' is not an address",
        "LOCKSTEP_HUB_WRITE_TIMEOUT (environment): 'forever' is not a duration",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[tokio::test]
async fn generated_secret_is_private_reused_and_used_by_lockstep_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = |args: &[&str]| {
        let output = Command::new(lockstep_bin())
            .arg("token")
            .args(args)
            .env_clear()
            .env("LOCKSTEP_DATA_DIR", &data)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    // `token` before the first `serve` creates the secret; `serve` then reuses it.
    let ana = token(&["--sub", "ana", "--team", "t1", "--ttl", "10m"]);
    let secret = std::fs::read_to_string(data.join("jwt-secret")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(data.join("jwt-secret"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let node = Lockstep::start_with(Options::default().data_dir(&data));
    assert_eq!(
        std::fs::read_to_string(data.join("jwt-secret")).unwrap(),
        secret,
        "the secret was not reused"
    );
    let (mut client, _) = StompClient::connect(&node.ws(), &ana).await.unwrap();
    client.subscribe("t", "/team/t1").await.unwrap();
    let backend = token(&["--sub", "backend", "--admin-of", "t1", "--scope", "publish"]);
    let (mut publisher, _) = StompClient::connect(&node.ws(), &backend).await.unwrap();
    publisher
        .publish("/team/t1", "job.progress", r#"{"done":1}"#, Some("r"))
        .await
        .unwrap();
    assert_eq!(
        envelope(&client.expect_frame().await.unwrap(), "t", "/team/t1")["data"]["done"],
        1
    );
    // Unknown scopes are refused by the command.
    let output = Command::new(lockstep_bin())
        .args(["token", "--sub", "x", "--scope", "root"])
        .env_clear()
        .env("LOCKSTEP_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown scope 'root'"));
}

#[tokio::test]
async fn sigterm_closes_clients_with_4010_and_exits_within_the_grace() {
    let mut node = Lockstep::start_with(Options::default().env("LOCKSTEP_SHUTDOWN_GRACE", "5s"));
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = crate::client(&node, &format!("u{i}"), &[], "").await;
        c.subscribe("g", "/global").await.unwrap();
        clients.push(c);
    }
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.expect_close().await.unwrap().1 }))
        .collect();
    let (status, took) = tokio::task::spawn_blocking(move || {
        let result = node.terminate(Duration::from_secs(10));
        (result, node)
    })
    .await
    .map(|(r, _node)| r.unwrap())
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for waiter in waiters {
        assert_eq!(
            waiter.await.unwrap(),
            Some((4010, "server shutting down".to_owned()))
        );
    }
}

#[test]
fn readme_documents_every_configuration_key() {
    let output = Command::new(lockstep_bin())
        .args(["config", "--markdown"])
        .output()
        .unwrap();
    let table = String::from_utf8(output.stdout).unwrap();
    let readme = std::fs::read_to_string(tests::workspace().join("README.md")).unwrap();
    let start = readme.find("<!-- config-keys:start").expect("start marker");
    let start = start + readme[start..].find('\n').unwrap() + 1;
    let end = readme.find("<!-- config-keys:end -->").expect("end marker");
    assert_eq!(
        &readme[start..end],
        table,
        "README's key table is stale: paste `lockstep config --markdown`"
    );
}
