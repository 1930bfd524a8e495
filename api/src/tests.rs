//! Router-level tests with `oneshot`: the publish handlers against a recording publisher.

use super::*;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use protocol::auth::AuthConfig;
use recording::Recorded;
use serde_json::{Value, json};
use tower::ServiceExt as _;

const SECRET: &[u8] = b"unit-test-secret-unit-test-secret-xx";

/// Records what was published; fails every publish after `fail_after` events.
mod recording {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub(super) struct Recorded {
        pub(super) events: Mutex<Vec<(String, String, String)>>,
        pub(super) fail_after: Option<usize>,
    }

    impl EventPublisher for Recorded {
        fn publish<'a>(
            &'a self,
            topic: &'a Topic,
            event_type: &'a EventType,
            data: &'a RawValue,
            _options: EventOptions,
        ) -> BoxFuture<'a, Result<PublishedEvent, PublishFailure>> {
            let mut events = self.events.lock().unwrap();
            let result = if self.fail_after.is_some_and(|n| events.len() >= n) {
                Err(PublishFailure::Unavailable("redis down".into()))
            } else {
                events.push((
                    topic.to_string(),
                    event_type.to_string(),
                    data.get().to_owned(),
                ));
                Ok(PublishedEvent {
                    id: format!("id-{}", events.len()),
                    position: Position::new(events.len() as u64, "E"),
                    duplicate: false,
                    superseded: false,
                })
            };
            Box::pin(std::future::ready(result))
        }

        fn presence<'a>(
            &'a self,
            _topic: &'a Topic,
        ) -> BoxFuture<'a, Result<crate::PresencePage, PublishFailure>> {
            Box::pin(std::future::ready(Ok(crate::PresencePage {
                count: 0,
                members: Some(Vec::new()),
            })))
        }

        fn snapshot<'a>(
            &'a self,
            _topic: &'a Topic,
        ) -> BoxFuture<'a, Result<StatePage, PublishFailure>> {
            let top = Position::new(self.events.lock().unwrap().len() as u64, "E");
            Box::pin(std::future::ready(Ok(StatePage {
                top,
                events: Vec::new(),
            })))
        }

        fn history<'a>(
            &'a self,
            _topic: &'a Topic,
            _after: u64,
            _limit: usize,
        ) -> BoxFuture<'a, Result<EventPage, PublishFailure>> {
            let top = Position::new(self.events.lock().unwrap().len() as u64, "E");
            Box::pin(std::future::ready(Ok(EventPage {
                first: top.offset + 1,
                top,
                events: Vec::new(),
            })))
        }
    }
}

fn app_with(publisher: Arc<Recorded>) -> Router {
    let auth = Authenticator::new(&AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    })
    .unwrap();
    app(ApiState::new(
        ApiConfig::default(),
        Arc::new(auth),
        publisher,
        Vec::new(),
        None,
        Backends::default(),
    ))
}

fn token(scope: &str) -> String {
    let claims =
        json!({"sub": "backend", "teams": ["t1"], "scope": scope, "exp": 4_000_000_000u64});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

async fn post(app: Router, path: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header("authorization", format!("Bearer {}", token("publish")))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn publish_passes_data_through_untouched() {
    let recorded = Arc::new(Recorded::default());
    let request = Request::post("/api/v1/publish")
        .header("authorization", format!("Bearer {}", token("publish")))
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"topic":"/team/t1","type":"job.progress","data":{"b":1.50, "a":[1,2]}}"#,
        ))
        .unwrap();
    let response = app_with(recorded.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let events = recorded.events.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![(
            "/team/t1".into(),
            "job.progress".into(),
            r#"{"b":1.50, "a":[1,2]}"#.into()
        )]
    );
}

#[tokio::test]
async fn batch_failure_midway_reports_what_was_published() {
    let recorded = Arc::new(Recorded {
        fail_after: Some(2),
        ..Recorded::default()
    });
    let events: Vec<Value> = (0..4)
        .map(|n| json!({"topic": "/team/t1", "type": "a.b", "data": n}))
        .collect();
    let (status, body) = post(
        app_with(recorded.clone()),
        "/api/v1/publish/batch",
        json!({"events": events}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "broker_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the first 2 events were published"),
        "{body}"
    );
    assert_eq!(recorded.events.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn empty_batch_is_invalid() {
    let (status, body) = post(
        app_with(Arc::default()),
        "/api/v1/publish/batch",
        json!({"events": []}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("empty_batch"))
    );
}
