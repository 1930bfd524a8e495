//! The HTTP API: publish, batch, refusals in the JSON error format, health, OpenAPI, CORS.

use crate::{client, envelope, http_publish};
use serde_json::{Value, json};
use std::time::Duration;
use tests::{Lockstep, Options};

async fn post(
    node: &Lockstep,
    path: &str,
    token: Option<&str>,
    body: reqwest::Body,
    content_type: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", node.http()))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("every answer is JSON");
    (status, body)
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[tokio::test]
async fn publish_refusals_use_the_error_format() {
    let node = Lockstep::start_with(Options::default().env("LOCKSTEP_API_MAX_BODY_BYTES", 4096));
    let token = node.token("backend", &["t1"], "publish");
    let no_scope = node.token("viewer", &["t1"], "");
    let event = |topic: &str, ty: &str| json!({"topic": topic, "type": ty, "data": {}}).to_string();
    let cases: Vec<(Option<&str>, String, &str, u16, &str)> = vec![
        (
            None,
            event("/team/t1", "a.b"),
            "application/json",
            401,
            "unauthorized",
        ),
        (
            Some("not-a-token"),
            event("/team/t1", "a.b"),
            "application/json",
            401,
            "unauthorized",
        ),
        (
            Some(&no_scope),
            event("/team/t1", "a.b"),
            "application/json",
            403,
            "forbidden",
        ),
        (
            Some(&token),
            event("/team/t9", "a.b"),
            "application/json",
            403,
            "forbidden",
        ),
        (
            Some(&token),
            event("/queue/x", "a.b"),
            "application/json",
            422,
            "invalid_topic",
        ),
        (
            Some(&token),
            event("/team/t1", "Bad"),
            "application/json",
            422,
            "invalid_event_type",
        ),
        (
            Some(&token),
            r#"{"topic":"/team/t1","type":"a.b"}"#.to_owned(),
            "application/json",
            422,
            "invalid_body",
        ),
        (
            Some(&token),
            r#"{"topic":"/team/t1","type":"a.b","data":1,"extra":1}"#.to_owned(),
            "application/json",
            422,
            "invalid_body",
        ),
        (
            Some(&token),
            "{not json".to_owned(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            Some(&token),
            event("/team/t1", "a.b"),
            "text/plain",
            400,
            "unsupported_media_type",
        ),
        (
            Some(&token),
            json!({"topic": "/team/t1", "type": "a.b", "data": "x".repeat(5000)}).to_string(),
            "application/json",
            413,
            "body_too_large",
        ),
    ];
    for (token, body, content_type, status, error) in cases {
        let (got, json) = post(
            &node,
            "/api/v1/publish",
            token,
            body.clone().into(),
            content_type,
        )
        .await;
        assert_eq!((got, code(&json)), (status, error), "{body}: {json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let response = reqwest::get(format!("{}/api/v1/nope", node.http()))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(code(&response.json().await.unwrap()), "not_found");
}

#[tokio::test]
async fn batch_is_all_or_nothing_and_ordered() {
    let node = Lockstep::start_with(Options::default().env("LOCKSTEP_API_MAX_BATCH", 5));
    let mut sub = client(&node, "ana", &["t1"], "").await;
    sub.subscribe("t", "/team/t1").await.unwrap();
    let token = node.token("backend", &["t1"], "publish");
    let event =
        |n: u32, topic: &str| json!({"topic": topic, "type": "job.progress", "data": {"n": n}});
    // One bad event refuses the whole batch, naming its index.
    let bad = json!({"events": [event(1, "/team/t1"), event(2, "/team/t9")]});
    let (status, body) = post(
        &node,
        "/api/v1/publish/batch",
        Some(&token),
        bad.to_string().into(),
        "application/json",
    )
    .await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    assert_eq!(body["error"]["details"]["index"], 1);
    let (status, body) = post(
        &node,
        "/api/v1/publish/batch",
        Some(&token),
        json!({"events": (0..6).map(|n| event(n, "/team/t1")).collect::<Vec<_>>()})
            .to_string()
            .into(),
        "application/json",
    )
    .await;
    assert_eq!((status, code(&body)), (413, "batch_too_large"));
    let good = json!({"events": (10..15).map(|n| event(n, "/team/t1")).collect::<Vec<_>>()});
    let (status, body) = post(
        &node,
        "/api/v1/publish/batch",
        Some(&token),
        good.to_string().into(),
        "application/json",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ids: Vec<&str> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    // Only the good batch arrives (nothing from the refused one), in order, with the API's ids.
    for (n, id) in (10..15).zip(ids) {
        let env = envelope(&sub.expect_frame().await.unwrap(), "t", "/team/t1");
        assert_eq!(
            (env["data"]["n"].as_u64(), env["id"].as_str()),
            (Some(n), Some(id))
        );
    }
}

#[tokio::test]
async fn publish_rate_limit_answers_429_with_retry_after() {
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_API_PUBLISH_RATE", 1)
            .env("LOCKSTEP_API_PUBLISH_BURST", 3),
    );
    let token = node.token("backend", &["t1"], "publish");
    let body = json!({"topic": "/team/t1", "type": "a.b", "data": null});
    for _ in 0..3 {
        assert_eq!(http_publish(&node, &token, &body).await.0, 202);
    }
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/publish", node.http()))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(code(&response.json().await.unwrap()), "rate_limited");
    // Another token has its own budget.
    assert_eq!(
        http_publish(&node, &node.token("other", &["t1"], "publish"), &body)
            .await
            .0,
        202
    );
}

#[tokio::test]
async fn health_openapi_metrics_and_cors() {
    let node = Lockstep::start_with(
        Options::default().env("LOCKSTEP_ALLOWED_ORIGINS", "http://app.example:3000"),
    );
    let get = |path: &str| reqwest::get(format!("{}{path}", node.http()));
    assert_eq!(
        get("/healthz")
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
        json!({"status": "ok"})
    );
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["checks"]["broker"],
        "ok"
    );
    let doc: Value = get("/api/v1/openapi.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/api/v1/publish"]["post"].is_object());
    assert!(doc["paths"]["/api/v1/publish/batch"]["post"].is_object());
    let token = node.token("backend", &["t1"], "publish");
    http_publish(
        &node,
        &token,
        &json!({"topic": "/team/t1", "type": "a.b", "data": 1}),
    )
    .await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("lockstep_events_published_total 1"),
        "{metrics}"
    );

    let preflight = |origin: &str| {
        reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/v1/publish", node.http()),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .timeout(Duration::from_secs(5))
            .send()
    };
    let allowed = preflight("http://app.example:3000").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://app.example:3000"
    );
    let refused = preflight("http://evil.example").await.unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

/// Found by schemathesis against the OpenAPI document: serde took a struct from a JSON array,
/// query and path rejections were plain text, `60000.0` was refused as an integer, and a JSON
/// `null` body was refused where the body is optional.
#[tokio::test]
async fn bodies_queries_and_paths_are_read_as_the_document_says() {
    let node = Lockstep::start();
    let token = node.token("ana", &["t1"], "publish locks");
    let raw = |method: &str, path: &str, body: &str| {
        let request = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("{}{path}", node.http()))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_owned());
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("every answer is JSON");
            (status, body)
        }
    };
    let lock = "/api/v1/teams/t1/items/i1/lock";

    // An array is not an object, even if its elements line up with the fields.
    let (status, body) = raw("POST", "/api/v1/publish", r#"["/team/t1","a.b",{}]"#).await;
    assert_eq!((status, code(&body)), (422, "invalid_body"), "{body}");
    let (status, body) = raw("POST", lock, "[60000, null]").await;
    assert_eq!((status, code(&body)), (422, "invalid_body"), "{body}");

    // `null` is "no body" where the body is optional; whole floats are integers.
    let (status, body) = raw("POST", lock, "null").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw("POST", lock, r#"{"ttl_ms": 60000.0}"#).await;
    assert_eq!(status, 200, "{body}");
    for bad in [r#"{"ttl_ms": 60000.5}"#, r#"{"ttl_ms": 1e300}"#] {
        let (status, body) = raw("POST", lock, bad).await;
        assert_eq!(
            (status, code(&body)),
            (422, "invalid_body"),
            "{bad}: {body}"
        );
    }
    let renewed = format!(r#"{{"token": {}.0}}"#, body["token"]);
    let (status, body) = raw("PUT", lock, &renewed).await;
    assert_eq!(status, 200, "{body}");

    // Queries and paths that cannot be read answer in the error format.
    let (status, body) = raw("DELETE", &format!("{lock}?token=99999999999999999999"), "").await;
    assert_eq!((status, code(&body)), (400, "invalid_query"), "{body}");
    let (status, body) = raw("DELETE", &format!("{lock}?force=maybe"), "").await;
    assert_eq!((status, code(&body)), (400, "invalid_query"), "{body}");
    let (status, body) = raw("GET", "/api/v1/teams/t1/items/%FF/lock", "").await;
    assert_eq!((status, code(&body)), (400, "invalid_path"), "{body}");
}
