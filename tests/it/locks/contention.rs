//! Safety under contention: every grant and event recorded, and a pure checker that proves no
//! two grants of an item overlap.

use super::*;

/// The safety checker: a pure function over what clients were told and what was announced.
mod history {
    use std::collections::BTreeMap;

    /// A 200 answer to an acquire or a renewal: the client was told it holds `token` on `item`
    /// until `expires_at` (database times, ms since the epoch).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Promise {
        pub(super) item: String,
        pub(super) token: i64,
        pub(super) holder: String,
        pub(super) acquired_at: i64,
        pub(super) expires_at: i64,
    }

    /// How a grant ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum End {
        Released,
        Expired,
        TakenOver,
    }

    /// A lock event seen on the team topic.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) enum Event {
        Acquired {
            item: String,
            token: i64,
            holder: String,
            acquired_at: i64,
        },
        Ended {
            item: String,
            token: i64,
            holder: String,
            how: End,
            /// `released_at` or `expired_at`.
            at: i64,
        },
    }

    impl Event {
        /// The event's item and its place in the item's history: a grant's `lock.acquired`
        /// comes before its end, and both before the next grant's.
        pub(super) fn version(&self) -> (&str, (i64, u8)) {
            match self {
                Event::Acquired { item, token, .. } => (item, (*token, 0)),
                Event::Ended { item, token, .. } => (item, (*token, 1)),
            }
        }
    }

    /// Counts, to show a run exercised what it should.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub(super) struct Summary {
        pub(super) grants: usize,
        pub(super) released: usize,
        pub(super) expired: usize,
        pub(super) taken_over: usize,
        /// Grants announced whose 200 no client saw (their request's answer was lost).
        pub(super) unseen: usize,
        /// Grants whose end event was superseded by the next grant's.
        pub(super) superseded_ends: usize,
        /// Grants whose `lock.acquired` was superseded by a newer event of the item (its own end
        /// or a later grant's, published first by another node).
        pub(super) superseded_acquires: usize,
    }

    struct Grant<'a> {
        holder: &'a str,
        /// Known from its `lock.acquired` or from a 200; unknown for a grant no client saw whose
        /// announcement was superseded.
        acquired_at: Option<i64>,
        /// Its `lock.acquired` was delivered.
        announced: bool,
        ends: Vec<(End, i64, &'a str)>,
        /// The expiry of the last promise for this grant: the holder may move its expiry
        /// earlier itself (a renewal or re-acquire with a shorter TTL sets now + TTL), so only
        /// its latest promise binds.
        promised_until: Option<i64>,
    }

    /// Checks a finished history (every grant has ended) of one team.
    ///
    /// Lock events are keyed by item and versioned in commit order, and the broker drops an
    /// event published after a newer one of its item (a slow node's, or a sweeper's after its
    /// node died): a subscriber sees a subsequence of each item's history, in order, that ends
    /// with its latest state. So:
    ///
    /// - each item's events arrive in history order (token, then acquired before ended), none
    ///   twice;
    /// - every grant a client was told about (a 200) was announced by a `lock.acquired` with the
    ///   same holder and `acquired_at`, or that announcement was superseded by a newer event of
    ///   the item that did arrive (the grant's own end or a later grant's); an end names the
    ///   grant's holder;
    /// - at most `unanswered` grants were announced that no client saw (requests whose answer
    ///   was lost may have been granted);
    /// - each grant ended at most once, by its holder's release, an expiry or a takeover, no
    ///   earlier than it began; an expiry no earlier than the holder's last promised expiry
    ///   (`promises` are in the order their holder received them). An end may be missing only
    ///   when a later grant of the item was announced; the last grant of each item must end;
    /// - per item, tokens strictly increase with time and grants do not overlap: grant k+1's
    ///   `acquired_at` ≥ grant k's end.
    ///
    /// Returns every violation found.
    pub(super) fn check(
        promises: &[Promise],
        events: &[Event],
        unanswered: usize,
    ) -> Result<Summary, Vec<String>> {
        let mut errors = Vec::new();
        let mut summary = Summary::default();
        // The newest token delivered per item, and the arrival order.
        let mut newest: BTreeMap<&str, (i64, u8)> = BTreeMap::new();
        for event in events {
            let (item, version) = event.version();
            if let Some(previous) = newest.insert(item, version)
                && previous >= version
            {
                errors.push(format!(
                    "item {item}: event {version:?} (token, phase) arrived after {previous:?}"
                ));
                newest.insert(item, previous.max(version));
            }
        }
        let mut grants: BTreeMap<(&str, i64), Grant<'_>> = BTreeMap::new();
        for event in events {
            if let Event::Acquired {
                item,
                token,
                holder,
                acquired_at,
            } = event
            {
                let grant = Grant {
                    holder,
                    acquired_at: Some(*acquired_at),
                    announced: true,
                    ends: Vec::new(),
                    promised_until: None,
                };
                if grants.insert((item, *token), grant).is_some() {
                    errors.push(format!(
                        "item {item}: token {token} announced twice by lock.acquired"
                    ));
                }
            }
        }
        for event in events {
            if let Event::Ended {
                item,
                token,
                holder,
                how,
                at,
            } = event
            {
                let grant = grants.entry((item, *token)).or_insert_with(|| Grant {
                    holder,
                    acquired_at: None,
                    announced: false,
                    ends: Vec::new(),
                    promised_until: None,
                });
                grant.ends.push((*how, *at, holder));
            }
        }
        for p in promises {
            let key = (p.item.as_str(), p.token);
            let grant = grants.entry(key).or_insert_with(|| Grant {
                holder: &p.holder,
                acquired_at: None,
                announced: false,
                ends: Vec::new(),
                promised_until: None,
            });
            let acquired_at = *grant.acquired_at.get_or_insert(p.acquired_at);
            if grant.holder != p.holder || acquired_at != p.acquired_at {
                errors.push(format!(
                    "item {}: token {} told to {} as acquired at {}, announced for {} at {}",
                    p.item, p.token, p.holder, p.acquired_at, grant.holder, acquired_at
                ));
            }
            grant.promised_until = Some(p.expires_at);
        }
        summary.grants = grants.len();
        summary.unseen = grants
            .values()
            .filter(|g| g.promised_until.is_none())
            .count();
        if summary.unseen > unanswered {
            errors.push(format!(
                "{} grants were announced that no client was told about, but only {unanswered} requests went unanswered",
                summary.unseen
            ));
        }
        // Per item, in token order (the map's order), with each grant's end.
        let mut previous: Option<(&str, i64, i64)> = None;
        for ((item, token), grant) in &grants {
            // A later grant of the item was delivered: it says this one is over.
            let followed = newest.get(item).is_some_and(|(newest, _)| newest > token);
            if !grant.announced {
                if grant.ends.is_empty() && !followed {
                    errors.push(format!(
                        "item {item}: {} was granted token {token} (200) but no lock.acquired announced it, nor anything after it",
                        grant.holder
                    ));
                } else {
                    summary.superseded_acquires += 1;
                }
            }
            let end = match grant.ends.as_slice() {
                [] if followed => {
                    summary.superseded_ends += 1;
                    None
                }
                [] => {
                    errors.push(format!("item {item}: token {token} never ended (no event)"));
                    None
                }
                [(how, at, holder)] => {
                    match how {
                        End::Released => summary.released += 1,
                        End::Expired => summary.expired += 1,
                        End::TakenOver => summary.taken_over += 1,
                    }
                    if *holder != grant.holder {
                        errors.push(format!(
                            "item {item}: token {token} held by {} ended as {holder}'s",
                            grant.holder
                        ));
                    }
                    if let Some(acquired_at) = grant.acquired_at
                        && *at < acquired_at
                    {
                        errors.push(format!(
                            "item {item}: token {token} ended at {at}, before it was acquired at {acquired_at}"
                        ));
                    }
                    if let (End::Expired, Some(promised)) = (how, grant.promised_until)
                        && *at < promised
                    {
                        errors.push(format!(
                            "item {item}: token {token} announced expired at {at}, but its holder was promised it until {promised}"
                        ));
                    }
                    Some(*at)
                }
                many => {
                    errors.push(format!(
                        "item {item}: token {token} ended {} times: {many:?}",
                        many.len()
                    ));
                    None
                }
            };
            if let Some((prev_item, prev_token, prev_end)) = previous
                && prev_item == *item
                && let Some(acquired_at) = grant.acquired_at
                && acquired_at < prev_end
            {
                errors.push(format!(
                    "item {item}: overlap: token {token} acquired at {acquired_at} while token {prev_token} lasted until {prev_end}"
                ));
            }
            // Without a known end, compare the next grant with this one's start at least.
            match end.or(grant.acquired_at) {
                Some(at) => previous = Some((item, *token, at)),
                None if previous.is_some_and(|(prev_item, _, _)| prev_item == *item) => {}
                None => previous = None,
            }
        }
        if errors.is_empty() {
            Ok(summary)
        } else {
            Err(errors)
        }
    }
}

