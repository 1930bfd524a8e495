//! Frames the hub sends.
//!
//! `MESSAGE` frames are the hot path. A `MESSAGE` differs between subscribers only in its
//! `subscription` header, so [`MessageTemplate`] encodes everything else once per event (the
//! "tail": the other headers and the body) and [`MessageTemplate::frame_for`] prepends a
//! subscriber's pre-encoded `MESSAGE\nsubscription:…\n` line. The tail is also exactly what a
//! node publishes to the cluster broker, so no node re-encodes an event it receives.

use crate::frame::{Command, Frame, escape_header, unescape_header};
use crate::heartbeat::HeartBeat;
use std::sync::Arc;

/// The header naming an event's key.
pub const KEY_HEADER: &str = "x-key";
/// The header a conflated event carries: how many older events of its key it replaced.
pub const CONFLATED_HEADER: &str = "x-conflated";
/// The header of the events a `snapshot` subscription starts with (they are state, each the
/// latest of its key, not a contiguous part of the stream).
pub const SNAPSHOT_HEADER: &str = "x-snapshot";

/// The server name sent in `CONNECTED`.
pub const SERVER: &str = concat!("lockstep/", env!("CARGO_PKG_VERSION"));

/// An event encoded once, shared by every subscriber of its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTemplate {
    tail: Arc<str>,
}

impl MessageTemplate {
    /// Encodes the parts of a `MESSAGE` that all subscribers share.
    pub fn new(
        destination: &str,
        message_id: &str,
        event_type: &str,
        envelope_json: &str,
    ) -> MessageTemplate {
        MessageTemplate::keyed(destination, message_id, event_type, None, envelope_json)
    }

    /// [`MessageTemplate::new`] for an event with a key (`x-key`), the latest of which its
    /// topic keeps (DESIGN §13).
    pub fn keyed(
        destination: &str,
        message_id: &str,
        event_type: &str,
        key: Option<&str>,
        envelope_json: &str,
    ) -> MessageTemplate {
        let mut tail = String::with_capacity(envelope_json.len() + 160);
        for (name, value) in [
            ("destination", Some(destination)),
            ("message-id", Some(message_id)),
            ("content-type", Some("application/json")),
            ("event-type", Some(event_type)),
            (KEY_HEADER, key),
        ] {
            let Some(value) = value else { continue };
            tail.push_str(name);
            tail.push(':');
            tail.push_str(&escape_header(value));
            tail.push('\n');
        }
        tail.push_str("content-length:");
        tail.push_str(&envelope_json.len().to_string());
        tail.push_str("\n\n");
        tail.push_str(envelope_json);
        tail.push('\0');
        MessageTemplate { tail: tail.into() }
    }

    /// Rebuilds a template from a tail produced by [`MessageTemplate::tail`] (as received from
    /// the cluster broker).
    pub fn from_tail(tail: Arc<str>) -> MessageTemplate {
        MessageTemplate { tail }
    }

    /// The shared part of the frame: every header but `subscription`, the body and the NUL.
    pub fn tail(&self) -> &Arc<str> {
        &self.tail
    }

    /// The whole `MESSAGE` frame for one subscription. `prefix` comes from
    /// [`subscription_prefix`].
    pub fn frame_for(&self, prefix: &str) -> String {
        self.frame_with(prefix, "")
    }

    /// [`MessageTemplate::frame_for`] with header lines of this subscription's own (each ending
    /// in `\n`: `x-conflated:3\n`, `x-snapshot:true\n`) after the `subscription` line.
    pub fn frame_with(&self, prefix: &str, headers: &str) -> String {
        let mut frame = String::with_capacity(prefix.len() + headers.len() + self.tail.len());
        frame.push_str(prefix);
        frame.push_str(headers);
        frame.push_str(&self.tail);
        frame
    }

    /// The event's key (`x-key`), if it has one.
    pub fn key(&self) -> Option<String> {
        self.headers()
            .split('\n')
            .find_map(|line| line.strip_prefix(KEY_HEADER)?.strip_prefix(':'))
            .map(unescape_header)
    }

    /// The event's type (`event-type`).
    pub fn event_type(&self) -> Option<&str> {
        self.headers()
            .split('\n')
            .find_map(|line| line.strip_prefix("event-type:"))
    }

    /// The frame's body (the event's envelope JSON), without the NUL that ends the frame.
    pub fn body(&self) -> &str {
        self.tail
            .split_once("\n\n")
            .map_or("", |(_, body)| body.strip_suffix('\0').unwrap_or(body))
    }

    /// Whether the tail holds escaped header characters, so that a STOMP 1.0 subscriber (no
    /// escaping) needs [`MessageTemplate::frame_for_unescaped`].
    pub fn has_escapes(&self) -> bool {
        self.headers().contains('\\')
    }

    fn headers(&self) -> &str {
        self.tail
            .split_once("\n\n")
            .map_or(&self.tail[..], |(headers, _)| headers)
    }

    /// The whole `MESSAGE` frame for a STOMP 1.0 subscription, whose headers carry no escape
    /// sequences (1.0 has none: `:` in a value is literal). Rare, so it re-encodes.
    pub fn frame_for_unescaped(&self, prefix: &str) -> String {
        self.frame_with_unescaped(prefix, "")
    }

