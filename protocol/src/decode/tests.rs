use super::*;
use crate::frame::Frame;
use bytes::Bytes;
use proptest::prelude::*;

/// Renders decoded frames (and the error that stopped decoding, if any) as one line each:
/// `COMMAND name=value,… |body|`, with the body's bytes escaped as Rust would.
fn render(input: &[u8], limits: Limits, chunk: usize) -> Vec<String> {
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => out.push(render_frame(&frame)),
                Ok(None) => break,
                Err(err) => {
                    out.push(format!("error: {err}"));
                    return out;
                }
            }
        }
    }
    out
}

fn render_frame(frame: &Frame) -> String {
    let headers: Vec<String> = frame
        .headers
        .iter()
        .map(|(n, v)| format!("{n}={v:?}"))
        .collect();
    format!(
        "{} {} |{}|",
        frame.command,
        headers.join(","),
        frame.body.escape_ascii()
    )
}

/// Decodes `input` whole and split into every chunk size up to 7 bytes, and checks that each
/// way gives `expect`.
fn check(input: &[u8], expect: &[&str]) {
    check_with(input, Limits::default(), expect);
}

fn check_with(input: &[u8], limits: Limits, expect: &[&str]) {
    for chunk in [input.len(), 1, 2, 3, 5, 7] {
        let got = render(input, limits, chunk);
        assert_eq!(
            got,
            expect,
            "chunk size {chunk}, input {:?}",
            input.escape_ascii().to_string()
        );
    }
}

