//! Presigned object access (DESIGN §6): browsers read and write item files directly in
//! S3-compatible storage; no file byte passes through Lockstep.
//!
//! Presigning is local computation (SigV4 query signing) on a client built once, so a batch of
//! hundreds of URLs makes no network call. Object keys are always
//! `{prefix}/{team}/{item}/{name}` with a validated `name`, so no caller can reach another
//! team's objects. A write URL is issued only to the item's current lock holder presenting the
//! current fencing token, and never outlives the lock.
//!
//! Writes are fenced: a write URL signs the fencing token into the object's metadata
//! (`x-amz-meta-lockstep-token`), so the object records which grant wrote it, and `commit`
//! refuses an object written under any other token. A URL outlives an early end of its lock
//! (release, takeover, a closed session) until its own expiry, and storage cannot be told to
//! revoke it; fencing makes such a stale write visible instead of silently winning. A write
//! URL also always signs a content type from an allow-list, so an uploader cannot make the
//! storage serve, say, `text/html` from the bucket.

use crate::ApiState;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, Caller, whole};
use crate::locks::store::LockState;
use crate::locks::{authorize_now, rfc3339};
use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use axum::Json;
use axum::extract::State;
use protocol::topic::is_valid_id;
use protocol::{EventType, Principal, Scope, Topic};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use utoipa::ToSchema;

/// Object storage settings.
#[derive(Debug, Clone, Default)]
pub struct StorageConfig {
    /// e.g. `https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:9000`,
    /// `https://oss-cn-hangzhou.aliyuncs.com`; empty: the AWS default for the region.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key (no leading or trailing `/`); may be empty.
    pub prefix: String,
    /// `https://endpoint/bucket/key` (MinIO, most local servers) instead of
    /// `https://bucket.endpoint/key` (AWS, OSS).
    pub path_style: bool,
    /// Static credentials; when absent, the standard AWS credential chain (environment,
    /// profile, web identity, instance metadata).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Lifetime of a URL when the request names none.
    pub default_expires: Duration,
    /// Longest lifetime of any URL.
    pub max_expires: Duration,
    /// Most objects in one batch.
    pub max_batch: usize,
    /// Content types a write URL may sign (`type/subtype`, `type/*`, or `*` for any).
    pub content_types: Vec<String>,
}

/// What a write URL signs when the request names no content type.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The object metadata key (`x-amz-meta-…`) that records the fencing token of the write.
const TOKEN_METADATA: &str = "lockstep-token";

/// The default allow-list of write content types: data, media and archives that browsers
/// download or display inertly; none that a browser would run as a page or script (HTML, SVG,
/// XML, JavaScript).
pub const DEFAULT_CONTENT_TYPES: &str = "application/octet-stream,application/json,application/x-ndjson,application/zip,application/gzip,application/x-protobuf,text/plain,text/csv,image/png,image/jpeg,image/webp,image/tiff,image/bmp,image/gif,video/mp4,video/webm,audio/mpeg,audio/wav,audio/ogg,audio/flac,model/gltf-binary";

impl StorageConfig {
    /// Whether a write URL may sign `content_type`.
    pub fn allows(&self, content_type: &str) -> bool {
        // Parameters (`; charset=…`) do not change what the type is.
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.content_types.iter().any(|allowed| {
            allowed == "*"
                || *allowed == essence
                || allowed
                    .strip_suffix("/*")
                    .is_some_and(|kind| essence.split_once('/').is_some_and(|(k, _)| k == kind))
        })
    }
}

/// The presigner: one S3 client, built at start.
#[derive(Debug, Clone)]
pub struct Storage {
    client: aws_sdk_s3::Client,
    config: StorageConfig,
}

impl Storage {
    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// Builds the client. Resolves credentials from the AWS chain when none are configured.
    pub async fn new(config: StorageConfig) -> Storage {
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(config.region.clone()))
            .force_path_style(config.path_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        builder = match (&config.access_key_id, &config.secret_access_key) {
            (Some(key), Some(secret)) => {
                builder.credentials_provider(aws_sdk_s3::config::Credentials::new(
                    key,
                    secret,
                    config.session_token.clone(),
                    None,
                    "lockstep-config",
                ))
            }
            _ => {
                let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(aws_sdk_s3::config::Region::new(config.region.clone()))
                    .load()
                    .await;
                match shared.credentials_provider() {
                    Some(provider) => builder.credentials_provider(provider),
                    None => builder,
                }
            }
        };
        Storage {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            config,
        }
    }

