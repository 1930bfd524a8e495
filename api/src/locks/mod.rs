//! Per-item edit locks (DESIGN §6, §7): the HTTP endpoints, over [`store::LockStore`].
//!
//! Every decision is one statement on PostgreSQL (one transaction on SQLite); its events are
//! written with it and published right after commit, its item's earlier ones first ([`outbox`]).

mod event;
pub mod outbox;
pub mod store;

use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller, whole};
use crate::{ApiState, EventPublisher, NodeSessions};
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use protocol::topic::is_valid_id;
use protocol::{Principal, Scope, SessionKey};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use store::{Acquired, BatchAcquired, Bound, LockState, LockStore, StoreError, TokenCheck};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

/// Lock settings.
#[derive(Debug, Clone)]
pub struct LockConfig {
    pub default_ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Most items in one batch request.
    pub max_batch: usize,
    /// How long after its WebSocket closes a session-bound lock is released.
    pub session_grace: Duration,
    /// How often each node looks for expiries, closed sessions and orphaned events.
    pub sweep_interval: Duration,
    /// How long a node may go without sweeping before the others take it for dead and treat
    /// every session it hosted as closed.
    pub node_timeout: Duration,
}

impl Default for LockConfig {
    fn default() -> LockConfig {
        LockConfig {
            default_ttl: Duration::from_secs(60),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3600),
            max_batch: 100,
            session_grace: Duration::from_secs(10),
            sweep_interval: Duration::from_millis(250),
            node_timeout: Duration::from_secs(10),
        }
    }
}

/// The lock service: the store, its settings, and the queue of closed sessions.
#[derive(Debug)]
pub struct Locks {
    store: LockStore,
    config: LockConfig,
    /// Checks that a `session` given to the API was issued to the caller by a node.
    sessions: SessionKey,
    closed_sessions: mpsc::Sender<outbox::Closing>,
    /// Published outbox rows waiting to be deleted in a batch.
    deletes: outbox::Deletes,
    /// Whether this node's row in `nodes` exists (it registered, and the cluster has not taken
    /// it for dead since). Part of readiness: locks bound to its sessions need it.
    registered: Arc<tokio::sync::watch::Sender<bool>>,
}

/// What the lock service needs from the node around it.
#[derive(Debug)]
pub struct LockNode {
    /// This node's id: the hub's session ids start with it (`{node}.{id}.{mac}`), so when the
    /// node dies the others can release its sessions' locks.
    pub id: String,
    /// The key session ids are signed with, shared by every node.
    pub sessions: SessionKey,
    /// The sessions open on this node.
    pub open: Arc<dyn NodeSessions>,
}

