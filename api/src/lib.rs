//! Lockstep's HTTP API (DESIGN §6): publish, health and readiness, metrics, OpenAPI.
//!
//! [`app`] builds the router. The API does not know the hub: events go out through an
//! [`EventPublisher`] the binary plugs in, and readiness is asked of [`ReadinessCheck`]s.
//!
//! # Layout
//!
//! - [`error`]: [`ApiError`], the one error type, and its JSON form.
//! - `extract`: [`extract::ApiJson`] and [`extract::Caller`] (bearer-token authentication).
//! - `publish`: `POST /api/v1/publish` and `/publish/batch`.
//! - `topics`: a topic's position and history (`/api/v1/topics/{topic}/…`).
//! - [`control`]: the control API (`/api/v1/users/{user}/…`): disconnect, unsubscribe, list
//!   connections, through a [`control::ControlPlane`] the binary plugs in.
//! - [`locks`]: per-item edit locks: the endpoints, [`locks::store::LockStore`] (sqlx,
//!   PostgreSQL or SQLite) and the event outbox.
//! - [`presign`]: presigned object URLs ([`presign::Storage`], aws-sdk-s3) and upload commits.
//! - `health`: `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`]: the API's Prometheus metric names and the request-counting middleware.
//! - `openapi`: the OpenAPI document at `/api/v1/openapi.json`.
//! - [`webhooks`]: signed deliveries of occupancy, presence and lock events to configured
//!   endpoints, queued in the lock store's database ([`webhooks::Webhooks`]).

pub mod control;
pub mod error;
pub mod extract;
mod health;
pub mod locks;
pub mod metrics;
mod openapi;
pub mod presign;
mod publish;
mod ratelimit;
mod topics;
pub mod webhooks;

pub use error::ApiError;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::future::BoxFuture;
use http::{HeaderValue, Method};
use protocol::{Authenticator, EventType, Position, Topic};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

/// Publishes events and reads topics' history for the API. The binary implements it over the
/// hub.
pub trait EventPublisher: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes one event; answers its id and position. The event takes its place in its
    /// topic's order when this is *called*, so a caller may start several publishes before
    /// awaiting any, and they keep the order they were started in.
    fn publish<'a>(
        &'a self,
        topic: &'a Topic,
        event_type: &'a EventType,
        data: &'a RawValue,
        options: EventOptions,
    ) -> BoxFuture<'a, Result<PublishedEvent, PublishFailure>>;

    /// Up to `limit` events of `topic` after offset `after`, with its latest position.
    fn history<'a>(
        &'a self,
        topic: &'a Topic,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<EventPage, PublishFailure>>;

    /// The latest event of every key of `topic`, with the position they were taken at.
    fn snapshot<'a>(&'a self, topic: &'a Topic)
    -> BoxFuture<'a, Result<StatePage, PublishFailure>>;

    /// Who is present in a team or item topic across the cluster.
    fn presence<'a>(
        &'a self,
        topic: &'a Topic,
    ) -> BoxFuture<'a, Result<PresencePage, PublishFailure>>;
}

/// Who is present in a topic.
#[derive(Debug, Clone)]
pub struct PresencePage {
    /// Users present.
    pub count: usize,
    /// (user, connections, since), sorted by user; `None` above the node's listing maximum.
    pub members: Option<Vec<(String, u32, std::time::SystemTime)>>,
}

/// What a publish asks for besides the event.
#[derive(Debug, Clone, Default)]
pub struct EventOptions {
    /// Already scoped to its caller: a key seen before (within the history age) answers the
    /// first publish and publishes nothing.
    pub idempotency_key: Option<String>,
    /// The event's key in its topic, and its version: an event older than the newest version
    /// already published for its key is not published (lock events: `lock:{item}`, their
    /// outbox id).
    pub key: Option<String>,
    pub version: Option<u64>,
}

/// A published event's id and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedEvent {
    pub id: String,
    pub position: Position,
    /// A repeated idempotent publish: nothing was published this time.
    pub duplicate: bool,
    /// A newer version of its key was already published: this one was not.
    pub superseded: bool,
}

