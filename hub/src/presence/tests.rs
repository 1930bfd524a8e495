use super::*;

fn entry(user: &str, connections: u32) -> Entry {
    Entry {
        user: user.into(),
        connections,
        since_ms: 1_000,
    }
}

fn changes(list: &[Change]) -> Vec<(&str, bool)> {
    list.iter().map(|c| (&*c.user, c.joined)).collect()
}

async fn update(
    store: &MemoryPresence,
    node: &str,
    upserts: &[Entry],
    removes: &[&str],
    ttl: Duration,
) -> Vec<Change> {
    let removes: Vec<Arc<str>> = removes.iter().map(|u| Arc::from(*u)).collect();
    store
        .update("/team/t1", node, upserts, &removes, ttl)
        .await
        .unwrap()
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn users_join_with_their_first_node_and_leave_with_their_last() {
    let store = MemoryPresence::new();
    let joined = update(&store, "A", &[entry("ana", 1)], &[], LONG).await;
    assert_eq!(changes(&joined), [("ana", true)]);
    // Ana on a second node, and a refresh of node A: no change.
    assert!(
        update(&store, "B", &[entry("ana", 2)], &[], LONG)
            .await
            .is_empty()
    );
    assert!(
        update(&store, "A", &[entry("ana", 1)], &[], LONG)
            .await
            .is_empty()
    );
    let listing = store.list("/team/t1", 10).await.unwrap();
    assert_eq!(listing.count, 1);
    let members = listing.members.unwrap();
    assert_eq!((&*members[0].user, members[0].connections), ("ana", 3));
    // She leaves node A: still on B.
    assert!(update(&store, "A", &[], &["ana"], LONG).await.is_empty());
    let left = update(&store, "B", &[], &["ana"], LONG).await;
    assert_eq!(changes(&left), [("ana", false)]);
    assert!(left[0].version > joined[0].version);
    // Removing what is not there changes nothing.
    assert!(update(&store, "B", &[], &["ana"], LONG).await.is_empty());
    assert_eq!(store.list("/team/t1", 10).await.unwrap().count, 0);
    assert!(store.topics.is_empty(), "an empty topic is forgotten");
}

#[tokio::test]
async fn the_first_user_in_occupies_a_topic_and_the_last_one_out_vacates_it() {
    let store = MemoryPresence::new();
    let occupancy = |list: &[Change]| -> Vec<(String, u64, Option<Occupancy>)> {
        list.iter()
            .map(|c| (c.user.to_string(), c.present, c.occupancy()))
            .collect()
    };
    let first = update(&store, "A", &[entry("ana", 1), entry("bo", 1)], &[], LONG).await;
    assert_eq!(
        occupancy(&first),
        [
            ("ana".to_owned(), 1, Some(Occupancy::Occupied)),
            ("bo".to_owned(), 2, None)
        ]
    );
    // Ana on a second node changes nothing; Bo leaving leaves Ana.
    assert!(
        update(&store, "B", &[entry("ana", 1)], &[], LONG)
            .await
            .is_empty()
    );
    let bo = update(&store, "A", &[], &["bo"], LONG).await;
    assert_eq!(occupancy(&bo), [("bo".to_owned(), 1, None)]);
    assert!(update(&store, "A", &[], &["ana"], LONG).await.is_empty());
    let last = update(&store, "B", &[], &["ana"], LONG).await;
    assert_eq!(
        occupancy(&last),
        [("ana".to_owned(), 0, Some(Occupancy::Vacated))]
    );
    // One update with a join and the other user's leave: joins are applied first, so the
    // topic never looks empty (no vacated-then-occupied pair for a handover).
    update(&store, "A", &[entry("cy", 1)], &[], LONG).await;
    let swap = update(&store, "A", &[entry("di", 1)], &["cy"], LONG).await;
    assert_eq!(
        occupancy(&swap),
        [("di".to_owned(), 2, None), ("cy".to_owned(), 1, None)]
    );
}

#[tokio::test]
async fn a_dead_nodes_entries_expire_and_the_next_update_sweeps_them_once() {
    let store = MemoryPresence::new();
    update(
        &store,
        "dead",
        &[entry("ana", 1), entry("bo", 1)],
        &[],
        Duration::from_millis(200),
    )
    .await;
    // Bo is also on a live node. (Within the dead node's TTL, however loaded the machine: an
    // update after it would already sweep Ana.)
    update(&store, "live", &[entry("bo", 1)], &[], LONG).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Expired entries are not listed even before they are swept.
    let listing = store.list("/team/t1", 10).await.unwrap();
    let users: Vec<_> = listing
        .members
        .unwrap()
        .iter()
        .map(|m| m.user.clone())
        .collect();
    assert_eq!(users, [Arc::from("bo")]);
    // The live node's next refresh sweeps them: Ana left, Bo did not.
    let swept = update(&store, "live", &[entry("bo", 1)], &[], LONG).await;
    assert_eq!(changes(&swept), [("ana", false)]);
    assert!(
        update(&store, "live", &[entry("bo", 1)], &[], LONG)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn an_entry_without_connections_only_keeps_an_existing_entry_alive() {
    let store = MemoryPresence::new();
    let short = Duration::from_millis(20);
    update(&store, "A", &[entry("ana", 2)], &[], short).await;
    // Ana's last connection on A is gone, her leave pending: A keeps her entry alive. Bo has
    // no entry: keeping it alive creates nothing.
    let kept = update(&store, "A", &[entry("ana", 0), entry("bo", 0)], &[], LONG).await;
    assert!(kept.is_empty(), "{kept:?}");
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        update(&store, "B", &[entry("carol", 1)], &[], LONG)
            .await
            .iter()
            .all(|c| &*c.user == "carol"),
        "ana's entry outlived its first expiry"
    );
    let members = store.list("/team/t1", 10).await.unwrap().members.unwrap();
    let listed: Vec<_> = members.iter().map(|m| (&*m.user, m.connections)).collect();
    assert_eq!(listed, [("ana", 2), ("carol", 1)], "details unchanged");
    let left = update(&store, "A", &[], &["ana"], LONG).await;
    assert_eq!(changes(&left), [("ana", false)]);
}

#[tokio::test]
async fn above_the_maximum_only_the_count_is_listed() {
    let store = MemoryPresence::new();
    let many: Vec<Entry> = (0..5).map(|i| entry(&format!("u{i}"), 1)).collect();
    assert_eq!(update(&store, "A", &many, &[], LONG).await.len(), 5);
    let listing = store.list("/team/t1", 4).await.unwrap();
    assert_eq!((listing.count, listing.members), (5, None));
    let listed = store.list("/team/t1", 5).await.unwrap().members.unwrap();
    let users: Vec<_> = listed.iter().map(|m| &*m.user).collect();
    assert_eq!(users, ["u0", "u1", "u2", "u3", "u4"], "sorted by user");
}

#[test]
fn versions_grow_with_every_change_and_with_time() {
    let v = next_version(0, 1_000);
    assert!(next_version(v, 1_000) > v, "the same millisecond");
    assert!(next_version(v, 999) > v, "a clock that went back");
    assert!(next_version(v + 10_000, 1_000) > v + 10_000);
    assert!(next_version(0, 1_001) > next_version(next_version(0, 1_000), 1_000));
}

/// (topic, user) → (connections, since).
type Memberships = HashMap<(Arc<str>, Arc<str>), (u32, SystemTime)>;

/// A node whose membership the test sets, recording what the tracker publishes.
#[derive(Default)]
struct FakeNode {
    members: parking_lot::Mutex<Memberships>,
    published: parking_lot::Mutex<Vec<(String, Arc<str>, bool)>>,
    notify: Notify,
}

impl FakeNode {
    fn set(&self, topic: &str, user: &str, connections: u32) {
        let mut members = self.members.lock();
        if connections == 0 {
            members.remove(&(topic.into(), user.into()));
        } else {
            members.insert(
                (topic.into(), user.into()),
                (connections, SystemTime::now()),
            );
        }
    }

    async fn next(&self) -> (String, Arc<str>, bool) {
        loop {
            let notified = self.notify.notified();
            if let Some(first) = {
                let mut published = self.published.lock();
                (!published.is_empty()).then(|| published.remove(0))
            } {
                return first;
            }
            notified.await;
        }
    }
}

impl Node for FakeNode {
    fn member(&self, topic: &str, user: &str) -> Option<(u32, SystemTime)> {
        self.members
            .lock()
            .get(&(topic.into(), user.into()))
            .copied()
    }

    fn members(&self) -> Vec<(Arc<str>, Vec<Member>)> {
        let mut by_topic: HashMap<Arc<str>, Vec<Member>> = HashMap::new();
        for ((topic, user), (connections, since)) in self.members.lock().iter() {
            by_topic.entry(topic.clone()).or_default().push(Member {
                user: user.clone(),
                connections: *connections,
                since: *since,
            });
        }
        by_topic.into_iter().collect()
    }

    fn publish(&self, topic: &str, change: &Change) -> BoxFuture<'static, Result<(), String>> {
        self.published
            .lock()
            .push((topic.to_owned(), change.user.clone(), change.joined));
        self.notify.notify_waiters();
        Box::pin(std::future::ready(Ok(())))
    }

    fn observe(&self, _topic: &str, _change: &Change) {}
}

#[tokio::test(start_paused = true)]
async fn a_reload_within_the_leave_delay_is_silent_and_a_close_leaves_after_it() {
    let config = PresenceConfig {
        leave_delay: Duration::from_secs(5),
        ..PresenceConfig::default()
    };
    let tracker = Arc::new(Tracker::new(config, "A", Arc::new(MemoryPresence::new())));
    let node = Arc::new(FakeNode::default());
    let stop = CancellationToken::new();
    tracker.spawn(node.clone(), stop.clone());
    let (topic, ana): (Arc<str>, Arc<str>) = ("/team/t1/items/i1".into(), "ana".into());

    node.set(&topic, &ana, 1);
    tracker.touch(&topic, &ana);
    assert_eq!(node.next().await, (topic.to_string(), ana.clone(), true));

    // A reload: the connection goes, another comes 2 s later.
    node.set(&topic, &ana, 0);
    tracker.touch(&topic, &ana);
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.set(&topic, &ana, 1);
    tracker.touch(&topic, &ana);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(node.published.lock().is_empty(), "a reload is silent");

    // The tab closes: one leave, after the delay and not before.
    node.set(&topic, &ana, 0);
    tracker.touch(&topic, &ana);
    let closed = tokio::time::Instant::now();
    assert_eq!(node.next().await, (topic.to_string(), ana.clone(), false));
    let waited = closed.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // User topics have no presence.
    tracker.touch(&"/user/ana".into(), &ana);
    assert!(tracker.dirty.lock().is_empty());
    stop.cancel();
}

/// A pending leave outlasting a refresh keeps its entry alive, or the entry (which lives
/// `timeout - refresh`) could expire and be swept as a leave before the delay is over.
#[tokio::test(start_paused = true)]
async fn a_refresh_keeps_the_entries_of_pending_leaves_alive() {
    let config = PresenceConfig {
        leave_delay: Duration::from_secs(2),
        timeout: Duration::from_secs(3),
        ..PresenceConfig::default()
    };
    let store = Arc::new(CountingStore::default());
    let tracker = Arc::new(Tracker::new(config, "A", store.clone()));
    let node = Arc::new(FakeNode::default());
    let stop = CancellationToken::new();
    tracker.spawn(node.clone(), stop.clone());
    let (topic, ana): (Arc<str>, Arc<str>) = ("/team/t1".into(), "ana".into());
    node.set(&topic, &ana, 1);
    tracker.touch(&topic, &ana);
    assert!(node.next().await.2);
    node.set(&topic, &ana, 0);
    tracker.touch(&topic, &ana);
    // The refresh (every second) comes within the 2 s delay.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        store.keep_alives.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(!node.next().await.2, "then the leave");
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn changes_within_the_window_go_out_together() {
    let store = Arc::new(CountingStore::default());
    let tracker = Arc::new(Tracker::new(PresenceConfig::default(), "A", store.clone()));
    let node = Arc::new(FakeNode::default());
    let stop = CancellationToken::new();
    tracker.spawn(node.clone(), stop.clone());
    let topic: Arc<str> = "/team/t1".into();
    for i in 0..2000 {
        let user: Arc<str> = format!("u{i}").into();
        node.set(&topic, &user, 1);
        tracker.touch(&topic, &user);
    }
    for _ in 0..2000 {
        node.next().await;
    }
    // 2,000 joins in one window: four updates of 500 entries, not 2,000.
    assert_eq!(store.updates.load(std::sync::atomic::Ordering::Relaxed), 4);
    stop.cancel();
}

/// A [`MemoryPresence`] that counts its updates.
#[derive(Debug, Default)]
struct CountingStore {
    inner: MemoryPresence,
    updates: std::sync::atomic::AtomicUsize,
    /// Entries sent without connections (keep-alives of pending leaves).
    keep_alives: std::sync::atomic::AtomicUsize,
}

impl PresenceStore for CountingStore {
    fn update<'a>(
        &'a self,
        topic: &'a str,
        node: &'a str,
        upserts: &'a [Entry],
        removes: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<Change>, BrokerError>> {
        self.updates
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.keep_alives.fetch_add(
            upserts.iter().filter(|e| e.connections == 0).count(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.inner.update(topic, node, upserts, removes, ttl)
    }

    fn list<'a>(
        &'a self,
        topic: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, BrokerError>> {
        self.inner.list(topic, max)
    }
}
