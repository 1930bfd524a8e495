//! Stream positions (DESIGN §12): every event of a topic has an offset, contiguous from 1, and
//! each topic an epoch that changes when its history or offset counter was lost. They travel
//! as the first two headers of a `MESSAGE` tail, `x-stream-offset:N` and `x-stream-epoch:E`
//! (the names RabbitMQ's streams use), put there once by whoever assigns them (the broker), so
//! fan-out still only prepends the `subscription` line.
//!
//! A client picks where a subscription starts with the `x-stream-offset` header of `SUBSCRIBE`
//! ([`StreamStart`]).

use crate::frame::escape_header;
use crate::server::MessageTemplate;
use std::sync::Arc;
use thiserror::Error;

/// The offset header of `MESSAGE` and `SUBSCRIBE`.
pub const OFFSET_HEADER: &str = "x-stream-offset";
/// The epoch header of `MESSAGE` and `SUBSCRIBE`.
pub const EPOCH_HEADER: &str = "x-stream-epoch";
/// Whether a subscription's start position was served in full (`lockstep.subscribed`).
pub const RECOVERED_HEADER: &str = "x-recovered";

/// The first frame of a subscription that asked for a start position.
pub const SUBSCRIBED_EVENT: &str = "lockstep.subscribed";
/// The last frame of a subscription the server ended: the platform revoked the user's access
/// to the topic, or a refreshed token no longer allows it. `data.reason` says which
/// (`revoked`, `token`).
pub const UNSUBSCRIBED_EVENT: &str = "lockstep.unsubscribed";
/// Sent to a topic's subscribers when a node could not deliver part of the stream: what they
/// hold may be stale; the new position is in its headers.
pub const RESET_EVENT: &str = "lockstep.reset";

/// A position in a topic's stream: the offset of an event (0 before the first) and the epoch
/// it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

