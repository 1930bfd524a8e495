//! Presigned object access (DESIGN §6) end to end: a real `lockstep serve` signs URLs for a
//! real S3-compatible server (s3s-fs, which checks SigV4 signatures and expiry), and the bytes
//! go straight between the client and the storage server. The storage server's own answers
//! are asserted (status and S3 error code), not just "not 200"; what it stored is read from its
//! disk, independently of Lockstep. The browser test runs headless Chromium against an nginx
//! CORS front, as a deployment's bucket CORS rules would allow.

use crate::locks::call;
use crate::{client, envelope, http_publish};
use loadtest::client::StompClient;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tests::nginx::CorsProxy;
use tests::s3::S3Server;
use tests::{Lockstep, Options, free_port, workspace};

const TEAM: &str = "t1";

/// A node signing for `s3` directly, with `options` on top.
fn node_for(s3: &S3Server, options: Options) -> Lockstep {
    Lockstep::start_with(s3.configure(options, &s3.endpoint()))
}

/// A member of [`TEAM`] who may lock and presign.
fn member(node: &Lockstep, sub: &str) -> String {
    node.token(sub, &[TEAM], "locks presign")
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

/// Takes the lock on `item` of [`TEAM`]; returns the lock (token, `expires_at`, …).
async fn lock(node: &Lockstep, token: &str, item: &str, ttl_ms: Option<u64>) -> Value {
    let body = ttl_ms.map(|ttl| json!({ "ttl_ms": ttl }));
    let (status, lock) = call(
        node,
        "POST",
        &format!("/api/v1/teams/{TEAM}/items/{item}/lock"),
        token,
        body,
    )
    .await;
    assert_eq!(status, 200, "locking {item}: {lock}");
    lock
}

/// An admin of [`TEAM`] takes over `item`'s lock (`DELETE …/lock?force=true`).
async fn take_over(node: &Lockstep, item: &str) {
    let admin = node.token_with(&json!({
        "sub": "admin", "teams": [TEAM], "admin_of": [TEAM], "scope": "locks",
        "exp": tests::now() + 3600,
    }));
    let (status, body) = call(
        node,
        "DELETE",
        &format!("/api/v1/teams/{TEAM}/items/{item}/lock?force=true"),
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 200, "takeover of {item}: {body}");
}

async fn presign(
    node: &Lockstep,
    token: &str,
    team: &str,
    item: &str,
    body: Value,
) -> (u16, Value) {
    call(
        node,
        "POST",
        &format!("/api/v1/teams/{team}/items/{item}/presign"),
        token,
        Some(body),
    )
    .await
}

async fn batch(node: &Lockstep, token: &str, team: &str, body: Value) -> (u16, Value) {
    call(
        node,
        "POST",
        &format!("/api/v1/teams/{team}/presign/batch"),
        token,
        Some(body),
    )
    .await
}

async fn commit(node: &Lockstep, token: &str, item: &str, body: Value) -> (u16, Value) {
    call(
        node,
        "POST",
        &format!("/api/v1/teams/{TEAM}/items/{item}/commit"),
        token,
        Some(body),
    )
    .await
}

/// Presigns one URL that must be granted.
async fn signed(node: &Lockstep, token: &str, item: &str, body: Value) -> Value {
    let (status, url) = presign(node, token, TEAM, item, body.clone()).await;
    assert_eq!(status, 200, "presign {item} {body}: {url}");
    url
}

/// The storage server's answer: status, S3 error code (from the XML error body), headers and
/// body.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) status: u16,
    error: Option<String>,
    etag: Option<String>,
    content_type: Option<String>,
    pub(crate) body: Vec<u8>,
}

async fn answer(request: reqwest::RequestBuilder) -> Stored {
    let response = request.send().await.expect("storage request");
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (etag, content_type) = (header("etag"), header("content-type"));
    let body = response.bytes().await.expect("storage body").to_vec();
    let text = String::from_utf8_lossy(&body);
    let error = text
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.to_owned());
    Stored {
        status,
        error,
        etag,
        content_type,
        body,
    }
}

/// Sends a presigned request as a client must: the returned method and URL with exactly the
/// returned headers; `body` for a PUT.
pub(crate) async fn send(presigned: &Value, body: Option<Vec<u8>>) -> Stored {
    let method = presigned["method"].as_str().expect("method");
    let url = presigned["url"].as_str().expect("url");
    let mut request = reqwest::Client::new().request(method.parse().expect("method"), url);
    for (name, value) in presigned["headers"].as_object().expect("headers") {
        request = request.header(name, value.as_str().expect("header value"));
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    answer(request).await
}

/// `GET url` with no headers.
async fn get(url: &str) -> Stored {
    answer(reqwest::Client::new().get(url)).await
}

/// Asserts the storage server refused with `status` and S3 error `code`.
#[track_caller]
fn assert_refused(got: &Stored, status: u16, code: &str, what: &str, s3: &S3Server) {
    assert_eq!(
        (got.status, got.error.as_deref()),
        (status, Some(code)),
        "{what}: the storage server answered {} {:?}; s3s-fs log:\n{}",
        got.status,
        String::from_utf8_lossy(&got.body),
        s3.log()
    );
}

/// Deterministic bytes for object `i` of a run (`seed`); `presign.html` computes the same
/// function, so the page can check what it read byte for byte.
fn pattern(seed: u32, i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| {
            let v = u64::from(seed) * 31 + i as u64 * 131 + j as u64 * 7 + (j as u64 >> 8) * 13;
            v.to_le_bytes()[0]
        })
        .collect()
}

fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// A query parameter of a URL.
fn param(url: &str, name: &str) -> String {
    let url = reqwest::Url::parse(url).expect("URL");
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("{name} missing from {url}"))
}

