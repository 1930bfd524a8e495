//! `GET /api/v1/topics/{topic}/position`, `…/events` and `…/snapshot` (DESIGN §12, §13): where
//! a topic's stream stands, its recent history and the latest event of every key, for
//! backends, bots and pages that load state over HTTP and then subscribe from exactly there;
//! and `…/presence` (DESIGN §14): who is present in a team or item topic.
//!
//! `{topic}` is the whole topic as one percent-encoded path segment (`%2Fteam%2Ft1`). Reading a
//! topic needs what subscribing to it needs.

use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, Caller};
use crate::{ApiState, EventPage, PublishFailure, StatePage};
use axum::Json;
use axum::extract::State;
use protocol::{Position, Principal, Topic, TopicKind};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

/// A position in a topic's stream.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PositionView {
    /// The offset of the topic's latest event (0 before the first).
    offset: u64,
    /// The topic's epoch: it changes when history and offsets were lost.
    epoch: String,
}

impl From<&Position> for PositionView {
    fn from(p: &Position) -> PositionView {
        PositionView {
            offset: p.offset,
            epoch: p.epoch.to_string(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Events after this offset (default 0: from the oldest kept).
    #[serde(default)]
    after: u64,
    /// The epoch `after` belongs to; when it is not the topic's, nothing can be resumed.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    epoch: Option<String>,
    /// At most this many events (default 100, capped at the node's replay maximum).
    #[param(minimum = 1)]
    limit: Option<usize>,
}

/// One event of a topic's history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StoredEvent {
    offset: u64,
    /// The event's envelope, as subscribers got it.
    #[schema(value_type = Object)]
    event: Box<RawValue>,
}

/// Part of a topic's history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Events {
    /// The topic's latest position.
    position: PositionView,
    /// The oldest offset history still holds.
    first: u64,
    /// Whether `events` continue right after `after` in the same epoch: nothing between was
    /// lost (false: the epoch changed, or those events were trimmed; reload state instead).
    recovered: bool,
    events: Vec<StoredEvent>,
    /// More events follow the last one returned.
    more: bool,
}

/// One key's latest event.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct KeyedEvent {
    offset: u64,
    /// The event's key (`x-key`): `job:{job_id}`, `lock:{item}`, or the publisher's own.
    key: String,
    /// The event's envelope, as subscribers got it.
    #[schema(value_type = Object)]
    event: Box<RawValue>,
}

/// A topic's state.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TopicState {
    /// The position the state was taken at: subscribe with `x-stream-offset:offset=<offset>`
    /// and `x-stream-epoch:<epoch>` to continue from exactly there.
    position: PositionView,
    /// The latest event of every key, oldest first.
    events: Vec<KeyedEvent>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PresenceQuery {
    /// Users after this one (the `next` of the previous page).
    #[param(pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    after: Option<String>,
    /// At most this many users (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A user present in a topic.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresentUser {
    user: String,
    /// The user's connections subscribed to the topic, over every node.
    connections: u32,
    /// Since when the user is present (RFC 3339).
    since: String,
}

/// Who is present in a team or item topic, across the cluster.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresenceView {
    /// Users present.
    count: usize,
    /// A page of them, sorted by user id; empty when `counts_only`.
    users: Vec<PresentUser>,
    /// More users are present than the node lists (`presence.max_listed`): only `count` is
    /// given.
    counts_only: bool,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The topic a request names, once the caller may read it.
fn readable(caller: &Principal, topic: &str) -> Result<Topic, ApiError> {
    let topic =
        Topic::parse(topic).map_err(|e| ApiError::invalid("invalid_topic", e.to_string()))?;
    caller
        .can_subscribe(&topic)
        .map_err(|e| ApiError::forbidden(e.to_string()))?;
    Ok(topic)
}

pub(crate) fn unavailable(failure: &PublishFailure) -> ApiError {
    ApiError::unavailable("broker_unavailable", failure.to_string())
}

/// Where a topic's stream stands: subscribe with `x-stream-offset:offset=<offset>` and
/// `x-stream-epoch:<epoch>` to get every event after it.
#[utoipa::path(get, path = "/api/v1/topics/{topic}/position",
    responses((status = 200, description = "the topic's latest position", body = PositionView)),
    security(("bearer" = [])))]
pub(crate) async fn position(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(topic): ApiPath<String>,
) -> Result<Json<PositionView>, ApiError> {
    let topic = readable(&caller, &topic)?;
    crate::control::check_access(&state, &caller, &topic, crate::control::Access::Read).await?;
    let page = state
        .inner
        .publisher
        .history(&topic, u64::MAX, 0)
        .await
        .map_err(|f| unavailable(&f))?;
    Ok(Json((&page.top).into()))
}

/// A topic's recent events after an offset.
#[utoipa::path(get, path = "/api/v1/topics/{topic}/events",
    params(EventsQuery),
    responses((status = 200, description = "events after the offset, oldest first", body = Events)),
    security(("bearer" = [])))]
