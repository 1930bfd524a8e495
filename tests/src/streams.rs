//! The stream checker (DESIGN §12): given what one subscriber saw of one topic across its
//! (re)subscriptions, proves it never missed an event silently.
//!
//! Rules, per subscriber and topic:
//! - each (epoch, offset) is seen at most once, over all its subscriptions;
//! - within a subscription, events come in increasing offset order without gaps: each event is
//!   the one after the position the subscription (or the last reset) stated, or after the
//!   previous event, except for offsets a conflated event (`x-conflated:n`) says it replaced.
//!   The replacement takes the newest place in the send queue, so it may come a few events
//!   after the gap it explains: skipped offsets are a debt that later `x-conflated` counts
//!   pay, never overpay, and that is paid in full by the end. Only a connection that dropped
//!   while a keyed event was in its stream may end in debt (the replacement was still queued;
//!   a resume from the last offset seen gets it again);
//! - a snapshot's state events (`x-snapshot:true`) come before the stream continues, in offset
//!   order, at or below the position the subscription stated;
//! - a resume from `(n, e)` answered `x-recovered:true` states exactly that position, so
//!   nothing between the old subscription and the new one is missing;
//! - anything else is said explicitly: `x-recovered:false` or `lockstep.reset`, after which
//!   delivery continues from the position stated.
//!
//! Pure logic with unit tests against crafted violations, like the lock checker.

use std::collections::{BTreeMap, BTreeSet};

/// What a subscriber saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// It sent `SUBSCRIBE`, resuming after `(offset, epoch)` (`None`: `next` or no header).
    Subscribe { resume: Option<(u64, String)> },
    /// `lockstep.subscribed`.
    Subscribed {
        recovered: bool,
        offset: u64,
        epoch: String,
    },
    /// An event; `conflated` is its `x-conflated` count (0 without the header), `keyed` whether
    /// it has an `x-key`.
    Event {
        offset: u64,
        epoch: String,
        conflated: u64,
        keyed: bool,
    },
    /// A snapshot's state event (`x-snapshot:true`).
    State { offset: u64, epoch: String },
    /// `lockstep.reset`: delivery continues after this position.
    Reset { offset: u64, epoch: String },
    /// The connection ended (the next subscription starts afresh).
    Disconnected,
}

/// What a run of a subscriber showed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub events: usize,
    pub subscriptions: usize,
    pub recovered: usize,
    pub not_recovered: usize,
    pub resets: usize,
    /// Offsets skipped by conflation (replaced, not lost).
    pub conflated: u64,
    /// The last position seen, if any.
    pub last: Option<(u64, String)>,
}

