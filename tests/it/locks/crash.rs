//! A PostgreSQL crash and restart under traffic.

use super::*;

/// One batch attempt of the background batcher: its number, status, error code, duration.
type Attempt = (usize, u16, String, Duration);

/// PostgreSQL crashes (immediate stop) while a client keeps acquiring batches, and comes back:
/// requests during the outage answer 503 `lock_store_unavailable` within 5 s; no batch is half
/// written; the node is ready again by itself; grants survive and tokens continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_answers_503_then_recovers() {
    let mut pg = Postgres::start();
    let url = pg.database("restart");
    let node = node(Some(&url), &[]).await;
    let ana = node.token("ana", &["t1"], "locks");
    let item = lock_path("t1", "r1");
    let batch = "/api/v1/teams/t1/locks/batch";
    let list = "/api/v1/teams/t1/locks";

    // A few grants, and one kept across the outage.
    let mut last = 0;
    for _ in 0..3 {
        let (s, lock) = call(&node, "POST", &item, &ana, None).await;
        assert_eq!(s, 200, "{lock}");
        assert!(token_of(&lock) > last);
        last = token_of(&lock);
        let (s, _) = call(&node, "DELETE", &item, &ana, Some(json!({"token": last}))).await;
        assert_eq!(s, 204);
    }
    let (s, kept) = call(&node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{kept}");
    let kept_token = token_of(&kept);
    assert!(kept_token > last);

    // The batcher: a batch of four fresh items every 20 ms, each answer recorded.
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let batcher = {
        let (base, token, attempts) = (node.http(), ana.clone(), attempts.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 0usize.. {
                let items: Vec<String> = (0..4).map(|k| format!("b{n}-{k}")).collect();
                let started = Instant::now();
                let answer = request(
                    &http,
                    &base,
                    "POST",
                    batch,
                    &token,
                    Some(json!({"items": items, "ttl_ms": 600_000})),
                )
                .await;
                let (status, code) = match &answer {
                    Ok((s, body)) => (
                        *s,
                        body["error"]["code"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    Err(e) => (0, e.to_string()),
                };
                attempts.lock().push((n, status, code, started.elapsed()));
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    let granted = |a: &[Attempt]| a.iter().filter(|a| a.1 == 200).count();
    wait_until(Duration::from_secs(10), "5 batches granted", || {
        granted(&attempts.lock()) >= 5
    })
    .await;

    // `restart()` is crash + start; done in two steps so requests can be made in between.
    pg.crash();
    let crashed_at = attempts.lock().len();
    let outage: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", lock_path("t1", "r2"), None),
        ("PUT", item.clone(), Some(json!({"token": kept_token}))),
        ("DELETE", item.clone(), Some(json!({"token": kept_token}))),
        ("DELETE", format!("{item}?force=true"), None),
        ("GET", item.clone(), None),
        ("GET", list.to_owned(), None),
        (
            "POST",
            batch.to_owned(),
            Some(json!({"items": ["x0", "x1", "x2"]})),
        ),
        (
            "DELETE",
            batch.to_owned(),
            Some(json!({"items": [{"item": "r1", "token": kept_token}]})),
        ),
    ];
    let root = admin_token(&node, "root", "t1");
    let answers = futures_util::future::join_all(outage.into_iter().map(|(method, path, body)| {
        let (node, token) = (&node, if path.contains("force") { &root } else { &ana });
        async move {
            let started = Instant::now();
            let (s, answer) = call(node, method, &path, token, body).await;
            (format!("{method} {path}"), s, answer, started.elapsed())
        }
    }))
    .await;
    for (what, s, answer, took) in &answers {
        assert_eq!(
            (*s, code(answer)),
            (503, "lock_store_unavailable"),
            "{what}: {answer}"
        );
        assert!(*took < Duration::from_secs(5), "{what} took {took:?}");
    }
    wait_ready(&node, 503, Duration::from_secs(10)).await;
    wait_until(
        Duration::from_secs(10),
        "a batch attempted during the outage",
        || attempts.lock().len() > crashed_at + 1,
    )
    .await;

    pg.restart();
    let recovered = wait_ready(&node, 200, Duration::from_secs(30)).await;
    // The node serves again by itself, and the grant made before the crash is intact.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let (s, body) = call(&node, "GET", &item, &ana, None).await;
        if s == 200 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still {s} after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held, kept);
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(20), batcher)
        .await
        .expect("the batcher stops")
        .unwrap();
    eprintln!("postgres restart: ready {recovered:?} after the restart");

    // All or nothing: every batch has all four items locked or none; a granted one all four.
    let (s, body) = call(&node, "GET", list, &ana, None).await;
    assert_eq!(s, 200, "{body}");
    let live: BTreeSet<String> = body["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["item"].as_str().unwrap().to_owned())
        .collect();
    let attempts = attempts.lock().clone();
    let mut refused = 0;
    for (n, status, code, took) in &attempts {
        let locked = (0..4)
            .filter(|k| live.contains(&format!("b{n}-{k}")))
            .count();
        if *status == 200 {
            assert_eq!(
                locked, 4,
                "batch {n} was granted but {locked} of its items are locked"
            );
        } else {
            refused += 1;
            assert!(
                locked == 0 || locked == 4,
                "batch {n} ({status} {code}) is half written: {locked} of 4 items locked"
            );
            assert_eq!(
                (*status, code.as_str()),
                (503, "lock_store_unavailable"),
                "batch {n}"
            );
            assert!(*took < Duration::from_secs(5), "batch {n} took {took:?}");
        }
    }
    assert!(
        refused > 0,
        "no batch was attempted during the outage: {attempts:?}"
    );
    for never in ["x0", "x1", "x2", "r2"] {
        assert!(
            !live.contains(never),
            "{never} was locked during the outage"
        );
    }

    // Tokens continue from where they were.
    let (s, _) = call(
        &node,
        "DELETE",
        &item,
        &ana,
        Some(json!({"token": kept_token})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, next) = call(&node, "POST", &item, &ana, None).await;
    assert_eq!(s, 200, "{next}");
    assert!(
        token_of(&next) > kept_token,
        "token {} after {kept_token}",
        token_of(&next)
    );
}

/// Lock events read the same, byte for byte, whichever database decides: on PostgreSQL the
/// decision functions write the data in SQL, on SQLite (and in every sweep) `LockEvent` writes
/// it in Rust. Each data object must be compact JSON with sorted keys (exactly what serde_json
/// writes for the parsed value) with the same fields on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_event_data_is_the_same_on_both_databases() {
    let pg = Postgres::start();
    let url = pg.database("bytes");
    // No sweep runs during the few seconds of the test (the first is at start): the expiry is
    // announced by the next grant's decision. (The heartbeat, a tenth of the node timeout,
    // still registers the node quickly.)
    let no_sweeps = [
        ("LOCKSTEP_LOCKS_SWEEP_INTERVAL", "20s"),
        ("LOCKSTEP_LOCKS_NODE_TIMEOUT", "80s"),
    ];
    let mut shapes = Vec::new();
    for database in [None, Some(url.as_str())] {
        let node = node(database, &no_sweeps).await;
        let mut watch = watcher(&node, "w", &["t1"], "/team/t1").await;
        let ana = node.token("ana", &["t1"], "locks");
        let bob = node.token("bob", &["t1"], "locks");
        let lead = admin_token(&node, "lead", "t1");
        let path = lock_path("t1", "i1");
        let (s, _) = call(&node, "POST", &path, &ana, Some(json!({"ttl_ms": 1000}))).await;
        assert_eq!(s, 200);
        let list = "/api/v1/teams/t1/locks";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, body) = call(&node, "GET", list, &lead, None).await;
            assert_eq!(s, 200, "{body}");
            if body["locks"].as_array().is_some_and(Vec::is_empty) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ana's grant never expired: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (s, granted) = call(&node, "POST", &path, &bob, Some(json!({"ttl_ms": 5000}))).await;
        assert_eq!(s, 200, "{granted}");
        let release = json!({"token": granted["token"]});
        let (s, body) = call(&node, "DELETE", &path, &bob, Some(release)).await;
        assert_eq!(s, 204, "{body}");
        let (s, _) = call(&node, "POST", &path, &ana, Some(json!({"ttl_ms": 5000}))).await;
        assert_eq!(s, 200);
        let (s, body) = call(&node, "DELETE", &format!("{path}?force=true"), &lead, None).await;
        assert_eq!(s, 200, "{body}");

        let mut shape = Vec::new();
        for _ in 0..6 {
            let frame = watch.expect_frame().await.expect("a lock event");
            let raw = String::from_utf8(frame.body.to_vec()).expect("UTF-8 body");
            let envelope = envelope(&frame, "s", "/team/t1");
            let data = &envelope["data"];
            let canonical = serde_json::to_string(data).expect("JSON");
            assert!(
                raw.contains(&format!("\"data\":{canonical}")),
                "{database:?}: data is not compact with sorted keys: {raw}"
            );
            let keys: Vec<String> = data.as_object().expect("object").keys().cloned().collect();
            shape.push((envelope["type"].as_str().expect("type").to_owned(), keys));
        }
        shapes.push(shape);
    }
    let types: Vec<&str> = shapes[0].iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "lock.acquired",
            "lock.expired",
            "lock.acquired",
            "lock.released",
            "lock.acquired",
            "lock.taken_over"
        ]
    );
    assert_eq!(shapes[0], shapes[1]);
}