/// The URL with the first hex digit of its signature changed (one character).
fn with_changed_signature(url: &str) -> String {
    let at = url.find("X-Amz-Signature=").expect("signed URL") + "X-Amz-Signature=".len();
    let old = &url[at..=at];
    let new = if old == "0" { "1" } else { "0" };
    format!("{}{new}{}", &url[..at], &url[at + 1..])
}

/// The URL with `from` replaced by `to` in its path (not its query).
fn with_path_changed(url: &str, from: &str, to: &str) -> String {
    let (path, query) = url.split_once('?').expect("query");
    assert!(path.contains(from), "{from} not in {path}");
    format!("{}?{query}", path.replacen(from, to, 1))
}

/// Milliseconds since the epoch of a UTC date and time.
fn utc_ms(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, ms: i64) -> i64 {
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms
}

/// `2026-11-25T17:18:51.699Z` → ms since the epoch.
fn rfc3339_ms(s: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().unwrap_or_else(|_| panic!("{s}")) };
    let frac = s[19..]
        .trim_start_matches('.')
        .trim_end_matches('Z')
        .chars()
        .chain("000".chars())
        .take(3)
        .collect::<String>();
    utc_ms(
        n(0..4),
        n(5..7),
        n(8..10),
        n(11..13),
        n(14..16),
        n(17..19),
        frac.parse().unwrap_or(0),
    )
}

/// When a SigV4 URL stops working: `X-Amz-Date` (`20261125T171752Z`) + `X-Amz-Expires` s.
fn signed_expiry_ms(url: &str) -> i64 {
    let date = param(url, "X-Amz-Date");
    let n = |r: std::ops::Range<usize>| -> i64 { date[r].parse().expect("X-Amz-Date") };
    let expires: i64 = param(url, "X-Amz-Expires").parse().expect("X-Amz-Expires");
    utc_ms(n(0..4), n(4..6), n(6..8), n(9..11), n(11..13), n(13..15), 0) + expires * 1000
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

/// A deliberate wait for a point in time (a URL's or a lock's expiry), not a synchronization.
async fn sleep_until_ms(at: i64) {
    let left = u64::try_from(at - now_ms()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(left)).await;
}

#[tokio::test]
async fn presign_put_then_get_round_trips_bytes() {
    let s3 = S3Server::start();
    // Slashes around the prefix are trimmed: keys are `{prefix}/{team}/{item}/{name}`.
    let node = node_for(
        &s3,
        Options::default().env("LOCKSTEP_S3_PREFIX", "/e2e/run-1/"),
    );
    let ana = member(&node, "ana");
    let held = lock(&node, &ana, "scan-1", None).await;
    let put = signed(
        &node,
        &ana,
        "scan-1",
        json!({"method": "PUT", "name": "frames/000001.pcd",
               "content_type": "application/octet-stream", "token": held["token"]}),
    )
    .await;
    assert_eq!(put["method"], "PUT", "{put}");
    assert_eq!(
        put["headers"],
        json!({"content-type": "application/octet-stream", "x-amz-meta-lockstep-token": held["token"].to_string()}),
        "the signed content type and fencing token are headers the client must send: {put}"
    );
    let url = put["url"].as_str().unwrap();
    let key = "e2e/run-1/t1/scan-1/frames/000001.pcd";
    assert!(
        url.starts_with(&format!("{}/{}/{key}?", s3.endpoint(), s3.bucket)),
        "path-style URL for {key}: {url}"
    );

    let bytes = random_bytes(96 * 1024 + 3);
    let uploaded = send(&put, Some(bytes.clone())).await;
    assert_eq!(uploaded.status, 200, "{uploaded:?}\n{}", s3.log());
    assert_eq!(
        s3.stored(key).as_deref(),
        Some(&bytes[..]),
        "the storage server holds the uploaded bytes under {key}"
    );

    // Reading needs no lock: bob, another member, reads what ana wrote.
    let bob = node.token("bob", &[TEAM], "presign");
    let get_url = signed(
        &node,
        &bob,
        "scan-1",
        json!({"method": "GET", "name": "frames/000001.pcd"}),
    )
    .await;
    assert_eq!(
        (&get_url["method"], &get_url["headers"]),
        (&json!("GET"), &json!({})),
        "{get_url}"
    );
    let read = send(&get_url, None).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert!(
        read.body == bytes,
        "the GET returned other bytes than were PUT"
    );
    assert_eq!(read.etag, uploaded.etag, "same object, same ETag");
    assert_eq!(
        read.content_type.as_deref(),
        Some("application/octet-stream"),
        "the signed content type was stored"
    );
}

#[tokio::test]
async fn storage_refuses_tampered_urls() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    let original = random_bytes(4096);
    s3.put_file("t1/scan-1/frames/000001.pcd", &original);
    // Objects the tampered URLs point at exist, so a refusal cannot be a "no such key".
    s3.put_file("t1/scan-1/frames/000002.pcd", b"neighbour frame");
    s3.put_file("t2/scan-1/frames/000001.pcd", b"another team's frame");
    s3.put_file("t1/other/b.bin", b"another item's file");

    let get_url = signed(
        &node,
        &ana,
        "scan-1",
        json!({"method": "GET", "name": "frames/000001.pcd"}),
    )
    .await;
    let url = get_url["url"].as_str().unwrap();
    // The untampered URL works, so the refusals below come from the changes.
    let ok = get(url).await;
    assert_eq!((ok.status, ok.body == original), (200, true), "{ok:?}");

    let got = get(&with_changed_signature(url)).await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "one signature digit changed",
        &s3,
    );
    let got = get(&with_path_changed(url, "000001.pcd", "000002.pcd")).await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "one key character changed",
        &s3,
    );
    let got = get(&with_path_changed(url, "/t1/", "/t2/")).await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "the key of another team",
        &s3,
    );
    let got = get(&with_path_changed(
        url,
        "/scan-1/frames/000001.pcd",
        "/other/b.bin",
    ))
    .await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "another key altogether",
        &s3,
    );
    // The method is signed too: a read URL cannot write.
    let got = answer(reqwest::Client::new().put(url).body("overwrite")).await;
    assert_refused(&got, 403, "SignatureDoesNotMatch", "PUT on a GET URL", &s3);

    // A write URL signs its content type: the upload must send exactly that one.
    let held = lock(&node, &ana, "scan-1", None).await;
    let put = signed(
        &node,
        &ana,
        "scan-1",
        json!({"method": "PUT", "name": "frames/000001.pcd",
               "content_type": "application/octet-stream", "token": held["token"]}),
    )
    .await;
    let put_url = put["url"].as_str().unwrap();
    let got = answer(
        reqwest::Client::new()
            .put(put_url)
            .header("content-type", "text/html")
            .body("<script>"),
    )
    .await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "PUT with another content type",
        &s3,
    );
    let got = answer(reqwest::Client::new().put(put_url).body("no type")).await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "PUT without the content type",
        &s3,
    );
    let got = answer(
        reqwest::Client::new()
            .put(with_changed_signature(put_url))
            .header("content-type", "application/octet-stream")
            .body("forged"),
    )
    .await;
    assert_refused(
        &got,
        403,
        "SignatureDoesNotMatch",
        "PUT with a changed signature",
        &s3,
    );
    assert_eq!(
        s3.stored("t1/scan-1/frames/000001.pcd").as_deref(),
        Some(&original[..]),
        "no refused PUT changed the object"
    );
    assert_eq!(
        s3.stored("t2/scan-1/frames/000001.pcd").as_deref(),
        Some(&b"another team's frame"[..])
    );
}