impl Locks {
    /// Starts the service's background work (sweepers, heartbeat, session closer) until
    /// `shutdown`.
    pub fn start(
        store: LockStore,
        config: LockConfig,
        node: LockNode,
        publisher: Arc<dyn EventPublisher>,
        shutdown: &CancellationToken,
    ) -> Arc<Locks> {
        let (closed_sessions, closed) = mpsc::channel(10_000);
        let registered = Arc::new(tokio::sync::watch::Sender::new(false));
        tokio::spawn(outbox::run_sweepers(
            store.clone(),
            publisher,
            node.open.clone(),
            node.id.clone(),
            config.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(outbox::run_heartbeat(
            store.clone(),
            node.open,
            node.id,
            config.clone(),
            registered.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(outbox::run_session_closer(
            store.clone(),
            closed,
            config.session_grace,
        ));
        let (deletes, queued) = mpsc::channel(10_000);
        tokio::spawn(outbox::run_deleter(store.clone(), queued));
        Arc::new(Locks {
            store,
            config,
            sessions: node.sessions,
            closed_sessions,
            deletes,
            registered,
        })
    }

    /// Whether this node is registered in the lock store (see `registered`).
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// Waits until this node is registered, so sessions it hosts can take locks.
    pub async fn wait_registered(&self) {
        let mut rx = self.registered.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// A WebSocket session ended; its session-bound locks are released after the grace.
    pub fn session_closed(&self, session: &str) {
        if self
            .closed_sessions
            .try_send(outbox::Closing::Session(session.to_owned()))
            .is_err()
        {
            tracing::warn!(
                session,
                "closed-session queue full; the session's locks will expire by TTL"
            );
        }
    }

    /// Waits until every session close reported so far is recorded in the store, so another
    /// node can release their locks after the grace (called when the node shuts down).
    pub async fn flush_closed_sessions(&self) {
        let (done, recorded) = tokio::sync::oneshot::channel();
        if self
            .closed_sessions
            .send(outbox::Closing::Flush(done))
            .await
            .is_ok()
        {
            let _ = recorded.await;
        }
    }

    pub fn store(&self) -> &LockStore {
        &self.store
    }

    pub fn config(&self) -> &LockConfig {
        &self.config
    }
}

/// RFC 3339 with milliseconds, UTC, from ms since the epoch.
pub(crate) fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// A lock as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LockView {
    team: String,
    item: String,
    holder: String,
    /// Fencing token: strictly greater for every new grant of this item.
    token: i64,
    #[schema(example = "2026-11-25T10:00:00.000Z")]
    acquired_at: String,
    #[schema(example = "2026-11-25T10:01:00.000Z")]
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

impl From<LockState> for LockView {
    fn from(l: LockState) -> LockView {
        LockView {
            acquired_at: rfc3339(l.acquired_at),
            expires_at: rfc3339(l.expires_at),
            team: l.team,
            item: l.item,
            holder: l.holder,
            token: l.token,
            session: l.session,
        }
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcquireRequest {
    /// Lifetime in milliseconds; the configured default when absent.
    #[serde(default, deserialize_with = "whole::opt")]
    ttl_ms: Option<u64>,
    /// The `session` header of `CONNECTED` (`{node}.{id}.{mac}`, issued to the caller): the lock
    /// is released shortly after that WebSocket closes.
    #[schema(pattern = r"^[0-9A-HJKMNP-TV-Z]{26}\.[0-9A-HJKMNP-TV-Z]{26}\.[A-Za-z0-9_-]{22}$")]
    session: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenewRequest {
    #[serde(deserialize_with = "whole::int")]
    token: i64,
    #[serde(default, deserialize_with = "whole::opt")]
    ttl_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseRequest {
    #[serde(default, deserialize_with = "whole::opt")]
    token: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReleaseQuery {
    /// `true`: a team admin ends whoever's lock is live (takeover).
    #[serde(default)]
    force: bool,
    /// The token, for clients that cannot send a body with DELETE.
    token: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchAcquireRequest {
    #[schema(min_items = 1)]
    items: Vec<String>,
    #[serde(default, deserialize_with = "whole::opt")]
    ttl_ms: Option<u64>,
    /// As for a single lock.
    #[schema(pattern = r"^[0-9A-HJKMNP-TV-Z]{26}\.[0-9A-HJKMNP-TV-Z]{26}\.[A-Za-z0-9_-]{22}$")]
    session: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchReleaseItem {
    item: String,
    #[serde(deserialize_with = "whole::int")]
    token: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchReleaseRequest {
    #[schema(min_items = 1)]
    items: Vec<BatchReleaseItem>,
}

/// The locks a batch granted.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LockList {
    locks: Vec<LockView>,
}

/// The live locks of a team, and where the team topic stood just before they were read:
/// subscribe to `/team/{t}` from there (`x-stream-offset:offset=<offset>`,
/// `x-stream-epoch:<epoch>`) and no change is missed or applied twice.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TeamLocks {
    locks: Vec<LockView>,
    position: crate::topics::PositionView,
}

/// What a batch release did for one item.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReleaseResult {
    item: String,
    released: bool,
    /// Why not: `lock_held` (another user holds it) or `lock_lost` (the token's grant is over).
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    /// The current holder, with `lock_held`.
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReleaseResults {
    /// One per requested item, in request order.
    results: Vec<ReleaseResult>,
}

/// A forced takeover: whose lock ended.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TakenOver {
    team: String,
    item: String,
    taken_over_from: String,
    /// The ended grant's token.
    token: i64,
}

pub(crate) fn locks(state: &ApiState) -> Result<&Locks, ApiError> {
    state
        .inner
        .locks
        .as_deref()
        .ok_or_else(|| ApiError::unavailable("locks_not_configured", "this node serves no locks"))
}

/// The answer to a lock store failure (locks, presigned writes and commits alike).
pub(crate) fn store_error(err: &StoreError) -> ApiError {
    tracing::warn!(%err, "lock store error");
    match err {
        StoreError::Contended => ApiError::unavailable("lock_store_busy", err.to_string()),
        StoreError::Unavailable(_) => ApiError::unavailable(
            "lock_store_unavailable",
            "the lock store is unavailable; nothing was changed, try again",
        ),
    }
}

/// [`authorize`], and the control API has not revoked the caller's access to the team (or to
/// one of `items`) since the token was issued (DESIGN §15: a member removed from a team loses
/// its locks and files at once, not at the token's expiry).
///
/// # Errors
///
/// As [`authorize`]; 403 when revoked, 503 when the revocations cannot be read.
pub(crate) async fn authorize_now(
    state: &ApiState,
    caller: &Principal,
    team: &str,
    scope: Scope,
    items: &[&str],
) -> Result<(), ApiError> {
    authorize(caller, team, scope, items)?;
    let topics = std::iter::once(format!("/team/{team}")).chain(
        items
            .iter()
            .map(|item| format!("/team/{team}/items/{item}")),
    );
    for topic in topics {
        // Valid ids make valid topics; anything else was refused above.
        if let Ok(topic) = protocol::Topic::parse(&topic) {
            crate::control::check_access(state, caller, &topic, crate::control::Access::Read)
                .await?;
        }
    }
    Ok(())
}

/// Checks the ids are valid and the caller may use `scope` (locks or presigned URLs) in
/// `team`: the scope, and membership or administration of the team.
pub(crate) fn authorize(
    caller: &Principal,
    team: &str,
    scope: Scope,
    items: &[&str],
) -> Result<(), ApiError> {
    if !is_valid_id(team) {
        return Err(ApiError::invalid(
            "invalid_team",
            format!("invalid team id '{team}': ids match [A-Za-z0-9_.:-]{{1,128}}"),
        ));
    }
    for item in items {
        if !is_valid_id(item) {
            return Err(ApiError::invalid(
                "invalid_item",
                format!("invalid item id '{item}': ids match [A-Za-z0-9_.:-]{{1,128}}"),
            ));
        }
    }
    if !caller.has_scope(scope) {
        let what = if scope == Scope::Presign {
            "presigned URLs"
        } else {
            "locks"
        };
        return Err(ApiError::forbidden(format!(
            "{what} need the '{}' scope",
            scope.as_str()
        )));
    }
    if !(caller.is_member(team) || caller.is_admin(team)) {
        return Err(ApiError::forbidden(format!("not a member of team {team}")));
    }
    Ok(())
}

fn ttl(config: &LockConfig, ttl_ms: Option<u64>) -> Result<i64, ApiError> {
    let ttl = ttl_ms.map_or(config.default_ttl, Duration::from_millis);
    if ttl < config.min_ttl || ttl > config.max_ttl {
        return Err(ApiError::invalid(
            "invalid_ttl",
            format!(
                "ttl_ms must be between {} and {}",
                config.min_ttl.as_millis(),
                config.max_ttl.as_millis()
            ),
        ));
    }
    Ok(millis(ttl))
}

/// A duration in the store's unit, milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Checks a `session` given with a lock request: it must be a session id a node of this
/// cluster issued to the caller (the `session` header of their `CONNECTED`).
fn session<'a>(
    locks: &Locks,
    caller: &Principal,
    session: Option<&'a str>,
) -> Result<Option<Bound<'a>>, ApiError> {
    let Some(session) = session else {
        return Ok(None);
    };
    let id = locks.sessions.verify(session, &caller.sub).map_err(|err| {
        ApiError::invalid(
            "invalid_session",
            format!("session must be the session header of a CONNECTED frame you received: {err}"),
        )
    })?;
    Ok(Some(Bound {
        session,
        node: id.node,
    }))
}

fn session_gone() -> ApiError {
    ApiError::Conflict {
        code: "session_closed",
        message: "the WebSocket session this lock would be bound to has ended (its node left the cluster); reconnect and use the new session".to_owned(),
        details: None,
        gone: true,
    }
}

fn held(lock: &LockState) -> ApiError {
    crate::metrics::lock_conflict();
    ApiError::Conflict {
        code: "lock_held",
        message: format!(
            "item {} is held by {} until {}",
            lock.item,
            lock.holder,
            rfc3339(lock.expires_at)
        ),
        details: Some(json!({"holder": lock.holder, "expires_at": rfc3339(lock.expires_at)})),
        gone: false,
    }
}

fn lost(item: &str) -> ApiError {
    crate::metrics::lock_lost();
    ApiError::Conflict {
        code: "lock_lost",
        message: format!(
            "the lock on item {item} with this token is over (expired, released or taken over); acquire it again"
        ),
        details: None,
        gone: true,
    }
}

async fn publish(state: &ApiState, locks: &Locks, events: &[store::StoredEvent]) {
    outbox::publish_queued(
        &locks.store,
        &locks.deletes,
        state.inner.publisher.as_ref(),
        events,
    )
    .await;
}

/// Acquires (or extends) the lock on an item.
#[utoipa::path(post, path = "/api/v1/teams/{team}/items/{item}/lock", request_body = Option<AcquireRequest>,
    responses((status = 200, description = "granted, or extended for its holder", body = LockView), (status = 409, description = "held by another user")),
    security(("bearer" = [])))]
pub(crate) async fn acquire(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((team, item)): ApiPath<(String, String)>,
    body: Option<ApiJson<AcquireRequest>>,
) -> Result<Json<LockView>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Locks, &[&item]).await?;
    let locks = locks(&state)?;
    let request = body.map(|b| b.0).unwrap_or_default();
    let ttl = ttl(&locks.config, request.ttl_ms)?;
    let session = session(locks, &caller, request.session.as_deref())?;
    // A grant publishes an event: it draws on the caller's event budget like a publish.
    state.inner.limiter.check(&caller, 1)?;
    match locks
        .store
        .acquire(&team, &item, &caller.sub, session, ttl)
        .await
        .map_err(|e| store_error(&e))?
    {
        Acquired::Granted { lock, events, .. } => {
            publish(&state, locks, &events).await;
            Ok(Json(lock.into()))
        }
        Acquired::Held(lock) => Err(held(&lock)),
        Acquired::SessionGone => Err(session_gone()),
    }
}

/// Renews the caller's lock.
#[utoipa::path(put, path = "/api/v1/teams/{team}/items/{item}/lock", request_body = RenewRequest,
    responses((status = 200, description = "renewed", body = LockView), (status = 409, description = "held by another user"), (status = 410, description = "the token's grant is over")),
    security(("bearer" = [])))]
pub(crate) async fn renew(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((team, item)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<RenewRequest>,
) -> Result<Json<LockView>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Locks, &[&item]).await?;
    let locks = locks(&state)?;
    let ttl = ttl(&locks.config, request.ttl_ms)?;
    match locks
        .store
        .renew(&team, &item, &caller.sub, request.token, ttl)
        .await
        .map_err(|e| store_error(&e))?
    {
        TokenCheck::Done { lock, .. } => Ok(Json(lock.into())),
        TokenCheck::HeldByOther(lock) => Err(held(&lock)),
        TokenCheck::Lost => Err(lost(&item)),
    }
}

/// Releases the caller's lock, or (`force=true`, team admins) ends whoever's lock is live.
#[utoipa::path(delete, path = "/api/v1/teams/{team}/items/{item}/lock", request_body = Option<ReleaseRequest>,
    params(ReleaseQuery),
    responses((status = 204, description = "released"), (status = 200, description = "taken over (force=true)", body = TakenOver), (status = 404, description = "not locked (force=true)"), (status = 409, description = "held by another user"), (status = 410, description = "the token's grant is over")),
    security(("bearer" = [])))]
