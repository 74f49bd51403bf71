//! Segment-shaped `track` events of about 400 bytes, as an SDK sends them.
//!
//! Each event has a unique `messageId` and carries `properties.sent_ns`, the instant it was
//! sent (see [`crate::timing`]), which the sinks read back to measure ingest-to-sink latency.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The write key of the one source every bench config has.
pub const WRITE_KEY: &str = "wk_bench";

/// Makes events whose names cycle through a list (destinations filter on them). Not `Clone`:
/// every load needs a maker of its own, or its messageIds would repeat another's and be
/// dropped as duplicates.
pub struct EventMaker {
    /// Distinguishes the messageIds of two makers in one process.
    run: u64,
    names: Arc<[String]>,
}

impl EventMaker {
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> EventMaker {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        assert!(!names.is_empty(), "an event maker needs at least one name");
        EventMaker {
            run: RUNS.fetch_add(1, Ordering::Relaxed),
            names: names.into(),
        }
    }

    /// One event name, as every event of this maker has.
    pub fn single(name: &str) -> EventMaker {
        EventMaker::new([name])
    }

    /// The messageId of event number `seq`.
    pub fn message_id(&self, seq: u64) -> String {
        format!("sy-{}-{}-{seq}", std::process::id(), self.run)
    }

    /// Appends event number `seq` (named after it, round robin) as JSON.
    pub fn write_track(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64, timestamp: &str) {
        let name = &self.names[(seq % self.names.len() as u64) as usize];
        let _ = write!(
            out,
            concat!(
                r#"{{"type":"track","event":"{name}","userId":"user-{user}","#,
                r#""messageId":"sy-{pid}-{run}-{seq}","timestamp":"{timestamp}","#,
                r#""properties":{{"sent_ns":{sent_ns},"order_id":"ord-{seq}","revenue":42.17,"#,
                r#""currency":"USD","products":[{{"sku":"SKU-1042","#,
                r#""name":"Trail Running Shoes","price":89.99,"quantity":1}}]}},"#,
                r#""context":{{"library":{{"name":"analytics-python","version":"2.3.2"}},"#,
                r#""ip":"203.0.113.7","userAgent":"Mozilla/5.0"}}}}"#
            ),
            name = name,
            user = seq % 5_000,
            pid = std::process::id(),
            run = self.run,
            seq = seq,
            timestamp = timestamp,
            sent_ns = sent_ns,
        );
    }

    /// A `/v1/track` body: event `seq`.
    pub fn track_body(&self, seq: u64, sent_ns: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.write_track(&mut out, seq, sent_ns, &timestamp_now());
        out
    }

    /// A `/v1/batch` body: events `first..first + count`.
    pub fn batch_body(&self, first: u64, count: usize, sent_ns: u64) -> Vec<u8> {
        let timestamp = timestamp_now();
        let mut out = Vec::with_capacity(64 + count * 450);
        out.extend_from_slice(b"{\"batch\":[");
        for i in 0..count as u64 {
            if i > 0 {
                out.push(b',');
            }
            self.write_track(&mut out, first + i, sent_ns, &timestamp);
        }
        let _ = write!(out, r#"],"sentAt":"{timestamp}"}}"#);
        out
    }
}

/// Now, as Segment SDKs write timestamps.
pub fn timestamp_now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "2026-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_of_about_400_bytes() {
        let maker = EventMaker::new(["Order Completed", "Product Viewed"]);
        let body = maker.track_body(7, 123);
        let event: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(event["properties"]["sent_ns"], 123);
        assert_eq!(event["event"], "Product Viewed");
        assert_eq!(event["messageId"], maker.message_id(7));
        assert!((380..=460).contains(&body.len()), "{} bytes", body.len());

        let batch: serde_json::Value =
            serde_json::from_slice(&maker.batch_body(10, 3, 5)).expect("valid JSON");
        assert_eq!(batch["batch"].as_array().map(Vec::len), Some(3));
    }
}
