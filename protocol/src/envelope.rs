//! The JSON envelope every event travels in.
//!
//! ```json
//! {"id":"01JD…","type":"job.progress","topic":"/team/t1","ts":"2026-11-24T10:00:00.123Z","data":{…}}
//! ```
//!
//! `data` is carried as raw JSON ([`RawValue`]): Lockstep checks that it is JSON and then passes
//! the publisher's bytes through untouched, key order and number formatting included.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::time::SystemTime;

/// An envelope to encode, borrowing its parts.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub topic: &'a str,
    pub ts: &'a str,
    pub data: &'a RawValue,
}

impl Envelope<'_> {
    /// The envelope as compact JSON.
    pub fn to_json(&self) -> String {
        // Serializing borrowed strings and a RawValue cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Formats a timestamp as the envelope's `ts`: RFC 3339, UTC, milliseconds.
pub fn format_ts(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// A received event, as clients and tests decode it.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub topic: String,
    pub ts: String,
    pub data: Box<RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn data_passes_through_untouched() {
        let data = RawValue::from_string(r#"{"z":1,"a":1.50,"s":"é"}"#.to_owned()).unwrap();
        let ts = format_ts(UNIX_EPOCH + Duration::from_millis(1_795_000_000_123));
        let json = Envelope {
            id: "01X",
            event_type: "job.progress",
            topic: "/team/t",
            ts: &ts,
            data: &data,
        }
        .to_json();
        assert_eq!(
            json,
            r#"{"id":"01X","type":"job.progress","topic":"/team/t","ts":"2026-11-18T11:06:40.123Z","data":{"z":1,"a":1.50,"s":"é"}}"#
        );
        let event: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(event.data.get(), data.get());
    }
}
