//! `POST /api/v1/publish` and `POST /api/v1/publish/batch`.
//!
//! Every answer carries each event's position (`offset`, `epoch`), the same the subscribers see
//! in `x-stream-offset`/`x-stream-epoch`. An `idempotency_key` makes a retried publish answer
//! the first one's id and position and publish nothing (within the history age); keys are the
//! caller's own, so one caller cannot take another's.

use crate::error::ApiError;
use crate::extract::{ApiJson, Caller};
use crate::{ApiState, EventOptions, PublishFailure, PublishedEvent};
use axum::Json;
use axum::extract::State;
use http::StatusCode;
use protocol::{EventType, Principal, Topic};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use utoipa::ToSchema;

/// One event to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    /// `/user/{id}`, `/team/{id}` or `/global`.
    #[schema(
        example = "/team/t1",
        pattern = r"^/(?:global|(?:user|team)/(?!\.\.?$)[A-Za-z0-9_.:-]{1,128})$"
    )]
    topic: String,
    /// Event type, e.g. `job.progress`.
    #[serde(rename = "type")]
    #[schema(
        example = "job.progress",
        pattern = r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+$",
        max_length = 128
    )]
    event_type: String,
    /// Any JSON; delivered byte for byte.
    #[schema(value_type = Value)]
    data: Box<RawValue>,
    /// Publish at most once per key: a retry with the same key answers the first publish.
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    idempotency_key: Option<String>,
    /// The event's key in its topic (`x-key`): the topic keeps the latest event of each key
    /// for `x-stream-offset:snapshot`, and a slow subscriber may get only the latest.
    /// `job.*` events with a `job_id` default to `job:{job_id}`; `lock:` and `presence:` keys
    /// are Lockstep's own.
    #[schema(example = "job:import-42", pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Published {
    /// The event id, also the STOMP `message-id`.
    id: String,
    /// The event's offset in its topic, contiguous from 1 (`x-stream-offset`).
    offset: u64,
    /// The topic's epoch (`x-stream-epoch`).
    epoch: String,
    /// Present (true) when an idempotency key was seen before: this is the first publish's
    /// answer and nothing was published now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl From<PublishedEvent> for Published {
    fn from(p: PublishedEvent) -> Published {
        Published {
            id: p.id,
            offset: p.position.offset,
            epoch: p.position.epoch.to_string(),
            duplicate: p.duplicate,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    #[schema(min_items = 1)]
    events: Vec<PublishRequest>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchPublished {
    /// Event ids, in request order.
    ids: Vec<String>,
    /// Each event's id and position, in request order.
    events: Vec<Published>,
}

/// Publishes one event.
#[utoipa::path(post, path = "/api/v1/publish", request_body = PublishRequest,
    responses((status = 202, description = "accepted by the broker", body = Published), (status = 429, description = "the token's publish rate is exceeded; see Retry-After")),
    security(("bearer" = [])))]
pub(crate) async fn publish(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(request): ApiJson<PublishRequest>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let (topic, event_type) = validate(&state, &caller, &request).map_err(|e| e.at(None))?;
    crate::control::check_access(&state, &caller, &topic, crate::control::Access::Publish).await?;
    state.inner.limiter.check(&caller, 1)?;
    let published = state
        .inner
        .publisher
        .publish(
            &topic,
            &event_type,
            &request.data,
            EventOptions {
                idempotency_key: scoped_key(&caller, request.idempotency_key.as_deref()),
                key: request.key.clone(),
                ..EventOptions::default()
            },
        )
        .await
        .map_err(|f| unavailable(&f, &[]))?;
    Ok((StatusCode::ACCEPTED, Json(published.into())))
}

/// Publishes several events, in order. All are validated before any is sent.
#[utoipa::path(post, path = "/api/v1/publish/batch", request_body = BatchRequest,
    responses((status = 202, description = "every event accepted by the broker", body = BatchPublished), (status = 429, description = "the token's publish rate is exceeded; see Retry-After")),
    security(("bearer" = [])))]