    fn key(&self, team: &str, item: &str, name: &str) -> String {
        if self.config.prefix.is_empty() {
            format!("{team}/{item}/{name}")
        } else {
            format!("{}/{team}/{item}/{name}", self.config.prefix)
        }
    }

    /// Signs a request. A write signs `content_type` and the fencing `token` into the object's
    /// metadata, both of which the upload must then send exactly.
    async fn presign(
        &self,
        method: Method,
        key: &str,
        write: Option<(&str, i64)>,
        start: SystemTime,
        expires: Duration,
    ) -> Result<PresignedRequest, ApiError> {
        let presigning = PresigningConfig::builder()
            .start_time(start)
            .expires_in(expires)
            .build()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let failed = |e: &dyn std::fmt::Display| {
            tracing::warn!(error = %e, "presigning failed");
            ApiError::unavailable(
                "storage_unavailable",
                "could not sign the request: storage credentials are unavailable",
            )
        };
        match method {
            Method::Get => self
                .client
                .get_object()
                .bucket(&self.config.bucket)
                .key(key)
                .presigned(presigning)
                .await
                .map_err(|e| failed(&aws_sdk_s3::error::DisplayErrorContext(&e))),
            Method::Put => {
                let (content_type, token) = write.ok_or_else(|| {
                    ApiError::Internal("a write URL without its content type and token".into())
                })?;
                self.client
                    .put_object()
                    .bucket(&self.config.bucket)
                    .key(key)
                    .content_type(content_type)
                    .metadata(TOKEN_METADATA, token.to_string())
                    .presigned(presigning)
                    .await
                    .map_err(|e| failed(&aws_sdk_s3::error::DisplayErrorContext(&e)))
            }
        }
    }

    /// Signs a read URL for an item's object: the work `POST …/presign` does after validation
    /// (for benchmarks of the signing itself).
    ///
    /// # Errors
    ///
    /// When credentials are unavailable.
    pub async fn sign_get(
        &self,
        team: &str,
        item: &str,
        name: &str,
        expires: Duration,
    ) -> Result<String, ApiError> {
        let key = self.key(team, item, name);
        Ok(self
            .presign(Method::Get, &key, None, SystemTime::now(), expires)
            .await?
            .uri()
            .to_owned())
    }

    /// The object's size, ETag and the fencing token it was written under (`HEAD`); `None`
    /// when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<Head>, ApiError> {
        match self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(Head {
                size: head.content_length().unwrap_or(0),
                etag: head.e_tag().map(str::to_owned),
                token: head
                    .metadata()
                    .and_then(|m| m.get(TOKEN_METADATA))
                    .and_then(|t| t.parse().ok()),
            })),
            Err(err)
                if err.as_service_error().is_some_and(
                    aws_sdk_s3::operation::head_object::HeadObjectError::is_not_found,
                ) =>
            {
                Ok(None)
            }
            Err(err) => {
                tracing::warn!(error = %aws_sdk_s3::error::DisplayErrorContext(&err), "HEAD object failed");
                Err(ApiError::unavailable(
                    "storage_unavailable",
                    "the object storage did not answer",
                ))
            }
        }
    }
}