/// Part of a topic's history.
#[derive(Debug, Clone)]
pub struct EventPage {
    /// The topic's latest position.
    pub top: Position,
    /// The oldest offset history still holds (`top.offset + 1` when none).
    pub first: u64,
    /// (offset, envelope JSON), oldest first.
    pub events: Vec<(u64, String)>,
}

/// A topic's state: the latest event of every key, taken at one position.
#[derive(Debug, Clone)]
pub struct StatePage {
    /// The topic's position when it was taken; live events continue after it.
    pub top: Position,
    /// (offset, key, envelope JSON), in offset order.
    pub events: Vec<(u64, String, String)>,
}

/// Why an event could not be published.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishFailure {
    #[error("event broker unavailable: {0}")]
    Unavailable(String),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("event data is {size} bytes; at most {limit} are allowed")]
    TooLarge { size: usize, limit: usize },
}

/// The WebSocket sessions this node hosts, as the lock service needs them. The binary
/// implements it over the hub.
pub trait NodeSessions: Send + Sync + std::fmt::Debug + 'static {
    /// Whether the session with this id is open on this node.
    fn is_open(&self, session: &str) -> bool;
    /// The cluster took this node for dead (it stalled) and is releasing the locks of its
    /// sessions: close them all, so their clients reconnect and lock again.
    fn node_expired(&self);
}

/// A dependency `/readyz` reports on.
pub trait ReadinessCheck: Send + Sync + std::fmt::Debug + 'static {
    /// A short name: `broker`, `lock_store`.
    fn name(&self) -> &'static str;
    fn is_ready(&self) -> BoxFuture<'_, bool>;
}

/// Which origins get CORS headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers: only same-origin pages can call the API.
    #[default]
    SameOrigin,
    List(Vec<String>),
    Any,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Most events in one `POST /publish/batch`.
    pub max_batch: usize,
    /// Largest event `data` (JSON bytes); the hub's bound, checked here too so that a batch
    /// is refused whole before any of it is published.
    pub max_event_bytes: usize,
    /// Most events one history request returns (the hub's replay maximum).
    pub max_replay: usize,
    /// Events per second per token (0: unlimited), and the burst above it. Every endpoint
    /// that publishes draws on it: publish, locks (their events) and commit.
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// The highest rate a token's `publish_rate` claim may ask for.
    pub max_claimed_rate: u32,
    /// Longest a request may take before it is answered 503.
    pub request_timeout: Duration,
    pub cors: Cors,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            max_body_bytes: 1024 * 1024,
            max_batch: 100,
            max_event_bytes: 60 * 1024,
            max_replay: 1000,
            publish_rate: 1000,
            publish_burst: 2000,
            max_claimed_rate: 10_000,
            request_timeout: Duration::from_secs(30),
            cors: Cors::SameOrigin,
        }
    }
}

/// Everything handlers share; cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ApiConfig,
    auth: Arc<Authenticator>,
    publisher: Arc<dyn EventPublisher>,
    checks: Vec<Arc<dyn ReadinessCheck>>,
    /// Renders `/metrics`; `None` when no recorder is installed.
    metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    limiter: ratelimit::KeyedLimiter,
    /// The lock service; `None` on a node that serves no locks.
    locks: Option<Arc<locks::Locks>>,
    /// Object storage; `None` answers 503 `storage_not_configured`.
    storage: Option<presign::Storage>,
    /// The hub's control plane; `None` answers 503 `control_not_configured`.
    control: Option<Arc<dyn control::ControlPlane>>,
}

/// The stateful services behind the API, each optional.
#[derive(Debug, Default)]
pub struct Backends {
    pub locks: Option<Arc<locks::Locks>>,
    pub storage: Option<presign::Storage>,
    pub control: Option<Arc<dyn control::ControlPlane>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .field("publisher", &self.publisher)
            .field("checks", &self.checks)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    pub fn new(
        config: ApiConfig,
        auth: Arc<Authenticator>,
        publisher: Arc<dyn EventPublisher>,
        checks: Vec<Arc<dyn ReadinessCheck>>,
        metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
        backends: Backends,
    ) -> ApiState {
        let limiter = ratelimit::KeyedLimiter::new(
            config.publish_rate,
            config.publish_burst,
            config.max_claimed_rate,
        );
        ApiState {
            inner: Arc::new(Inner {
                config,
                auth,
                publisher,
                checks,
                metrics,
                limiter,
                locks: backends.locks,
                storage: backends.storage,
                control: backends.control,
            }),
        }
    }
}