pub(crate) async fn publish_batch(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<(StatusCode, Json<BatchPublished>), ApiError> {
    let max = state.inner.config.max_batch;
    if request.events.len() > max {
        return Err(ApiError::TooLarge {
            code: "batch_too_large",
            message: format!(
                "a batch holds at most {max} events; got {}",
                request.events.len()
            ),
        });
    }
    if request.events.is_empty() {
        return Err(ApiError::invalid("empty_batch", "the batch has no events"));
    }
    let validated = request
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| validate(&state, &caller, e).map_err(|err| err.at(Some(i))))
        .collect::<Result<Vec<_>, _>>()?;
    for (topic, _) in &validated {
        crate::control::check_access(&state, &caller, topic, crate::control::Access::Publish)
            .await?;
    }
    #[allow(clippy::cast_possible_truncation)] // bounded by max_batch
    state
        .inner
        .limiter
        .check(&caller, request.events.len() as u32)?;
    // Every event is handed to the broker first (in order: each takes its place when
    // started), then the answers are awaited: one round trip for the batch, not one each.
    let pending: Vec<_> = validated
        .iter()
        .zip(&request.events)
        .map(|((topic, event_type), event)| {
            state.inner.publisher.publish(
                topic,
                event_type,
                &event.data,
                EventOptions {
                    idempotency_key: scoped_key(&caller, event.idempotency_key.as_deref()),
                    key: event.key.clone(),
                    ..EventOptions::default()
                },
            )
        })
        .collect();
    let outcomes = futures_util::future::join_all(pending).await;
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut events = Vec::with_capacity(outcomes.len());
    let mut failed: Vec<(usize, PublishFailure)> = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(published) => {
                ids.push(published.id.clone());
                events.push(Published::from(published));
            }
            Err(failure) => failed.push((i, failure)),
        }
    }
    if let Some((first, failure)) = failed.first() {
        let indices: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        // Usually the failures are a suffix (the broker went away); say which ones either way.
        if indices.iter().copied().eq(*first..failed.len() + first) && *first == ids.len() {
            return Err(unavailable(failure, &ids));
        }
        let mut error = unavailable(failure, &[]);
        if let ApiError::Unavailable { message, .. } = &mut error {
            *message = format!(
                "{failure}; events {indices:?} of the batch were not published, the others were"
            );
        }
        return Err(error);
    }
    Ok((StatusCode::ACCEPTED, Json(BatchPublished { ids, events })))
}

/// A refusal of one event, before it is placed in a batch.
enum Refusal {
    Invalid(&'static str, String),
    Forbidden(String),
    TooLarge(String),
}

impl Refusal {
    fn at(self, index: Option<usize>) -> ApiError {
        let details = index.map(|i| json!({ "index": i }));
        let prefix = index.map(|i| format!("events[{i}]: ")).unwrap_or_default();
        match self {
            Refusal::Invalid(code, message) => ApiError::Invalid {
                code,
                message: format!("{prefix}{message}"),
                details,
            },
            Refusal::Forbidden(message) => ApiError::Forbidden {
                message: format!("{prefix}{message}"),
                details,
            },
            Refusal::TooLarge(message) => ApiError::TooLarge {
                code: "event_too_large",
                message: format!("{prefix}{message}"),
            },
        }
    }
}

fn validate(
    state: &ApiState,
    caller: &Principal,
    request: &PublishRequest,
) -> Result<(Topic, EventType), Refusal> {
    let limit = state.inner.config.max_event_bytes;
    let size = request.data.get().len();
    if size > limit {
        return Err(Refusal::TooLarge(format!(
            "event data is {size} bytes; at most {limit} are allowed"
        )));
    }
    let topic = Topic::parse(&request.topic)
        .map_err(|e| Refusal::Invalid("invalid_topic", e.to_string()))?;
    if let Some(key) = &request.idempotency_key
        && !protocol::topic::is_valid_id(key)
    {
        return Err(Refusal::Invalid(
            "invalid_idempotency_key",
            "idempotency_key must match [A-Za-z0-9_.:-]{1,128}".to_owned(),
        ));
    }
    if let Some(key) = &request.key {
        protocol::stream::check_event_key(key).map_err(|e| Refusal::Invalid("invalid_key", e))?;
    }
    let event_type = EventType::parse(&request.event_type)
        .map_err(|e| Refusal::Invalid("invalid_event_type", e.to_string()))?;
    caller
        .can_publish(&topic)
        .map_err(|e| Refusal::Forbidden(e.to_string()))?;
    Ok((topic, event_type))
}

/// An idempotency key in the caller's own key space (`/` never occurs in an id).
fn scoped_key(caller: &Principal, key: Option<&str>) -> Option<String> {
    key.map(|key| format!("{}/{key}", caller.sub))
}

fn unavailable(failure: &PublishFailure, published: &[String]) -> ApiError {
    if let PublishFailure::TooLarge { .. } = failure {
        return ApiError::TooLarge {
            code: "event_too_large",
            message: if published.is_empty() {
                failure.to_string()
            } else {
                format!(
                    "{failure}; the first {} events were published",
                    published.len()
                )
            },
        };
    }
    let message = if published.is_empty() {
        failure.to_string()
    } else {
        format!(
            "{failure}; the first {} events were published",
            published.len()
        )
    };
    let code = match failure {
        PublishFailure::Unavailable(_) => "broker_unavailable",
        PublishFailure::ShuttingDown => "shutting_down",
        PublishFailure::TooLarge { .. } => "event_too_large",
    };
    tracing::warn!(%failure, published = published.len(), "publish failed");
    ApiError::Unavailable { code, message }
}
