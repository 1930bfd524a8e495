//! Edit locks over HTTP, on SQLite (the embedded default) and on a private PostgreSQL.

use serde_json::{Value, json};
use tests::postgres::Postgres;
use tests::{Lockstep, Options};

/// A small HTTP helper: method, path, token, optional JSON body → (status, JSON body).
pub(crate) async fn call(
    node: &Lockstep,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client
        .request(method.parse().unwrap(), format!("{}{path}", node.http()))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        },
    )
}

async fn lifecycle(node: &Lockstep) {
    let ana = node.token("ana", &["t1"], "locks");
    let bob = node.token("bob", &["t1"], "locks");
    let (s, lock) = call(node, "POST", "/api/v1/teams/t1/items/812/lock", &ana, None).await;
    assert_eq!(
        (s, lock["token"].as_i64(), lock["holder"].as_str()),
        (200, Some(1), Some("ana")),
        "{lock}"
    );
    let (s, body) = call(
        node,
        "POST",
        "/api/v1/teams/t1/items/812/lock",
        &bob,
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (
            s,
            body["error"]["code"].as_str(),
            body["error"]["details"]["holder"].as_str()
        ),
        (409, Some("lock_held"), Some("ana")),
        "{body}"
    );
    let (s, body) = call(
        node,
        "DELETE",
        "/api/v1/teams/t1/items/812/lock",
        &ana,
        Some(json!({"token": 1})),
    )
    .await;
    assert_eq!(s, 204, "{body}");
    let (s, lock) = call(node, "POST", "/api/v1/teams/t1/items/812/lock", &bob, None).await;
    assert_eq!((s, lock["token"].as_i64()), (200, Some(2)), "{lock}");
    let (s, body) = call(
        node,
        "PUT",
        "/api/v1/teams/t1/items/812/lock",
        &ana,
        Some(json!({"token": 1})),
    )
    .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("lock_held")),
        "{body}"
    );
}

#[tokio::test]
async fn lifecycle_on_sqlite() {
    let node = Lockstep::start();
    lifecycle(&node).await;
}

#[tokio::test]
async fn lifecycle_on_postgres() {
    let pg = Postgres::start();
    let url = pg.database("lifecycle");
    let node = Lockstep::start_with(Options::default().env("LOCKSTEP_DATABASE_URL", &url));
    node.wait_readyz(200, std::time::Duration::from_secs(20))
        .unwrap();
    lifecycle(&node).await;
    assert_eq!(
        pg.psql("lifecycle", "SELECT token FROM locks WHERE item = '812'")
            .unwrap(),
        "2"
    );
}