/// What `HEAD` tells of an object.
#[derive(Debug)]
struct Head {
    size: i64,
    etag: Option<String>,
    /// The fencing token in its metadata, if it was written through a write URL.
    token: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub(crate) enum Method {
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "PUT")]
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PresignRequest {
    method: Method,
    /// Object name within the item: `[A-Za-z0-9._-]` segments separated by `/`.
    #[schema(example = "frames/000123.pcd")]
    name: String,
    /// Signed into PUT URLs: the upload must send exactly this `content-type`. Default
    /// `application/octet-stream`; only types on the node's allow-list are signed.
    #[schema(pattern = r"^[ -~]*/[ -~]*$", max_length = 255)]
    content_type: Option<String>,
    /// Seconds; capped by the configured maximum and, for PUT, by the lock's expiry.
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1)]
    expires_in: Option<i64>,
    /// The lock's fencing token; required for PUT.
    #[serde(default, deserialize_with = "whole::opt")]
    token: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchObject {
    #[schema(example = "doc-1")]
    item: String,
    #[schema(example = "frames/000123.pcd")]
    name: String,
    #[schema(pattern = r"^[ -~]*/[ -~]*$", max_length = 255)]
    content_type: Option<String>,
    /// For PUT: the token of this item's lock.
    #[serde(default, deserialize_with = "whole::opt")]
    token: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchPresignRequest {
    method: Method,
    #[schema(min_items = 1)]
    objects: Vec<BatchObject>,
    #[serde(default, deserialize_with = "whole::opt")]
    #[schema(minimum = 1)]
    expires_in: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresignedBatch {
    /// One per object, in request order.
    urls: Vec<Presigned>,
}

/// An announced upload.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Committed {
    /// The `item.updated` event's id.
    id: String,
    item: String,
    name: String,
    /// Bytes, as the object storage reports them.
    size: i64,
    etag: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Presigned {
    url: String,
    method: String,
    /// Headers the request must carry exactly (e.g. the signed `content-type`).
    headers: HashMap<String, String>,
    expires_at: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommitRequest {
    #[serde(deserialize_with = "whole::int")]
    token: i64,
    #[schema(example = "frames/000123.pcd")]
    name: String,
}

fn storage(state: &ApiState) -> Result<&Storage, ApiError> {
    state.inner.storage.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "storage_not_configured",
            "object storage is not configured on this node (set LOCKSTEP_S3_BUCKET and friends)",
        )
    })
}

/// Validates an object name: `/`-separated segments of `[A-Za-z0-9._-]`, none empty, `.` or
/// `..`, at most 512 bytes. Keys are built from it; nothing else may escape the item's folder.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=512).contains(&name.len())
        && name.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

fn valid_content_type(ct: &str) -> bool {
    (1..=255).contains(&ct.len())
        && ct.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && ct.contains('/')
}

/// One object to sign, validated.
struct Object<'a> {
    item: &'a str,
    name: &'a str,
    content_type: Option<&'a str>,
    token: Option<i64>,
}

impl Object<'_> {
    /// What a write URL signs: the content type (or the default) and the fencing token.
    fn write(&self) -> Option<(&str, i64)> {
        self.token
            .map(|token| (self.content_type.unwrap_or(DEFAULT_CONTENT_TYPE), token))
    }
}

fn validate(
    config: &StorageConfig,
    object: &Object<'_>,
    method: Method,
    index: Option<usize>,
) -> Result<(), ApiError> {
    let at = |message: String, code: &'static str| {
        let prefix = index.map(|i| format!("objects[{i}]: ")).unwrap_or_default();
        ApiError::Invalid {
            code,
            message: format!("{prefix}{message}"),
            details: index.map(|i| json!({"index": i})),
        }
    };
    if !is_valid_id(object.item) {
        return Err(at(
            format!("invalid item id '{}'", object.item),
            "invalid_item",
        ));
    }
    if !valid_name(object.name) {
        return Err(at(
            "invalid name: use '/'-separated segments of [A-Za-z0-9._-], no '.' or '..' segments, at most 512 bytes".to_owned(),
            "invalid_name",
        ));
    }
    if let Some(ct) = object.content_type
        && !valid_content_type(ct)
    {
        return Err(at(
            format!("invalid content_type '{ct}'"),
            "invalid_content_type",
        ));
    }
    if method == Method::Put {
        let ct = object.content_type.unwrap_or(DEFAULT_CONTENT_TYPE);
        if !config.allows(ct) {
            return Err(at(
                format!(
                    "content_type '{ct}' is not on this node's list of types write URLs may sign (s3.content_types)"
                ),
                "content_type_not_allowed",
            ));
        }
    }
    if method == Method::Put && object.token.is_none() {
        return Err(at(
            "a PUT needs the item's lock token".to_owned(),
            "missing_token",
        ));
    }
    Ok(())
}

