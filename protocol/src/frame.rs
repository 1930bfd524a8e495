//! The untyped STOMP frame and its encoder.
//!
//! A [`Frame`] is what the grammar of STOMP 1.2 describes: a command, an ordered list of
//! headers, and a body. Meaning (which headers a `SUBSCRIBE` needs, what a `MESSAGE` carries)
//! lives one level up, in [`crate::client`] and [`crate::server`].

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// A STOMP command: every command of STOMP 1.2, client and server side, plus anything else a
/// peer sent. An unknown command is a value, not a decode error, so the session can answer it
/// with a precise `ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Connected,
    Message,
    Receipt,
    Error,
    /// Anything else, as sent.
    Unknown(String),
}

impl Command {
    /// Parses a command line (without its EOL).
    pub fn parse(line: &str) -> Command {
        match line {
            "CONNECT" => Command::Connect,
            "STOMP" => Command::Stomp,
            "SEND" => Command::Send,
            "SUBSCRIBE" => Command::Subscribe,
            "UNSUBSCRIBE" => Command::Unsubscribe,
            "ACK" => Command::Ack,
            "NACK" => Command::Nack,
            "BEGIN" => Command::Begin,
            "COMMIT" => Command::Commit,
            "ABORT" => Command::Abort,
            "DISCONNECT" => Command::Disconnect,
            "CONNECTED" => Command::Connected,
            "MESSAGE" => Command::Message,
            "RECEIPT" => Command::Receipt,
            "ERROR" => Command::Error,
            other => Command::Unknown(other.to_owned()),
        }
    }

    /// The command as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Command::Unknown(name) => name,
            known => known.known_name().unwrap_or_default(),
        }
    }

    /// The name of a command STOMP defines; `None` for [`Command::Unknown`]. `'static`, so it
    /// can serve as a metric label.
    pub fn known_name(&self) -> Option<&'static str> {
        Some(match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
            Command::Unknown(_) => return None,
        })
    }

    /// STOMP 1.2: "CONNECT and CONNECTED frames do not escape the carriage return, line feed
    /// or colon octets", so that 1.0-era peers can still negotiate.
    pub fn escapes_headers(&self) -> bool {
        !matches!(self, Command::Connect | Command::Connected)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One STOMP frame.
///
/// Headers keep every occurrence in wire order; [`Frame::header`] applies the STOMP 1.2 rule
/// that the first occurrence of a repeated header wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    /// A frame with no headers and no body.
    pub fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (builder style).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Frame {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body (builder style). The caller adds `content-length` when it wants one.
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Encodes the frame into `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        self.encode_with(dst, self.command.escapes_headers());
    }

    /// Encodes the frame into `dst`, escaping header names and values when `escape` is set:
    /// STOMP 1.0 has no escaping, so frames for a 1.0 peer are written without it.
    pub fn encode_with(&self, dst: &mut BytesMut, escape: bool) {
        let escape = escape && self.command.escapes_headers();
        dst.reserve(self.encoded_len_hint());
        dst.put_slice(self.command.as_str().as_bytes());
        dst.put_u8(b'\n');
        for (name, value) in &self.headers {
            put_header_part(dst, name, escape);
            dst.put_u8(b':');
            put_header_part(dst, value, escape);
            dst.put_u8(b'\n');
        }
        dst.put_u8(b'\n');
        dst.put_slice(&self.body);
        dst.put_u8(0);
    }

    /// Encodes the frame into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut dst = BytesMut::new();
        self.encode(&mut dst);
        dst.freeze()
    }

    fn encoded_len_hint(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 2)
            .sum();
        self.command.as_str().len() + headers + self.body.len() + 3
    }
}

/// Writes `s` with STOMP 1.2 header escaping when `escape` is set.
fn put_header_part(dst: &mut BytesMut, s: &str, escape: bool) {
    if !escape || !s.bytes().any(needs_escape) {
        dst.put_slice(s.as_bytes());
        return;
    }
    for b in s.bytes() {
        match b {
            b'\r' => dst.put_slice(b"\\r"),
            b'\n' => dst.put_slice(b"\\n"),
            b':' => dst.put_slice(b"\\c"),
            b'\\' => dst.put_slice(b"\\\\"),
            other => dst.put_u8(other),
        }
    }
}

fn needs_escape(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | b':' | b'\\')
}

/// Undoes STOMP 1.2 escaping of a header part that this crate escaped (no undefined
/// sequences).
pub fn unescape_header(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('c') => out.push(':'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Escapes a header name or value into a `String` (STOMP 1.2 rules).
pub fn escape_header(s: &str) -> String {
    let mut out = BytesMut::with_capacity(s.len());
    put_header_part(&mut out, s, true);
    // Escaping only replaces ASCII bytes with ASCII sequences, so UTF-8 stays valid.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_undoes_escape() {
        for s in ["plain", "/team/t:1", "a\\b:c\nd\re"] {
            assert_eq!(unescape_header(&escape_header(s)), s);
        }
    }

    #[test]
    fn stomp_1_0_frames_are_not_escaped() {
        let frame = Frame::new(Command::Message).with_header("destination", "/team/t:1");
        let mut escaped = BytesMut::new();
        frame.encode(&mut escaped);
        assert!(escaped.starts_with(b"MESSAGE\ndestination:/team/t\\c1\n"));
        let mut raw = BytesMut::new();
        frame.encode_with(&mut raw, false);
        assert!(raw.starts_with(b"MESSAGE\ndestination:/team/t:1\n"));
    }

    #[test]
    fn encodes_with_escaping() {
        let frame = Frame::new(Command::Send)
            .with_header("destination", "/team/a:b")
            .with_header("x", "line1\nline2\\")
            .with_body("hi");
        assert_eq!(
            &frame.to_bytes()[..],
            b"SEND\ndestination:/team/a\\cb\nx:line1\\nline2\\\\\n\nhi\0"
        );
    }

    #[test]
    fn connect_headers_are_not_escaped() {
        let frame = Frame::new(Command::Connect).with_header("passcode", "a\\b:c");
        assert_eq!(&frame.to_bytes()[..], b"CONNECT\npasscode:a\\b:c\n\n\0");
    }

    #[test]
    fn first_header_wins() {
        let frame = Frame::new(Command::Send)
            .with_header("a", "1")
            .with_header("a", "2");
        assert_eq!(frame.header("a"), Some("1"));
    }
}
