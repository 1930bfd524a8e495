//! `GET /ws`: the checks made before a connection becomes a WebSocket.
//!
//! A client that offers no STOMP subprotocol is still accepted (DESIGN §2).

use crate::Hub;
use crate::config::OriginPolicy;
use crate::session::{self, SessionContext};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use std::net::SocketAddr;

/// The subprotocols we speak, best first: the server picks the highest one a client offers.
const SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

#[derive(Debug, Deserialize)]
pub(crate) struct UpgradeQuery {
    access_token: Option<String>,
}

/// The peer address when the server was started with connect info; `None` in unit tests.
#[derive(Debug)]
pub(crate) struct PeerAddr(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

pub(crate) async fn handler(
    State(hub): State<Hub>,
    PeerAddr(peer): PeerAddr,
    Query(query): Query<UpgradeQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if hub.inner.shutdown.is_cancelled() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server is shutting down",
        );
    }
    if let Err(origin) = check_origin(&hub.inner.config.origins, &headers) {
        tracing::debug!(%origin, "websocket origin refused");
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            &format!("origin {origin} is not allowed to open a WebSocket"),
        );
    }
    let upgrade_token = bearer(&headers).or(query.access_token);
    let config = &hub.inner.config;
    let ws = ws
        .protocols(SUBPROTOCOLS)
        .read_buffer_size(config.read_buffer_bytes)
        // Writes are coalesced per wake-up and flushed explicitly; this only caps one batch.
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        // One WebSocket message may pack several frames; the STOMP decoder enforces the
        // per-frame limits.
        .max_message_size(config.limits.max_frame_bytes * 4)
        .max_frame_size(config.limits.max_frame_bytes * 4);
    // No slot is taken yet: a connection counts against `max_connections` once its CONNECT
    // is accepted, and until then it waits in the node's small pool of pending connections
    // (see `connections`), where a flood of silent upgrades evicts only its own kind.
    ws.on_upgrade(move |socket| {
        let context = SessionContext {
            peer,
            upgrade_token,
        };
        session::run(socket, hub, context)
    })
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

/// Browsers send `Origin` on every WebSocket upgrade; non-browser clients usually do not and
/// are allowed (they are not subject to cross-site attacks).
fn check_origin(policy: &OriginPolicy, headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| "(not text)".to_owned())?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let same_origin = host.is_some_and(|host| {
        origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
    });
    let allowed = same_origin
        || match policy {
            OriginPolicy::SameOrigin => false,
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        };
    if allowed {
        Ok(())
    } else {
        Err(origin.to_owned())
    }
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn origin_rules() {
        let same = OriginPolicy::SameOrigin;
        assert!(check_origin(&same, &headers(None, "h:1")).is_ok());
        assert!(check_origin(&same, &headers(Some("http://h:1"), "h:1")).is_ok());
        assert!(check_origin(&same, &headers(Some("http://evil:1"), "h:1")).is_err());
        let list = OriginPolicy::List(vec!["https://app.example".into()]);
        assert!(check_origin(&list, &headers(Some("https://app.example"), "h:1")).is_ok());
        assert!(check_origin(&list, &headers(Some("https://app.example.evil"), "h:1")).is_err());
        assert!(check_origin(&OriginPolicy::Any, &headers(Some("http://x"), "h:1")).is_ok());
    }
}