    /// [`MessageTemplate::frame_for_unescaped`] with header lines of the subscription's own,
    /// as [`MessageTemplate::frame_with`].
    pub fn frame_with_unescaped(&self, prefix: &str, own: &str) -> String {
        let (headers, rest) = self.tail.split_once("\n\n").unwrap_or((&self.tail[..], ""));
        let mut frame = String::with_capacity(prefix.len() + own.len() + self.tail.len());
        frame.push_str(prefix);
        frame.push_str(own);
        for line in headers.split('\n') {
            frame.push_str(&unescape_header(line));
            frame.push('\n');
        }
        frame.push('\n');
        frame.push_str(rest);
        frame
    }
}

/// `MESSAGE\nsubscription:{id}\n`, encoded once per subscription. `escape` is false for a
/// STOMP 1.0 session.
pub fn subscription_prefix(subscription_id: &str) -> String {
    format!("MESSAGE\nsubscription:{}\n", escape_header(subscription_id))
}

/// [`subscription_prefix`] for a STOMP 1.0 session, which has no header escaping.
pub fn subscription_prefix_unescaped(subscription_id: &str) -> String {
    format!("MESSAGE\nsubscription:{subscription_id}\n")
}

/// `CONNECTED`. Not escaped, as STOMP 1.2 requires for this frame.
pub fn connected(version: &str, session: &str, heart_beat: HeartBeat) -> Frame {
    Frame::new(Command::Connected)
        .with_header("version", version)
        .with_header("server", SERVER)
        .with_header("heart-beat", heart_beat.header_value())
        .with_header("session", session)
}

/// `RECEIPT` for a client frame's `receipt` header.
pub fn receipt(receipt_id: &str) -> Frame {
    Frame::new(Command::Receipt).with_header("receipt-id", receipt_id)
}

/// `ERROR` with a short `message` header and a plain-text explanation in the body.
pub fn error(message: &str, receipt_id: Option<&str>, details: &str) -> Frame {
    let mut frame = Frame::new(Command::Error).with_header("message", message);
    if let Some(id) = receipt_id {
        frame = frame.with_header("receipt-id", id);
    }
    frame
        .with_header("content-type", "text/plain")
        .with_header("content-length", details.len().to_string())
        .with_body(details.to_owned())
}

/// Encodes a server frame as text. Server frames carry only UTF-8 (headers are `String`s, bodies
/// are JSON or plain text), so they can go out as WebSocket text messages, which browsers and
/// every STOMP client library handle.
pub fn to_text(frame: &Frame) -> String {
    String::from_utf8_lossy(&frame.to_bytes()).into_owned()
}

/// [`to_text`] for a session that negotiated `version`: STOMP 1.0 gets unescaped headers.
pub fn to_text_for(frame: &Frame, version: &str) -> String {
    let mut dst = bytes::BytesMut::new();
    frame.encode_with(&mut dst, version != "1.0");
    String::from_utf8_lossy(&dst).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, Limits};
    use bytes::BytesMut;

    #[test]
    fn message_template_decodes_as_a_message() {
        let body = r#"{"id":"01","data":{"a":"x\u0000"}}"#;
        let t = MessageTemplate::new("/team/t:1", "01", "job.progress", body);
        let text = t.frame_for(&subscription_prefix("sub:0"));
        let frame = Decoder::new(Limits::default())
            .decode(&mut BytesMut::from(text.as_bytes()))
            .unwrap()
            .unwrap();
        assert_eq!(frame.command, Command::Message);
        assert_eq!(frame.header("subscription"), Some("sub:0"));
        assert_eq!(frame.header("destination"), Some("/team/t:1"));
        assert_eq!(frame.header("message-id"), Some("01"));
        assert_eq!(frame.header("event-type"), Some("job.progress"));
        assert_eq!(frame.header("content-type"), Some("application/json"));
        assert_eq!(&frame.body[..], body.as_bytes());
    }

    #[test]
    fn stomp_1_0_subscribers_get_literal_colons() {
        let t = MessageTemplate::new("/team/t:1", "01", "job.progress", "{}");
        assert!(t.has_escapes());
        let text = t.frame_for_unescaped(&subscription_prefix_unescaped("s:0"));
        assert!(
            text.starts_with("MESSAGE\nsubscription:s:0\ndestination:/team/t:1\nmessage-id:01\n"),
            "{text}"
        );
        assert!(text.ends_with("\n\n{}\0"), "{text}");
        assert!(!MessageTemplate::new("/team/t1", "01", "job.progress", "{}").has_escapes());
    }

    #[test]
    fn keyed_messages_name_their_key() {
        let t = MessageTemplate::keyed("/team/t1", "01", "job.progress", Some("job:7"), "{}");
        assert_eq!(t.key().as_deref(), Some("job:7"));
        assert_eq!(t.event_type(), Some("job.progress"));
        assert_eq!(
            MessageTemplate::new("/team/t1", "01", "a.b", "{}").key(),
            None
        );
        let text = t.frame_with(&subscription_prefix("s"), "x-conflated:2\n");
        let frame = Decoder::new(Limits::default())
            .decode(&mut BytesMut::from(text.as_bytes()))
            .unwrap()
            .unwrap();
        assert_eq!(frame.header("x-key"), Some("job:7"));
        assert_eq!(frame.header("x-conflated"), Some("2"));
        assert_eq!(frame.header("subscription"), Some("s"));
    }

    #[test]
    fn error_frame_carries_receipt_id() {
        let text = to_text(&error("forbidden", Some("r-1"), "not yours"));
        assert_eq!(
            text,
            "ERROR\nmessage:forbidden\nreceipt-id:r-1\ncontent-type:text/plain\ncontent-length:9\n\nnot yours\0"
        );
    }
}