/// The lifetime of a URL: requested (or default), capped by the maximum and, for a write, by
/// the lock's remaining life (`lock_left_ms`).
fn lifetime(
    config: &StorageConfig,
    requested: Option<i64>,
    lock_left_ms: Option<i64>,
) -> Result<Duration, ApiError> {
    // Whole seconds: SigV4's X-Amz-Expires is in seconds, and the reported expiry must be the
    // moment the URL really stops working.
    let seconds = requested
        .map_or(config.default_expires, |r| {
            Duration::from_secs(u64::try_from(r).unwrap_or(0))
        })
        .min(config.max_expires)
        .as_secs();
    let mut expires = Duration::from_secs(seconds);
    if requested.is_some_and(|r| r < 1) {
        return Err(ApiError::invalid(
            "invalid_expires_in",
            "expires_in must be at least 1 second (longer requests than the configured maximum are capped)",
        ));
    }
    if let Some(left) = lock_left_ms {
        // Rounded down, so the URL dies no later than the lock.
        expires = expires.min(Duration::from_secs(u64::try_from(left / 1000).unwrap_or(0)));
    }
    if expires < Duration::from_secs(1) {
        return Err(ApiError::Conflict {
            code: "lock_expiring",
            message: "the lock expires within a second; renew it first".to_owned(),
            details: None,
            gone: false,
        });
    }
    Ok(expires)
}

/// `details` with the object's index added (a refusal in a batch names the object).
fn with_index(details: Option<serde_json::Value>, index: usize) -> serde_json::Value {
    match details {
        Some(serde_json::Value::Object(mut map)) => {
            map.insert("index".to_owned(), json!(index));
            serde_json::Value::Object(map)
        }
        _ => json!({ "index": index }),
    }
}

/// Checks that `caller` holds `item`'s live lock with `token`; returns the lock.
fn check_lock<'a>(
    live: &'a HashMap<String, LockState>,
    caller: &Principal,
    item: &str,
    token: i64,
) -> Result<&'a LockState, ApiError> {
    match live.get(item) {
        Some(lock) if lock.holder == caller.sub && lock.token == token => Ok(lock),
        Some(lock) if lock.holder != caller.sub => Err(ApiError::Conflict {
            code: "lock_held",
            message: format!(
                "item {item} is locked by {}; a write URL needs the lock",
                lock.holder
            ),
            details: Some(json!({"holder": lock.holder, "expires_at": rfc3339(lock.expires_at)})),
            gone: false,
        }),
        _ => Err(ApiError::Conflict {
            code: "lock_lost",
            message: format!(
                "token {token} is not the current lock on item {item}; acquire the lock (again) first"
            ),
            details: None,
            gone: true,
        }),
    }
}

/// The live locks among `items`, by item, and the database's time.
async fn live_locks(
    state: &ApiState,
    team: &str,
    items: &[&str],
) -> Result<(HashMap<String, LockState>, i64), ApiError> {
    let (live, now) = crate::locks::locks(state)?
        .store()
        .live(team, items)
        .await
        .map_err(|e| crate::locks::store_error(&e))?;
    Ok((live.into_iter().map(|l| (l.item.clone(), l)).collect(), now))
}

/// The signing time: now, rounded down to the second as `X-Amz-Date` will show it, so
/// `start + expires` is exactly when the URL stops working.
fn signing_start() -> SystemTime {
    UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        )
}

fn view(signed: &PresignedRequest, start: SystemTime, expires: Duration) -> Presigned {
    let expires_at = start + expires;
    Presigned {
        url: signed.uri().to_owned(),
        method: signed.method().to_owned(),
        headers: signed
            .headers()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        expires_at: rfc3339(
            i64::try_from(
                expires_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(0),
        ),
    }
}

/// Signs one URL to read (any member) or write (the lock holder) an item's object.
#[utoipa::path(post, path = "/api/v1/teams/{team}/items/{item}/presign", request_body = PresignRequest,
    responses((status = 200, description = "the signed URL", body = Presigned), (status = 409, description = "the item is locked by another user, or the lock expires within a second"), (status = 410, description = "the token's grant is over")),
    security(("bearer" = [])))]