#[tokio::test]
async fn storage_refuses_expired_urls() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    s3.put_file("t1/scan-1/a.bin", b"short-lived");
    let short = signed(
        &node,
        &ana,
        "scan-1",
        json!({"method": "GET", "name": "a.bin", "expires_in": 1}),
    )
    .await;
    let url = short["url"].as_str().unwrap();
    assert_eq!(param(url, "X-Amz-Expires"), "1", "{url}");
    // Past both the reported and the signed expiry, with a margin for clock granularity.
    let expired_at = rfc3339_ms(short["expires_at"].as_str().unwrap()).max(signed_expiry_ms(url));
    sleep_until_ms(expired_at + 1200).await;
    let got = get(url).await;
    assert_refused(&got, 403, "AccessDenied", "a GET URL past its expiry", &s3);
    assert!(
        String::from_utf8_lossy(&got.body).contains("expired"),
        "refused for its age: {got:?}"
    );
    // The same request signed now works: only the age of the first URL was wrong.
    let fresh = signed(
        &node,
        &ana,
        "scan-1",
        json!({"method": "GET", "name": "a.bin", "expires_in": 60}),
    )
    .await;
    let got = send(&fresh, None).await;
    assert_eq!((got.status, &got.body[..]), (200, &b"short-lived"[..]));
}

#[tokio::test]
async fn write_urls_end_with_the_lock() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    // Long enough that the first upload below is well within the URL's life on a slow machine.
    let held = lock(&node, &ana, "scan-2", Some(5000)).await;
    let lock_end = rfc3339_ms(held["expires_at"].as_str().unwrap());
    let mut urls = Vec::new();
    // Asking for an hour, or for the default (5 min), a write URL still ends with the lock.
    for expires_in in [Some(3600), None] {
        let mut body = json!({"method": "PUT", "name": "out.bin", "token": held["token"]});
        if let Some(e) = expires_in {
            body["expires_in"] = json!(e);
        }
        let put = signed(&node, &ana, "scan-2", body).await;
        let url = put["url"].as_str().unwrap().to_owned();
        let seconds: i64 = param(&url, "X-Amz-Expires").parse().unwrap();
        assert!((1..=5).contains(&seconds), "X-Amz-Expires {seconds}: {url}");
        assert!(
            signed_expiry_ms(&url) <= lock_end,
            "the URL works until {} ms, after the lock ends at {lock_end}: {url}",
            signed_expiry_ms(&url)
        );
        urls.push(put);
    }
    let put = &urls[0];
    let got = send(put, Some(b"while locked".to_vec())).await;
    assert_eq!(got.status, 200, "{got:?}");
    sleep_until_ms(lock_end.max(signed_expiry_ms(put["url"].as_str().unwrap())) + 1200).await;
    let got = send(put, Some(b"after the lock".to_vec())).await;
    assert_refused(
        &got,
        403,
        "AccessDenied",
        "a write URL after its lock ended",
        &s3,
    );
    assert_eq!(
        s3.stored("t1/scan-2/out.bin").as_deref(),
        Some(&b"while locked"[..])
    );
    let (status, body) = presign(
        &node,
        &ana,
        TEAM,
        "scan-2",
        json!({"method": "PUT", "name": "out.bin", "token": held["token"]}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (410, "lock_lost"),
        "no write URL once the lock expired: {body}"
    );
}