/// The checker accepts a clean history and finds each kind of violation in doctored ones, so
/// the contention tests built on it can fail.
#[test]
fn lock_history_checker_finds_violations() {
    use history::{End, Event, Promise, check};
    let promise = |token: i64, holder: &str, acquired_at: i64, expires_at: i64| Promise {
        item: "a".to_owned(),
        token,
        holder: holder.to_owned(),
        acquired_at,
        expires_at,
    };
    let acquired = |token: i64, holder: &str, acquired_at: i64| Event::Acquired {
        item: "a".to_owned(),
        token,
        holder: holder.to_owned(),
        acquired_at,
    };
    let ended = |token: i64, holder: &str, how: End, at: i64| Event::Ended {
        item: "a".to_owned(),
        token,
        holder: holder.to_owned(),
        how,
        at,
    };
    // ana holds token 1 from 1000, renews to 2500, and it expires at 2500; bob takes token 2 at
    // 2500 and releases it at 2700; an admin takes token 3 from carol.
    let promises = vec![
        promise(1, "ana", 1000, 2000),
        promise(1, "ana", 1000, 2500),
        promise(2, "bob", 2500, 4000),
        promise(3, "carol", 2800, 5000),
    ];
    let events = vec![
        acquired(1, "ana", 1000),
        ended(1, "ana", End::Expired, 2500),
        acquired(2, "bob", 2500),
        ended(2, "bob", End::Released, 2700),
        acquired(3, "carol", 2800),
        ended(3, "carol", End::TakenOver, 2900),
    ];
    let summary = check(&promises, &events, 0).expect("a clean history");
    assert_eq!(
        (
            summary.grants,
            summary.released,
            summary.expired,
            summary.taken_over
        ),
        (3, 1, 1, 1)
    );
    let fails = |promises: &[Promise], events: &[Event], unanswered: usize, needle: &str| {
        let errors = check(promises, events, unanswered).expect_err(needle);
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "expected '{needle}' in {errors:?}"
        );
    };
    // Overlap: bob's grant starts while ana's lasts.
    let mut overlapping = events.clone();
    overlapping[2] = acquired(2, "bob", 2400);
    let mut overlapping_promises = promises.clone();
    overlapping_promises[2] = promise(2, "bob", 2400, 4000);
    fails(&overlapping_promises, &overlapping, 0, "overlap");
    // An expiry announced before the latest renewal's expiry.
    let mut early = events.clone();
    early[1] = ended(1, "ana", End::Expired, 2000);
    fails(&promises, &early, 0, "promised it until 2500");
    // But a holder may shorten its own grant: a later renewal with a shorter TTL binds.
    let mut shortened = promises.clone();
    shortened.insert(2, promise(1, "ana", 1000, 2000));
    assert!(check(&shortened, &early, 0).is_ok());
    // A grant announced twice, and one ended twice.
    let mut doubled = events.clone();
    doubled.push(acquired(2, "bob", 2500));
    fails(&promises, &doubled, 0, "announced twice");
    let mut ended_twice = events.clone();
    ended_twice.push(ended(1, "ana", End::Expired, 2500));
    fails(&promises, &ended_twice, 0, "ended 2 times");
    // A 200 grant nobody announced, with nothing newer of its item either; a grant nobody saw
    // beyond the unanswered requests.
    fails(&promises, &events[..4], 0, "no lock.acquired announced it");
    fails(&promises[..2], &events, 0, "no client was told about");
    assert!(check(&promises[..2], &events, 2).is_ok());
    // An announcement superseded by a newer event of the item that another node published
    // first: by the grant's own end, or by the next grant's.
    let mut own_end = events.clone();
    own_end.remove(4);
    let summary = check(&promises, &own_end, 0).expect("acquire superseded by its end");
    assert_eq!(summary.superseded_acquires, 1);
    let mut next_grant = events.clone();
    next_grant.drain(2..4);
    let summary = check(&promises, &next_grant, 0).expect("grant superseded by the next");
    assert_eq!(
        (summary.superseded_acquires, summary.superseded_ends),
        (1, 1)
    );
    // Its end must still name its holder.
    let mut wrong_holder = own_end.clone();
    wrong_holder[4] = ended(3, "dan", End::TakenOver, 2900);
    fails(&promises, &wrong_holder, 0, "told to carol");
    // An item's events never arrive out of history order.
    let mut swapped = events.clone();
    swapped.swap(0, 1);
    fails(&promises, &swapped, 0, "arrived after");
    let mut late = events.clone();
    late.swap(3, 4);
    fails(&promises, &late, 0, "arrived after");
    // A grant that never ended, and a token reused out of time order.
    fails(&promises, &events[..5], 0, "never ended");
    // An end superseded by the next grant's announcement is fine; the last one must end.
    let mut superseded = events;
    superseded.remove(3);
    assert_eq!(
        check(&promises, &superseded, 0)
            .expect("superseded end")
            .superseded_ends,
        1
    );
    let reordered = vec![
        acquired(1, "ana", 3000),
        ended(1, "ana", End::Released, 3100),
        acquired(2, "bob", 1000),
        ended(2, "bob", End::Released, 1100),
    ];
    fails(&[], &reordered, 2, "overlap");
}