pub(crate) async fn release(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((team, item)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<ReleaseQuery>,
    body: Option<ApiJson<ReleaseRequest>>,
) -> Result<Response, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Locks, &[&item]).await?;
    let locks = locks(&state)?;
    if query.force {
        if !caller.is_admin(&team) {
            return Err(ApiError::forbidden(format!(
                "taking over a lock needs admin rights in team {team}"
            )));
        }
        // Two events: to the team, and to the previous holder.
        state.inner.limiter.check(&caller, 2)?;
        return match locks
            .store
            .take_over(&team, &item, &caller.sub)
            .await
            .map_err(|e| store_error(&e))?
        {
            Some((previous, events)) => {
                publish(&state, locks, &events).await;
                let body = TakenOver {
                    team,
                    item,
                    taken_over_from: previous.holder,
                    token: previous.token,
                };
                Ok((StatusCode::OK, Json(body)).into_response())
            }
            None => Err(ApiError::NotFound {
                code: "not_locked",
                message: format!("item {item} is not locked"),
            }),
        };
    }
    let token = body
        .and_then(|b| b.0.token)
        .or(query.token)
        .ok_or_else(|| {
            ApiError::invalid(
                "missing_token",
                "send the lock's token: {\"token\": N} or ?token=N",
            )
        })?;
    state.inner.limiter.check(&caller, 1)?;
    match locks
        .store
        .release(&team, &item, &caller.sub, token)
        .await
        .map_err(|e| store_error(&e))?
    {
        TokenCheck::Done { events, .. } => {
            publish(&state, locks, &events).await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        TokenCheck::HeldByOther(lock) => Err(held(&lock)),
        TokenCheck::Lost => Err(lost(&item)),
    }
}