pub(crate) async fn presign(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((team, item)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<PresignRequest>,
) -> Result<Json<Presigned>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Presign, &[]).await?;
    let storage = storage(&state)?;
    let object = Object {
        item: &item,
        name: &request.name,
        content_type: request.content_type.as_deref(),
        token: request.token,
    };
    validate(&storage.config, &object, request.method, None)?;
    let lock_left = match (request.method, request.token) {
        (Method::Put, Some(token)) => {
            let (live, now) = live_locks(&state, &team, &[&item]).await?;
            let lock = check_lock(&live, &caller, &item, token)?;
            Some(lock.expires_at - now)
        }
        _ => None,
    };
    let expires = lifetime(&storage.config, request.expires_in, lock_left)?;
    let start = signing_start();
    let key = storage.key(&team, &item, &request.name);
    let signed = storage
        .presign(request.method, &key, object.write(), start, expires)
        .await?;
    crate::metrics::presigned(request.method.as_str(), 1);
    Ok(Json(view(&signed, start, expires)))
}

/// Signs many URLs at once (a frame sequence), all validated before any is made, answered in
/// request order.
#[utoipa::path(post, path = "/api/v1/teams/{team}/presign/batch", request_body = BatchPresignRequest,
    responses((status = 200, description = "the signed URLs, in request order", body = PresignedBatch), (status = 409, description = "an item is locked by another user, or a lock expires within a second"), (status = 410, description = "an item's token is no longer current")),
    security(("bearer" = [])))]
pub(crate) async fn presign_batch(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(team): ApiPath<String>,
    ApiJson(request): ApiJson<BatchPresignRequest>,
) -> Result<Json<PresignedBatch>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Presign, &[]).await?;
    let storage = storage(&state)?;
    let max = storage.config.max_batch;
    if request.objects.len() > max {
        return Err(ApiError::TooLarge {
            code: "batch_too_large",
            message: format!(
                "a batch holds at most {max} objects; got {}",
                request.objects.len()
            ),
        });
    }
    if request.objects.is_empty() {
        return Err(ApiError::invalid("empty_batch", "the batch has no objects"));
    }
    let objects: Vec<Object<'_>> = request
        .objects
        .iter()
        .map(|o| Object {
            item: &o.item,
            name: &o.name,
            content_type: o.content_type.as_deref(),
            token: o.token,
        })
        .collect();
    for (i, object) in objects.iter().enumerate() {
        validate(&storage.config, object, request.method, Some(i))?;
    }
    // For writes, one read of the objects' locks checks every object.
    let mut lock_left: Option<i64> = None;
    if request.method == Method::Put {
        let mut items: Vec<&str> = objects.iter().map(|o| o.item).collect();
        items.sort_unstable();
        items.dedup();
        let (live, now) = live_locks(&state, &team, &items).await?;
        for (i, object) in objects.iter().enumerate() {
            let lock = check_lock(&live, &caller, object.item, object.token.unwrap_or(0)).map_err(
                |e| match e {
                    ApiError::Conflict {
                        code,
                        message,
                        details,
                        gone,
                    } => ApiError::Conflict {
                        code,
                        message: format!("objects[{i}]: {message}"),
                        details: Some(with_index(details, i)),
                        gone,
                    },
                    other => other,
                },
            )?;
            let left = lock.expires_at - now;
            lock_left = Some(lock_left.map_or(left, |l| l.min(left)));
        }
    }
    let expires = lifetime(&storage.config, request.expires_in, lock_left)?;
    let start = signing_start();
    let mut urls = Vec::with_capacity(objects.len());
    for object in &objects {
        let key = storage.key(&team, object.item, object.name);
        let signed = storage
            .presign(request.method, &key, object.write(), start, expires)
            .await?;
        urls.push(view(&signed, start, expires));
    }
    crate::metrics::presigned(request.method.as_str(), urls.len());
    Ok(Json(PresignedBatch { urls }))
}

/// Confirms an upload: the lock and token are still current and the object exists; then
/// `item.updated` goes to the team.
#[utoipa::path(post, path = "/api/v1/teams/{team}/items/{item}/commit", request_body = CommitRequest,
    responses((status = 200, description = "announced as item.updated", body = Committed), (status = 404, description = "no such object: upload it first"), (status = 409, description = "the item is locked by another user"), (status = 410, description = "the token's grant is over")), security(("bearer" = [])))]
