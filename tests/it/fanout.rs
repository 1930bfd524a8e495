//! Fan-out: ordering across many subscribers, and slow consumers.

use crate::{client, envelope};
use loadtest::client::{Incoming, StompClient};
use protocol::Command;
use tests::{Lockstep, Options};

/// 10,000 events from one publisher reach 100 subscribers complete and in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_in_order_at_a_hundred_subscribers() {
    const EVENTS: u64 = 10_000;
    const SUBSCRIBERS: usize = 100;
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HUB_PUBLISH_RATE", 1_000_000)
            .env("LOCKSTEP_HUB_PUBLISH_BURST", 1_000_000)
            .env("LOCKSTEP_HUB_OUTBOUND_QUEUE", 20_000),
    );
    let mut readers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut c = client(&node, &format!("u{i}"), &["t1"], "").await;
        c.subscribe("sub-0", "/team/t1").await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut last_id = String::new();
            for seq in 0..EVENTS {
                let frame = c
                    .expect_frame()
                    .await
                    .unwrap_or_else(|e| panic!("subscriber {i} at {seq}: {e:#}"));
                let env = envelope(&frame, "sub-0", "/team/t1");
                assert_eq!(env["data"]["seq"], seq, "subscriber {i} out of order");
                let id = env["id"].as_str().unwrap().to_owned();
                assert!(id > last_id, "ids must sort in publish order");
                last_id = id;
            }
            c
        }));
    }
    let mut publisher = client(&node, "backend", &["t1"], "publish").await;
    for seq in 0..EVENTS {
        let receipt = (seq == EVENTS - 1).then_some("last");
        publisher
            .publish(
                "/team/t1",
                "job.progress",
                &format!(r#"{{"seq":{seq}}}"#),
                receipt,
            )
            .await
            .unwrap();
    }
    for reader in readers {
        let mut c = reader.await.unwrap();
        // Nothing more than the 10,000 arrived.
        let extra = tokio::time::timeout(std::time::Duration::from_millis(200), c.next()).await;
        assert!(
            !matches!(extra, Ok(Ok(Incoming::Frame(_)))),
            "unexpected extra frame"
        );
    }
}

/// A client that stops reading is closed with 4008; everyone else keeps receiving everything,
/// and the node's memory does not grow with what the slow client failed to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_others_are_unaffected() {
    const EVENTS: u64 = 8_000;
    // The publisher is held to a rate the reading client easily keeps up with, so only the
    // client that stopped reading falls behind; 8,000 events of 4 KiB (32 MB) overflow the
    // kernel's socket buffers and the queue many times over.
    let node = Lockstep::start_with(
        Options::default()
            .env("LOCKSTEP_HUB_PUBLISH_RATE", 4_000)
            .env("LOCKSTEP_HUB_PUBLISH_BURST", 100)
            .env("LOCKSTEP_HUB_OUTBOUND_QUEUE", 256)
            .env("LOCKSTEP_HUB_WRITE_TIMEOUT", "60s"),
    );
    let padding = "x".repeat(4000);
    let mut slow = client(&node, "slow", &["t1"], "").await;
    slow.subscribe("s", "/team/t1").await.unwrap();
    let mut fast = client(&node, "fast", &["t1"], "").await;
    fast.subscribe("f", "/team/t1").await.unwrap();
    let fast = tokio::spawn(async move {
        for seq in 0..EVENTS {
            let frame = fast.expect_frame().await.unwrap();
            assert_eq!(envelope(&frame, "f", "/team/t1")["data"]["seq"], seq);
        }
    });
    let rss_before = node.rss_kib();
    let mut publisher = client(&node, "backend", &["t1"], "publish").await;
    for seq in 0..EVENTS {
        let receipt = (seq == EVENTS - 1).then_some("last");
        let body = format!(r#"{{"seq":{seq},"pad":"{padding}"}}"#);
        publisher
            .publish("/team/t1", "job.progress", &body, receipt)
            .await
            .unwrap();
    }
    fast.await
        .expect("the fast subscriber got every event in order");
    let growth_kib = node.rss_kib().saturating_sub(rss_before);
    // 32 MB went out; the slow client's backlog is bounded by its queue (256 frames) and one
    // write batch, not by what it missed.
    assert!(growth_kib < 16 * 1024, "RSS grew by {growth_kib} KiB");

    // The slow client now reads: some events, then the 4008 close.
    let mut received = 0;
    let close = loop {
        match slow.next().await.unwrap() {
            Incoming::Frame(f) if f.command == Command::Message => received += 1,
            Incoming::Frame(f) => panic!("unexpected {}", loadtest::client::describe(&f)),
            Incoming::HeartBeat => {}
            Incoming::Closed(close) => break close,
        }
    };
    assert_eq!(close, Some((4008, "slow consumer".to_owned())));
    assert!(
        received < EVENTS,
        "the slow client got everything ({received}); it was not slow"
    );
}

/// The same event reaches user, team and global subscribers with the right ids.
#[tokio::test]
async fn events_reach_every_kind_of_topic() {
    let node = Lockstep::start();
    let mut ana = client(&node, "ana", &["t1"], "").await;
    ana.subscribe("u", "/user/ana").await.unwrap();
    ana.subscribe("t", "/team/t1").await.unwrap();
    ana.subscribe("g", "/global").await.unwrap();
    let mut bob = client(&node, "bob", &["t2"], "").await;
    bob.subscribe("g", "/global").await.unwrap();
    bob.subscribe("t", "/team/t2").await.unwrap();
    let mut backend: StompClient =
        client(&node, "backend", &["t1", "t2"], "publish publish:global").await;
    for (topic, n) in [
        ("/user/ana", 1),
        ("/team/t1", 2),
        ("/team/t2", 3),
        ("/global", 4),
    ] {
        backend
            .publish(
                topic,
                "job.progress",
                &format!(r#"{{"n":{n}}}"#),
                Some(topic),
            )
            .await
            .unwrap();
    }
    for (sub, topic, n) in [
        ("u", "/user/ana", 1),
        ("t", "/team/t1", 2),
        ("g", "/global", 4),
    ] {
        assert_eq!(
            envelope(&ana.expect_frame().await.unwrap(), sub, topic)["data"]["n"],
            n
        );
    }
    for (sub, topic, n) in [("t", "/team/t2", 3), ("g", "/global", 4)] {
        assert_eq!(
            envelope(&bob.expect_frame().await.unwrap(), sub, topic)["data"]["n"],
            n
        );
    }
}