/// The live lock on an item.
#[utoipa::path(get, path = "/api/v1/teams/{team}/items/{item}/lock",
    responses((status = 200, description = "the live lock", body = LockView), (status = 404, description = "not locked")), security(("bearer" = [])))]
pub(crate) async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((team, item)): ApiPath<(String, String)>,
) -> Result<Json<LockView>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Locks, &[&item]).await?;
    let locks = locks(&state)?;
    match locks
        .store
        .get(&team, &item)
        .await
        .map_err(|e| store_error(&e))?
    {
        Some(lock) => Ok(Json(lock.into())),
        None => Err(ApiError::NotFound {
            code: "not_locked",
            message: format!("item {item} is not locked"),
        }),
    }
}

/// Every live lock of a team.
#[utoipa::path(get, path = "/api/v1/teams/{team}/locks",
    responses((status = 200, description = "every live lock of the team, and the team topic's position before they were read", body = TeamLocks)), security(("bearer" = [])))]
pub(crate) async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(team): ApiPath<String>,
) -> Result<Json<TeamLocks>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Locks, &[]).await?;
    let locks = locks(&state)?;
    // Read before the locks: a change committed after this position is announced after it, so
    // a page that lists and then subscribes from here misses nothing. (A change announced
    // between the two is in both: its event carries the same token, and applying it twice is
    // harmless.)
    let topic = protocol::Topic::team(&team).map_err(|e| ApiError::Internal(e.to_string()))?;
    let position = state
        .inner
        .publisher
        .history(&topic, u64::MAX, 0)
        .await
        .map_err(|f| crate::topics::unavailable(&f))?
        .top;
    let all: Vec<LockView> = locks
        .store
        .list(&team)
        .await
        .map_err(|e| store_error(&e))?
        .into_iter()
        .map(LockView::from)
        .collect();
    Ok(Json(TeamLocks {
        locks: all,
        position: (&position).into(),
    }))
}

