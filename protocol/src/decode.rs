//! Incremental STOMP 1.2 decoding.
//!
//! [`Decoder::decode`] takes whatever bytes have arrived (one WebSocket message may hold part of
//! a frame, one frame, or several) and returns complete frames one at a time. It remembers how
//! far it has scanned, so a frame trickling in a byte at a time costs linear, not quadratic,
//! work; and it refuses a frame as soon as it can tell the frame breaks a [`Limits`] bound, before
//! buffering the rest of it.

use crate::frame::{Command, Frame};
use bytes::{Buf, BytesMut};
use thiserror::Error;

/// Bounds on what a peer may send. Every one is configurable; the defaults suit browsers and
/// bots publishing JSON events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame: command, headers and body.
    pub max_frame_bytes: usize,
    /// Most headers in one frame.
    pub max_headers: usize,
    /// Longest single header line, escaped, without its EOL.
    pub max_header_bytes: usize,
    /// Largest body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_headers: 32,
            max_header_bytes: 4 * 1024,
            max_body_bytes: 60 * 1024,
        }
    }
}

/// Why a byte stream is not valid STOMP. After any of these the stream is out of sync, so the
/// session answers with an `ERROR` frame and closes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("frame is larger than {limit} bytes")]
    FrameTooLarge { limit: usize },
    #[error("body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("more than {limit} headers")]
    TooManyHeaders { limit: usize },
    #[error("a header line is longer than {limit} bytes")]
    HeaderTooLong { limit: usize },
    #[error("frame is not valid UTF-8 before its body")]
    InvalidUtf8,
    #[error("empty command line")]
    EmptyCommand,
    #[error("invalid command line (a command is up to 32 printable ASCII characters)")]
    InvalidCommand,
    #[error("malformed header line (no ':' or empty name)")]
    MalformedHeader,
    #[error("undefined escape sequence in a header")]
    InvalidEscape,
    #[error("invalid content-length header")]
    InvalidContentLength,
    #[error("frame body is not followed by a NUL octet")]
    MissingNul,
}

/// A frame whose header block has been parsed but whose body has not fully arrived.
#[derive(Debug)]
struct Head {
    command: Command,
    headers: Vec<(String, String)>,
    /// Offset of the first body byte in the buffer.
    body_start: usize,
    content_length: Option<usize>,
}