pub(crate) async fn events(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(topic): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<Events>, ApiError> {
    let topic = readable(&caller, &topic)?;
    crate::control::check_access(&state, &caller, &topic, crate::control::Access::Read).await?;
    if let Some(epoch) = &query.epoch
        && !protocol::stream::is_epoch(epoch)
    {
        return Err(ApiError::invalid(
            "invalid_epoch",
            "epoch must be an epoch Lockstep issued ([A-Za-z0-9_-]{1,64})",
        ));
    }
    let max = state.inner.config.max_replay;
    let limit = query.limit.unwrap_or(100).clamp(1, max.max(1));
    let page = state
        .inner
        .publisher
        // One more than asked, to tell whether more follow.
        .history(&topic, query.after, limit + 1)
        .await
        .map_err(|f| unavailable(&f))?;
    Ok(Json(events_view(page, &query, limit)))
}

/// The latest event of every key of a topic (each running job's progress, each item's lock
/// state), and the position it was taken at.
#[utoipa::path(get, path = "/api/v1/topics/{topic}/snapshot",
    responses((status = 200, description = "the latest event of every key, oldest first", body = TopicState)),
    security(("bearer" = [])))]
pub(crate) async fn snapshot(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(topic): ApiPath<String>,
) -> Result<Json<TopicState>, ApiError> {
    let topic = readable(&caller, &topic)?;
    crate::control::check_access(&state, &caller, &topic, crate::control::Access::Read).await?;
    let page: StatePage = state
        .inner
        .publisher
        .snapshot(&topic)
        .await
        .map_err(|f| unavailable(&f))?;
    Ok(Json(TopicState {
        position: (&page.top).into(),
        events: page
            .events
            .into_iter()
            .filter_map(|(offset, key, json)| {
                RawValue::from_string(json)
                    .ok()
                    .map(|event| KeyedEvent { offset, key, event })
            })
            .collect(),
    }))
}

/// Who is present in a team or item topic, on any node (DESIGN §14). Reading it needs what
/// subscribing to the topic needs.
#[utoipa::path(get, path = "/api/v1/topics/{topic}/presence",
    params(PresenceQuery),
    responses(
        (status = 200, description = "users present, sorted by user id", body = PresenceView),
        (status = 422, description = "not a team or item topic, or an invalid query")),
    security(("bearer" = [])))]
pub(crate) async fn presence(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(topic): ApiPath<String>,
    ApiQuery(query): ApiQuery<PresenceQuery>,
) -> Result<Json<PresenceView>, ApiError> {
    let topic = readable(&caller, &topic)?;
    crate::control::check_access(&state, &caller, &topic, crate::control::Access::Read).await?;
    if !matches!(topic.kind(), TopicKind::Team | TopicKind::Item) {
        return Err(ApiError::invalid(
            "no_presence",
            format!("{topic} has no presence: only team and item topics do"),
        ));
    }
    if let Some(after) = &query.after
        && !protocol::topic::is_valid_id(after)
    {
        return Err(ApiError::invalid(
            "invalid_after",
            "after must be a user id ([A-Za-z0-9_.:-]{1,128})",
        ));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit must be between 1 and 1000",
        ));
    }
    let page = state
        .inner
        .publisher
        .presence(&topic)
        .await
        .map_err(|f| unavailable(&f))?;
    let Some(members) = page.members else {
        return Ok(Json(PresenceView {
            count: page.count,
            users: Vec::new(),
            counts_only: true,
            next: None,
        }));
    };
    let rest = members
        .into_iter()
        .filter(|(user, _, _)| query.after.as_deref().is_none_or(|a| user.as_str() > a));
    let mut users: Vec<PresentUser> = rest
        .take(limit + 1)
        .map(|(user, connections, since)| PresentUser {
            user,
            connections,
            since: humantime::format_rfc3339_millis(since).to_string(),
        })
        .collect();
    let next = (users.len() > limit).then(|| {
        users.truncate(limit);
        users.last().map(|u| u.user.clone()).unwrap_or_default()
    });
    Ok(Json(PresenceView {
        count: page.count,
        users,
        counts_only: false,
        next,
    }))
}

fn events_view(page: EventPage, query: &EventsQuery, limit: usize) -> Events {
    let same_epoch = query.epoch.as_deref().is_none_or(|e| *page.top.epoch == *e);
    let recovered = same_epoch && (query.after >= page.top.offset || page.first <= query.after + 1);
    let mut events: Vec<StoredEvent> = if same_epoch {
        page.events
            .into_iter()
            .filter_map(|(offset, json)| {
                RawValue::from_string(json)
                    .ok()
                    .map(|event| StoredEvent { offset, event })
            })
            .collect()
    } else {
        Vec::new()
    };
    let more = events.len() > limit;
    events.truncate(limit);
    Events {
        position: (&page.top).into(),
        first: page.first,
        recovered,
        events,
        more,
    }
}