/// Events a batch of `n` items may publish (one per item), for the caller's budget.
fn batch_events(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn check_batch(config: &LockConfig, n: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::invalid("empty_batch", "the batch has no items"));
    }
    if n > config.max_batch {
        return Err(ApiError::TooLarge {
            code: "batch_too_large",
            message: format!("a batch holds at most {} items; got {n}", config.max_batch),
        });
    }
    Ok(())
}

/// Acquires every listed item, or none (409 lists the blockers).
#[utoipa::path(post, path = "/api/v1/teams/{team}/locks/batch", request_body = BatchAcquireRequest,
    responses((status = 200, description = "every item granted", body = LockList), (status = 409, description = "some items are held by others; nothing was locked")), security(("bearer" = [])))]
pub(crate) async fn acquire_batch(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(team): ApiPath<String>,
    ApiJson(request): ApiJson<BatchAcquireRequest>,
) -> Result<Json<LockList>, ApiError> {
    let items: Vec<&str> = request.items.iter().map(String::as_str).collect();
    authorize_now(&state, &caller, &team, Scope::Locks, &items).await?;
    let locks = locks(&state)?;
    check_batch(&locks.config, items.len())?;
    let ttl = ttl(&locks.config, request.ttl_ms)?;
    let session = session(locks, &caller, request.session.as_deref())?;
    state
        .inner
        .limiter
        .check(&caller, batch_events(items.len()))?;
    match locks
        .store
        .acquire_batch(&team, &request.items, &caller.sub, session, ttl)
        .await
        .map_err(|e| store_error(&e))?
    {
        BatchAcquired::Granted {
            locks: granted,
            events,
        } => {
            publish(&state, locks, &events).await;
            let views: Vec<LockView> = granted.into_iter().map(LockView::from).collect();
            Ok(Json(LockList { locks: views }))
        }
        BatchAcquired::Blocked(blockers) => {
            crate::metrics::lock_conflict();
            let list: Vec<serde_json::Value> = blockers
                .iter()
                .map(|l| json!({"item": l.item, "holder": l.holder, "expires_at": rfc3339(l.expires_at)}))
                .collect();
            Err(ApiError::Conflict {
                code: "lock_held",
                message: format!(
                    "{} of the items are held by others; nothing was locked",
                    list.len()
                ),
                details: Some(json!({ "blockers": list })),
                gone: false,
            })
        }
        BatchAcquired::SessionGone => Err(session_gone()),
    }
}