/// `expires_at` must tell the client when the URL stops working (DESIGN §6: for a write, at
/// most the lock's expiry), so a client refreshing by it never holds a dead URL.
#[tokio::test]
async fn expires_at_is_when_the_url_stops_working() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    let held = lock(&node, &ana, "scan-4", Some(30_000)).await;
    let lock_end = rfc3339_ms(held["expires_at"].as_str().unwrap());
    let get_url = signed(&node, &ana, "scan-4", json!({"method": "GET", "name": "a"})).await;
    let put_url = signed(
        &node,
        &ana,
        "scan-4",
        json!({"method": "PUT", "name": "a", "token": held["token"], "expires_in": 3600}),
    )
    .await;
    let mut problems = Vec::new();
    for presigned in [&get_url, &put_url] {
        let url = presigned["url"].as_str().unwrap();
        let reported = rfc3339_ms(presigned["expires_at"].as_str().unwrap());
        let real = signed_expiry_ms(url);
        // SigV4 has whole seconds: a truthful expires_at is the signed expiry, or up to a
        // second before it.
        if !(real - 1000..=real).contains(&reported) {
            problems.push(format!(
                "{} URL: expires_at {} but the storage server refuses it from X-Amz-Date {} + \
                 X-Amz-Expires {} s: expires_at is {:+} ms off",
                presigned["method"],
                presigned["expires_at"],
                param(url, "X-Amz-Date"),
                param(url, "X-Amz-Expires"),
                reported - real
            ));
        }
    }
    let reported_put = rfc3339_ms(put_url["expires_at"].as_str().unwrap());
    if reported_put > lock_end {
        problems.push(format!(
            "PUT URL: expires_at {} is after the lock's expires_at {} (+{} ms)",
            put_url["expires_at"],
            held["expires_at"],
            reported_put - lock_end
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn lockstep_refuses_write_urls_without_the_current_lock() {
    let s3 = S3Server::start();
    refuses_write_urls_without_the_current_lock(&node_for(&s3, Options::default())).await;
}

/// The same on PostgreSQL, whose lock store reads the objects' locks with its own SQL.
#[tokio::test]
async fn lockstep_refuses_write_urls_without_the_current_lock_on_postgres() {
    let s3 = S3Server::start();
    let pg = tests::postgres::Postgres::start();
    let database = pg.database("presign");
    let node = node_for(
        &s3,
        Options::default().env("LOCKSTEP_DATABASE_URL", &database),
    );
    crate::locks::wait_ready(&node, 200, std::time::Duration::from_secs(20)).await;
    refuses_write_urls_without_the_current_lock(&node).await;
}

async fn refuses_write_urls_without_the_current_lock(node: &Lockstep) {
    let (ana, bob) = (member(node, "ana"), member(node, "bob"));
    let put = |token: Option<&Value>| {
        let mut body = json!({"method": "PUT", "name": "a.bin"});
        if let Some(t) = token {
            body["token"] = t.clone();
        }
        body
    };

    // bob holds the lock: ana gets no write URL, even presenting bob's token.
    let bobs = lock(node, &bob, "scan-1", None).await;
    let (status, body) = presign(node, &ana, TEAM, "scan-1", put(Some(&bobs["token"]))).await;
    assert_eq!((status, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(body["error"]["details"]["holder"], "bob", "{body}");
    assert!(body.get("url").is_none(), "{body}");
    let (status, body) = presign(node, &ana, TEAM, "scan-1", put(None)).await;
    assert_eq!((status, code(&body)), (422, "missing_token"), "{body}");
    // No lock at all on the item.
    let (status, body) = presign(node, &ana, TEAM, "scan-9", put(Some(&json!(1)))).await;
    assert_eq!((status, code(&body)), (410, "lock_lost"), "{body}");

    // ana's lock is taken over by an admin: her token is stale.
    let anas = lock(node, &ana, "scan-2", None).await;
    signed(node, &ana, "scan-2", put(Some(&anas["token"]))).await;
    take_over(node, "scan-2").await;
    let (status, body) = presign(node, &ana, TEAM, "scan-2", put(Some(&anas["token"]))).await;
    assert_eq!((status, code(&body)), (410, "lock_lost"), "{body}");
    let (status, body) = batch(
        node,
        &ana,
        TEAM,
        json!({"method": "PUT", "objects": [
            {"item": "scan-1", "name": "a.bin", "token": bobs["token"]},
            {"item": "scan-2", "name": "a.bin", "token": anas["token"]},
        ]}),
    )
    .await;
    // Object 0 is refused first (bob's lock), in request order.
    assert_eq!((status, code(&body)), (409, "lock_held"), "{body}");
    let (status, body) = batch(
        node,
        &ana,
        TEAM,
        json!({"method": "PUT", "objects": [
            {"item": "scan-2", "name": "a.bin", "token": anas["token"]},
        ]}),
    )
    .await;
    assert_eq!((status, code(&body)), (410, "lock_lost"), "{body}");
    assert_eq!(body["error"]["details"]["index"], 0, "{body}");
    // Someone new holds it: the stale token meets a lock held by another.
    let carol = member(node, "carol");
    lock(node, &carol, "scan-2", None).await;
    let (status, body) = presign(node, &ana, TEAM, "scan-2", put(Some(&anas["token"]))).await;
    assert_eq!((status, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(body["error"]["details"]["holder"], "carol", "{body}");
    // With the current locks, a batch of writes over two items (one twice) is signed.
    let (three, four) = (
        lock(node, &ana, "scan-3", None).await,
        lock(node, &ana, "scan-4", None).await,
    );
    let (status, body) = batch(
        node,
        &ana,
        TEAM,
        json!({"method": "PUT", "objects": [
            {"item": "scan-3", "name": "a.bin", "token": three["token"]},
            {"item": "scan-4", "name": "a.bin", "token": four["token"]},
            {"item": "scan-3", "name": "b.bin", "token": three["token"]},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["urls"].as_array().map(Vec::len), Some(3), "{body}");
}

/// A refused object in a batch of writes is named by its index, whatever the reason.
#[tokio::test]
async fn batch_write_refusals_name_the_object() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let (ana, bob) = (member(&node, "ana"), member(&node, "bob"));
    let anas = lock(&node, &ana, "scan-1", None).await;
    let bobs = lock(&node, &bob, "scan-2", None).await;
    let (status, body) = batch(
        &node,
        &ana,
        TEAM,
        json!({"method": "PUT", "objects": [
            {"item": "scan-1", "name": "a.bin", "token": anas["token"]},
            {"item": "scan-2", "name": "a.bin", "token": bobs["token"]},
        ]}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "lock_held"), "{body}");
    assert!(body.get("urls").is_none(), "{body}");
    assert_eq!(
        (
            &body["error"]["details"]["index"],
            &body["error"]["details"]["holder"]
        ),
        (&json!(1), &json!("bob")),
        "details name the refused object and its holder: {body}"
    );
}

#[tokio::test]
async fn lockstep_refuses_other_teams_bad_names_and_missing_scope() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    let get = |name: &str| json!({"method": "GET", "name": name});

    // Another team's items: no URL, read or write, single or batch.
    let (status, body) = presign(&node, &ana, "t2", "scan-1", get("a.bin")).await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    let (status, body) = presign(
        &node,
        &ana,
        "t2",
        "scan-1",
        json!({"method": "PUT", "name": "a.bin", "token": 1}),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    let (status, body) = batch(
        &node,
        &ana,
        "t2",
        json!({"method": "GET", "objects": [{"item": "scan-1", "name": "a.bin"}]}),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    // A member without the `presign` scope.
    let viewer = node.token("viewer", &[TEAM], "locks");
    let (status, body) = presign(&node, &viewer, TEAM, "scan-1", get("a.bin")).await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");

    let too_long = "x".repeat(513);
    let bad_names = [
        "../x",
        "/abs",
        "a//b",
        too_long.as_str(),
        "a/../../t2/x",
        "./a",
        "a/",
        "a b",
        "a%2Fb",
        "",
    ];
    for name in bad_names {
        let (status, body) = presign(&node, &ana, TEAM, "scan-1", get(name)).await;
        assert_eq!(
            (status, code(&body)),
            (422, "invalid_name"),
            "name {name:?}: {body}"
        );
        // In a batch, the bad object is named and no URL is made for the good ones.
        let (status, body) = batch(
            &node,
            &ana,
            TEAM,
            json!({"method": "GET", "objects": [
                {"item": "scan-1", "name": "ok.bin"},
                {"item": "scan-1", "name": name},
            ]}),
        )
        .await;
        assert_eq!(
            (status, code(&body), &body["error"]["details"]["index"]),
            (422, "invalid_name", &json!(1)),
            "batch with name {name:?}: {body}"
        );
        assert!(body.get("urls").is_none(), "{body}");
    }
    // The longest valid name still works.
    signed(&node, &ana, "scan-1", get(&"x".repeat(512))).await;
    let (status, body) = presign(
        &node,
        &ana,
        TEAM,
        "scan-1",
        json!({"method": "GET", "name": "a", "expires_in": 0}),
    )
    .await;
    assert_eq!((status, code(&body)), (422, "invalid_expires_in"), "{body}");
}

/// `.` and `..` are valid item ids (`[A-Za-z0-9_.:-]`), but as a key segment they leave the
/// item's folder: `t1/../t2/…` is team t2's object on any storage that resolves dot segments
/// (s3s-fs maps keys to files; HTTP clients and proxies normalize paths). DESIGN §6: no caller
/// reaches another team's objects.
#[tokio::test]
async fn item_ids_cannot_leave_the_team_folder() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    s3.put_file("t2/scan-1/secret.bin", b"team t2 only");
    s3.put_file("t1/scan-1/frame.bin", b"item scan-1 of t1");
    let mut problems = Vec::new();
    for (item, name, target) in [
        ("..", "t2/scan-1/secret.bin", "t2/scan-1/secret.bin"),
        (".", "scan-1/frame.bin", "t1/scan-1/frame.bin"),
    ] {
        let (status, body) = batch(
            &node,
            &ana,
            TEAM,
            json!({"method": "GET", "objects": [{"item": item, "name": name}]}),
        )
        .await;
        if status == 200 {
            let url = body["urls"][0]["url"].as_str().unwrap_or_default();
            let (got_status, got) = raw_get(url).await;
            problems.push(format!(
                "item {item:?}, name {name:?}: 200 with {url}; sent as is, the storage server \
                 answered {got_status} {:?} (the object at {target} is {:?})",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&s3.stored(target).unwrap_or_default()),
            ));
        } else if !matches!(status, 403 | 422) {
            problems.push(format!("item {item:?}: {status} {body}"));
        }
    }
    // Writes: if the lock on item `..` is granted, its write URL must still be refused.
    let (status, locked) = call(
        &node,
        "POST",
        &format!("/api/v1/teams/{TEAM}/locks/batch"),
        &ana,
        Some(json!({"items": [".."]})),
    )
    .await;
    if status == 200 {
        let token = locked["locks"][0]["token"]
            .as_i64()
            .unwrap_or_else(|| panic!("no token in {locked}"));
        let (status, body) = batch(
            &node,
            &ana,
            TEAM,
            json!({"method": "PUT", "objects": [
                {"item": "..", "name": "t2/scan-1/secret.bin", "token": token}]}),
        )
        .await;
        if status == 200 {
            let url = body["urls"][0]["url"].as_str().unwrap_or_default();
            let (put_status, _) = raw_put(url, b"overwritten by t1").await;
            problems.push(format!(
                "PUT item \"..\", name \"t2/scan-1/secret.bin\": 200 with {url}; sent as is, \
                 the storage server answered {put_status}, and t2's object is now {:?}",
                String::from_utf8_lossy(&s3.stored("t2/scan-1/secret.bin").unwrap_or_default())
            ));
        } else if !matches!(status, 403 | 422) {
            problems.push(format!("PUT item \"..\": {status} {body}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// One HTTP/1.1 request with the URL's path sent exactly as given (an HTTP library would
/// resolve `.`/`..` segments first, as browsers do; other clients and proxies need not).
async fn raw_request(url: &str, method: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, target) = rest.split_at(rest.find('/').expect("path"));
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the storage server answers within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.as_bytes().to_vec())
        .unwrap_or_default();
    (status, body)
}

async fn raw_get(url: &str) -> (u16, Vec<u8>) {
    raw_request(url, "GET", b"").await
}

async fn raw_put(url: &str, body: &[u8]) -> (u16, Vec<u8>) {
    raw_request(url, "PUT", body).await
}

#[tokio::test]
async fn batches_are_ordered_validated_first_and_limited() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default().env("LOCKSTEP_S3_MAX_BATCH", 4));
    let ana = member(&node, "ana");
    let objects: Vec<Value> = (0..4)
        .map(|i| json!({"item": format!("scan-{}", i % 2), "name": format!("f/{i}.bin")}))
        .collect();
    for (i, object) in objects.iter().enumerate() {
        let key = format!(
            "t1/{}/{}",
            object["item"].as_str().unwrap(),
            object["name"].as_str().unwrap()
        );
        s3.put_file(&key, format!("object {i}").as_bytes());
    }

    let mut five = objects.clone();
    five.push(json!({"item": "scan-0", "name": "f/4.bin"}));
    let (status, body) = batch(&node, &ana, TEAM, json!({"method": "GET", "objects": five})).await;
    assert_eq!((status, code(&body)), (413, "batch_too_large"), "{body}");
    let (status, body) = batch(&node, &ana, TEAM, json!({"method": "GET", "objects": []})).await;
    assert_eq!((status, code(&body)), (422, "empty_batch"), "{body}");
    let mut one_bad = objects.clone();
    one_bad[2]["item"] = json!("no/slash");
    let (status, body) = batch(
        &node,
        &ana,
        TEAM,
        json!({"method": "GET", "objects": one_bad}),
    )
    .await;
    assert_eq!(
        (status, code(&body), &body["error"]["details"]["index"]),
        (422, "invalid_item", &json!(2)),
        "{body}"
    );
    assert!(body.get("urls").is_none(), "{body}");

    // In request order: URL i reads object i.
    let (status, body) = batch(
        &node,
        &ana,
        TEAM,
        json!({"method": "GET", "objects": objects, "expires_in": 60}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let urls = body["urls"].as_array().expect("urls");
    assert_eq!(urls.len(), 4, "{body}");
    for (i, url) in urls.iter().enumerate() {
        let got = send(url, None).await;
        assert_eq!(
            (got.status, String::from_utf8_lossy(&got.body).into_owned()),
            (200, format!("object {i}")),
            "URL {i}: {url}"
        );
    }

    // Writes in a batch: each object with its own item's token.
    let a = lock(&node, &ana, "scan-0", None).await;
    let b = lock(&node, &ana, "scan-1", None).await;
    let (status, body) = batch(
        &node,
        &ana,
        TEAM,
        json!({"method": "PUT", "objects": [
            {"item": "scan-1", "name": "w.bin", "token": b["token"], "content_type": "text/plain"},
            {"item": "scan-0", "name": "w.bin", "token": a["token"]},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let urls = body["urls"].as_array().expect("urls");
    assert_eq!(
        urls[0]["headers"],
        json!({"content-type": "text/plain", "x-amz-meta-lockstep-token": b["token"].to_string()})
    );
    for (url, text) in urls.iter().zip(["for scan-1", "for scan-0"]) {
        let got = send(url, Some(text.as_bytes().to_vec())).await;
        assert_eq!(got.status, 200, "{got:?}");
    }
    assert_eq!(
        s3.stored("t1/scan-1/w.bin").as_deref(),
        Some(&b"for scan-1"[..])
    );
    assert_eq!(
        s3.stored("t1/scan-0/w.bin").as_deref(),
        Some(&b"for scan-0"[..])
    );
    // A PUT batch without a token is refused before anything is signed.
    let (status, body) = batch(
        &node,
        &ana,
        TEAM,
        json!({"method": "PUT", "objects": [
            {"item": "scan-0", "name": "w.bin", "token": a["token"]},
            {"item": "scan-1", "name": "w.bin"},
        ]}),
    )
    .await;
    assert_eq!(
        (status, code(&body), &body["error"]["details"]["index"]),
        (422, "missing_token", &json!(1)),
        "{body}"
    );
}

#[tokio::test]
async fn without_storage_presign_answers_503() {
    let node = Lockstep::start();
    let ana = member(&node, "ana");
    let held = lock(&node, &ana, "scan-1", None).await;
    let cases = [
        (
            format!("/api/v1/teams/{TEAM}/items/scan-1/presign"),
            json!({"method": "GET", "name": "a"}),
        ),
        (
            format!("/api/v1/teams/{TEAM}/items/scan-1/presign"),
            json!({"method": "PUT", "name": "a", "token": held["token"]}),
        ),
        (
            format!("/api/v1/teams/{TEAM}/presign/batch"),
            json!({"method": "GET", "objects": [{"item": "scan-1", "name": "a"}]}),
        ),
        (
            format!("/api/v1/teams/{TEAM}/items/scan-1/commit"),
            json!({"token": held["token"], "name": "a"}),
        ),
    ];
    for (path, body) in cases {
        let (status, answer) = call(&node, "POST", &path, &ana, Some(body)).await;
        assert_eq!(
            (status, code(&answer)),
            (503, "storage_not_configured"),
            "{path}: {answer}"
        );
    }
}

/// Reads `/team/t1` until the first event that is not a lock event (the locks taken in the
/// test announce themselves there too); bounded by the client's 10 s per frame.
async fn next_non_lock_event(watcher: &mut StompClient) -> Value {
    for _ in 0..20 {
        let frame = watcher.expect_frame().await.expect("an event on /team/t1");
        let event = envelope(&frame, "t", "/team/t1");
        if !event["type"]
            .as_str()
            .unwrap_or_default()
            .starts_with("lock.")
        {
            return event;
        }
    }
    panic!("only lock events on /team/t1");
}

#[tokio::test]
async fn commit_announces_uploads_to_the_team() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let mut watcher = client(&node, "carol", &[TEAM], "").await;
    watcher.subscribe("t", "/team/t1").await.unwrap();
    let (ana, bob) = (member(&node, "ana"), member(&node, "bob"));
    let held = lock(&node, &ana, "scan-3", None).await;
    let token = &held["token"];

    let (status, body) = commit(
        &node,
        &ana,
        "scan-3",
        json!({"token": token, "name": "result.json"}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (404, "object_not_found"),
        "before the upload: {body}"
    );

    let put = signed(
        &node,
        &ana,
        "scan-3",
        json!({"method": "PUT", "name": "result.json", "content_type": "application/json", "token": token}),
    )
    .await;
    let bytes = br#"{"frames": 120, "labels": ["car", "tree"]}"#.to_vec();
    let uploaded = send(&put, Some(bytes.clone())).await;
    assert_eq!(uploaded.status, 200, "{uploaded:?}");
    // Only the holder commits.
    let (status, body) = commit(
        &node,
        &bob,
        "scan-3",
        json!({"token": token, "name": "result.json"}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "lock_held"), "{body}");

    let (status, committed) = commit(
        &node,
        &ana,
        "scan-3",
        json!({"token": token, "name": "result.json"}),
    )
    .await;
    assert_eq!(status, 200, "{committed}");
    assert_eq!(
        (&committed["item"], &committed["name"], &committed["size"]),
        (&json!("scan-3"), &json!("result.json"), &json!(bytes.len())),
        "{committed}"
    );
    assert_eq!(
        committed["etag"].as_str(),
        uploaded.etag.as_deref(),
        "{committed}"
    );

    // The first non-lock event is this commit's: the refused commits announced nothing.
    let event = next_non_lock_event(&mut watcher).await;
    assert_eq!(event["type"], "item.updated", "{event}");
    assert_eq!(event["id"], committed["id"], "{event}");
    let data = &event["data"];
    assert_eq!(
        (
            &data["team"],
            &data["item"],
            &data["name"],
            &data["holder"],
            &data["token"]
        ),
        (
            &json!(TEAM),
            &json!("scan-3"),
            &json!("result.json"),
            &json!("ana"),
            token
        ),
        "{event}"
    );
    assert_eq!(data["size"], json!(bytes.len()), "{event}");
    assert_eq!(data["etag"].as_str(), uploaded.etag.as_deref(), "{event}");

    // After a takeover the old token commits nothing, and nothing is announced.
    take_over(&node, "scan-3").await;
    let (status, body) = commit(
        &node,
        &ana,
        "scan-3",
        json!({"token": token, "name": "result.json"}),
    )
    .await;
    assert_eq!((status, code(&body)), (410, "lock_lost"), "{body}");
    let backend = node.token("backend", &[TEAM], "publish");
    let (status, marker) = http_publish(
        &node,
        &backend,
        &json!({"topic": "/team/t1", "type": "test.marker", "data": {}}),
    )
    .await;
    assert_eq!(status, 202, "{marker}");
    let event = next_non_lock_event(&mut watcher).await;
    assert_eq!(
        (&event["type"], &event["id"]),
        (&json!("test.marker"), &marker["id"]),
        "nothing but the marker after the refused commit: {event}"
    );
}

#[tokio::test]
async fn browser_reads_a_batch_and_uploads_through_cors() {
    const OBJECTS: usize = 20;
    let page_port = free_port();
    let origin = format!("http://127.0.0.1:{page_port}");
    let s3 = S3Server::start();
    let proxy = CorsProxy::start(&format!("127.0.0.1:{}", s3.port), &origin);
    // URLs are signed for the proxy's address: the browser only ever talks to it.
    let node = Lockstep::start_with(s3.configure(
        Options::default().env("LOCKSTEP_ALLOWED_ORIGINS", &origin),
        &proxy.endpoint(),
    ));

    // The objects the page will read, uploaded through one batch of write URLs.
    let seed: u32 = rand::random_range(1..1_000_000);
    let sizes: Vec<usize> = (0..OBJECTS).map(|i| 1 + i * 2477 + i % 3).collect();
    let names: Vec<String> = (0..OBJECTS).map(|i| format!("frames/{i:06}.bin")).collect();
    let uploader = member(&node, "uploader");
    let held = lock(&node, &uploader, "scan-9", None).await;
    let objects: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({"item": "scan-9", "name": n, "token": held["token"],
                        "content_type": "application/octet-stream"})
        })
        .collect();
    let (status, body) = batch(
        &node,
        &uploader,
        TEAM,
        json!({"method": "PUT", "objects": objects}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let uploads = body["urls"]
        .as_array()
        .expect("urls")
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let bytes = pattern(seed, i, sizes[i]);
            async move { send(url, Some(bytes)).await }
        });
    for (i, got) in futures_util::future::join_all(uploads)
        .await
        .iter()
        .enumerate()
    {
        assert_eq!(
            got.status,
            200,
            "upload {i} through the proxy: {got:?}\n{}",
            proxy.log()
        );
    }
    for (i, name) in names.iter().enumerate() {
        assert!(
            s3.stored(&format!("t1/scan-9/{name}")) == Some(pattern(seed, i, sizes[i])),
            "object {i} stored as uploaded"
        );
    }

    let ana = member(&node, "ana");
    let config = json!({
        "http": node.http(),
        "team": TEAM,
        "token": ana,
        "read": {"item": "scan-9", "names": names, "sizes": sizes, "seed": seed},
        "write": {"item": "result-1", "name": "checks/result.json", "content_type": "application/json"},
        "page_port": page_port,
    });
    let dir = workspace().join("tests/clients");
    let run = tokio::process::Command::new("node")
        .arg(dir.join("browser/presign.mjs"))
        .arg(config.to_string())
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    // presign.mjs bounds itself at 120 s; this bound only guards against a hung Node.
    let output = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .expect("presign.mjs finished within 150 s")
        .unwrap_or_else(|e| {
            panic!("cannot run node: {e}; run the README's test command, which installs it")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = stdout
        .lines()
        .find_map(|l| l.strip_prefix("OK "))
        .filter(|_| output.status.success())
        .unwrap_or_else(|| {
            panic!(
                "presign.mjs failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}\nlockstep log:\n{}\nnginx:\n{}",
                output.status,
                node.log(),
                proxy.log()
            )
        });
    let summary: Value = serde_json::from_str(summary).expect("summary JSON");
    eprintln!("presign.mjs: {summary}");
    assert_eq!(summary["objects"], OBJECTS, "{summary}");
    assert_eq!(summary["bytes"], sizes.iter().sum::<usize>(), "{summary}");

    // What the page uploaded is on the storage server, under the item's key, and reads back
    // through a fresh URL.
    let result = summary["result"].as_str().expect("result");
    let key = "t1/result-1/checks/result.json";
    assert_eq!(
        s3.stored(key).as_deref(),
        Some(result.as_bytes()),
        "the page's upload is stored under {key}"
    );
    let written: Value = serde_json::from_str(result).expect("the page uploaded JSON");
    assert_eq!(
        (&written["checked"], &written["seed"]),
        (&json!(OBJECTS), &json!(seed)),
        "{written}"
    );
    let read = signed(
        &node,
        &ana,
        "result-1",
        json!({"method": "GET", "name": "checks/result.json"}),
    )
    .await;
    let got = send(&read, None).await;
    assert_eq!((got.status, &got.body[..]), (200, result.as_bytes()));
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(summary["etag"].as_str(), got.etag.as_deref(), "{summary}");
}

/// A write URL outlives an early end of its lock (storage cannot revoke it), so it is fenced:
/// it signs the lock's token into the object's metadata, and `commit` refuses an object
/// written under another token. After a takeover the old holder's URL still writes, but the
/// new holder's commit then refuses to announce the stale bytes as its own (it used to
/// announce them).
#[tokio::test]
async fn stale_write_urls_cannot_pass_for_the_new_holder() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let (ana, bob) = (member(&node, "ana"), member(&node, "bob"));
    let first = lock(&node, &ana, "doc-9", None).await;
    let stale = signed(
        &node,
        &ana,
        "doc-9",
        json!({"method": "PUT", "name": "labels.json", "content_type": "application/json", "token": first["token"]}),
    )
    .await;
    assert_eq!(
        stale["headers"]["x-amz-meta-lockstep-token"],
        json!(first["token"].to_string()),
        "{stale}"
    );
    take_over(&node, "doc-9").await;
    let second = lock(&node, &bob, "doc-9", None).await;
    let fresh = signed(
        &node,
        &bob,
        "doc-9",
        json!({"method": "PUT", "name": "labels.json", "content_type": "application/json", "token": second["token"]}),
    )
    .await;
    assert_eq!(
        send(&fresh, Some(br#"{"by":"bob"}"#.to_vec())).await.status,
        200
    );
    // The old holder's URL is still valid at the storage and overwrites Bob's upload...
    assert_eq!(
        send(&stale, Some(br#"{"by":"ana"}"#.to_vec())).await.status,
        200
    );
    // ...and the metadata cannot be forged: the signed header must be sent as it is.
    let mut forged = stale.clone();
    forged["headers"]["x-amz-meta-lockstep-token"] = json!(second["token"].to_string());
    let got = send(&forged, Some(br#"{"by":"mallory"}"#.to_vec())).await;
    assert_refused(&got, 403, "SignatureDoesNotMatch", "a forged token", &s3);
    // Bob's commit sees the object was last written under the old token and refuses it.
    let (status, body) = commit(
        &node,
        &bob,
        "doc-9",
        json!({"token": second["token"], "name": "labels.json"}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "stale_write"), "{body}");
    assert_eq!(body["error"]["details"]["written_token"], first["token"]);
    // Uploading again with his URL makes the commit go through.
    assert_eq!(
        send(&fresh, Some(br#"{"by":"bob"}"#.to_vec())).await.status,
        200
    );
    let (status, body) = commit(
        &node,
        &bob,
        "doc-9",
        json!({"token": second["token"], "name": "labels.json"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // An object put there out of band (no fencing token) is not announced either.
    s3.put_file("t1/doc-9/other.bin", b"out of band");
    let (status, body) = commit(
        &node,
        &bob,
        "doc-9",
        json!({"token": second["token"], "name": "other.bin"}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "stale_write"), "{body}");
}

/// A write URL always signs a content type: `application/octet-stream` when the request names
/// none (an unsigned one let the uploader choose `text/html`, which the bucket would then
/// serve as a page), and only types on `s3.content_types`.
#[tokio::test]
async fn write_urls_always_sign_an_allowed_content_type() {
    let s3 = S3Server::start();
    let node = node_for(&s3, Options::default());
    let ana = member(&node, "ana");
    let held = lock(&node, &ana, "doc-10", None).await;
    let put = signed(
        &node,
        &ana,
        "doc-10",
        json!({"method": "PUT", "name": "a.bin", "token": held["token"]}),
    )
    .await;
    assert_eq!(
        put["headers"]["content-type"],
        json!("application/octet-stream"),
        "{put}"
    );
    let url = put["url"].as_str().unwrap();
    let got = answer(
        reqwest::Client::new()
            .put(url)
            .header("content-type", "text/html")
            .body("<script>alert(1)</script>"),
    )
    .await;
    assert_refused(&got, 403, "SignatureDoesNotMatch", "text/html instead", &s3);
    for refused in ["text/html", "image/svg+xml", "application/javascript"] {
        let (status, body) = presign(
            &node,
            &ana,
            TEAM,
            "doc-10",
            json!({"method": "PUT", "name": "a.bin", "content_type": refused, "token": held["token"]}),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (422, "content_type_not_allowed"),
            "{refused}: {body}"
        );
    }
    // Reads sign no content type and need no lock.
    let (status, body) = presign(
        &node,
        &ana,
        TEAM,
        "doc-10",
        json!({"method": "GET", "name": "a.bin", "content_type": "text/html"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}
