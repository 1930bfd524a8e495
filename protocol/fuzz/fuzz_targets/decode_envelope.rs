//! Arbitrary text as destinations, event types and envelope JSON never panics the parsers, and
//! a parsed topic prints back to its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{Event, EventType, Topic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(topic) = Topic::parse(text) {
        assert_eq!(topic.as_str(), text);
    }
    let _ = EventType::parse(text);
    let _ = serde_json::from_str::<Event>(text);
});