impl Position {
    pub fn new(offset: u64, epoch: impl Into<Arc<str>>) -> Position {
        Position {
            offset,
            epoch: epoch.into(),
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamStart {
    /// Live events only (the default when the header is absent).
    Next,
    /// The topic's latest event first, then live.
    Last,
    /// Every event after `offset` of `epoch`, then live.
    After { offset: u64, epoch: String },
    /// The latest event of every key, then live.
    Snapshot,
}

/// A malformed `x-stream-offset` or `x-stream-epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StreamError {
    #[error("x-stream-offset must be next, last, snapshot or offset=<n>, got '{0}'")]
    InvalidStart(String),
    #[error("x-stream-offset:offset=<n> needs x-stream-epoch (from the MESSAGE that had offset n)")]
    MissingEpoch,
    #[error("x-stream-epoch '{0}' is not an epoch Lockstep issued")]
    InvalidEpoch(String),
}

impl StreamStart {
    /// Parses the `x-stream-offset` and `x-stream-epoch` headers of a `SUBSCRIBE`. `Ok(None)`
    /// when the client asked for nothing (no `lockstep.subscribed` frame then).
    ///
    /// # Errors
    ///
    /// [`StreamError`] for a value that is none of the forms, or an offset without its epoch.
    pub fn parse(
        offset: Option<&str>,
        epoch: Option<&str>,
    ) -> Result<Option<StreamStart>, StreamError> {
        let Some(value) = offset else {
            return Ok(None);
        };
        let start = match value.trim() {
            "next" => StreamStart::Next,
            "last" => StreamStart::Last,
            "snapshot" => StreamStart::Snapshot,
            other => {
                let n = other
                    .strip_prefix("offset=")
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| StreamError::InvalidStart(shown(value)))?;
                let epoch = epoch.ok_or(StreamError::MissingEpoch)?;
                if !is_epoch(epoch) {
                    return Err(StreamError::InvalidEpoch(shown(epoch)));
                }
                StreamStart::After {
                    offset: n,
                    epoch: epoch.to_owned(),
                }
            }
        };
        Ok(Some(start))
    }
}

/// At most 40 characters of a client's value, for an error message.
fn shown(value: &str) -> String {
    value.chars().take(40).collect()
}

/// Whether `s` can be an epoch: 1 to 64 characters of `[A-Za-z0-9_-]` (brokers make ULIDs), so
/// it needs no escaping in a header, a URL or a Redis script's reply.
pub fn is_epoch(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Key prefixes only Lockstep's own events carry (lock state, presence): a publisher's event
/// under one would stand in a snapshot for state it does not own.
const RESERVED_KEY_PREFIXES: [&str; 2] = ["lock:", "presence:"];

/// Checks a key a publisher gave an event (HTTP `key`, STOMP `x-key`): an id, and not one of
/// Lockstep's own.
///
/// # Errors
///
/// Says why the key is refused.
pub fn check_event_key(key: &str) -> Result<(), String> {
    if !crate::topic::is_valid_id(key) {
        return Err(format!(
            "key '{}' must match [A-Za-z0-9_.:-]{{1,128}}",
            shown(key)
        ));
    }
    if let Some(prefix) = RESERVED_KEY_PREFIXES.iter().find(|p| key.starts_with(**p)) {
        return Err(format!(
            "keys starting with '{prefix}' are Lockstep's own (its lock and presence events)"
        ));
    }
    Ok(())
}

/// The position headers, as they start a positioned tail.
fn headers(offset: u64, epoch: &str) -> String {
    format!(
        "{OFFSET_HEADER}:{offset}\n{EPOCH_HEADER}:{}\n",
        escape_header(epoch)
    )
}

/// `message` with its position: the headers come first, so [`position_of`] finds them without
/// parsing the rest, and a positioned tail is exactly what history keeps.
pub fn positioned(message: &MessageTemplate, offset: u64, epoch: &str) -> MessageTemplate {
    with_headers(message, &headers(offset, epoch))
}

/// `message` with header lines (each ending in `\n`) put first.
fn with_headers(message: &MessageTemplate, head: &str) -> MessageTemplate {
    let mut tail = String::with_capacity(head.len() + message.tail().len());
    tail.push_str(head);
    tail.push_str(message.tail());
    MessageTemplate::from_tail(tail.into())
}

/// The envelope of a frame Lockstep itself makes about a subscription or a topic.
fn notice(destination: &str, id: &str, ts: &str, event_type: &str, data: &str) -> MessageTemplate {
    let data = serde_json::value::RawValue::from_string(data.to_owned())
        .unwrap_or_else(|_| serde_json::value::RawValue::from_string("{}".to_owned()).expect("{}"));
    let json = crate::Envelope {
        id,
        event_type,
        topic: destination,
        ts,
        data: &data,
    }
    .to_json();
    MessageTemplate::new(destination, id, event_type, &json)
}

/// The first frame of a subscription that asked for a start position: whether the position
/// was served in full (`recovered`), and the position live delivery continues after.
pub fn subscribed(
    destination: &str,
    id: &str,
    ts: &str,
    recovered: bool,
    position: &Position,
) -> MessageTemplate {
    let data = format!(
        r#"{{"recovered":{recovered},"offset":{},"epoch":"{}"}}"#,
        position.offset, position.epoch
    );
    let message = notice(destination, id, ts, SUBSCRIBED_EVENT, &data);
    with_headers(
        &message,
        &format!(
            "{}{RECOVERED_HEADER}:{recovered}\n",
            headers(position.offset, &position.epoch)
        ),
    )
}

/// The last frame of a subscription the server ended, and why.
pub fn unsubscribed(destination: &str, id: &str, ts: &str, reason: &str) -> MessageTemplate {
    let data = serde_json::json!({ "reason": reason }).to_string();
    notice(destination, id, ts, UNSUBSCRIBED_EVENT, &data)
}

/// Tells a topic's subscribers that part of its stream could not be delivered (`reason`), so
/// their state may be stale: reload it, and count on offsets after `position`.
pub fn reset(
    destination: &str,
    id: &str,
    ts: &str,
    position: &Position,
    reason: &str,
) -> MessageTemplate {
    let data = serde_json::json!({
        "offset": position.offset,
        "epoch": &*position.epoch,
        "reason": reason,
    })
    .to_string();
    with_headers(
        &notice(destination, id, ts, RESET_EVENT, &data),
        &headers(position.offset, &position.epoch),
    )
}

/// The position a positioned tail starts with.
pub fn position_of(tail: &str) -> Option<(u64, &str)> {
    let rest = tail.strip_prefix(OFFSET_HEADER)?.strip_prefix(':')?;
    let (offset, rest) = rest.split_once('\n')?;
    let rest = rest.strip_prefix(EPOCH_HEADER)?.strip_prefix(':')?;
    let (epoch, _) = rest.split_once('\n')?;
    Some((offset.parse().ok()?, epoch))
}

/// Splits a broker message that carries several positioned tails back to back (a batch of
/// one topic's events). Each tail ends with the frame's NUL, which a JSON body never holds
/// raw, so the NUL is an unambiguous end.
pub fn split_batch(payload: &str) -> impl Iterator<Item = &str> {
    payload.split_inclusive('\0').filter(|t| t.ends_with('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, Limits};
    use crate::server::subscription_prefix;
    use bytes::BytesMut;

    #[test]
    fn starts() {
        let parse = |o: Option<&str>, e: Option<&str>| StreamStart::parse(o, e);
        assert_eq!(parse(None, None), Ok(None));
        assert_eq!(parse(Some("next"), None), Ok(Some(StreamStart::Next)));
        assert_eq!(parse(Some("last"), None), Ok(Some(StreamStart::Last)));
        assert_eq!(
            parse(Some("snapshot"), None),
            Ok(Some(StreamStart::Snapshot))
        );
        assert_eq!(
            parse(Some("offset=17"), Some("01JDX")),
            Ok(Some(StreamStart::After {
                offset: 17,
                epoch: "01JDX".into()
            }))
        );
        assert_eq!(
            parse(Some("offset=17"), None),
            Err(StreamError::MissingEpoch)
        );
        for bad in [
            "offset=",
            "offset=-1",
            "offset=x",
            "first",
            "",
            "offset=99999999999999999999",
        ] {
            assert!(
                matches!(
                    parse(Some(bad), Some("e")),
                    Err(StreamError::InvalidStart(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(Some("offset=1"), Some("a:b")),
            Err(StreamError::InvalidEpoch(_))
        ));
    }

    #[test]
    fn notices_are_messages_with_an_envelope() {
        let position = Position::new(7, "E2");
        for (m, event_type) in [
            (
                subscribed("/user/ana", "01A", "ts", false, &position),
                SUBSCRIBED_EVENT,
            ),
            (
                reset("/user/ana", "01B", "ts", &position, "trimmed"),
                RESET_EVENT,
            ),
        ] {
            let text = m.frame_for(&subscription_prefix("s"));
            let frame = Decoder::new(Limits::default())
                .decode(&mut BytesMut::from(text.as_bytes()))
                .unwrap()
                .unwrap();
            assert_eq!(frame.header("event-type"), Some(event_type));
            assert_eq!(frame.header(OFFSET_HEADER), Some("7"));
            assert_eq!(frame.header(EPOCH_HEADER), Some("E2"));
            let body: serde_json::Value = serde_json::from_slice(&frame.body).unwrap();
            assert_eq!(
                (body["type"].as_str(), &body["data"]["offset"]),
                (Some(event_type), &serde_json::json!(7))
            );
        }
        let m = subscribed("/user/ana", "01A", "ts", true, &position);
        assert!(m.tail().contains("\nx-recovered:true\n"), "{}", m.tail());
        assert_eq!(position_of(m.tail()), Some((7, "E2")));
    }

    #[test]
    fn positioned_tails_decode_as_messages() {
        let m = MessageTemplate::new("/team/t1", "01", "job.progress", "{}");
        let p = positioned(&m, 42, "E1");
        assert_eq!(position_of(p.tail()), Some((42, "E1")));
        assert_eq!(position_of(m.tail()), None);
        let text = p.frame_for(&subscription_prefix("s"));
        let frame = Decoder::new(Limits::default())
            .decode(&mut BytesMut::from(text.as_bytes()))
            .unwrap()
            .unwrap();
        assert_eq!(frame.header(OFFSET_HEADER), Some("42"));
        assert_eq!(frame.header(EPOCH_HEADER), Some("E1"));
        assert_eq!(frame.header("destination"), Some("/team/t1"));
        let batch = format!("{}{}", p.tail(), positioned(&m, 43, "E1").tail());
        let tails: Vec<&str> = split_batch(&batch).collect();
        assert_eq!(tails.len(), 2);
        assert_eq!(position_of(tails[1]), Some((43, "E1")));
    }

    #[test]
    fn publishers_keys_are_ids_outside_lockstep_own() {
        assert!(check_event_key("job:import-42").is_ok());
        assert!(
            check_event_key("lock:item-1")
                .unwrap_err()
                .contains("Lockstep's own")
        );
        assert!(check_event_key("presence:u1").is_err());
        assert!(check_event_key("a b").unwrap_err().contains("must match"));
        assert!(check_event_key("").is_err());
    }
}
