//! Lock events (DESIGN §5) as the outbox stores them: type, topics and data of each.
//!
//! On PostgreSQL the decision functions of `migrations/postgres/0004_lock_decisions.sql` write
//! the same data in SQL; both are compact JSON with sorted keys (the field order below), and
//! `tests/it/locks` checks the bytes subscribers get on both databases.

use super::rfc3339;
use super::store::LockState;
use serde::Serialize;

/// A change of one item's lock.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LockEvent<'a> {
    Acquired(&'a LockState),
    /// The grant ran out at its `expires_at`.
    Expired(&'a LockState),
    /// Released by its holder or, `session_closed`, by its session's end.
    Released {
        lock: &'a LockState,
        reason: Reason,
        at: i64,
    },
    /// Ended by a team admin.
    TakenOver {
        lock: &'a LockState,
        by: &'a str,
        at: i64,
    },
}

/// Why a grant was released.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reason {
    Released,
    SessionClosed,
}

// Fields in sorted order: the data is byte for byte what the PostgreSQL functions write.
#[derive(Serialize)]
struct AcquiredData<'a> {
    acquired_at: String,
    expires_at: String,
    holder: &'a str,
    item: &'a str,
    team: &'a str,
    token: i64,
}

#[derive(Serialize)]
struct ExpiredData<'a> {
    expired_at: String,
    holder: &'a str,
    item: &'a str,
    team: &'a str,
    token: i64,
}

#[derive(Serialize)]
struct ReleasedData<'a> {
    holder: &'a str,
    item: &'a str,
    reason: Reason,
    released_at: String,
    team: &'a str,
    token: i64,
}

#[derive(Serialize)]
struct TakenOverData<'a> {
    by: &'a str,
    holder: &'a str,
    item: &'a str,
    released_at: String,
    team: &'a str,
    token: i64,
}

impl LockEvent<'_> {
    fn lock(&self) -> &LockState {
        match self {
            LockEvent::Acquired(lock) | LockEvent::Expired(lock) => lock,
            LockEvent::Released { lock, .. } | LockEvent::TakenOver { lock, .. } => lock,
        }
    }

    pub(crate) fn event_type(&self) -> &'static str {
        match self {
            LockEvent::Acquired(_) => "lock.acquired",
            LockEvent::Expired(_) => "lock.expired",
            LockEvent::Released { .. } => "lock.released",
            LockEvent::TakenOver { .. } => "lock.taken_over",
        }
    }

    /// The team topic always; the holder's own topic too when the grant ended without the
    /// holder asking (an expiry or a takeover), so the holder's other tabs learn it.
    pub(crate) fn topics(&self) -> Vec<String> {
        let lock = self.lock();
        let team = format!("/team/{}", lock.team);
        match self {
            LockEvent::Expired(_) | LockEvent::TakenOver { .. } => {
                vec![team, format!("/user/{}", lock.holder)]
            }
            LockEvent::Acquired(_) | LockEvent::Released { .. } => vec![team],
        }
    }

    /// The outbox's `lock_key` column: `{team}/{item}` (ids never contain `/`).
    pub(crate) fn lock_key(&self) -> String {
        let lock = self.lock();
        format!("{}/{}", lock.team, lock.item)
    }

    pub(crate) fn data(&self) -> String {
        let l = self.lock();
        let data = match *self {
            LockEvent::Acquired(_) => serde_json::to_string(&AcquiredData {
                acquired_at: rfc3339(l.acquired_at),
                expires_at: rfc3339(l.expires_at),
                holder: &l.holder,
                item: &l.item,
                team: &l.team,
                token: l.token,
            }),
            LockEvent::Expired(_) => serde_json::to_string(&ExpiredData {
                expired_at: rfc3339(l.expires_at),
                holder: &l.holder,
                item: &l.item,
                team: &l.team,
                token: l.token,
            }),
            LockEvent::Released { reason, at, .. } => serde_json::to_string(&ReleasedData {
                holder: &l.holder,
                item: &l.item,
                reason,
                released_at: rfc3339(at),
                team: &l.team,
                token: l.token,
            }),
            LockEvent::TakenOver { by, at, .. } => serde_json::to_string(&TakenOverData {
                by,
                holder: &l.holder,
                item: &l.item,
                released_at: rfc3339(at),
                team: &l.team,
                token: l.token,
            }),
        };
        // Strings and integers only: serializing cannot fail.
        data.expect("lock event data serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock() -> LockState {
        LockState {
            team: "t1".to_owned(),
            item: "i1".to_owned(),
            holder: "ana".to_owned(),
            session: None,
            token: 7,
            acquired_at: 1_765_113_981_123,
            expires_at: 1_765_113_982_005,
        }
    }

    /// The exact bytes the PostgreSQL functions produce for the same values (see the
    /// migration), so events read the same whichever database a deployment uses.
    #[test]
    fn data_is_compact_with_sorted_keys() {
        let lock = lock();
        assert_eq!(
            LockEvent::Acquired(&lock).data(),
            r#"{"acquired_at":"2025-12-07T13:26:21.123Z","expires_at":"2025-12-07T13:26:22.005Z","holder":"ana","item":"i1","team":"t1","token":7}"#
        );
        assert_eq!(
            LockEvent::Expired(&lock).data(),
            r#"{"expired_at":"2025-12-07T13:26:22.005Z","holder":"ana","item":"i1","team":"t1","token":7}"#
        );
        let released = LockEvent::Released {
            lock: &lock,
            reason: Reason::SessionClosed,
            at: 1_765_113_981_500,
        };
        assert_eq!(
            released.data(),
            r#"{"holder":"ana","item":"i1","reason":"session_closed","released_at":"2025-12-07T13:26:21.500Z","team":"t1","token":7}"#
        );
        let taken = LockEvent::TakenOver {
            lock: &lock,
            by: "lead",
            at: 1_765_113_981_500,
        };
        assert_eq!(
            taken.data(),
            r#"{"by":"lead","holder":"ana","item":"i1","released_at":"2025-12-07T13:26:21.500Z","team":"t1","token":7}"#
        );
        assert_eq!(taken.topics(), ["/team/t1", "/user/ana"]);
        assert_eq!(released.topics(), ["/team/t1"]);
        assert_eq!(released.event_type(), "lock.released");
        assert_eq!(taken.lock_key(), "t1/i1");
    }
}
