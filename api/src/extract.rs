//! Extractors that keep every refusal in the API's error format.

use crate::ApiState;
use crate::error::ApiError;
use axum::extract::rejection::{JsonRejection, MissingJsonContentType};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Path, Query, Request};
use bytes::Bytes;
use http::header;
use http::request::Parts;
use protocol::Principal;
use serde::de::DeserializeOwned;
use std::time::{SystemTime, UNIX_EPOCH};

/// `axum::Json`, with rejections turned into [`ApiError`]. The body must be a JSON object:
/// serde would otherwise also take a struct from a JSON array of its fields in order, which no
/// client means and the OpenAPI document does not allow.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        parse_object(&bytes).map(ApiJson)
    }
}

/// The body of a JSON request, refusing other content types.
async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    if !is_json(req.headers()) {
        return Err(JsonRejection::from(MissingJsonContentType::default()).into());
    }
    Bytes::from_request(req, state)
        .await
        .map_err(|rejection| match rejection.status() {
            http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
                code: "body_too_large",
                message: "request body is too large".to_owned(),
            },
            _ => ApiError::BadRequest {
                code: "bad_request",
                message: rejection.body_text(),
            },
        })
}

fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(ApiError::invalid(
            "invalid_body",
            "the request body must be a JSON object",
        ));
    }
    let axum::Json(value) = axum::Json::<T>::from_bytes(bytes)?;
    Ok(value)
}

/// `application/json` or any `application/*+json`, as `axum::Json` accepts.
fn is_json(headers: &http::HeaderMap) -> bool {
    let Some(mime) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
    else {
        return false;
    };
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// An optional JSON body: `None` when the request has no body at all (no `content-length`, or
/// zero, and no chunked transfer) or the body is JSON `null`, so `POST …/lock` works with or
/// without `{}`.
impl<T, S> OptionalFromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
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
        let bytes = json_bytes(req, state).await?;
        if bytes.trim_ascii() == b"null" {
            return Ok(None);
        }
        parse_object(&bytes).map(|value| Some(ApiJson(value)))
    }
}

/// `axum::extract::Path`, answering a path it cannot read (not UTF-8, say) in the API's format.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::BadRequest {
                code: "invalid_path",
                message: rejection.body_text(),
            }),
        }
    }
}

/// `axum::extract::Query`, answering a query it cannot read in the API's format.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::BadRequest {
                code: "invalid_query",
                message: rejection.body_text(),
            }),
        }
    }
}

/// Integer body fields that also take a JSON number with a zero fraction (`60000.0`): JSON
/// Schema, and so the OpenAPI document, counts those as integers, and some JSON encoders write
/// every number that way.
pub(crate) mod whole {
    use serde::de::{Deserializer, Error, Visitor};
    use std::fmt;

    struct Whole<T>(std::marker::PhantomData<T>);

    impl<T: TryFrom<i64> + TryFrom<u64>> Visitor<'_> for Whole<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }

        #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
        fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
            // Only whole numbers a float holds exactly (|v| <= 2^53). Integer literals that fit
            // 64 bits never come here; larger ones arrive as floats and must not be rounded
            // into range.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if v.fract() != 0.0 || !(-EXACT..=EXACT).contains(&v) {
                return Err(E::custom(format!("{v} is not an integer")));
            }
            self.visit_i64(v as i64)
        }
    }

    /// For `i64` and `u64` fields: `#[serde(deserialize_with = "whole::int")]`.
    pub(crate) fn int<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<i64> + TryFrom<u64>,
    {
        d.deserialize_any(Whole(std::marker::PhantomData))
    }

    /// For `Option<i64>` and `Option<u64>` fields, with `#[serde(default)]`.
    pub(crate) fn opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<i64> + TryFrom<u64>,
    {
        /// `int` as a type, so serde's own `Option` handling (`null`, absent) wraps it.
        struct Int<T>(T);
        impl<'de, T: TryFrom<i64> + TryFrom<u64>> serde::Deserialize<'de> for Int<T> {
            fn deserialize<D2: Deserializer<'de>>(d: D2) -> Result<Self, D2::Error> {
                int(d).map(Int)
            }
        }
        <Option<Int<T>> as serde::Deserialize>::deserialize(d).map(|o| o.map(|i| i.0))
    }

    #[cfg(test)]
    mod tests {
        #[derive(Debug, serde::Deserialize)]
        struct T {
            #[serde(deserialize_with = "super::int")]
            a: i64,
            #[serde(default, deserialize_with = "super::opt")]
            b: Option<u64>,
        }

        fn parse(json: &str) -> Result<T, serde_json::Error> {
            serde_json::from_str(json)
        }

        #[test]
        fn whole_floats_are_integers_and_nothing_else_is() {
            let t = parse(r#"{"a": 5611.0, "b": 60000.0}"#).unwrap();
            assert_eq!((t.a, t.b), (5611, Some(60000)));
            let t = parse(r#"{"a": -3}"#).unwrap();
            assert_eq!((t.a, t.b), (-3, None));
            assert_eq!(parse(r#"{"a": 1, "b": null}"#).unwrap().b, None);
            for bad in [
                r#"{"a": 1.5}"#,
                r#"{"a": "1"}"#,
                r#"{"a": 1e300}"#,
                r#"{"a": 9223372036854775808}"#,
                r#"{"a": -9223372036854775809}"#,
                r#"{"a": 1e17}"#,
                r#"{"a": 1, "b": -1}"#,
                r#"{"a": 1, "b": -1.0}"#,
                r#"{"a": 1, "b": true}"#,
            ] {
                assert!(parse(bad).is_err(), "{bad}");
            }
        }
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