/// Releases several of the caller's locks; reports each item.
#[utoipa::path(delete, path = "/api/v1/teams/{team}/locks/batch", request_body = BatchReleaseRequest,
    responses((status = 200, description = "what happened to each item", body = ReleaseResults)), security(("bearer" = [])))]
pub(crate) async fn release_batch(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(team): ApiPath<String>,
    ApiJson(request): ApiJson<BatchReleaseRequest>,
) -> Result<Json<ReleaseResults>, ApiError> {
    let items: Vec<&str> = request.items.iter().map(|i| i.item.as_str()).collect();
    authorize_now(&state, &caller, &team, Scope::Locks, &items).await?;
    let locks = locks(&state)?;
    check_batch(&locks.config, items.len())?;
    state
        .inner
        .limiter
        .check(&caller, batch_events(items.len()))?;
    let pairs: Vec<(String, i64)> = request
        .items
        .into_iter()
        .map(|i| (i.item, i.token))
        .collect();
    let (outcomes, events) = locks
        .store
        .release_batch(&team, &pairs, &caller.sub)
        .await
        .map_err(|e| store_error(&e))?;
    publish(&state, locks, &events).await;
    let results = outcomes
        .into_iter()
        .map(|(item, outcome)| {
            let (released, code, holder) = match outcome {
                TokenCheck::Done { .. } => (true, None, None),
                TokenCheck::HeldByOther(l) => (false, Some("lock_held"), Some(l.holder)),
                TokenCheck::Lost => (false, Some("lock_lost"), None),
            };
            ReleaseResult {
                item,
                released,
                code,
                holder,
            }
        })
        .collect();
    Ok(Json(ReleaseResults { results }))
}