pub(crate) async fn commit(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((team, item)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<CommitRequest>,
) -> Result<Json<Committed>, ApiError> {
    authorize_now(&state, &caller, &team, Scope::Presign, &[]).await?;
    let storage = storage(&state)?;
    validate(
        &storage.config,
        &Object {
            item: &item,
            name: &request.name,
            content_type: None,
            token: Some(request.token),
        },
        Method::Put,
        None,
    )?;
    let (live, _) = live_locks(&state, &team, &[&item]).await?;
    check_lock(&live, &caller, &item, request.token)?;
    // The announcement draws on the caller's event budget like a publish.
    state.inner.limiter.check(&caller, 1)?;
    let key = storage.key(&team, &item, &request.name);
    let Some(Head { size, etag, token }) = storage.head(&key).await? else {
        return Err(ApiError::NotFound {
            code: "object_not_found",
            message: format!(
                "no object '{}' on item {item}; upload it first",
                request.name
            ),
        });
    };
    if token != Some(request.token) {
        // Written under an earlier grant's URL after this one's upload (or not through a write
        // URL at all): announcing it would present stale bytes as this holder's.
        return Err(ApiError::Conflict {
            code: "stale_write",
            message: format!(
                "object '{}' on item {item} was last written {}, not with token {}; upload it again with a URL for the current lock",
                request.name,
                token.map_or_else(
                    || "without a fencing token".to_owned(),
                    |t| format!("under token {t}")
                ),
                request.token
            ),
            details: Some(json!({"written_token": token})),
            gone: false,
        });
    }
    let data = json!({"team": team, "item": item, "name": request.name, "holder": caller.sub, "token": request.token, "size": size, "etag": etag});
    let topic = Topic::team(&team).map_err(|e| ApiError::Internal(e.to_string()))?;
    let event_type =
        EventType::parse("item.updated").map_err(|e| ApiError::Internal(e.to_string()))?;
    let raw = serde_json::value::RawValue::from_string(data.to_string())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let published = state
        .inner
        .publisher
        .publish(&topic, &event_type, &raw, crate::EventOptions::default())
        .await
        .map_err(|f| {
            ApiError::unavailable(
                "broker_unavailable",
                format!("{f}; the upload is stored, commit again to announce it"),
            )
        })?;
    crate::metrics::upload_committed();
    Ok(Json(Committed {
        id: published.id,
        item,
        name: request.name,
        size,
        etag,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_item() {
        for ok in ["a.json", "frames/000123.pcd", "x-y_z.v2/a", "a..b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "../b",
            "a/../b",
            "a//b",
            "./a",
            "a b",
            "a\\b",
            "é",
            "a?b",
            &"x".repeat(513),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn lifetimes_are_capped() {
        let config = StorageConfig {
            default_expires: Duration::from_secs(300),
            max_expires: Duration::from_secs(3600),
            ..StorageConfig::default()
        };
        assert_eq!(
            lifetime(&config, None, None).unwrap(),
            Duration::from_secs(300)
        );
        assert_eq!(
            lifetime(&config, Some(99_999), None).unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            lifetime(&config, Some(600), Some(30_000)).unwrap(),
            Duration::from_secs(30)
        );
        assert!(lifetime(&config, Some(0), None).is_err());
        assert!(lifetime(&config, Some(-5), None).is_err());
        assert_eq!(
            lifetime(&config, Some(i64::MAX), None).unwrap(),
            Duration::from_secs(3600)
        );
        assert!(lifetime(&config, None, Some(500)).is_err());
    }

    #[test]
    fn content_type_allow_list() {
        let config = StorageConfig {
            content_types: DEFAULT_CONTENT_TYPES
                .split(',')
                .map(str::to_owned)
                .chain(["model/*".to_owned()])
                .collect(),
            ..StorageConfig::default()
        };
        for ok in [
            "application/octet-stream",
            "Application/JSON; charset=utf-8",
            "image/png",
            "model/obj",
        ] {
            assert!(config.allows(ok), "{ok}");
        }
        for refused in [
            "text/html",
            "image/svg+xml",
            "application/xhtml+xml",
            "text/javascript",
            "modelx/obj",
            "",
        ] {
            assert!(!config.allows(refused), "{refused}");
        }
        let any = StorageConfig {
            content_types: vec!["*".into()],
            ..StorageConfig::default()
        };
        assert!(any.allows("text/html"));
    }
}
