//! `/console` (DESIGN §16): a page on the public protocol and API, served from files embedded
//! in the binary (no build step, no CDN): the page, its script and style, the client library
//! (`clients/js/src/index.js`, unchanged) and @stomp/stompjs's UMD bundle (vendored,
//! Apache-2.0).
//!
//! In the embedded default only (no Redis, no configured secret or keys, listening on a
//! loopback address: a laptop), and only to a request whose `Host` is a loopback name, the page
//! offers a one-click development token, minted here with the generated secret. Anywhere else
//! that endpoint answers 404: a cluster's tokens come from its identity provider, and a
//! container listening on 0.0.0.0 must not hand admin tokens to its network.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{EncodingKey, Header};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");
const LIBRARY: &str = include_str!("../clients/js/src/index.js");
const STOMPJS: &str = include_str!("console/vendor/stomp.umd.min.js");

/// The page may talk to its own origin only (WebSocket included): nothing it loads or sends
/// leaves the node.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// How long a development token lives.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);

#[derive(Clone)]
struct Console {
    /// The generated HS256 secret, when development tokens may be minted.
    dev_secret: Option<Arc<str>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("dev_token", &self.dev_secret.is_some())
            .finish()
    }
}

/// The console's routes. `dev_secret`: the secret development tokens are signed with, given
/// only in the embedded default.
pub(crate) fn router(dev_secret: Option<String>) -> Router {
    let state = Console {
        dev_secret: dev_secret.map(Arc::from),
    };
    Router::new()
        .route(
            "/console",
            get(|| async { file(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/",
            get(|| async { file(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/console.js",
            get(|| async { file(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/console.css",
            get(|| async { file(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/console/lockstep.js",
            get(|| async { file(LIBRARY, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/stomp.umd.min.js",
            get(|| async { file(STOMPJS, "text/javascript; charset=utf-8") }),
        )
        .route("/console/config.json", get(config))
        .route("/console/dev-token", post(dev_token))
        .with_state(state)
}

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Embedded in the binary: a new binary may change them, so revalidate each load.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn config(State(console): State<Console>, headers: HeaderMap) -> Json<serde_json::Value> {
    Json(
        serde_json::json!({ "dev_token": console.dev_secret.is_some() && loopback_host(&headers) }),
    )
}

/// Whether the request names a loopback host (`127.0.0.1`, `[::1]`, `localhost`, any port).
/// Development tokens are for the person at the machine: a page reached through another name
/// (DNS rebinding onto 127.0.0.1, or a node reachable from elsewhere) gets none.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    matches!(name, "127.0.0.1" | "::1" | "localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_loopback_host_names_get_dev_tokens() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "localhost",
            "[::1]:8080",
            "127.0.0.1",
        ] {
            assert!(loopback_host(&host(ok)), "{ok}");
        }
        for no in [
            "evil.example:8080",
            "10.0.0.5:8080",
            "127.0.0.1.evil.example",
            "[::2]:80",
            "localhost.evil:1",
        ] {
            assert!(!loopback_host(&host(no)), "{no}");
        }
        assert!(!loopback_host(&HeaderMap::new()));
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    team: String,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// A token for a fresh development user in `team` (member and admin; scopes publish, locks,
/// presign), valid for eight hours.
async fn dev_token(
    State(console): State<Console>,
    headers: HeaderMap,
    body: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(secret) = console
        .dev_secret
        .as_ref()
        .filter(|_| loopback_host(&headers))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "development tokens exist only on a node running its embedded defaults (no Redis, no configured jwt.secret or jwt.public_keys) on a loopback address, asked for through a loopback host name",
        );
    };
    let Ok(Json(request)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected a JSON body {\"team\": \"<team id>\"}",
        );
    };
    if protocol::Topic::parse(&format!("/team/{}", request.team)).is_err()
        || request.team.contains('/')
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_team",
            "the team must be a valid team id",
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let sub = format!("dev-{:08x}", rand::random::<u32>());
    let claims = serde_json::json!({
        "sub": sub,
        "teams": [request.team],
        "admin_of": [request.team],
        "scope": "publish locks presign",
        "iat": now,
        "exp": now + DEV_TOKEN_TTL.as_secs(),
    });
    match jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    ) {
        Ok(token) => Json(serde_json::json!({"token": token, "sub": sub})).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not sign a token",
        ),
    }
}
