//! `GET /api/v1/topics/{topic}/position`, `…/events` and `…/snapshot` (DESIGN §12, §13): where
//! a topic's stream stands, its recent history and the latest event of every key, for
//! backends, bots and pages that load state over HTTP and then subscribe from exactly there.
//!
//! `{topic}` is the whole topic as one percent-encoded path segment (`%2Fteam%2Ft1`). Reading a
//! topic needs what subscribing to it needs.

use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, Caller};
use crate::{ApiState, EventPage, PublishFailure, StatePage};
use axum::Json;
use axum::extract::State;
use protocol::{Position, Principal, Topic};
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
