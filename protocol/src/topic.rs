//! Topics (`/user/{id}`, `/team/{id}`, `/team/{id}/items/{id}`, `/global`) and event type names.

use std::fmt;
use thiserror::Error;

/// Which kind of topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    User,
    Team,
    /// `/team/{team}/items/{item}`: one item of a team, subscribed while it is open (DESIGN §14).
    Item,
    Global,
}

/// A valid destination. Keeps its canonical string so the hot path never formats it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    path: String,
    kind: TopicKind,
    /// Where the team id ends in `path`, for item topics (`/team/{team}` is `path[..team_end]`).
    team_end: usize,
}

/// Why a destination or event type is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error(
        "unknown destination '{0}': use /user/{{id}}, /team/{{id}}, /team/{{id}}/items/{{id}} or /global"
    )]
    UnknownDestination(String),
    #[error(
        "invalid id in destination '{0}': ids match [A-Za-z0-9_.:-]{{1,128}} and are not '.' or '..'"
    )]
    InvalidId(String),
    #[error("invalid event type '{0}': types match [a-z][a-z0-9_]*(.[a-z0-9_]+)+")]
    InvalidEventType(String),
}

/// Whether `id` is a valid user, team or item id: `[A-Za-z0-9_.:-]{1,128}`, except `.` and
/// `..`. Ids become path segments of object keys (`{team}/{item}/{name}`), and storage servers
/// that map keys to files resolve those two; an id must never step out of its folder.
pub fn is_valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl Topic {
    /// Parses a destination.
    ///
    /// # Errors
    ///
    /// [`TopicError`] naming the destination when it is not one of the four forms or an id
    /// is invalid.
    pub fn parse(destination: &str) -> Result<Topic, TopicError> {
        let invalid = || TopicError::InvalidId(truncate(destination));
        let (kind, ids) = if destination == "/global" {
            return Ok(Topic::global());
        } else if let Some(id) = destination.strip_prefix("/user/") {
            (TopicKind::User, [id, ""])
        } else if let Some(rest) = destination.strip_prefix("/team/") {
            // Ids hold no `/`: a second segment can only be an item.
            match rest.split_once('/') {
                None => (TopicKind::Team, [rest, ""]),
                Some((team, tail)) => match tail.strip_prefix("items/") {
                    Some(item) if is_valid_id(item) => (TopicKind::Item, [team, item]),
                    Some(_) => return Err(invalid()),
                    None => return Err(TopicError::UnknownDestination(truncate(destination))),
                },
            }
        } else {
            return Err(TopicError::UnknownDestination(truncate(destination)));
        };
        if !is_valid_id(ids[0]) {
            return Err(invalid());
        }
        Ok(Topic {
            path: destination.to_owned(),
            kind,
            team_end: "/team/".len() + ids[0].len(),
        })
    }

    pub fn global() -> Topic {
        Topic {
            path: "/global".to_owned(),
            kind: TopicKind::Global,
            team_end: 0,
        }
    }

    /// `/user/{id}`.
    ///
    /// # Errors
    ///
    /// When `id` is not a valid id.
    pub fn user(id: &str) -> Result<Topic, TopicError> {
        Topic::parse(&format!("/user/{id}"))
    }

    /// `/team/{id}`.
    ///
    /// # Errors
    ///
    /// When `id` is not a valid id.
    pub fn team(id: &str) -> Result<Topic, TopicError> {
        Topic::parse(&format!("/team/{id}"))
    }

    /// `/team/{team}/items/{item}`.
    ///
    /// # Errors
    ///
    /// When either id is not a valid id.
    pub fn item(team: &str, item: &str) -> Result<Topic, TopicError> {
        Topic::parse(&format!("/team/{team}/items/{item}"))
    }

    pub fn kind(&self) -> TopicKind {
        self.kind
    }

    /// The topic's own id: the user's, the team's or the item's; `None` for `/global`.
    pub fn id(&self) -> Option<&str> {
        match self.kind {
            TopicKind::User => Some(&self.path["/user/".len()..]),
            TopicKind::Team => Some(&self.path["/team/".len()..]),
            TopicKind::Item => Some(&self.path[self.team_end + "/items/".len()..]),
            TopicKind::Global => None,
        }
    }

    /// The team a team or item topic belongs to.
    pub fn team_id(&self) -> Option<&str> {
        match self.kind {
            TopicKind::Team | TopicKind::Item => Some(&self.path["/team/".len()..self.team_end]),
            TopicKind::User | TopicKind::Global => None,
        }
    }

    /// The destination string.
    pub fn as_str(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// Error messages quote the input; keep them short whatever a client sent.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(140) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// A valid event type name: `[a-z][a-z0-9_]*(\.[a-z0-9_]+)+`, e.g. `job.progress`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventType(String);

impl EventType {
    /// # Errors
    ///
    /// [`TopicError::InvalidEventType`] when `name` does not match the pattern or is longer than
    /// 128 bytes.
    pub fn parse(name: &str) -> Result<EventType, TopicError> {
        let mut parts = name.split('.');
        let first = parts.next().unwrap_or_default();
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let valid = name.len() <= 128
            && first.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && segment_ok(first)
            && name.contains('.')
            && parts.all(segment_ok);
        if valid {
            Ok(EventType(name.to_owned()))
        } else {
            Err(TopicError::InvalidEventType(truncate(name)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_topics() {
        let t = Topic::parse("/team/t-1.a:b_c").unwrap();
        assert_eq!((t.kind(), t.id()), (TopicKind::Team, Some("t-1.a:b_c")));
        assert_eq!(Topic::parse("/global").unwrap().id(), None);
        assert_eq!(Topic::parse("/user/u1").unwrap().as_str(), "/user/u1");
        let item = Topic::parse("/team/t-1/items/doc:9.json").unwrap();
        assert_eq!(
            (item.kind(), item.team_id(), item.id()),
            (TopicKind::Item, Some("t-1"), Some("doc:9.json"))
        );
        assert_eq!(Topic::item("t-1", "doc:9.json").unwrap(), item);
        assert_eq!(Topic::parse("/team/t-1").unwrap().team_id(), Some("t-1"));
        assert_eq!(Topic::parse("/user/t-1").unwrap().team_id(), None);
        assert!(matches!(
            Topic::parse("/team/a/items/..").unwrap_err(),
            TopicError::InvalidId(_)
        ));
        for bad in [
            "/user/",
            "/team/a b",
            "/team/a/b",
            "/team/a/items/",
            "/team/a/items/..",
            "/team/../items/x",
            "/team/a/items/x/y",
            "/team/a/items/a b",
            "/team//items/x",
            "/team/a/item/x",
            "/user/a/items/x",
            "/queue/x",
            "/global/x",
            "user/x",
            "",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
        assert!(Topic::parse(&format!("/user/{}", "a".repeat(128))).is_ok());
        assert!(Topic::parse(&format!("/user/{}", "a".repeat(129))).is_err());
        let msg = Topic::parse(&"x".repeat(1000)).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn parses_event_types() {
        for ok in ["job.progress", "lock.taken_over", "a1.b.c_2", "x.0"] {
            assert!(EventType::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "job",
            "Job.progress",
            "1job.x",
            "job.",
            ".job",
            "job..x",
            "job.Pro",
            "a-b.c",
            "",
        ] {
            assert!(EventType::parse(bad).is_err(), "{bad}");
        }
    }
}
