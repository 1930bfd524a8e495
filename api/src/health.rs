//! `/healthz` (the process answers), `/readyz` (its dependencies answer), `/metrics`.

use crate::ApiState;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde_json::{Map, Value, json};

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn readyz(State(state): State<ApiState>) -> Response {
    let mut checks = Map::new();
    let mut ready = true;
    for check in &state.inner.checks {
        let ok = check.is_ready().await;
        ready &= ok;
        checks.insert(
            check.name().to_owned(),
            Value::from(if ok { "ok" } else { "unavailable" }),
        );
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks});
    (status, Json(body)).into_response()
}

pub(crate) async fn metrics(State(state): State<ApiState>) -> Response {
    match &state.inner.metrics {
        Some(render) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
