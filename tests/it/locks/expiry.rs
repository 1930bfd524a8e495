//! Exactly one `lock.expired` per expiry across nodes, also while a node is SIGKILLed.

use super::*;

/// Reads from a [`watcher`] of `destination` until `n` `lock.expired` and `acquired`
/// `lock.acquired` events arrived; returns the expiries by item. An item announced twice
/// fails, as does any other event.
async fn expiries(
    client: &mut StompClient,
    destination: &str,
    n: usize,
    acquired: usize,
) -> BTreeMap<String, Value> {
    let mut got = BTreeMap::new();
    let mut grants = BTreeSet::new();
    while got.len() < n || grants.len() < acquired {
        // A killed node's claimed events are published by another node once their claim
        // (5 s) lapses, so allow for more than that.
        let frame = client
            .expect_frame_within(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{destination}: {} of {n} expiries, {} of {acquired} grants, then {e:#}",
                    got.len(),
                    grants.len()
                )
            });
        let envelope = envelope(&frame, "s", destination);
        let data = envelope["data"].clone();
        let item = data["item"].as_str().expect("item").to_owned();
        match envelope["type"].as_str() {
            Some("lock.expired") => {
                if let Some(first) = got.insert(item, data.clone()) {
                    panic!("{destination}: expiry announced twice: {first} and {data}");
                }
            }
            Some("lock.acquired") if grants.len() < acquired => {
                assert!(
                    grants.insert(item),
                    "{destination}: grant announced twice: {data}"
                );
            }
            _ => panic!("{destination}: unexpected event {envelope}"),
        }
    }
    got
}

/// One round: 30 items locked for six users through every node with staggered short TTLs; if
/// `kill` says so, that node is SIGKILLed after the delay, while expiries are being announced.
/// Every expiry must reach both team watchers and its holder's inbox exactly once.
async fn expiry_round(
    nodes: &mut [Lockstep],
    outbox: (&Postgres, &str),
    watchers: &mut [StompClient],
    inboxes: &mut [StompClient],
    round: &str,
    kill: Option<(usize, Duration)>,
) {
    let mut expected = BTreeMap::new();
    for i in 0..30usize {
        let node = &nodes[i % nodes.len()];
        let user = format!("u{}", i % inboxes.len());
        let token = node.token(&user, &["t1"], "locks");
        let item = format!("{round}-{i}");
        // Expiries spread over 1.5 s, so a kill lands among them.
        let ttl = 1000 + 50 * i;
        let (s, lock) = call(
            node,
            "POST",
            &lock_path("t1", &item),
            &token,
            Some(json!({"ttl_ms": ttl})),
        )
        .await;
        assert_eq!(s, 200, "{lock}");
        expected.insert(
            item.clone(),
            json!({"team": "t1", "item": item, "holder": user, "token": lock["token"], "expired_at": lock["expires_at"]}),
        );
    }
    let started = Instant::now();
    if let Some((victim, after)) = kill {
        // A deliberate wait: the point is to kill the node in the middle of the expiries.
        tokio::time::sleep(after).await;
        nodes[victim].kill();
    }
    for (i, w) in watchers.iter_mut().enumerate() {
        let got = expiries(w, "/team/t1", expected.len(), expected.len()).await;
        assert_eq!(got, expected, "team watcher {i}, round {round}");
    }
    for (k, inbox) in inboxes.iter_mut().enumerate() {
        let user = format!("u{k}");
        let mine: BTreeMap<String, Value> = expected
            .iter()
            .filter(|(_, e)| e["holder"] == user.as_str())
            .map(|(i, e)| (i.clone(), e.clone()))
            .collect();
        let destination = format!("/user/{user}");
        let got = expiries(inbox, &destination, mine.len(), 0).await;
        assert_eq!(got, mine, "{destination}, round {round}");
    }
    eprintln!(
        "expiry round {round}: every expiry announced {:?} after the grants",
        started.elapsed()
    );
    // Once the outbox is empty nothing can be published again; then no duplicate may arrive.
    let (pg, database) = outbox;
    wait_until(Duration::from_secs(20), "the outbox drains", || {
        outbox_rows(pg, database) == 0
    })
    .await;
    let quiet = Duration::from_millis(500);
    for w in watchers.iter_mut() {
        assert_no_event(w, "/team/t1 (a duplicate expiry)", quiet).await;
    }
    for inbox in inboxes.iter_mut() {
        assert_no_event(inbox, "a user topic (a duplicate expiry)", quiet).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiries_are_announced_exactly_once_even_when_a_node_dies() {
    let pg = Postgres::start();
    let url = pg.database("expiry");
    let redis = RedisServer::start();
    let mut nodes = cluster(3, &url, &redis, &[]).await;
    // Everyone listens on nodes 0 and 1; node 2 is the one that dies.
    let mut watchers = vec![
        watcher(&nodes[0], "watch0", &["t1"], "/team/t1").await,
        watcher(&nodes[1], "watch1", &["t1"], "/team/t1").await,
    ];
    let mut inboxes = Vec::new();
    for k in 0..6 {
        let user = format!("u{k}");
        inboxes.push(watcher(&nodes[k % 2], &user, &["t1"], &format!("/user/{user}")).await);
    }
    expiry_round(
        &mut nodes,
        (&pg, "expiry"),
        &mut watchers,
        &mut inboxes,
        "calm",
        None,
    )
    .await;
    expiry_round(
        &mut nodes,
        (&pg, "expiry"),
        &mut watchers,
        &mut inboxes,
        "kill",
        Some((2, Duration::from_millis(1200))),
    )
    .await;
}
