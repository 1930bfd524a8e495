//! The STOMP session: authentication, authorization, protocol rules and refusals. Every refusal
//! is checked for its ERROR frame and close code, and for leaving a bystander connection
//! untouched.

use crate::{client, envelope, http_publish};
use loadtest::client::{OpenOptions, StompClient};
use protocol::{Command, Frame};
use serde_json::json;
use std::time::Duration;
use tests::{Lockstep, Options, now, sign};

/// A client subscribed to `/global` that must keep receiving whatever happens to others.
struct Bystander {
    client: StompClient,
    publisher: String,
    seq: u64,
}

impl Bystander {
    async fn new(node: &Lockstep) -> Bystander {
        let mut client = client(node, "bystander", &[], "").await;
        client.subscribe("g", "/global").await.unwrap();
        Bystander {
            client,
            publisher: node.token("backend", &[], "publish:global"),
            seq: 0,
        }
    }

    /// Publishes to `/global` and checks the bystander gets it.
    async fn still_served(&mut self, node: &Lockstep) {
        self.seq += 1;
        let (status, _) = http_publish(
            node,
            &self.publisher,
            &json!({"topic": "/global", "type": "test.ping", "data": {"seq": self.seq}}),
        )
        .await;
        assert_eq!(status, 202);
        let frame = self
            .client
            .expect_frame()
            .await
            .expect("bystander still receives");
        assert_eq!(envelope(&frame, "g", "/global")["data"]["seq"], self.seq);
    }
}

/// Asserts the server sent an ERROR with `message` (and `details` in its body) and closed
/// with `code`.
async fn assert_refused(
    client: &mut StompClient,
    code: u16,
    message: &str,
    details: &str,
) -> Frame {
    let (error, close) = client.expect_close().await.unwrap();
    let error = error.unwrap_or_else(|| panic!("no ERROR frame before close {close:?}"));
    assert_eq!(
        error.header("message"),
        Some(message),
        "{}",
        loadtest::client::describe(&error)
    );
    let body = String::from_utf8_lossy(&error.body);
    assert!(
        body.contains(details),
        "ERROR body {body:?} lacks {details:?}"
    );
    assert_eq!(close.map(|c| c.0), Some(code), "close code");
    error
}

async fn open(node: &Lockstep) -> StompClient {
    StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap()
}

fn connect_frame(token: Option<&str>) -> Frame {
    let mut frame = Frame::new(Command::Connect)
        .with_header("accept-version", "1.2")
        .with_header("host", "x");
    if let Some(t) = token {
        frame = frame.with_header("passcode", t);
    }
    frame
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4001() {
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_JWT_ISSUER", "platform")
            .env("LOCKSTEP_JWT_AUDIENCE", "lockstep"),
    );
    let mut bystander = {
        let token = node.token_with(
            &json!({"sub": "bystander", "iss": "platform", "aud": "lockstep", "exp": now() + 600}),
        );
        let (mut c, _) = StompClient::connect(&node.ws(), &token).await.unwrap();
        c.subscribe("g", "/global").await.unwrap();
        let publisher = node.token_with(&json!({"sub": "b", "scope": "publish:global", "iss": "platform", "aud": "lockstep", "exp": now() + 600}));
        Bystander {
            client: c,
            publisher,
            seq: 0,
        }
    };
    let good = json!({"sub": "ana", "iss": "platform", "aud": "lockstep", "exp": now() + 600});
    let with = |patch: serde_json::Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        node.token_with(&claims)
    };
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "no token"),
        (
            "bad signature",
            Some(sign(&good, b"another-secret-another-secret-another")),
            "invalid token signature",
        ),
        (
            "expired",
            Some(with(json!({"exp": now() - 5}))),
            "token has expired",
        ),
        (
            "not yet valid",
            Some(with(json!({"nbf": now() + 600}))),
            "token is not valid yet",
        ),
        ("alg none", Some(alg_none), "token algorithm"),
        (
            "wrong issuer",
            Some(with(json!({"iss": "evil"}))),
            "wrong issuer",
        ),
        (
            "wrong audience",
            Some(with(json!({"aud": "other"}))),
            "wrong audience",
        ),
        ("garbage", Some("garbage".to_owned()), "malformed token"),
    ];
    for (case, token, details) in cases {
        let mut c = open(&node).await;
        c.send(&connect_frame(token.as_deref())).await.unwrap();
        let (error, close) = c.expect_close().await.unwrap();
        let error = error.unwrap_or_else(|| panic!("{case}: no ERROR"));
        assert_eq!(error.header("message"), Some("unauthorized"), "{case}");
        let body = String::from_utf8_lossy(&error.body);
        assert!(body.contains(details), "{case}: {body}");
        assert_eq!(close.map(|c| c.0), Some(4001), "{case}");
        bystander.still_served(&node).await;
    }
    // A good token works.
    let (_c, connected) = StompClient::connect(&node.ws(), &node.token_with(&good))
        .await
        .unwrap();
    assert_eq!(connected.header("version"), Some("1.2"));
    // `{node}.{ulid}.{mac}`: the node's id first, so other nodes can tell its sessions apart,
    // and a MAC over node, id and user, so the lock API accepts it only from its user.
    let session = connected.header("session").expect("session");
    let parts: Vec<&str> = session.split('.').collect();
    assert!(
        parts.len() == 3 && parts[0].len() == 26 && parts[1].len() == 26 && parts[2].len() == 22,
        "{session}"
    );
}