#[test]
fn simple_frames() {
    check(
        b"SEND\ndestination:/team/t1\n\nhello\0",
        &[r#"SEND destination="/team/t1" |hello|"#],
    );
    check(b"DISCONNECT\n\n\0", &["DISCONNECT  ||"]);
    check(
        b"CONNECT\r\naccept-version:1.2\r\nhost:x\r\n\r\n\0",
        &[r#"CONNECT accept-version="1.2",host="x" ||"#],
    );
}

#[test]
fn heart_beats_and_packed_frames() {
    check(
        b"\n\r\n\nSEND\n\na\0\n\nSEND\n\nb\0\r\n",
        &["SEND  |a|", "SEND  |b|"],
    );
    check(b"\n\n\n", &[]);
}

#[test]
fn escaping() {
    check(
        b"SEND\na\\cb:x\\ny\\\\z\\r\n\n\0",
        &[r#"SEND a:b="x\ny\\z\r" ||"#],
    );
    check(
        b"SEND\na:\\t\n\n\0",
        &["error: undefined escape sequence in a header"],
    );
    // CONNECT is not escaped, and a value keeps every colon after the first.
    check(
        b"CONNECT\npasscode:a\\tb:c\n\n\0",
        &[r#"CONNECT passcode="a\\tb:c" ||"#],
    );
}

#[test]
fn repeated_headers_first_wins() {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::from(&b"SEND\nfoo:1\nfoo:2\n\n\0"[..]);
    let frame = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!(frame.header("foo"), Some("1"));
    assert_eq!(frame.headers.len(), 2);
    // The first content-length decides how many bytes are body.
    check(
        b"SEND\ncontent-length:2\ncontent-length:5\n\na\0\0",
        &[r#"SEND content-length="2",content-length="5" |a\x00|"#],
    );
}

#[test]
fn content_length_allows_nul_in_body() {
    check(
        b"SEND\ncontent-length:3\n\na\0b\0",
        &[r#"SEND content-length="3" |a\x00b|"#],
    );
    check(
        b"SEND\ncontent-length:1\n\nab\0",
        &["error: frame body is not followed by a NUL octet"],
    );
    check(
        b"SEND\ncontent-length:x\n\n\0",
        &["error: invalid content-length header"],
    );
}

#[test]
fn malformed_input() {
    check(
        b"SEND\nno-colon\n\n\0",
        &["error: malformed header line (no ':' or empty name)"],
    );
    check(
        b"SEND\n:empty\n\n\0",
        &["error: malformed header line (no ':' or empty name)"],
    );
    check(
        b"SEND\na:\xff\n\n\0",
        &["error: frame is not valid UTF-8 before its body"],
    );
    check(b"BOGUS\n\n\0", &["BOGUS  ||"]);
    // Found by the fuzzer: a command with control bytes used to decode, and re-encode to a
    // different command.
    check(
        b"\0\r\r\n\n\n\0",
        &["error: invalid command line (a command is up to 32 printable ASCII characters)"],
    );
    check(
        b"SEND X\n\n\0",
        &["error: invalid command line (a command is up to 32 printable ASCII characters)"],
    );
    // A body may be any bytes.
    check(b"SEND\n\n\xff\xfe\0", &[r"SEND  |\xff\xfe|"]);
}

#[test]
fn limits() {
    let limits = Limits {
        max_frame_bytes: 64,
        max_headers: 2,
        max_header_bytes: 20,
        max_body_bytes: 8,
    };
    check_with(
        b"SEND\na:1\nb:2\n\n12345678\0",
        limits,
        &[r#"SEND a="1",b="2" |12345678|"#],
    );
    check_with(
        b"SEND\na:1\nb:2\nc:3\n\n\0",
        limits,
        &["error: more than 2 headers"],
    );
    check_with(
        b"SEND\na:1234567890123456789\n\n\0",
        limits,
        &["error: a header line is longer than 20 bytes"],
    );
    check_with(
        b"SEND\n\n123456789\0",
        limits,
        &["error: body is larger than 8 bytes"],
    );
    check_with(
        b"SEND\ncontent-length:9\n\n123456789\0",
        limits,
        &["error: body is larger than 8 bytes"],
    );
}

#[test]
fn oversized_frames_are_refused_before_they_are_buffered() {
    let limits = Limits::default();
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::new();
    // A header block that never ends.
    let line = format!("h:{}\n", "x".repeat(100));
    buf.extend_from_slice(b"SEND\n");
    let mut refused = None;
    for _ in 0..10_000 {
        buf.extend_from_slice(line.as_bytes());
        if let Err(err) = decoder.decode(&mut buf) {
            refused = Some(err);
            break;
        }
    }
    assert_eq!(
        refused,
        Some(DecodeError::TooManyHeaders {
            limit: limits.max_headers
        })
    );

    // A body without content-length that never ends.
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]);
    let mut refused = None;
    for _ in 0..10_000 {
        buf.extend_from_slice(&[b'x'; 1000]);
        if let Err(err) = decoder.decode(&mut buf) {
            refused = Some(err);
            break;
        }
    }
    assert_eq!(
        refused,
        Some(DecodeError::BodyTooLarge {
            limit: limits.max_body_bytes
        })
    );
    assert!(buf.len() < limits.max_frame_bytes + 1000);
}

#[test]
fn body_is_a_zero_copy_slice() {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::from(&b"SEND\n\nbody\0"[..]);
    let frame = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!(frame.body, Bytes::from_static(b"body"));
    assert!(buf.is_empty());
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Connect),
        Just(Command::Stomp),
        Just(Command::Send),
        Just(Command::Subscribe),
        Just(Command::Unsubscribe),
        Just(Command::Ack),
        Just(Command::Nack),
        Just(Command::Begin),
        Just(Command::Commit),
        Just(Command::Abort),
        Just(Command::Disconnect),
        Just(Command::Connected),
        Just(Command::Message),
        Just(Command::Receipt),
        Just(Command::Error),
        "[A-Z]{1,12}".prop_map(|s| Command::parse(&s)),
    ]
}

/// Arbitrary frames that STOMP 1.2 can represent: CONNECT/CONNECTED headers cannot carry CR,
/// LF, or a colon in the name, because those frames are not escaped.
fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        arb_command(),
        prop::collection::vec(any::<u8>(), 0..200),
        any::<bool>(),
    )
        .prop_flat_map(|(command, body, with_length)| {
            let raw = !command.escapes_headers();
            let name = if raw { "[^\r\n:]{1,12}" } else { "\\PC{1,12}" };
            let value = if raw {
                "[^\r\n]{0,20}"
            } else {
                "\\PC{0,20}|[\r\n:\\\\]{0,4}"
            };
            let headers = prop::collection::vec((name, value), 0..6);
            (Just(command), headers, Just(body), Just(with_length))
        })
        .prop_map(|(command, mut headers, mut body, with_length)| {
            headers.retain(|(n, _)| n != "content-length");
            if with_length {
                headers.push(("content-length".to_owned(), body.len().to_string()));
            } else {
                // Without content-length the body ends at its first NUL.
                body.retain(|&b| b != 0);
            }
            Frame {
                command,
                headers,
                body: Bytes::from(body),
            }
        })
}

fn roomy() -> Limits {
    Limits {
        max_frame_bytes: 1 << 20,
        max_headers: 64,
        max_header_bytes: 1024,
        max_body_bytes: 1 << 20,
    }
}

proptest! {
    #[test]
    fn encode_decode_round_trip(frames in prop::collection::vec(arb_frame(), 1..5), chunk in 1usize..64, eols in 0usize..3) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire);
            wire.extend_from_slice(&b"\r\n\n"[..eols]);
        }
        let mut decoder = Decoder::new(roomy());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_chunking_does_not_change_frames(
        input in prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\n'), Just(b':'), Just(0u8)], 0..400),
        chunk in 1usize..32,
    ) {
        let limits = Limits { max_frame_bytes: 256, max_headers: 4, max_header_bytes: 32, max_body_bytes: 128 };
        let whole = render(&input, limits, input.len());
        let chunked = render(&input, limits, chunk);
        // Frames decoded before any error must agree; only the kind of error may differ,
        // because a chunked stream can break a limit before the whole one shows a syntax error.
        let ok = |v: &Vec<String>| v.iter().take_while(|l| !l.starts_with("error")).cloned().collect::<Vec<_>>();
        let (w, c) = (ok(&whole), ok(&chunked));
        let n = w.len().min(c.len());
        prop_assert_eq!(&w[..n], &c[..n]);
    }
}
