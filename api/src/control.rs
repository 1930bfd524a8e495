//! The control API (DESIGN §15), for the platform's backend (scope `control`): end a user's
//! connections or their access to a topic on every node at once, and list their connections.
//!
//! `POST /api/v1/users/{user}/disconnect`, `POST /api/v1/users/{user}/unsubscribe {topic}`,
//! `GET /api/v1/users/{user}/connections`. A user with no connections is not an error: the
//! calls still revoke their tokens, and the listing is empty.

use crate::ApiState;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, Caller};
use axum::Json;
use axum::extract::State;
use futures_util::future::BoxFuture;
use protocol::{Principal, Scope, Topic};
use serde::{Deserialize, Serialize};
use std::time::{Duration, UNIX_EPOCH};
use utoipa::ToSchema;

/// The hub's control plane, as the API needs it. The binary implements it over the hub.
pub trait ControlPlane: Send + Sync + std::fmt::Debug + 'static {
    /// Revokes `user`'s tokens issued until now (for `topic`, or for connecting at all) and
    /// acts on their connections on every node.
    fn revoke<'a>(
        &'a self,
        user: &'a str,
        topic: Option<&'a Topic>,
    ) -> BoxFuture<'a, Result<RevocationView, String>>;

    /// Whether a revocation refuses `user`'s token issued at `issued_at` for `topic` (checked
    /// before the API publishes to or reads a topic for a caller).
    fn is_revoked<'a>(
        &'a self,
        user: &'a str,
        topic: &'a Topic,
        issued_at: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, String>>;

    /// `user`'s connections on every node that answered.
    fn connections<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<ConnectionsView, String>>;
}

/// What a control call revoked.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RevocationView {
    pub user: String,
    /// The topic whose subscriptions ended (a team topic: and its item topics); absent for a
    /// disconnect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Tokens of the user issued at or before this second (RFC 3339; their `iat`, else `nbf`,
    /// and tokens with neither) are refused from now on: on `CONNECT` after a disconnect, on
    /// `SUBSCRIBE` to the topic after an unsubscribe.
    pub tokens_issued_until: String,
    /// When the refusal lapses: every token it covers should have expired by then
    /// (`control.revocation_ttl`).
    pub enforced_until: String,
}

impl RevocationView {
    /// The view of a revocation with `cutoff` and `until` in Unix seconds.
    pub fn new(user: &str, topic: Option<&str>, cutoff: u64, until: u64) -> RevocationView {
        let at = |secs: u64| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        };
        RevocationView {
            user: user.to_owned(),
            topic: topic.map(str::to_owned),
            tokens_issued_until: at(cutoff),
            enforced_until: at(until.min(253_402_300_799)),
        }
    }
}

/// One connection of a user.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionView {
    /// The node it is on.
    pub node: String,
    /// Its STOMP session id (the `session` header of its `CONNECTED`).
    pub session: String,
    /// When it connected (RFC 3339).
    pub since: String,
    /// The topics it subscribes to, sorted.
    pub topics: Vec<String>,
}

/// A user's connections across the cluster.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionsView {
    pub user: String,
    /// Sorted by node, then session.
    pub connections: Vec<ConnectionView>,
    /// How many nodes answered.
    pub nodes_answered: usize,
    /// Nodes known to be alive that did not answer within a second: their connections are
    /// missing from the list.
    pub nodes_missing: Vec<String>,
}

/// `POST /users/{user}/unsubscribe`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnsubscribeRequest {
    /// The topic whose subscriptions end: `/team/{id}` (its item topics too),
    /// `/team/{id}/items/{item}`, `/user/{id}` or `/global`.
    topic: String,
}

/// What a caller wants of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Publish,
    Read,
}

