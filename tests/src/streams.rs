//! The stream checker (DESIGN §12): given what one subscriber saw of one topic across its
//! (re)subscriptions, proves it never missed an event silently.
//!
//! Rules, per subscriber and topic:
//! - each (epoch, offset) is seen at most once, over all its subscriptions;
//! - within a subscription, events come in offset order without gaps: each event is the one
//!   after the position the subscription (or the last reset) stated, or after the previous
//!   event; an event marked conflated (`x-conflated:n`) may skip the `n` offsets it replaced;
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
    /// An event; `conflated` is its `x-conflated` count (0 without the header).
    Event {
        offset: u64,
        epoch: String,
        conflated: u64,
    },
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
    for (i, entry) in log.iter().enumerate() {
        let fail = |what: String| Err(format!("#{i} {entry:?}: {what}"));
        match entry {
            Seen::Subscribe { resume } => {
                summary.subscriptions += 1;
                cursor = None;
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
            Seen::Event {
                offset,
                epoch,
                conflated,
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
                    if *offset > last + 1 + conflated {
                        return fail(format!(
                            "gap: {} offsets after {last} missing without a reset",
                            offset - last - 1 - conflated
                        ));
                    }
                    summary.conflated += offset - last - 1;
                }
                summary.events += 1;
                cursor = Some((*offset, epoch.clone()));
                summary.last = cursor.clone();
            }
            Seen::Reset { offset, epoch } => {
                summary.resets += 1;
                cursor = Some((*offset, epoch.clone()));
            }
            Seen::Disconnected => {
                // A resume asked and never answered (the connection dropped first) is fine.
                asked = None;
                cursor = None;
            }
        }
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
                    },
                ],
                "epoch changed",
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
            },
            Seen::Event {
                offset: 5,
                epoch: "F".into(),
                conflated: 3,
            },
        ];
        let summary = check(&log).unwrap();
        assert_eq!(
            (summary.not_recovered, summary.resets, summary.conflated),
            (1, 1, 3)
        );
    }
}
