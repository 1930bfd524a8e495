//! The API's one error type and its JSON form (DESIGN §6).
//!
//! `{"error":{"code":"lock_held","message":"…","details":{…}}}` with a fitting status. Messages
//! are written for the caller; causes that could leak internals (database errors, broker
//! errors) are logged here and replaced by a generic message.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// The body of every error answer, as the OpenAPI document describes it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable and machine-readable: `lock_held`, `invalid_body`, `broker_unavailable`, …
    #[schema(example = "lock_held")]
    code: String,
    /// For people; safe to show.
    message: String,
    /// Structured context when there is some (the holder of a lock, a batch index).
    #[schema(value_type = Option<Value>)]
    details: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is not what the endpoint reads (bad JSON, bad query).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401: no token or an invalid one.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, not allowed.
    #[error("{message}")]
    Forbidden {
        message: String,
        details: Option<Value>,
    },
    /// 404.
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// 409 (or 410 with `gone`): the state does not allow it.
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        details: Option<Value>,
        gone: bool,
    },
    /// 413.
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    /// 422: well-formed but invalid.
    #[error("{message}")]
    Invalid {
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    /// 429, with the seconds to wait.
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// 503: a dependency is down or not configured.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// 500: a bug. The cause is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::Forbidden {
            message: message.into(),
            details: None,
        }
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Unavailable {
            code,
            message: message.into(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&Value>) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code, None),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::Forbidden { details, .. } => {
                (StatusCode::FORBIDDEN, "forbidden", details.as_ref())
            }
            ApiError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code, None),
            ApiError::Conflict {
                code,
                details,
                gone,
                ..
            } => (
                if *gone {
                    StatusCode::GONE
                } else {
                    StatusCode::CONFLICT
                },
                code,
                details.as_ref(),
            ),
            ApiError::TooLarge { code, .. } => (StatusCode::PAYLOAD_TOO_LARGE, code, None),
            ApiError::Invalid { code, details, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, code, details.as_ref())
            }
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", None),
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code, None),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, details) = self.parts();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "internal error");
        } else {
            tracing::debug!(%status, code, message = %self, "request refused");
        }
        let mut error = json!({"code": code, "message": self.to_string()});
        if let Some(details) = details {
            error["details"] = details.clone();
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        match &self {
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }
}

/// Keeps axum's JSON rejections in our error format.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let message = rejection.body_text();
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge {
                code: "body_too_large",
                message: "request body is too large".to_owned(),
            };
        }
        match rejection {
            JsonRejection::JsonDataError(_) => ApiError::invalid("invalid_body", message),
            JsonRejection::JsonSyntaxError(_) => ApiError::BadRequest {
                code: "invalid_json",
                message,
            },
            JsonRejection::MissingJsonContentType(_) => ApiError::BadRequest {
                code: "unsupported_media_type",
                message: "send the body as JSON with content-type: application/json".to_owned(),
            },
            _ => ApiError::BadRequest {
                code: "bad_request",
                message,
            },
        }
    }
}