/// Checks one subscriber's view of one topic.
///
/// # Errors
///
/// A description of the first violation, with its index in `log`.
pub fn check(log: &[Seen]) -> Result<Summary, String> {
    let mut summary = Summary::default();
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    // Where delivery stands in the current subscription: the last position (stated or seen).
    let mut cursor: Option<(u64, String)> = None;
    // A resume asked for and not answered yet.
    let mut asked: Option<Option<(u64, String)>> = None;
    // Offsets skipped in this subscription that no `x-conflated` explained yet, and whether a
    // keyed event was seen (only then can a replacement be pending).
    let mut debt = 0u64;
    let mut keyed_seen = false;
    // The last state event of a snapshot.
    let mut state_at: Option<u64> = None;
    for (i, entry) in log.iter().enumerate() {
        let fail = |what: String| Err(format!("#{i} {entry:?}: {what}"));
        let unpaid = |debt: u64| {
            format!("gap: {debt} offsets missing without a reset (no x-conflated explained them)")
        };
        match entry {
            Seen::Subscribe { resume } => {
                if debt > 0 {
                    return fail(unpaid(debt));
                }
                summary.subscriptions += 1;
                cursor = None;
                state_at = None;
                keyed_seen = false;
                asked = Some(resume.clone());
            }
            Seen::Subscribed {
                recovered,
                offset,
                epoch,
            } => {
                let Some(resume) = asked.take() else {
                    return fail("lockstep.subscribed without a SUBSCRIBE asking for it".into());
                };
                if *recovered {
                    summary.recovered += 1;
                    if let Some((n, e)) = &resume
                        && (n != offset || e != epoch)
                    {
                        return fail(format!(
                            "recovered, but resumes after ({offset}, {epoch}) instead of ({n}, {e}): events between were skipped"
                        ));
                    }
                } else {
                    summary.not_recovered += 1;
                }
                cursor = Some((*offset, epoch.clone()));
            }
            Seen::State { offset, epoch } => {
                let Some((top, top_epoch)) = &cursor else {
                    return fail("a state event outside a subscription".into());
                };
                if epoch != top_epoch || offset > top {
                    return fail(format!(
                        "a state event beyond the position ({top}, {top_epoch}) its subscription stated"
                    ));
                }
                if state_at.is_some_and(|last| *offset <= last) {
                    return fail("state events out of offset order".into());
                }
                state_at = Some(*offset);
            }
            Seen::Event {
                offset,
                epoch,
                conflated,
                keyed,
            } => {
                if asked.as_ref().is_some_and(Option::is_some) {
                    return fail("an event before lockstep.subscribed of a resume".into());
                }
                asked = None;
                if !seen.entry(epoch.clone()).or_default().insert(*offset) {
                    return fail("seen twice".into());
                }
                if let Some((last, last_epoch)) = &cursor {
                    if epoch != last_epoch {
                        return fail(format!(
                            "epoch changed from {last_epoch} without lockstep.reset or a new subscription"
                        ));
                    }
                    if *offset <= *last {
                        return fail(format!("out of order after {last}"));
                    }
                    debt += offset - last - 1;
                    if *conflated > debt {
                        return fail(format!(
                            "x-conflated:{conflated}, but only {debt} offsets were skipped"
                        ));
                    }
                    debt -= conflated;
                    summary.conflated += conflated;
                }
                keyed_seen |= keyed;
                state_at = Some(u64::MAX);
                summary.events += 1;
                cursor = Some((*offset, epoch.clone()));
                summary.last = cursor.clone();
            }
            Seen::Reset { offset, epoch } => {
                // A reset says what was lost: the debt with the rest.
                debt = 0;
                summary.resets += 1;
                cursor = Some((*offset, epoch.clone()));
            }
            Seen::Disconnected => {
                if debt > 0 && !keyed_seen {
                    return fail(unpaid(debt));
                }
                debt = 0;
                // A resume asked and never answered (the connection dropped first) is fine.
                asked = None;
                cursor = None;
            }
        }
    }
    if debt > 0 {
        return Err(format!(
            "at the end: gap: {debt} offsets missing without a reset (no x-conflated explained them)"
        ));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(offset: u64) -> Seen {
        Seen::Event {
            offset,
            epoch: "E".into(),
            conflated: 0,
            keyed: false,
        }
    }

    fn keyed(offset: u64, conflated: u64) -> Seen {
        Seen::Event {
            offset,
            epoch: "E".into(),
            conflated,
            keyed: true,
        }
    }

    fn subscribe(resume: Option<u64>) -> Seen {
        Seen::Subscribe {
            resume: resume.map(|n| (n, "E".to_owned())),
        }
    }

    fn subscribed(recovered: bool, offset: u64) -> Seen {
        Seen::Subscribed {
            recovered,
            offset,
            epoch: "E".into(),
        }
    }

    #[test]
    fn a_clean_resume_passes() {
        let log = [
            subscribe(None),
            ev(1),
            ev(2),
            Seen::Disconnected,
            subscribe(Some(2)),
            subscribed(true, 2),
            ev(3),
            ev(4),
        ];
        let summary = check(&log).unwrap();
        assert_eq!((summary.events, summary.recovered), (4, 1));
        assert_eq!(summary.last, Some((4, "E".into())));
    }

    #[test]
    fn violations_are_found() {
        let cases: Vec<(Vec<Seen>, &str)> = vec![
            (vec![subscribe(None), ev(1), ev(1)], "seen twice"),
            (vec![subscribe(None), ev(2), ev(1)], "out of order"),
            (vec![subscribe(None), ev(1), ev(3)], "gap"),
            (
                vec![
                    subscribe(None),
                    ev(1),
                    Seen::Disconnected,
                    subscribe(Some(1)),
                    subscribed(true, 3),
                    ev(4),
                ],
                "skipped",
            ),
            (
                vec![
                    subscribe(None),
                    ev(1),
                    Seen::Disconnected,
                    subscribe(Some(1)),
                    ev(2),
                ],
                "before lockstep.subscribed",
            ),
            (
                vec![
                    subscribe(None),
                    ev(1),
                    Seen::Event {
                        offset: 2,
                        epoch: "F".into(),
                        conflated: 0,
                        keyed: false,
                    },
                ],
                "epoch changed",
            ),
            // Conflation claims no more than was skipped, and pays every skip by the end.
            (
                vec![subscribe(None), ev(1), keyed(3, 2)],
                "only 1 offsets were skipped",
            ),
            (
                vec![subscribe(None), keyed(1, 0), ev(3), keyed(5, 1)],
                "at the end: gap: 1",
            ),
            (
                vec![subscribe(None), ev(1), ev(3), Seen::Disconnected],
                "gap: 1 offsets",
            ),
            // State events stand at or below the position stated.
            (
                vec![
                    subscribe(None),
                    subscribed(true, 5),
                    Seen::State {
                        offset: 6,
                        epoch: "E".into(),
                    },
                ],
                "beyond the position",
            ),
            (
                vec![
                    subscribe(None),
                    subscribed(true, 5),
                    Seen::State {
                        offset: 4,
                        epoch: "E".into(),
                    },
                    Seen::State {
                        offset: 2,
                        epoch: "E".into(),
                    },
                ],
                "out of offset order",
            ),
            (vec![subscribed(true, 0)], "without a SUBSCRIBE"),
            // Seen twice across subscriptions: a resume that replays what was delivered.
            (
                vec![
                    subscribe(None),
                    ev(1),
                    ev(2),
                    Seen::Disconnected,
                    subscribe(Some(1)),
                    subscribed(true, 1),
                    ev(2),
                ],
                "seen twice",
            ),
        ];
        for (log, expected) in cases {
            let err = check(&log).expect_err(expected);
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn explicit_outcomes_allow_jumps() {
        let log = [
            subscribe(None),
            ev(1),
            Seen::Disconnected,
            subscribe(Some(1)),
            subscribed(false, 50),
            ev(51),
            Seen::Reset {
                offset: 0,
                epoch: "F".into(),
            },
            Seen::Event {
                offset: 1,
                epoch: "F".into(),
                conflated: 0,
                keyed: true,
            },
            // Offset 2 was replaced by 4, which comes after 3 (the newest place).
            Seen::Event {
                offset: 3,
                epoch: "F".into(),
                conflated: 0,
                keyed: false,
            },
            Seen::Event {
                offset: 4,
                epoch: "F".into(),
                conflated: 1,
                keyed: true,
            },
        ];
        let summary = check(&log).unwrap();
        assert_eq!(
            (summary.not_recovered, summary.resets, summary.conflated),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_snapshot_then_the_stream_passes() {
        let state = |offset| Seen::State {
            offset,
            epoch: "E".into(),
        };
        let log = [
            subscribe(None),
            subscribed(true, 9),
            state(2),
            state(7),
            state(9),
            keyed(10, 0),
            ev(11),
            // A replacement pending when the connection dropped.
            ev(13),
            Seen::Disconnected,
        ];
        assert_eq!(check(&log).unwrap().events, 3);
    }
}