/// What the clients of a contention run saw.
#[derive(Debug, Default)]
struct Tally {
    promises: Vec<history::Promise>,
    /// Acquire requests without a definitive answer (transport error, 5xx): they may have been
    /// granted without anyone seeing it.
    unanswered_acquires: usize,
    /// Answers by (request kind, status).
    statuses: BTreeMap<(&'static str, u16), usize>,
    /// Answers no correct server gives here.
    unexpected: Vec<String>,
}

impl Tally {
    fn promise(&mut self, body: &Value) -> i64 {
        let token = token_of(body);
        self.promises.push(history::Promise {
            item: body["item"].as_str().expect("item").to_owned(),
            token,
            holder: body["holder"].as_str().expect("holder").to_owned(),
            acquired_at: ms(&body["acquired_at"]),
            expires_at: ms(&body["expires_at"]),
        });
        token
    }

    /// Counts an answer; returns its status, or `None` when there was none.
    fn answer(
        &mut self,
        kind: &'static str,
        answer: &Result<(u16, Value), reqwest::Error>,
        expected: &[u16],
    ) -> Option<u16> {
        match answer {
            Ok((status, body)) => {
                *self.statuses.entry((kind, *status)).or_default() += 1;
                if !expected.contains(status) {
                    self.unexpected.push(format!("{kind}: {status} {body}"));
                }
                Some(*status)
            }
            Err(err) => {
                *self.statuses.entry((kind, 0)).or_default() += 1;
                self.unexpected.push(format!("{kind}: {err}"));
                None
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.promises.extend(other.promises);
        self.unanswered_acquires += other.unanswered_acquires;
        for (k, n) in other.statuses {
            *self.statuses.entry(k).or_default() += n;
        }
        self.unexpected.extend(other.unexpected);
    }
}

const CONTENTION_ITEMS: usize = 20;
const CONTENTION_CLIENTS: usize = 200;

/// One annotator until `deadline`: takes a random item on a random node with a 1–3 s TTL,
/// works on it (renewing, now and then re-acquiring, sometimes too late), then releases it or
/// walks away and lets it expire.
async fn annotator(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    team: String,
    user: String,
    token: String,
    deadline: Instant,
    seed: u64,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let path = lock_path(
            &team,
            &format!("i{}", rng.random_range(0..CONTENTION_ITEMS)),
        );
        let mut base = &bases[rng.random_range(0..bases.len())];
        let mut ttl: u64 = rng.random_range(1000..=3000);
        let answer = request(
            &http,
            base,
            "POST",
            &path,
            &token,
            Some(json!({"ttl_ms": ttl})),
        )
        .await;
        let mut held = match tally.answer("acquire", &answer, &[200, 409]) {
            Some(200) => {
                let body = &answer.as_ref().expect("answered").1;
                assert_eq!(body["holder"], user.as_str(), "{body}");
                tally.promise(body)
            }
            Some(409) => {
                // Busy: think a moment before trying another item (keeps the run from being
                // only 409s; not a synchronization).
                let pause = rng.random_range(20..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            _ => {
                tally.unanswered_acquires += 1;
                continue;
            }
        };
        let mut lost = false;
        for _ in 0..rng.random_range(0..=3) {
            // Simulated work between renewals; one time in seven past the TTL, so the renewal
            // finds the grant expired (410) or taken by someone else (409).
            let work = if rng.random_bool(1.0 / 7.0) {
                ttl * 13 / 10
            } else {
                rng.random_range(100..ttl * 6 / 10)
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(work).min(left)).await;
            base = &bases[rng.random_range(0..bases.len())];
            ttl = rng.random_range(1000..=3000);
            let reacquire = rng.random_bool(0.2);
            let answer = if reacquire {
                request(
                    &http,
                    base,
                    "POST",
                    &path,
                    &token,
                    Some(json!({"ttl_ms": ttl})),
                )
                .await
            } else {
                request(
                    &http,
                    base,
                    "PUT",
                    &path,
                    &token,
                    Some(json!({"token": held, "ttl_ms": ttl})),
                )
                .await
            };
            let (kind, expected): (&'static str, &[u16]) = if reacquire {
                ("re-acquire", &[200, 409])
            } else {
                ("renew", &[200, 409, 410])
            };
            match tally.answer(kind, &answer, expected) {
                Some(200) => {
                    let body = &answer.as_ref().expect("answered").1;
                    // A re-acquire after the grant expired unnoticed is a new grant (a new
                    // token); otherwise the same token with a later expiry.
                    held = tally.promise(body);
                }
                status => {
                    if reacquire && !matches!(status, Some(409)) {
                        tally.unanswered_acquires += 1;
                    }
                    lost = true;
                    break;
                }
            }
        }
        if !lost && Instant::now() < deadline && rng.random_bool(0.65) {
            base = &bases[rng.random_range(0..bases.len())];
            let answer = request(
                &http,
                base,
                "DELETE",
                &path,
                &token,
                Some(json!({"token": held})),
            )
            .await;
            // 410/409: the grant expired or was taken over while we worked.
            tally.answer("release", &answer, &[204, 409, 410]);
        }
        // Otherwise walk away: the lock expires by its TTL.
    }
    tally
}

/// A team admin who, until `deadline`, now and then takes over a random item.
async fn admin(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    team: String,
    token: String,
    deadline: Instant,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(7);
    let mut tally = Tally::default();
    loop {
        let pause = Duration::from_millis(rng.random_range(150..400));
        let left = deadline.saturating_duration_since(Instant::now());
        if left <= pause {
            return tally;
        }
        tokio::time::sleep(pause).await;
        let path = format!(
            "{}?force=true",
            lock_path(
                &team,
                &format!("i{}", rng.random_range(0..CONTENTION_ITEMS))
            )
        );
        let base = &bases[rng.random_range(0..bases.len())];
        let answer = request(&http, base, "DELETE", &path, &token, None).await;
        tally.answer("takeover", &answer, &[200, 404]);
    }
}

/// A bot until `deadline`: locks two random items in one batch on a random node,
/// holds them a moment and releases them in one batch (those still its own are released).
async fn bot(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    team: String,
    token: String,
    deadline: Instant,
    seed: u64,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let path = format!("/api/v1/teams/{team}/locks/batch");
    while Instant::now() < deadline {
        let mut items: Vec<String> = (0..2)
            .map(|_| format!("i{}", rng.random_range(0..CONTENTION_ITEMS)))
            .collect();
        items.sort();
        items.dedup();
        let base = &bases[rng.random_range(0..bases.len())];
        let ttl: u64 = rng.random_range(1000..=3000);
        let body = json!({"items": items, "ttl_ms": ttl});
        let answer = request(&http, base, "POST", &path, &token, Some(body)).await;
        match tally.answer("batch acquire", &answer, &[200, 409]) {
            Some(200) => {}
            Some(_) => {
                let pause = rng.random_range(20..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            None => {
                tally.unanswered_acquires += items.len();
                continue;
            }
        }
        let granted = answer.expect("answered").1;
        let held: Vec<Value> = granted["locks"]
            .as_array()
            .expect("locks")
            .iter()
            .map(|lock| json!({"item": lock["item"], "token": tally.promise(lock)}))
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        let work = Duration::from_millis(rng.random_range(100..ttl * 8 / 10));
        tokio::time::sleep(work.min(left)).await;
        let base = &bases[rng.random_range(0..bases.len())];
        let answer = request(
            &http,
            base,
            "DELETE",
            &path,
            &token,
            Some(json!({"items": held})),
        )
        .await;
        tally.answer("batch release", &answer, &[200]);
    }
    tally
}

/// A browser tab until `deadline`: connects to a random node, locks a random item bound to its
/// WebSocket session, and is closed while it holds the lock, so the lock is released after the
/// session grace (unless it expires or is taken over first).
async fn tab(
    http: reqwest::Client,
    nodes: Arc<Vec<(String, String)>>,
    team: String,
    token: String,
    deadline: Instant,
    seed: u64,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let (base, ws) = &nodes[rng.random_range(0..nodes.len())];
        let (socket, connected) = match StompClient::connect(ws, &token).await {
            Ok(open) => open,
            Err(err) => {
                tally.unexpected.push(format!("tab: connect: {err:#}"));
                continue;
            }
        };
        let session = connected.header("session").expect("session").to_owned();
        let path = lock_path(
            &team,
            &format!("i{}", rng.random_range(0..CONTENTION_ITEMS)),
        );
        let body = json!({"session": session, "ttl_ms": 3000});
        let answer = request(&http, base, "POST", &path, &token, Some(body)).await;
        match tally.answer("tab acquire", &answer, &[200, 409]) {
            Some(200) => {
                tally.promise(&answer.expect("answered").1);
                let left = deadline.saturating_duration_since(Instant::now());
                let open = Duration::from_millis(rng.random_range(50..300));
                tokio::time::sleep(open.min(left)).await;
            }
            Some(_) => {
                let pause = rng.random_range(20..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            None => tally.unanswered_acquires += 1,
        }
        // The tab closes: its socket goes.
        drop(socket);
    }
    tally
}

/// Events of `/team/{team}` collected by a background reader.
#[derive(Debug, Default)]
struct Collected {
    events: Vec<history::Event>,
    /// `lock.released` events of grants whose session closed.
    session_closed: usize,
    /// Why the reader stopped, if it did (it must not).
    stopped: Option<String>,
}

fn parse_event(event_type: &str, data: &Value) -> history::Event {
    let item = data["item"].as_str().expect("item").to_owned();
    let token = token_of(data);
    let holder = data["holder"].as_str().expect("holder").to_owned();
    let ended = |how, at: &Value| history::Event::Ended {
        item: item.clone(),
        token,
        holder: holder.clone(),
        how,
        at: ms(at),
    };
    match event_type {
        "lock.acquired" => history::Event::Acquired {
            acquired_at: ms(&data["acquired_at"]),
            item,
            token,
            holder,
        },
        "lock.released" => ended(history::End::Released, &data["released_at"]),
        "lock.expired" => ended(history::End::Expired, &data["expired_at"]),
        "lock.taken_over" => ended(history::End::TakenOver, &data["released_at"]),
        other => panic!("unexpected event type {other}: {data}"),
    }
}

fn collect(
    mut client: StompClient,
    destination: String,
) -> (Arc<Mutex<Collected>>, tokio::task::JoinHandle<()>) {
    let collected = Arc::new(Mutex::new(Collected::default()));
    let sink = collected.clone();
    let task = tokio::spawn(async move {
        loop {
            let stop = match client.next().await {
                Ok(Incoming::Frame(frame)) => {
                    let envelope = envelope(&frame, "s", &destination);
                    let event =
                        parse_event(envelope["type"].as_str().expect("type"), &envelope["data"]);
                    let mut sink = sink.lock();
                    sink.events.push(event);
                    if envelope["data"]["reason"] == "session_closed" {
                        sink.session_closed += 1;
                    }
                    continue;
                }
                Ok(Incoming::HeartBeat) => continue,
                Ok(Incoming::Closed(close)) => format!("closed: {close:?}"),
                Err(err) => format!("{err:#}"),
            };
            sink.lock().stopped = Some(stop);
            return;
        }
    });
    (collected, task)
}

/// Items whose history has not fully arrived: their newest event is not the end of a grant at
/// least as new as every grant a client was told about. (Events superseded by newer ones of
/// their item never arrive, so waiting for each grant's own events could not finish.)
fn outstanding(promises: &[history::Promise], events: &[history::Event]) -> usize {
    let mut newest: BTreeMap<&str, (i64, u8)> = BTreeMap::new();
    for event in events {
        let (item, version) = event.version();
        let entry = newest.entry(item).or_insert(version);
        *entry = (*entry).max(version);
    }
    let mut promised: BTreeMap<&str, i64> = BTreeMap::new();
    for p in promises {
        let entry = promised.entry(&p.item).or_insert(p.token);
        *entry = (*entry).max(p.token);
    }
    let unsettled = newest
        .iter()
        .filter(|(item, (token, phase))| {
            *phase == 0 || promised.get(*item).is_some_and(|p| p > token)
        })
        .count();
    unsettled
        + promised
            .keys()
            .filter(|item| !newest.contains_key(*item))
            .count()
}

/// The contention tests take most of the two cores: they run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Who else takes part in a contention run beside the annotators and the admin.
#[derive(Debug, Clone, Copy, Default)]
struct Mix {
    /// Annotators taking one item at a time.
    annotators: usize,
    /// Clients locking and releasing in batches.
    bots: usize,
    /// Browser tabs whose session-bound locks are released when they close.
    tabs: usize,
}

/// `mix.annotators` annotators (distinct users, 200 in the plain runs), an admin and the
/// mix's bots and tabs hammer 20 items of one team through `nodes` for `run`; every grant and
/// renewal is recorded from the answers, every event from a subscriber of the team topic, and
/// [`history::check`] must find no violation.
async fn contention(
    nodes: &[Lockstep],
    outbox: Option<(&Postgres, &str)>,
    run: Duration,
    mix: Mix,
) {
    let team = "crowd";
    let bases: Arc<Vec<String>> = Arc::new(nodes.iter().map(Lockstep::http).collect());
    let subscriber = watcher(&nodes[0], "watch", &[team], &format!("/team/{team}")).await;
    let (collected, reader) = collect(subscriber, format!("/team/{team}"));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONTENTION_CLIENTS)
        .build()
        .expect("HTTP client");
    let started = Instant::now();
    let deadline = started + run;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..mix.annotators {
        let user = format!("u{i}");
        let token = nodes[0].token(&user, &[team], "locks");
        tasks.spawn(annotator(
            http.clone(),
            bases.clone(),
            team.to_owned(),
            user,
            token,
            deadline,
            i as u64,
        ));
    }
    tasks.spawn(admin(
        http.clone(),
        bases.clone(),
        team.to_owned(),
        admin_token(&nodes[0], "lead", team),
        deadline,
    ));
    for i in 0..mix.bots {
        let token = nodes[0].token(&format!("bot{i}"), &[team], "locks");
        tasks.spawn(bot(
            http.clone(),
            bases.clone(),
            team.to_owned(),
            token,
            deadline,
            1000 + i as u64,
        ));
    }
    let sockets: Arc<Vec<(String, String)>> =
        Arc::new(nodes.iter().map(|n| (n.http(), n.ws())).collect());
    for i in 0..mix.tabs {
        let token = nodes[0].token(&format!("tab{i}"), &[team], "locks");
        tasks.spawn(tab(
            http.clone(),
            sockets.clone(),
            team.to_owned(),
            token,
            deadline,
            2000 + i as u64,
        ));
    }
    let mut tally = Tally::default();
    // Each task stops at the deadline; its last request is bounded by the client timeout.
    let joined = tokio::time::timeout(run + Duration::from_secs(30), async {
        while let Some(t) = tasks.join_next().await {
            tally.merge(t.expect("client task"));
        }
    })
    .await;
    assert!(joined.is_ok(), "client tasks did not finish");
    let ran = started.elapsed();

    // Let every grant end (TTLs are at most 3 s) and every event arrive.
    let lead = admin_token(&nodes[0], "lead", team);
    let list = format!("/api/v1/teams/{team}/locks");
    let drain = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, body) = call(&nodes[0], "GET", &list, &lead, None).await;
        assert_eq!(s, 200, "{body}");
        if body["locks"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < drain, "locks still live: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle = Instant::now() + Duration::from_secs(15);
    while outstanding(&tally.promises, &collected.lock().events) > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some((pg, database)) = outbox {
        // Once the outbox is empty no sweeper can publish anything again.
        wait_until(Duration::from_secs(15), "the outbox drains", || {
            outbox_rows(pg, database) == 0
        })
        .await;
    }
    // In-flight deliveries (a late duplicate would be caught by the checker).
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    let collected = std::mem::take(&mut *collected.lock());
    assert_eq!(collected.stopped, None, "the team subscriber stopped");

    let result = history::check(
        &tally.promises,
        &collected.events,
        tally.unanswered_acquires,
    );
    eprintln!(
        "contention on {} node(s): {ran:?}, {} answers {:?}, {} events, {:?}",
        nodes.len(),
        tally.statuses.values().sum::<usize>(),
        tally.statuses,
        collected.events.len(),
        result.as_ref().map_err(Vec::len),
    );
    let summary = result.unwrap_or_else(|errors| {
        panic!(
            "{} violations, first ones:\n{}",
            errors.len(),
            errors
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert!(
        tally.unexpected.is_empty(),
        "{} unexpected answers, first ones: {:#?}",
        tally.unexpected.len(),
        &tally.unexpected[..tally.unexpected.len().min(20)]
    );
    // The run exercised contention and every way a grant ends.
    let refused = tally.statuses.get(&("acquire", 409)).copied().unwrap_or(0);
    let lost = [409, 410]
        .iter()
        .filter_map(|s| tally.statuses.get(&("renew", *s)))
        .sum::<usize>();
    assert!(summary.grants >= 100, "{summary:?}");
    assert!(
        refused >= 200,
        "only {refused} acquires found the item held"
    );
    assert!(lost > 0, "no renewal found its grant over or taken");
    assert!(
        summary.released > 0 && summary.expired > 0 && summary.taken_over > 0,
        "{summary:?}"
    );
    if mix.bots > 0 {
        let batches = tally.statuses.get(&("batch acquire", 200)).copied();
        assert!(batches.unwrap_or(0) > 0, "no batch was granted");
    }
    if mix.tabs > 0 {
        assert!(
            collected.session_closed > 0,
            "no lock was released by its session's end: {summary:?}"
        );
    }
    // The checker allows what the broker's versions allow (a late event dropped behind a
    // newer one of its item), but every decision publishes its item's earlier outbox rows
    // first, so none is: a subscriber sees every grant and every end.
    assert_eq!(
        (summary.superseded_acquires, summary.superseded_ends),
        (0, 0),
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_is_safe_on_three_postgres_nodes() {
    let _heavy = HEAVY.lock().await;
    let pg = Postgres::start();
    let url = pg.database("contention");
    let redis = RedisServer::start();
    let nodes = cluster(3, &url, &redis, &[]).await;
    contention(
        &nodes,
        Some((&pg, "contention")),
        Duration::from_secs(10),
        Mix {
            annotators: CONTENTION_CLIENTS,
            ..Mix::default()
        },
    )
    .await;
}

/// Grace for session-bound locks in the mixed runs: shorter than the tabs' 3 s TTL, so closed
/// tabs' locks end by their session's end.
const MIXED: &[(&str, &str)] = &[("LOCKSTEP_LOCKS_SESSION_GRACE", "500ms")];

/// The contention run with bots locking in batches and tabs closing while they hold
/// session-bound locks, beside the annotators and the admin's takeovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_contention_is_safe_on_three_postgres_nodes() {
    let _heavy = HEAVY.lock().await;
    let pg = Postgres::start();
    let url = pg.database("mixed");
    let redis = RedisServer::start();
    let nodes = cluster(3, &url, &redis, MIXED).await;
    let mix = Mix {
        annotators: 20,
        bots: 8,
        tabs: 8,
    };
    contention(&nodes, Some((&pg, "mixed")), Duration::from_secs(10), mix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_contention_is_safe_on_sqlite() {
    let _heavy = HEAVY.lock().await;
    let node = node(None, MIXED).await;
    let mix = Mix {
        annotators: 20,
        bots: 8,
        tabs: 8,
    };
    contention(
        std::slice::from_ref(&node),
        None,
        Duration::from_secs(10),
        mix,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_is_safe_on_sqlite() {
    let _heavy = HEAVY.lock().await;
    let node = node(None, &[]).await;
    contention(
        std::slice::from_ref(&node),
        None,
        Duration::from_secs(10),
        Mix {
            annotators: CONTENTION_CLIENTS,
            ..Mix::default()
        },
    )
    .await;
}
