//! The whole HTTP contract and the events each change publishes.

use super::*;

/// The whole HTTP contract on one node with a fresh store, and the events each change
/// publishes. Watchers each hold one topic, so any event that should not exist (an extension,
/// a repeated release, a refused request, a blocked batch) shows up as a mismatch.
/// Returns the last token granted for item 812.
async fn lifecycle(node: &Lockstep) -> i64 {
    let ana = node.token("ana", &["t1"], "locks");
    let bob = node.token("bob", &["t1"], "locks");
    let root = admin_token(node, "root", "t1");
    let mut team = watcher(node, "watch", &["t1"], "/team/t1").await;
    let mut ana_inbox = watcher(node, "ana", &["t1"], "/user/ana").await;
    let mut bob_inbox = watcher(node, "bob", &["t1"], "/user/bob").await;
    let item = lock_path("t1", "812");

    // ana takes the item with the default TTL; the event carries exactly the grant.
    let (s, a1) = call(node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{a1}");
    assert_eq!(
        (&a1["team"], &a1["item"], &a1["holder"]),
        (&json!("t1"), &json!("812"), &json!("ana")),
        "{a1}"
    );
    assert!(a1.get("session").is_none(), "{a1}");
    assert_eq!(
        ms(&a1["expires_at"]) - ms(&a1["acquired_at"]),
        60_000,
        "{a1}"
    );
    let t1 = token_of(&a1);
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        a1
    );

    // Another user is refused, and told who holds it until when.
    let (s, body) = call(node, "POST", &item, &bob, Some(json!({}))).await;
    assert_eq!((s, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(
        body["error"]["details"],
        json!({"holder": "ana", "expires_at": a1["expires_at"]})
    );

    // The holder asking again keeps the token and gets a later expiry (no event).
    let (s, a2) = call(node, "POST", &item, &ana, Some(json!({"ttl_ms": 120_000}))).await;
    assert_eq!(s, 200, "{a2}");
    assert_eq!(
        (token_of(&a2), &a2["acquired_at"]),
        (t1, &a1["acquired_at"]),
        "{a2}"
    );
    assert!(ms(&a2["expires_at"]) > ms(&a1["expires_at"]), "{a1} → {a2}");

    // Renewal by the holder's token.
    let (s, r1) = call(
        node,
        "PUT",
        &item,
        &ana,
        Some(json!({"token": t1, "ttl_ms": 300_000})),
    )
    .await;
    assert_eq!(s, 200, "{r1}");
    assert_eq!((token_of(&r1), &r1["holder"]), (t1, &json!("ana")), "{r1}");
    assert!(ms(&r1["expires_at"]) > ms(&a2["expires_at"]), "{a2} → {r1}");
    // Someone else's renewal with the token is refused while ana holds it.
    let (s, body) = call(node, "PUT", &item, &bob, Some(json!({"token": t1}))).await;
    assert_eq!((s, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(body["error"]["details"]["holder"], "ana");

    // GET and the team list show the live grant as renewed.
    let (s, got) = call(node, "GET", &item, &bob, None).await;
    assert_eq!((s, &got), (200, &r1));
    let (s, list) = call(node, "GET", "/api/v1/teams/t1/locks", &bob, None).await;
    assert_eq!((s, &list["locks"]), (200, &json!([r1.clone()])), "{list}");
    // With the team topic's position read before the list.
    assert!(list["position"]["offset"].as_u64().is_some(), "{list}");

    // Release; a repeated release with the same token (here as ?token=) is 204 again, with no
    // second event; the released token cannot renew.
    let (s, body) = call(node, "DELETE", &item, &ana, Some(json!({"token": t1}))).await;
    assert_eq!(s, 204, "{body}");
    let released = expect_event(&mut team, "/team/t1", "lock.released").await;
    let released_at = ms(&released["released_at"]);
    assert_eq!(
        released,
        json!({"team": "t1", "item": "812", "holder": "ana", "token": t1, "reason": "released", "released_at": released["released_at"]})
    );
    assert!(released_at >= ms(&a1["acquired_at"]), "{released}");
    let (s, body) = call(node, "DELETE", &format!("{item}?token={t1}"), &ana, None).await;
    assert_eq!(s, 204, "{body}");
    let (s, body) = call(node, "PUT", &item, &ana, Some(json!({"token": t1}))).await;
    assert_eq!((s, code(&body)), (410, "lock_lost"), "{body}");
    let (s, body) = call(node, "GET", &item, &ana, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
    let (s, list) = call(node, "GET", "/api/v1/teams/t1/locks", &ana, None).await;
    assert_eq!((s, &list["locks"]), (200, &json!([])), "{list}");

    // bob's grant has a greater token and starts no earlier than ana's release.
    let (s, b1) = call(node, "POST", &item, &bob, None).await;
    assert_eq!(s, 200, "{b1}");
    let t2 = token_of(&b1);
    assert!(t2 > t1, "token {t2} after {t1}");
    assert!(ms(&b1["acquired_at"]) >= released_at, "{b1} vs {released}");
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        b1
    );
    // ana's stale token: renew and release answer 409 while bob holds the item.
    for method in ["PUT", "DELETE"] {
        let (s, body) = call(node, method, &item, &ana, Some(json!({"token": t1}))).await;
        assert_eq!((s, code(&body)), (409, "lock_held"), "{method}: {body}");
        assert_eq!(body["error"]["details"]["holder"], "bob");
    }

    // Takeover: a member who is not an admin may not; a team admin may.
    let force = format!("{item}?force=true");
    let (s, body) = call(node, "DELETE", &force, &bob, None).await;
    assert_eq!((s, code(&body)), (403, "forbidden"), "{body}");
    let (s, body) = call(node, "DELETE", &force, &root, None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (&body["taken_over_from"], token_of(&body)),
        (&json!("bob"), t2),
        "{body}"
    );
    let taken = expect_event(&mut team, "/team/t1", "lock.taken_over").await;
    assert_eq!(
        taken,
        json!({"team": "t1", "item": "812", "holder": "bob", "token": t2, "by": "root", "released_at": taken["released_at"]})
    );
    assert!(ms(&taken["released_at"]) >= ms(&b1["acquired_at"]));
    assert_eq!(
        expect_event(&mut bob_inbox, "/user/bob", "lock.taken_over").await,
        taken
    );
    // The taken-over token is over (410), and there is nothing left to take over.
    for method in ["PUT", "DELETE"] {
        let (s, body) = call(node, method, &item, &bob, Some(json!({"token": t2}))).await;
        assert_eq!((s, code(&body)), (410, "lock_lost"), "{method}: {body}");
    }
    let (s, body) = call(node, "DELETE", &force, &root, None).await;
    assert_eq!((s, code(&body)), (404, "not_locked"), "{body}");
    // A third grant: tokens keep increasing across release, takeover and new grants.
    let (s, c1) = call(node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{c1}");
    let t3 = token_of(&c1);
    assert!(t3 > t2, "token {t3} after {t2}");
    assert!(ms(&c1["acquired_at"]) >= ms(&taken["released_at"]));
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        c1
    );
    let (s, _) = call(node, "DELETE", &item, &ana, Some(json!({"token": t3}))).await;
    assert_eq!(s, 204);
    expect_event(&mut team, "/team/t1", "lock.released").await;

    // Expiry: announced on the team topic and to the holder, at the grant's expiry time; the
    // expired token cannot renew.
    let short = lock_path("t1", "e1");
    let (s, e1) = call(node, "POST", &short, &ana, Some(json!({"ttl_ms": 1000}))).await;
    assert_eq!(s, 200, "{e1}");
    assert_eq!(ms(&e1["expires_at"]) - ms(&e1["acquired_at"]), 1000);
    assert_eq!(
        expect_event(&mut team, "/team/t1", "lock.acquired").await,
        e1
    );
    let expired = expect_event(&mut team, "/team/t1", "lock.expired").await;
    assert_eq!(
        expired,
        json!({"team": "t1", "item": "e1", "holder": "ana", "token": e1["token"], "expired_at": e1["expires_at"]})
    );
    assert_eq!(
        expect_event(&mut ana_inbox, "/user/ana", "lock.expired").await,
        expired
    );
    let (s, body) = call(
        node,
        "PUT",
        &short,
        &ana,
        Some(json!({"token": e1["token"]})),
    )
    .await;
    assert_eq!((s, code(&body)), (410, "lock_lost"), "{body}");
    let (s, _) = call(node, "GET", &short, &ana, None).await;
    assert_eq!(s, 404);

    batches(node, &mut team, &ana, &bob).await;
    refusals(node).await;

    // Nothing else was published: no event for extensions, renewals, repeated releases,
    // refused requests or blocked batches.
    let (s, list) = call(node, "GET", "/api/v1/teams/t1/locks", &ana, None).await;
    assert_eq!((s, &list["locks"]), (200, &json!([])), "{list}");
    let quiet = Duration::from_millis(500);
    assert_no_event(&mut team, "/team/t1", quiet).await;
    assert_no_event(&mut ana_inbox, "/user/ana", quiet).await;
    assert_no_event(&mut bob_inbox, "/user/bob", quiet).await;
    t3
}

/// Batch acquire is all-or-nothing; batch release reports each item.
async fn batches(node: &Lockstep, team: &mut StompClient, ana: &str, bob: &str) {
    let batch = "/api/v1/teams/t1/locks/batch";
    let (s, b2) = call(node, "POST", &lock_path("t1", "b2"), bob, None).await;
    assert_eq!(s, 200, "{b2}");
    assert_eq!(expect_event(team, "/team/t1", "lock.acquired").await, b2);

    // One blocked item: 409 names it, and none of the free items was locked.
    let (s, body) = call(
        node,
        "POST",
        batch,
        ana,
        Some(json!({"items": ["b1", "b2", "b3"], "ttl_ms": 60_000})),
    )
    .await;
    assert_eq!((s, code(&body)), (409, "lock_held"), "{body}");
    assert_eq!(
        body["error"]["details"]["blockers"],
        json!([{"item": "b2", "holder": "bob", "expires_at": b2["expires_at"]}])
    );
    for free in ["b1", "b3"] {
        let (s, body) = call(node, "GET", &lock_path("t1", free), ana, None).await;
        assert_eq!((s, code(&body)), (404, "not_locked"), "{free}: {body}");
    }
    let (_, list) = call(node, "GET", "/api/v1/teams/t1/locks", ana, None).await;
    assert_eq!(list["locks"], json!([b2.clone()]), "{list}");

    // Once b2 is free the same batch is granted whole, answered in request order.
    let (s, _) = call(
        node,
        "DELETE",
        &lock_path("t1", "b2"),
        bob,
        Some(json!({"token": b2["token"]})),
    )
    .await;
    assert_eq!(s, 204);
    expect_event(team, "/team/t1", "lock.released").await;
    let (s, body) = call(
        node,
        "POST",
        batch,
        ana,
        Some(json!({"items": ["b3", "b1", "b2"], "ttl_ms": 60_000})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let granted = body["locks"].as_array().expect("locks").clone();
    let items: Vec<&str> = granted
        .iter()
        .map(|l| l["item"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["b3", "b1", "b2"], "{body}");
    assert!(granted.iter().all(|l| l["holder"] == "ana"), "{body}");
    assert!(
        token_of(&granted[2]) > token_of(&b2),
        "b2's token must grow: {body}"
    );
    let mut announced = BTreeMap::new();
    for _ in 0..3 {
        let data = expect_event(team, "/team/t1", "lock.acquired").await;
        announced.insert(data["item"].as_str().unwrap().to_owned(), data);
    }
    for lock in &granted {
        assert_eq!(&announced[lock["item"].as_str().unwrap()], lock);
    }
    let token = |item: &str| token_of(granted.iter().find(|l| l["item"] == item).unwrap());

    // Batch release: each item reported; a wrong token or someone else's lock is not released.
    let (s, b4) = call(node, "POST", &lock_path("t1", "b4"), bob, None).await;
    assert_eq!(s, 200, "{b4}");
    expect_event(team, "/team/t1", "lock.acquired").await;
    let (s, body) = call(
        node,
        "DELETE",
        batch,
        ana,
        Some(json!({"items": [
            {"item": "b1", "token": token("b1")},
            {"item": "b2", "token": token("b2")},
            {"item": "b3", "token": token("b3") + 7},
            {"item": "b4", "token": b4["token"]},
        ]})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["results"],
        json!([
            {"item": "b1", "released": true},
            {"item": "b2", "released": true},
            {"item": "b3", "released": false, "code": "lock_lost"},
            {"item": "b4", "released": false, "code": "lock_held", "holder": "bob"},
        ])
    );
    let mut released = BTreeSet::new();
    for _ in 0..2 {
        let data = expect_event(team, "/team/t1", "lock.released").await;
        assert_eq!(data["reason"], "released");
        released.insert(data["item"].as_str().unwrap().to_owned());
    }
    assert_eq!(released, BTreeSet::from(["b1".to_owned(), "b2".to_owned()]));
    let (_, list) = call(node, "GET", "/api/v1/teams/t1/locks", ana, None).await;
    let live: Vec<&str> = list["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["item"].as_str().unwrap())
        .collect();
    assert_eq!(live, ["b3", "b4"]);
    // Tidy up, so later checks start from an empty team.
    let (s, _) = call(
        node,
        "DELETE",
        &lock_path("t1", "b3"),
        ana,
        Some(json!({"token": token("b3")})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(
        node,
        "DELETE",
        &lock_path("t1", "b4"),
        bob,
        Some(json!({"token": b4["token"]})),
    )
    .await;
    assert_eq!(s, 204);
    expect_event(team, "/team/t1", "lock.released").await;
    expect_event(team, "/team/t1", "lock.released").await;
}

/// A refused request: method, path, token, body, then the status and error code expected.
type Refusal<'a> = (&'a str, String, &'a str, Option<Value>, u16, &'a str);

/// Every refusal: status and code; none of them may change anything (checked by the caller:
/// no event, no live lock).
async fn refusals(node: &Lockstep) {
    let ana = node.token("ana", &["t1"], "locks");
    let no_scope = node.token("ana", &["t1"], "publish");
    let outsider = node.token("eve", &["t2"], "locks");
    let other_admin = admin_token(node, "mallory", "t2");
    let item = lock_path("t1", "v1");
    let batch = "/api/v1/teams/t1/locks/batch";
    let long_item = "x".repeat(129);
    let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
    let many_release: Vec<Value> = many
        .iter()
        .map(|i| json!({"item": i, "token": 1}))
        .collect();
    let cases: Vec<Refusal<'_>> = vec![
        // TTL bounds (locks.min_ttl 1 s, locks.max_ttl 1 h).
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"ttl_ms": 999})),
            422,
            "invalid_ttl",
        ),
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"ttl_ms": 3_600_001})),
            422,
            "invalid_ttl",
        ),
        (
            "PUT",
            item.clone(),
            &ana,
            Some(json!({"token": 1, "ttl_ms": 0})),
            422,
            "invalid_ttl",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": ["v1"], "ttl_ms": 999})),
            422,
            "invalid_ttl",
        ),
        // Item ids must match [A-Za-z0-9_.:-]{1,128}.
        (
            "POST",
            lock_path("t1", &long_item),
            &ana,
            None,
            422,
            "invalid_item",
        ),
        (
            "POST",
            lock_path("t1", "bad%20item"),
            &ana,
            None,
            422,
            "invalid_item",
        ),
        (
            "GET",
            lock_path("t1", "bad*item"),
            &ana,
            None,
            422,
            "invalid_item",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": ["v1", "bad item"]})),
            422,
            "invalid_item",
        ),
        // Batch sizes (locks.max_batch 100).
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": many})),
            413,
            "batch_too_large",
        ),
        (
            "DELETE",
            batch.to_owned(),
            &ana,
            Some(json!({"items": many_release})),
            413,
            "batch_too_large",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": []})),
            422,
            "empty_batch",
        ),
        (
            "DELETE",
            batch.to_owned(),
            &ana,
            Some(json!({"items": []})),
            422,
            "empty_batch",
        ),
        // Unknown fields.
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"ttl": 5000})),
            422,
            "invalid_body",
        ),
        (
            "PUT",
            item.clone(),
            &ana,
            Some(json!({"token": 1, "force": true})),
            422,
            "invalid_body",
        ),
        (
            "POST",
            batch.to_owned(),
            &ana,
            Some(json!({"items": ["v1"], "all": true})),
            422,
            "invalid_body",
        ),
        (
            "DELETE",
            item.clone(),
            &ana,
            Some(json!({"token": 1, "why": "done"})),
            422,
            "invalid_body",
        ),
        // Other bad input.
        (
            "POST",
            item.clone(),
            &ana,
            Some(json!({"session": ""})),
            422,
            "invalid_session",
        ),
        ("DELETE", item.clone(), &ana, None, 422, "missing_token"),
        // Authorization: the `locks` scope and membership of the team.
        ("POST", item.clone(), &no_scope, None, 403, "forbidden"),
        ("GET", item.clone(), &no_scope, None, 403, "forbidden"),
        (
            "GET",
            "/api/v1/teams/t1/locks".to_owned(),
            &no_scope,
            None,
            403,
            "forbidden",
        ),
        (
            "POST",
            batch.to_owned(),
            &no_scope,
            Some(json!({"items": ["v1"]})),
            403,
            "forbidden",
        ),
        ("POST", item.clone(), &outsider, None, 403, "forbidden"),
        (
            "GET",
            "/api/v1/teams/t1/locks".to_owned(),
            &outsider,
            None,
            403,
            "forbidden",
        ),
        (
            "DELETE",
            format!("{item}?force=true"),
            &other_admin,
            None,
            403,
            "forbidden",
        ),
        ("POST", item.clone(), "", None, 401, "unauthorized"),
    ];
    for (method, path, token, body, status, want) in cases {
        let what = format!("{method} {path} {body:?}");
        let (s, answer) = call(node, method, &path, token, body).await;
        assert_eq!((s, code(&answer)), (status, want), "{what}: {answer}");
    }
}

#[tokio::test]
async fn lifecycle_on_sqlite() {
    let node = node(None, &[]).await;
    lifecycle(&node).await;
}

#[tokio::test]
async fn lifecycle_on_postgres() {
    let pg = Postgres::start();
    let url = pg.database("lifecycle");
    let node = node(Some(&url), &[]).await;
    let last = lifecycle(&node).await;
    // The store itself agrees on the last grant's token.
    assert_eq!(
        pg.psql("lifecycle", "SELECT token FROM locks WHERE item = '812'")
            .unwrap(),
        last.to_string()
    );
}
