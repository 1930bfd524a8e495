//! The OpenAPI 3.1 document at `/api/v1/openapi.json`.
//!
//! Operations, request and response bodies come from the handlers' annotations and types. What
//! every operation shares is added here, once, so it cannot be forgotten on one of them: the
//! `{team}`/`{item}` path parameters and their id pattern, the error answers (always
//! [`ErrorBody`](crate::error::ErrorBody)), and the bounds that are this node's configuration
//! (TTLs, batch sizes), so a client generated from the document refuses what the node refuses.

use crate::{ApiError, ApiState};
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Lockstep API", description = "Publish events, manage edit locks, presign object URLs, control users' connections."),
    paths(
        crate::publish::publish,
        crate::publish::publish_batch,
        crate::locks::acquire,
        crate::locks::renew,
        crate::locks::release,
        crate::locks::get,
        crate::locks::list,
        crate::locks::acquire_batch,
        crate::locks::release_batch,
        crate::presign::presign,
        crate::presign::presign_batch,
        crate::presign::commit,
        crate::topics::position,
        crate::topics::events,
        crate::topics::snapshot,
        crate::topics::presence,
        crate::control::disconnect,
        crate::control::unsubscribe,
        crate::control::connections,
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// User, team and item ids (`protocol::topic::is_valid_id`).
const ID_PATTERN: &str = r"^(?!\.\.?$)[A-Za-z0-9_.:-]{1,128}$";

/// Topics (`protocol::Topic::parse`).
const TOPIC_PATTERN: &str = r"^/(?:global|user/(?!\.\.?$)[A-Za-z0-9_.:-]{1,128}|team/(?!\.\.?(?:$|/))[A-Za-z0-9_.:-]{1,128}(?:/items/(?!\.\.?$)[A-Za-z0-9_.:-]{1,128})?)$";

/// The topics with presence (DESIGN §14): team and item topics (`presence::has_presence`).
const PRESENCE_TOPIC_PATTERN: &str =
    r"^/team/(?!\.\.?(?:$|/))[A-Za-z0-9_.:-]{1,128}(?:/items/(?!\.\.?$)[A-Za-z0-9_.:-]{1,128})?$";

/// Object names within an item (`presign::valid_name`): `/`-separated segments, none `.` or
/// `..`. (utoipa's `pattern` takes only literals, so the shared patterns live here, once.)
const NAME_PATTERN: &str =
    r"^(?!\.\.?(?:/|$))[A-Za-z0-9._-]+(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._-]+)*$";

pub(crate) async fn document(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    build(&state).map(Json)
}

/// The document for this node's configuration.
fn build(state: &ApiState) -> Result<Value, ApiError> {
    let mut doc = serde_json::to_value(ApiDoc::openapi())
        .map_err(|err| ApiError::Internal(format!("serializing the OpenAPI document: {err}")))?;
    add_shared(&mut doc);
    let inner = &state.inner;
    set_max_items(&mut doc, "BatchRequest", "events", inner.config.max_batch);
    if let Some(locks) = &inner.locks {
        let config = locks.config();
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (min, max) = (millis(config.min_ttl), millis(config.max_ttl));
        for schema in ["AcquireRequest", "RenewRequest", "BatchAcquireRequest"] {
            if let Some(ttl) = property(&mut doc, schema, "ttl_ms") {
                ttl["minimum"] = json!(min);
                ttl["maximum"] = json!(max);
            }
        }
        for schema in ["BatchAcquireRequest", "BatchReleaseRequest"] {
            set_max_items(&mut doc, schema, "items", config.max_batch);
        }
    }
    if let Some(storage) = &inner.storage {
        set_max_items(
            &mut doc,
            "BatchPresignRequest",
            "objects",
            storage.config().max_batch,
        );
    }
    Ok(doc)
}

fn property<'a>(doc: &'a mut Value, schema: &str, field: &str) -> Option<&'a mut Value> {
    doc.pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
}

fn set_max_items(doc: &mut Value, schema: &str, field: &str, max: usize) {
    if let Some(list) = property(doc, schema, field) {
        list["maxItems"] = json!(max);
    }
}