#[tokio::test]
async fn token_on_the_upgrade_header_or_query() {
    let node = Lockstep::start();
    let token = node.token("ana", &[], "");
    let options = OpenOptions {
        bearer: Some(token.clone()),
        ..OpenOptions::default()
    };
    let mut c = StompClient::open(&node.ws(), &options).await.unwrap();
    c.send(&connect_frame(None)).await.unwrap();
    assert_eq!(c.expect_frame().await.unwrap().command, Command::Connected);

    let url = format!("{}?access_token={token}", node.ws());
    let mut c = StompClient::open(&url, &OpenOptions::default())
        .await
        .unwrap();
    c.send(&connect_frame(None)).await.unwrap();
    assert_eq!(c.expect_frame().await.unwrap().command, Command::Connected);

    // Authorization in the CONNECT frame, as Spring's client sends it.
    let mut c = open(&node).await;
    c.send(
        &Frame::new(Command::Stomp)
            .with_header("accept-version", "1.1,1.2")
            .with_header("Authorization", format!("Bearer {token}")),
    )
    .await
    .unwrap();
    assert_eq!(c.expect_frame().await.unwrap().command, Command::Connected);
}

#[tokio::test]
async fn foreign_topics_are_refused_with_4004() {
    let node = Lockstep::start();
    let mut bystander = Bystander::new(&node).await;
    for (destination, details) in [
        ("/user/bob", "/user/bob is another user's topic"),
        ("/team/t9", "/team/t9: not a member of this team"),
        (
            "/team/t9/items/doc-1",
            "/team/t9/items/doc-1: not a member of this team",
        ),
    ] {
        let mut c = client(&node, "ana", &["t1"], "publish").await;
        c.subscribe("ok", "/team/t1").await.unwrap();
        c.send(
            &Frame::new(Command::Subscribe)
                .with_header("id", "x")
                .with_header("destination", destination)
                .with_header("receipt", "r-x"),
        )
        .await
        .unwrap();
        let error = assert_refused(&mut c, 4004, "forbidden", details).await;
        assert_eq!(error.header("receipt-id"), Some("r-x"));
        bystander.still_served(&node).await;
    }
    // Invalid destinations are protocol errors naming the rule.
    for (destination, details) in [
        ("/queue/jobs", "unknown destination '/queue/jobs'"),
        (
            "/team/t1/items/a b",
            "invalid id in destination '/team/t1/items/a b'",
        ),
    ] {
        let mut c = client(&node, "ana", &["t1"], "").await;
        c.send(
            &Frame::new(Command::Subscribe)
                .with_header("id", "x")
                .with_header("destination", destination),
        )
        .await
        .unwrap();
        assert_refused(&mut c, 4003, "invalid destination", details).await;
        bystander.still_served(&node).await;
    }
}