/// Refuses (403) a caller whose access to `topic` the control API revoked after its token was
/// issued. Nodes without a control plane check nothing.
///
/// # Errors
///
/// 403 when revoked, 503 when the revocations cannot be read.
pub(crate) async fn check_access(
    state: &ApiState,
    caller: &Principal,
    topic: &Topic,
    access: Access,
) -> Result<(), ApiError> {
    let Some(plane) = state.inner.control.as_deref() else {
        return Ok(());
    };
    let revoked = plane
        .is_revoked(&caller.sub, topic, caller.issued_at)
        .await
        .map_err(|err| {
            if access == Access::Publish {
                // A publish refused because the broker is away is a publish failure to the
                // operator, whichever read found it away first.
                ::metrics::counter!(crate::metrics::PUBLISH_FAILURES).increment(1);
            }
            unavailable(err)
        })?;
    if revoked {
        return Err(ApiError::forbidden(format!(
            "access to {topic} was revoked after this token was issued; get a new token"
        )));
    }
    Ok(())
}

fn control_caller(caller: &Principal) -> Result<(), ApiError> {
    if caller.scopes.contains(&Scope::Control) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "the token lacks the 'control' scope the control API needs",
        ))
    }
}

fn user_id(user: &str) -> Result<(), ApiError> {
    if protocol::topic::is_valid_id(user) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_user",
            "a user id is [A-Za-z0-9_.:-]{1,128}",
        ))
    }
}

fn plane(state: &ApiState) -> Result<&dyn ControlPlane, ApiError> {
    state.inner.control.as_deref().ok_or_else(|| {
        ApiError::unavailable("control_not_configured", "this node has no control plane")
    })
}

fn unavailable(err: String) -> ApiError {
    ApiError::unavailable("broker_unavailable", err)
}

/// Closes every connection of the user on every node (close 4011 "removed") and refuses their
/// current tokens on `CONNECT`.
#[utoipa::path(post, path = "/api/v1/users/{user}/disconnect",
    responses(
        (status = 200, description = "revoked; connections are closing on every node", body = RevocationView),
        (status = 403, description = "the token lacks the control scope"),
        (status = 422, description = "not a user id")),
    security(("bearer" = [])))]
pub(crate) async fn disconnect(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<RevocationView>, ApiError> {
    control_caller(&caller)?;
    user_id(&user)?;
    let view = plane(&state)?
        .revoke(&user, None)
        .await
        .map_err(unavailable)?;
    Ok(Json(view))
}

/// Ends the user's subscriptions to a topic on every node, each with a final
/// `lockstep.unsubscribed` MESSAGE, and refuses re-subscribing with their current tokens.
#[utoipa::path(post, path = "/api/v1/users/{user}/unsubscribe",
    request_body = UnsubscribeRequest,
    responses(
        (status = 200, description = "revoked; subscriptions are ending on every node", body = RevocationView),
        (status = 400, description = "a malformed body"),
        (status = 403, description = "the token lacks the control scope"),
        (status = 422, description = "not a user id, or not a topic")),
    security(("bearer" = [])))]
pub(crate) async fn unsubscribe(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(user): ApiPath<String>,
    ApiJson(request): ApiJson<UnsubscribeRequest>,
) -> Result<Json<RevocationView>, ApiError> {
    control_caller(&caller)?;
    user_id(&user)?;
    let topic = Topic::parse(&request.topic)
        .map_err(|e| ApiError::invalid("invalid_topic", e.to_string()))?;
    let view = plane(&state)?
        .revoke(&user, Some(&topic))
        .await
        .map_err(unavailable)?;
    Ok(Json(view))
}

/// The user's connections on every node: node, session, since when, topics.
#[utoipa::path(get, path = "/api/v1/users/{user}/connections",
    responses(
        (status = 200, description = "the connections (empty for a user with none)", body = ConnectionsView),
        (status = 403, description = "the token lacks the control scope"),
        (status = 422, description = "not a user id")),
    security(("bearer" = [])))]
pub(crate) async fn connections(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<ConnectionsView>, ApiError> {
    control_caller(&caller)?;
    user_id(&user)?;
    let view = plane(&state)?
        .connections(&user)
        .await
        .map_err(unavailable)?;
    Ok(Json(view))
}