/// Adds what every operation has: path parameters, id and name patterns, error answers.
fn add_shared(doc: &mut Value) {
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.insert(
            "Id".to_owned(),
            json!({
                "type": "string",
                "pattern": ID_PATTERN,
                "description": "A user, team or item id: [A-Za-z0-9_.:-]{1,128}, not '.' or '..'.",
                "example": "t1",
            }),
        );
        schemas.insert(
            "Topic".to_owned(),
            json!({
                "type": "string",
                "pattern": TOPIC_PATTERN,
                "description": "A topic; in a path, the whole topic percent-encoded as one segment (%2Fteam%2Ft1).",
                "example": "/team/t1",
            }),
        );
        schemas.insert(
            "PresenceTopic".to_owned(),
            json!({
                "type": "string",
                "pattern": PRESENCE_TOPIC_PATTERN,
                "description": "A team or item topic, percent-encoded as one path segment (%2Fteam%2Ft1%2Fitems%2Fi7).",
                "example": "/team/t1",
            }),
        );
        schemas.insert(
            "ObjectName".to_owned(),
            json!({
                "type": "string",
                "pattern": NAME_PATTERN,
                "maxLength": 512,
                "description": "An object name within the item: `[A-Za-z0-9._-]` segments separated by `/`, none '.' or '..'.",
                "example": "frames/000123.pcd",
            }),
        );
    }
    // Ids and object names inside bodies.
    if let Some(items) = property(doc, "BatchAcquireRequest", "items") {
        items["items"] = json!({"$ref": "#/components/schemas/Id"});
    }
    for (schema, field, shared) in [
        ("BatchReleaseItem", "item", "Id"),
        ("BatchObject", "item", "Id"),
        ("PresignRequest", "name", "ObjectName"),
        ("BatchObject", "name", "ObjectName"),
        ("CommitRequest", "name", "ObjectName"),
        ("UnsubscribeRequest", "topic", "Topic"),
    ] {
        if let Some(property) = property(doc, schema, field) {
            // The field's own description and example stay beside the reference.
            let mut shared = json!({"$ref": format!("#/components/schemas/{shared}")});
            for key in ["description", "example"] {
                if let Some(value) = property.get(key) {
                    shared[key] = value.clone();
                }
            }
            *property = shared;
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            add_path_parameters(path, operation);
            add_error_answers(operation);
        }
    }
}

fn add_path_parameters(path: &str, operation: &mut Value) {
    let mut parameters: Vec<Value> = path
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            let schema = match name {
                // Only team and item topics have a presence (422 no_presence otherwise).
                "topic" if path.ends_with("/presence") => "PresenceTopic",
                "topic" => "Topic",
                _ => "Id",
            };
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "schema": {"$ref": format!("#/components/schemas/{schema}")},
            })
        })
        .collect();
    if let Some(existing) = operation.get("parameters").and_then(Value::as_array) {
        parameters.extend(existing.iter().cloned());
    }
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
}

/// Every error answer the API can give for this operation, each with the error body.
fn add_error_answers(operation: &mut Value) {
    let has_body = operation.get("requestBody").is_some();
    let has_input = has_body
        || operation
            .get("parameters")
            .and_then(Value::as_array)
            .is_some_and(|p| !p.is_empty());
    let mut statuses = vec![
        ("401", "no token, or an invalid or expired one"),
        (
            "403",
            "the token does not allow this (scope, team membership, admin rights)",
        ),
        (
            "503",
            "a dependency is down or not configured, or the request timed out; nothing was changed",
        ),
    ];
    if has_input {
        statuses.push((
            "400",
            "the request cannot be read (JSON syntax, content type, path or query)",
        ));
        statuses.push((
            "422",
            "well-formed but invalid (ids, names, bounds); the body says which field",
        ));
    }
    if has_body {
        statuses.push(("413", "the body or a batch is too large"));
    }
    let Some(responses) = operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for (status, description) in statuses {
        responses
            .entry(status)
            .or_insert_with(|| json!({"description": description}));
    }
    for (status, response) in responses.iter_mut() {
        if status.starts_with('4') || status.starts_with('5') {
            response["content"] = json!({
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
            });
        }
    }
}