/// The API's routes: `/api/v1/…`, `/healthz`, `/readyz`, `/metrics`.
pub fn app(state: ApiState) -> Router {
    let config = &state.inner.config;
    let v1 = Router::new()
        .route("/publish", post(publish::publish))
        .route("/publish/batch", post(publish::publish_batch))
        .route(
            "/teams/{team}/items/{item}/lock",
            post(locks::acquire)
                .put(locks::renew)
                .delete(locks::release)
                .get(locks::get),
        )
        .route("/teams/{team}/locks", get(locks::list))
        .route("/teams/{team}/items/{item}/presign", post(presign::presign))
        .route("/teams/{team}/presign/batch", post(presign::presign_batch))
        .route("/teams/{team}/items/{item}/commit", post(presign::commit))
        .route(
            "/teams/{team}/locks/batch",
            post(locks::acquire_batch).delete(locks::release_batch),
        )
        .route("/topics/{topic}/position", get(topics::position))
        .route("/topics/{topic}/events", get(topics::events))
        .route("/topics/{topic}/snapshot", get(topics::snapshot))
        .route("/topics/{topic}/presence", get(topics::presence))
        .route("/users/{user}/disconnect", post(control::disconnect))
        .route("/users/{user}/unsubscribe", post(control::unsubscribe))
        .route("/users/{user}/connections", get(control::connections))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found);
    let timeout = config.request_timeout;
    Router::new()
        .nest("/api/v1", v1)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(move |req, next| {
            with_timeout(timeout, req, next)
        }))
        // Outside the timeout, so a request answered 503 by it is counted with that status.
        .layer(middleware::from_fn(metrics::track))
        .layer(cors_layer(&config.cors))
        // The span covers everything inside it. It names the route template, never the raw
        // URI: query strings may carry credentials. Failures are logged where they happen
        // (ApiError); a 503 from /readyz is not an error worth a log line of its own.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG))
                .make_span_with(|req: &Request| {
                    let route = route(req);
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), route, request.id = id)
                }),
        )
        // Outermost: every request gets an id (kept if a proxy in front already set one),
        // logged in its span and echoed in the response for support requests.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeUlid))
        .layer(middleware::from_fn(drop_odd_request_id))
        .with_state(state)
}

/// The route template a request matched (`/api/v1/teams/{team}/locks`), or `unmatched`: what
/// logs and metrics name a request by, never its raw path.
fn route(req: &Request) -> &str {
    req.extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
}

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A request id from the client or a proxy is kept only when it looks like one: it goes into
/// every log line of the request, so a long or odd value is replaced by a fresh ULID.
async fn drop_odd_request_id(mut req: Request, next: Next) -> Response {
    let plausible = req.headers().get(REQUEST_ID).is_none_or(|v| {
        (1..=64).contains(&v.len())
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    });
    if !plausible {
        req.headers_mut().remove(REQUEST_ID);
    }
    next.run(req).await
}

/// Request ids are ULIDs: unique across nodes and sortable by time.
#[derive(Debug, Clone, Copy)]
struct MakeUlid;

impl MakeRequestId for MakeUlid {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&ulid::Ulid::new().to_string())
            .ok()
            .map(RequestId::new)
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        message: "no such endpoint".to_owned(),
    }
}

/// Answers 503 in the API's format when a request runs past the timeout, so a stuck
/// dependency cannot hold a client (or a graceful shutdown) forever.
async fn with_timeout(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable(
            "timeout",
            format!("the request did not finish within {timeout:?}"),
        )
        .into_response(),
    }
}

fn cors_layer(cors: &Cors) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([http::header::AUTHORIZATION, http::header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600));
    match cors {
        Cors::SameOrigin => layer.allow_origin(AllowOrigin::list([])),
        Cors::Any => layer.allow_origin(AllowOrigin::any()),
        Cors::List(origins) => layer.allow_origin(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests;