#[tokio::test]
async fn publishing_needs_scope_and_membership() {
    let node = Lockstep::start();
    let mut bystander = Bystander::new(&node).await;
    let cases = [
        ("", "/team/t1", "needs the 'publish' scope"),
        ("publish", "/team/t9", "not a member"),
        ("", "/team/t1/items/doc-1", "needs the 'publish' scope"),
        ("publish", "/team/t9/items/doc-1", "not a member"),
        ("publish", "/global", "needs the 'publish:global' scope"),
        ("publish", "/user/bob", "needs the 'publish:global' scope"),
    ];
    for (scope, destination, details) in cases {
        let mut c = client(&node, "ana", &["t1"], scope).await;
        c.publish(destination, "job.progress", "{}", None)
            .await
            .unwrap();
        assert_refused(&mut c, 4004, "forbidden", details).await;
        bystander.still_served(&node).await;
    }
    // With the scope: own team, own user topic.
    let mut c = client(&node, "ana", &["t1"], "publish").await;
    c.subscribe("me", "/user/ana").await.unwrap();
    c.publish("/user/ana", "note.saved", r#"{"ok":true}"#, Some("p1"))
        .await
        .unwrap();
    let frame = c.expect_frame().await.unwrap();
    assert_eq!(
        envelope(&frame, "me", "/user/ana")["data"],
        json!({"ok": true})
    );
    c.publish("/team/t1", "job.progress", "{}", Some("p2"))
        .await
        .unwrap();
}

/// Item topics (`/team/{t}/items/{i}`, DESIGN §14) follow their team's rules over STOMP and
/// HTTP, and are topics of their own: an item's events reach its subscribers only, with offsets
/// of their own.
#[tokio::test]
async fn item_topics_follow_their_teams_rules() {
    let node = Lockstep::start();
    let item = "/team/t1/items/doc:7.json";
    let mut ana = client(&node, "ana", &["t1"], "publish").await;
    ana.subscribe("doc", item).await.unwrap();
    let mut team = client(&node, "bob", &["t1"], "").await;
    team.subscribe("team", "/team/t1").await.unwrap();
    let mut other = client(&node, "cy", &["t1"], "").await;
    other
        .subscribe("other", "/team/t1/items/doc:8.json")
        .await
        .unwrap();

    ana.publish(item, "item.viewed", r#"{"by":"ana"}"#, Some("p1"))
        .await
        .unwrap();
    let frame = ana.expect_frame().await.unwrap();
    assert_eq!(envelope(&frame, "doc", item)["data"], json!({"by": "ana"}));
    assert_eq!(frame.header("x-stream-offset"), Some("1"));
    let backend = node.token("backend", &["t1"], "publish");
    let (status, body) = http_publish(
        &node,
        &backend,
        &json!({"topic": item, "type": "item.saved", "data": {"rev": 2}}),
    )
    .await;
    assert_eq!((status, &body["offset"]), (202, &json!(2)), "{body}");
    let frame = ana.expect_frame().await.unwrap();
    assert_eq!(envelope(&frame, "doc", item)["data"], json!({"rev": 2}));
    // Neither the team topic nor another item got them.
    for (client, id, topic) in [
        (&mut team, "team", "/team/t1"),
        (&mut other, "other", "/team/t1/items/doc:8.json"),
    ] {
        let (status, body) = http_publish(
            &node,
            &backend,
            &json!({"topic": topic, "type": "item.marker", "data": {}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let frame = client.expect_frame().await.unwrap();
        assert_eq!(
            envelope(&frame, id, topic)["type"],
            json!("item.marker"),
            "the first event {topic} gets is its own"
        );
    }
    // HTTP reads need membership, like SUBSCRIBE; a malformed item id is a clear 422.
    let position = |token: String, topic: &'static str| {
        let url = format!(
            "{}/api/v1/topics/{}/position",
            node.http(),
            topic.replace('/', "%2F")
        );
        async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, body) = position(backend.clone(), "/team/t1/items/doc:7.json").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""offset":2"#), "{body}");
    let stranger = node.token("dee", &["t2"], "publish");
    let (status, body) = position(stranger.clone(), "/team/t1/items/doc:7.json").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = position(backend.clone(), "/team/t1/items/..").await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = http_publish(
        &node,
        &stranger,
        &json!({"topic": item, "type": "item.saved", "data": {}}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Over STOMP, a malformed item destination is refused like any other:
    // `foreign_topics_are_refused_with_4004`.
}

#[tokio::test]
async fn malformed_input_gets_a_protocol_error() {
    let node = Lockstep::start();
    let mut bystander = Bystander::new(&node).await;
    let big = format!(
        "SEND\ndestination:/team/t1\nevent-type:a.b\n\n{}\0",
        "x".repeat(70_000)
    );
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "no colon",
            b"SUBSCRIBE\nid\n\n\0".to_vec(),
            "malformed frame",
            "malformed header",
        ),
        (
            "bad escape",
            b"SUBSCRIBE\nid:\\t\ndestination:/global\n\n\0".to_vec(),
            "malformed frame",
            "undefined escape",
        ),
        (
            "missing header",
            b"SUBSCRIBE\nid:1\n\n\0".to_vec(),
            "malformed frame",
            "missing the 'destination' header",
        ),
        (
            "oversized",
            big.into_bytes(),
            "frame too large",
            "larger than",
        ),
        (
            "unknown command",
            b"FROB\n\n\0".to_vec(),
            "unknown command",
            "unknown command 'FROB'",
        ),
        (
            "server command",
            b"MESSAGE\n\n\0".to_vec(),
            "unknown command",
            "unknown command 'MESSAGE'",
        ),
        (
            "transaction",
            b"BEGIN\ntransaction:tx1\n\n\0".to_vec(),
            "transactions are not supported",
            "not supported",
        ),
        (
            "bad content-length",
            b"SEND\ndestination:/global\ncontent-length:5\n\nabcdefgh\0".to_vec(),
            "malformed frame",
            "not followed by a NUL",
        ),
        (
            "bad json",
            b"SEND\ndestination:/user/ana\nevent-type:a.b\n\n{nope\0".to_vec(),
            "invalid JSON body",
            "must be JSON",
        ),
        (
            "bad event type",
            b"SEND\ndestination:/user/ana\nevent-type:Progress\n\n{}\0".to_vec(),
            "invalid event-type",
            "invalid event type",
        ),
        (
            "no event type",
            b"SEND\ndestination:/user/ana\n\n{}\0".to_vec(),
            "missing event-type",
            "event-type",
        ),
    ];
    for (case, bytes, message, details) in cases {
        let mut c = client(&node, "ana", &["t1"], "publish").await;
        c.send_raw(&bytes).await.unwrap();
        let (error, close) = c.expect_close().await.unwrap();
        let error = error.unwrap_or_else(|| panic!("{case}: no ERROR, close {close:?}"));
        assert_eq!(
            error.header("message"),
            Some(message),
            "{case}: {}",
            loadtest::client::describe(&error)
        );
        assert!(
            String::from_utf8_lossy(&error.body).contains(details),
            "{case}: {}",
            loadtest::client::describe(&error)
        );
        assert_eq!(close.map(|c| c.0), Some(4003), "{case}");
        bystander.still_served(&node).await;
    }
    // Before CONNECT, only CONNECT is accepted.
    let mut c = open(&node).await;
    c.send(
        &Frame::new(Command::Subscribe)
            .with_header("id", "1")
            .with_header("destination", "/global"),
    )
    .await
    .unwrap();
    assert_refused(&mut c, 4001, "not connected", "CONNECT").await;
    // Garbage that is not even a frame.
    let mut c = open(&node).await;
    c.send_raw(&[0xff; 100_000]).await.unwrap();
    let (_, close) = c.expect_close().await.unwrap();
    assert_eq!(close.map(|c| c.0), Some(4003));
    bystander.still_served(&node).await;
}

#[tokio::test]
async fn frames_packed_split_and_heart_beats_between() {
    let node = Lockstep::start();
    let mut c = client(&node, "ana", &["t1"], "publish").await;
    // Two subscribes and EOL heart-beats in one message.
    c.send_text("\n\nSUBSCRIBE\nid:a\ndestination:/team/t1\n\n\0\r\nSUBSCRIBE\nid:b\ndestination:/user/ana\nreceipt:r1\n\n\0\n")
        .await
        .unwrap();
    c.expect_receipt("r1").await.unwrap();
    // A SEND split over three messages, body with a NUL under content-length.
    let body = "{\"s\":\"a\\u0000b\"}";
    let frame = format!(
        "SEND\ndestination:/team/t1\nevent-type:x.y\ncontent-length:{}\nreceipt:r2\n\n{body}\0",
        body.len()
    );
    let (a, rest) = frame.split_at(10);
    let (b, d) = rest.split_at(30);
    for part in [a, b, d] {
        c.send_text(part).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let f = c.expect_frame().await.unwrap();
        got.push(f.command.clone());
        if f.command == Command::Message {
            assert_eq!(
                envelope(&f, "a", "/team/t1")["data"],
                json!({"s": "a\u{0}b"})
            );
        }
    }
    got.sort_by_key(|c| c.to_string());
    assert_eq!(got, vec![Command::Message, Command::Receipt]);
}

#[tokio::test]
async fn subprotocol_negotiation() {
    let node = Lockstep::start();
    let offer = |p: &[&str]| OpenOptions {
        subprotocols: Some(p.iter().map(|s| (*s).to_owned()).collect()),
        ..OpenOptions::default()
    };
    let c = StompClient::open(&node.ws(), &offer(&["v10.stomp", "v11.stomp", "v12.stomp"]))
        .await
        .unwrap();
    assert_eq!(c.protocol.as_deref(), Some("v12.stomp"));
    let c = StompClient::open(&node.ws(), &offer(&["v10.stomp", "v11.stomp"]))
        .await
        .unwrap();
    assert_eq!(c.protocol.as_deref(), Some("v11.stomp"));
    // A client offering none is still accepted, without a subprotocol.
    let mut c = StompClient::open(&node.ws(), &offer(&[])).await.unwrap();
    assert_eq!(c.protocol, None);
    c.send(&connect_frame(Some(&node.token("ana", &[], ""))))
        .await
        .unwrap();
    assert_eq!(c.expect_frame().await.unwrap().command, Command::Connected);
    // Versions: a 1.0-only client gets 1.0, an unknown version is refused.
    let mut c = open(&node).await;
    c.send(&Frame::new(Command::Connect).with_header("passcode", node.token("ana", &[], "")))
        .await
        .unwrap();
    assert_eq!(
        c.expect_frame().await.unwrap().header("version"),
        Some("1.0")
    );
    let mut c = open(&node).await;
    c.send(
        &Frame::new(Command::Connect)
            .with_header("accept-version", "2.0")
            .with_header("passcode", node.token("ana", &[], "")),
    )
    .await
    .unwrap();
    assert_refused(&mut c, 4003, "unsupported protocol version", "1.2").await;
}

#[tokio::test]
async fn disallowed_origin_is_refused_before_upgrade() {
    let node = Lockstep::start_with(
        Options::default().env("LOCKSTEP_ALLOWED_ORIGINS", "https://app.example"),
    );
    let with_origin = |o: &str| OpenOptions {
        origin: Some(o.to_owned()),
        ..OpenOptions::default()
    };
    let err = StompClient::open(&node.ws(), &with_origin("https://evil.example"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("HTTP 403"), "{err:#}");
    assert!(
        err.to_string()
            .contains("origin https://evil.example is not allowed"),
        "{err:#}"
    );
    StompClient::open(&node.ws(), &with_origin("https://app.example"))
        .await
        .unwrap();
    // Same-origin pages and clients without Origin are allowed.
    StompClient::open(&node.ws(), &with_origin(&node.http()))
        .await
        .unwrap();
    StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn receipts_unsubscribe_and_disconnect() {
    let node = Lockstep::start();
    let mut c = client(&node, "ana", &["t1"], "publish").await;
    c.subscribe("s1", "/team/t1").await.unwrap();
    c.publish("/team/t1", "a.b", r#"{"n":1}"#, Some("p1"))
        .await
        .unwrap();
    assert_eq!(
        envelope(&c.expect_frame().await.unwrap(), "s1", "/team/t1")["data"]["n"],
        1
    );
    c.send(
        &Frame::new(Command::Unsubscribe)
            .with_header("id", "s1")
            .with_header("receipt", "u1"),
    )
    .await
    .unwrap();
    c.expect_receipt("u1").await.unwrap();
    // ACK/NACK are accepted no-ops.
    c.send(
        &Frame::new(Command::Ack)
            .with_header("id", "m1")
            .with_header("receipt", "a1"),
    )
    .await
    .unwrap();
    c.expect_receipt("a1").await.unwrap();
    c.publish("/team/t1", "a.b", r#"{"n":2}"#, Some("p2"))
        .await
        .unwrap();
    c.send(&Frame::new(Command::Disconnect).with_header("receipt", "bye"))
        .await
        .unwrap();
    // Nothing for the unsubscribed topic: the next frame is the DISCONNECT receipt.
    let f = c.expect_frame().await.unwrap();
    assert_eq!(
        (f.command.clone(), f.header("receipt-id")),
        (Command::Receipt, Some("bye"))
    );
    let (_, close) = c.expect_close().await.unwrap();
    assert_eq!(close.map(|c| c.0), Some(1000));
}

#[tokio::test]
async fn limits_on_subscriptions_and_connections() {
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HUB_MAX_SUBSCRIPTIONS", 2)
            .env("LOCKSTEP_HUB_MAX_CONNECTIONS", 3),
    );
    let mut a = client(&node, "ana", &["t1"], "").await;
    a.subscribe("1", "/global").await.unwrap();
    a.subscribe("2", "/team/t1").await.unwrap();
    a.send(
        &Frame::new(Command::Subscribe)
            .with_header("id", "3")
            .with_header("destination", "/user/ana"),
    )
    .await
    .unwrap();
    assert_refused(&mut a, 4003, "too many subscriptions", "at most 2").await;
    // Duplicate ids are refused too.
    let mut b = client(&node, "ana", &["t1"], "").await;
    b.subscribe("1", "/global").await.unwrap();
    b.send(
        &Frame::new(Command::Subscribe)
            .with_header("id", "1")
            .with_header("destination", "/team/t1"),
    )
    .await
    .unwrap();
    assert_refused(&mut b, 4003, "duplicate subscription id", "already in use").await;

    // The refused connections are gone; their slots are free again.
    drop((a, b));
    let _c1 = client(&node, "u1", &[], "").await;
    let _c2 = client(&node, "u2", &[], "").await;
    let _c3 = client(&node, "u3", &[], "").await;
    // A connection takes a slot when its CONNECT is accepted: the fourth is refused then.
    let mut c4 = StompClient::open(&node.ws(), &OpenOptions::default())
        .await
        .unwrap();
    let token = node.token("u4", &[], "");
    c4.send(
        &Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("passcode", token.as_str()),
    )
    .await
    .unwrap();
    assert_refused(&mut c4, 4009, "too many connections", "connection limit").await;
}

#[tokio::test]
async fn connect_timeout_and_token_expiry() {
    let node =
        Lockstep::start_with(Options::default().env("LOCKSTEP_HUB_CONNECT_TIMEOUT", "300ms"));
    let mut idle = open(&node).await;
    assert_refused(&mut idle, 4001, "connect timeout", "no CONNECT").await;

    // A token that expires while connected: delivery stops, ERROR, 4002.
    let token = node.token_with(&json!({"sub": "ana", "teams": ["t1"], "exp": now() + 2}));
    let (mut c, _) = StompClient::connect(&node.ws(), &token).await.unwrap();
    c.subscribe("t", "/team/t1").await.unwrap();
    let error = assert_refused(
        &mut c,
        4002,
        "token expired",
        "reconnect with a fresh token",
    )
    .await;
    assert_eq!(error.command, Command::Error);
}

#[tokio::test]
async fn heart_beats_keep_idle_connections_and_drop_dead_ones() {
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HUB_HEARTBEAT_SEND_MS", 200)
            .env("LOCKSTEP_HUB_HEARTBEAT_RECV_MS", 200),
    );
    let token = node.token("ana", &[], "");
    // A client that promises heart-beats every 200 ms and then sends nothing is dropped.
    let (mut silent, connected) =
        StompClient::connect_with(&node.ws(), &OpenOptions::default(), &token, "200,200")
            .await
            .unwrap();
    assert_eq!(connected.header("heart-beat"), Some("200,200"));
    let started = std::time::Instant::now();
    let mut beats = 0;
    let close = loop {
        match silent.next().await.unwrap() {
            loadtest::client::Incoming::HeartBeat => beats += 1,
            loadtest::client::Incoming::Closed(c) => break c,
            loadtest::client::Incoming::Frame(f) => panic!("unexpected {f:?}"),
        }
    };
    assert_eq!(close.map(|c| c.0), Some(4003));
    assert!(beats >= 1, "the server sent no heart-beats");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A client that sends heart-beats stays connected over many intervals.
    let (mut alive, _) =
        StompClient::connect_with(&node.ws(), &OpenOptions::default(), &token, "200,200")
            .await
            .unwrap();
    alive.subscribe("g", "/global").await.unwrap();
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    let mut received = 0;
    while std::time::Instant::now() < until {
        alive.send_text("\n").await.unwrap();
        if let Ok(Ok(incoming)) =
            tokio::time::timeout(Duration::from_millis(100), alive.next()).await
        {
            assert_eq!(incoming, loadtest::client::Incoming::HeartBeat);
            received += 1;
        }
    }
    assert!(received >= 4, "expected server heart-beats, got {received}");
    let publisher = node.token("backend", &[], "publish:global");
    let (status, _) = http_publish(
        &node,
        &publisher,
        &json!({"topic": "/global", "type": "a.b", "data": 1}),
    )
    .await;
    assert_eq!(status, 202);
    let frame = alive.expect_frame().await.unwrap();
    assert_eq!(envelope(&frame, "g", "/global")["data"], 1);
}
