//! End-to-end tests against real `lockstep serve` processes.

mod api;
mod clients;
mod cluster;
mod console;
mod control;
mod deploy;
mod fanout;
mod grafana;
mod hardening;
mod history;
mod history_load;
mod lifecycle;
mod load;
mod locks;
mod openapi;
mod ops;
mod presence;
mod presign;
mod snapshot;
mod stomp;
mod webhooks;

use loadtest::client::StompClient;
use protocol::{Command, Frame};
use tests::Lockstep;

/// A connected client for `sub` with `teams` and `scope`.
pub(crate) async fn client(node: &Lockstep, sub: &str, teams: &[&str], scope: &str) -> StompClient {
    let token = node.token(sub, teams, scope);
    let (client, _) = StompClient::connect(&node.ws(), &token)
        .await
        .expect("connect");
    client
}

/// Publishes through the HTTP API; returns the status and JSON body.
pub(crate) async fn http_publish(
    node: &Lockstep,
    token: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    http_publish_with(&reqwest::Client::new(), node, token, body).await
}

/// [`http_publish`] on a client of the caller's (one connection for many publishes).
pub(crate) async fn http_publish_with(
    client: &reqwest::Client,
    node: &Lockstep,
    token: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(format!("{}/api/v1/publish", node.http()))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("publish request");
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Asserts `frame` is a MESSAGE for `subscription` on `destination`; returns the envelope.
pub(crate) fn envelope(frame: &Frame, subscription: &str, destination: &str) -> serde_json::Value {
    assert_eq!(
        frame.command,
        Command::Message,
        "{}",
        loadtest::client::describe(frame)
    );
    assert_eq!(frame.header("subscription"), Some(subscription));
    assert_eq!(frame.header("destination"), Some(destination));
    assert_eq!(frame.header("content-type"), Some("application/json"));
    let envelope: serde_json::Value = serde_json::from_slice(&frame.body).expect("JSON body");
    assert_eq!(envelope["topic"], destination);
    assert_eq!(frame.header("message-id"), envelope["id"].as_str());
    assert_eq!(frame.header("event-type"), envelope["type"].as_str());
    envelope
}
