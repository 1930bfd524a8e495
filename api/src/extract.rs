//! Extractors that keep every refusal in the API's error format.

use crate::ApiState;
use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use http::header;
use http::request::Parts;
use protocol::Principal;
use std::time::{SystemTime, UNIX_EPOCH};

/// `axum::Json`, with rejections turned into [`ApiError`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

/// An optional JSON body: `None` when the request has no body at all (no `content-length`, or
/// zero, and no chunked transfer), so `POST …/lock` works with or without `{}`.
impl<T, S> OptionalFromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let headers = req.headers();
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let chunked = headers.contains_key(header::TRANSFER_ENCODING);
        if length.unwrap_or(0) == 0 && !chunked {
            return Ok(None);
        }
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Some(ApiJson(value)))
    }
}

/// The authenticated caller, from `Authorization: Bearer …`.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("send a token as Authorization: Bearer <token>".to_owned())
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "the Authorization header must be 'Bearer <token>'".to_owned(),
                )
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let principal = state
            .inner
            .auth
            .verify(token, now)
            .map_err(|err| ApiError::Unauthorized(err.to_string()))?;
        Ok(Caller(principal))
    }
}