/// Stateful, incremental STOMP decoder. One per connection.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    /// Offset up to which the buffer was already searched for the end of the header block (or,
    /// once `head` is set, for the NUL ending a body without `content-length`).
    scanned: usize,
    /// Complete lines seen so far in an unfinished header block, and where the open line
    /// starts: enough to refuse an oversized block without rescanning it.
    lines: usize,
    line_start: usize,
    head: Option<Head>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            scanned: 0,
            lines: 0,
            line_start: 0,
            head: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits from the next frame on (a session allows larger frames once the
    /// client authenticated). Limits checked on a frame already under way keep their old
    /// values for it.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether part of a frame is buffered (as opposed to only heart-beat EOLs or nothing).
    pub fn is_mid_frame(&self, buf: &BytesMut) -> bool {
        self.head.is_some() || buf.iter().any(|b| !matches!(b, b'\n' | b'\r'))
    }

    /// Decodes the next frame from `buf`, consuming its bytes.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame yet; the bytes stay in `buf` and
    /// the next call continues where this one stopped. EOLs between frames (heart-beats) are
    /// consumed silently.
    ///
    /// # Errors
    ///
    /// Any [`DecodeError`]: the stream is malformed or breaks a limit. The buffer is then in an
    /// unspecified state and the connection should be closed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if self.head.is_none() {
            let eols = buf
                .iter()
                .take_while(|b| matches!(b, b'\n' | b'\r'))
                .count();
            if eols > 0 {
                // A partial frame never starts with an EOL, so nothing was scanned yet.
                buf.advance(eols);
                self.reset_scan();
            }
            if buf.is_empty() {
                return Ok(None);
            }
            let Some(end) = self.find_head_end(buf) else {
                // Too long to ever be a valid header block: stop before buffering more.
                let limit = self.limits.max_frame_bytes;
                if buf.len() > limit {
                    return Err(DecodeError::FrameTooLarge { limit });
                }
                self.check_open_lines(buf)?;
                return Ok(None);
            };
            if end > self.limits.max_frame_bytes {
                return Err(DecodeError::FrameTooLarge {
                    limit: self.limits.max_frame_bytes,
                });
            }
            let head = self.parse_head(&buf[..end], end)?;
            self.scanned = end;
            self.lines = 0;
            self.line_start = 0;
            self.head = Some(head);
        }
        let Some(head) = self.head.as_ref() else {
            return Ok(None);
        };
        let body_end = match head.content_length {
            Some(len) => {
                let end = head.body_start + len;
                if buf.len() <= end {
                    return Ok(None);
                }
                if buf[end] != 0 {
                    return Err(DecodeError::MissingNul);
                }
                end
            }
            None => {
                let from = self.scanned.max(head.body_start);
                match memchr(0, &buf[from..]) {
                    Some(i) => from + i,
                    None => {
                        self.scanned = buf.len();
                        let body = buf.len() - head.body_start;
                        if body > self.limits.max_body_bytes {
                            return Err(DecodeError::BodyTooLarge {
                                limit: self.limits.max_body_bytes,
                            });
                        }
                        if buf.len() > self.limits.max_frame_bytes {
                            return Err(DecodeError::FrameTooLarge {
                                limit: self.limits.max_frame_bytes,
                            });
                        }
                        return Ok(None);
                    }
                }
            }
        };
        let Some(head) = self.head.take() else {
            return Ok(None);
        };
        if body_end - head.body_start > self.limits.max_body_bytes {
            return Err(DecodeError::BodyTooLarge {
                limit: self.limits.max_body_bytes,
            });
        }
        if body_end + 1 > self.limits.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge {
                limit: self.limits.max_frame_bytes,
            });
        }
        let mut frame_bytes = buf.split_to(body_end + 1);
        frame_bytes.advance(head.body_start);
        frame_bytes.truncate(body_end - head.body_start);
        self.reset_scan();
        Ok(Some(Frame {
            command: head.command,
            headers: head.headers,
            body: frame_bytes.freeze(),
        }))
    }

    /// Finds the end of the header block (just past the blank line), scanning only bytes not
    /// scanned before.
    fn find_head_end(&mut self, buf: &[u8]) -> Option<usize> {
        let mut i = self.scanned;
        while let Some(pos) = memchr(b'\n', &buf[i..]) {
            let nl = i + pos;
            match (buf.get(nl + 1), buf.get(nl + 2)) {
                (Some(b'\n'), _) => return Some(nl + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
                // Not enough bytes to decide: look at this newline again next time.
                (None, _) | (Some(b'\r'), None) => {
                    self.scanned = nl;
                    return None;
                }
                _ => {
                    i = nl + 1;
                    self.lines += 1;
                    self.line_start = i;
                }
            }
        }
        self.scanned = buf.len();
        None
    }

    /// Refuses an unfinished header block early when one of its complete lines, or the line
    /// still arriving, already breaks a limit.
    fn check_open_lines(&self, buf: &[u8]) -> Result<(), DecodeError> {
        // The command line is one of the lines; every other complete line is a header.
        if self.lines > self.limits.max_headers + 1 {
            return Err(DecodeError::TooManyHeaders {
                limit: self.limits.max_headers,
            });
        }
        // The command line is bounded by the same figure as a header line.
        let open_line = buf.len() - self.line_start;
        if open_line > self.limits.max_header_bytes + 1 {
            return Err(DecodeError::HeaderTooLong {
                limit: self.limits.max_header_bytes,
            });
        }
        Ok(())
    }

    fn reset_scan(&mut self) {
        self.scanned = 0;
        self.lines = 0;
        self.line_start = 0;
    }

    fn parse_head(&self, block: &[u8], body_start: usize) -> Result<Head, DecodeError> {
        let text = std::str::from_utf8(block).map_err(|_| DecodeError::InvalidUtf8)?;
        let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let command_line = lines.next().unwrap_or_default();
        if command_line.is_empty() {
            return Err(DecodeError::EmptyCommand);
        }
        // Commands are words like SEND; anything with control bytes or spaces is garbage (and
        // could not be encoded back unambiguously).
        if command_line.len() > 32 || !command_line.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(DecodeError::InvalidCommand);
        }
        let command = Command::parse(command_line);
        let escaped = command.escapes_headers();
        let mut headers = Vec::new();
        let mut content_length = None;
        for line in lines.filter(|l| !l.is_empty()) {
            if headers.len() == self.limits.max_headers {
                return Err(DecodeError::TooManyHeaders {
                    limit: self.limits.max_headers,
                });
            }
            if line.len() > self.limits.max_header_bytes {
                return Err(DecodeError::HeaderTooLong {
                    limit: self.limits.max_header_bytes,
                });
            }
            let (name, value) = line.split_once(':').ok_or(DecodeError::MalformedHeader)?;
            if name.is_empty() {
                return Err(DecodeError::MalformedHeader);
            }
            let (name, value) = if escaped {
                (unescape(name)?, unescape(value)?)
            } else {
                (name.to_owned(), value.to_owned())
            };
            // Repeated headers: the first occurrence decides, including content-length.
            if name == "content-length" && !headers.iter().any(|(n, _)| n == "content-length") {
                let len: usize = value
                    .trim()
                    .parse()
                    .map_err(|_| DecodeError::InvalidContentLength)?;
                if len > self.limits.max_body_bytes {
                    return Err(DecodeError::BodyTooLarge {
                        limit: self.limits.max_body_bytes,
                    });
                }
                content_length = Some(len);
            }
            headers.push((name, value));
        }
        Ok(Head {
            command,
            headers,
            body_start,
            content_length,
        })
    }
}

/// Undoes STOMP 1.2 header escaping. Undefined escapes are a protocol error, as the spec asks.
fn unescape(s: &str) -> Result<String, DecodeError> {
    if !s.contains('\\') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('c') => out.push(':'),
            Some('\\') => out.push('\\'),
            _ => return Err(DecodeError::InvalidEscape),
        }
    }
    Ok(out)
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests;
