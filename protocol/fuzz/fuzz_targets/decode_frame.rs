//! Arbitrary bytes, fed in arbitrary chunks, never panic the decoder; every decoded frame
//! re-encodes to bytes that decode to the same frame, and types without panicking.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::{ClientFrame, Decoder, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else { return };
    let limits = Limits { max_frame_bytes: 4096, max_headers: 16, max_header_bytes: 512, max_body_bytes: 2048 };
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::new();
    for piece in input.chunks(usize::from(chunk.max(1))) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut again = Decoder::new(Limits {
                        max_frame_bytes: 1 << 20,
                        max_headers: 1024,
                        max_header_bytes: 1 << 16,
                        max_body_bytes: 1 << 20,
                    });
                    let mut wire = BytesMut::new();
                    frame.encode(&mut wire);
                    // CONNECT/CONNECTED are not escaped, so a decoded value may hold bytes
                    // that cannot be re-encoded faithfully; only escaped frames round-trip.
                    if frame.command.escapes_headers() {
                        let decoded = again.decode(&mut wire).expect("re-encoded frame decodes");
                        assert_eq!(decoded.as_ref(), Some(&frame));
                    }
                    let _ = ClientFrame::try_from(frame);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
});
