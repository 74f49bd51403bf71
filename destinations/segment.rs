//! `segment`: forwards events to a Segment-compatible HTTP API (`POST /v1/batch`), such as
//! Segment itself or another Switchyard, so routers can be chained.
//!
//! Auth is HTTP Basic with the write key as user name. Events go as they are, `messageId`
//! included (Segment deduplicates on it), except `sentAt`: the batch carries the time it is
//! sent instead, so the receiver's clock-skew correction measures this hop and does not shift
//! the already corrected `timestamp` by the time the event waited here. Requests stay under
//! Segment's 500 KB per batch (a batch that would not is sent as several requests).
//!
//! Answers: 2xx delivered; 400 (too large, invalid JSON) and 401 permanent; 429 and 5xx retried.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::AUTHORIZATION;
use serde::Deserialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use url::Url;

use super::mapping;
use crate::destination::{
    classify_status, Built, DeliveryContext, Destination, Event, HttpRequest, Kind, KindDefaults,
    Part, Plan, SettingError, Settings, Verdict,
};

pub static KIND: Kind = Kind {
    name: "segment",
    catalog_name: "Segment",
    defaults: KindDefaults {
        batch_size: 100,
        max_batch_size: 100,
        // Segment asks partners to stay under 50 requests a second.
        rate_limit: Some((50, Duration::from_secs(1))),
    },
    build,
};

const DEFAULT_BASE: &str = "https://api.segment.io";
/// Segment takes at most 500 KB per batch request; room is left for the envelope.
const MAX_BATCH_BYTES: usize = 500 * 1024 - 1024;

/// The keys a `segment` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SegmentConfig {
    /// The write key of the source that receives the events, sent as the HTTP Basic user name.
    /// With the kind it is the default `rate_limit_key`. For Segment's EU region set
    /// `endpoint = "https://events.eu1.segmentapis.com"`; for another Switchyard, its URL.
    write_key: String,
}

/// A configured Segment forwarder.
pub struct Segment {
    url: Url,
    write_key: String,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    mapping::with_credential(
        settings,
        "write_key",
        |config: &SegmentConfig| &config.write_key,
        |config| {
            Arc::new(Segment {
                url: mapping::endpoint_url(settings.endpoint, DEFAULT_BASE, "/v1/batch"),
                write_key: config.write_key,
            })
        },
    )
}

/// The event as forwarded: as stored, without `sentAt`.
fn forwarded(event: &Event) -> Vec<u8> {
    match event.json() {
        Value::Object(mut message) => {
            message.remove("sentAt");
            Value::Object(message).to_string().into_bytes()
        }
        _ => event.payload.get().as_bytes().to_vec(),
    }
}

impl Segment {
    fn plan(&self, events: &[Event]) -> Plan {
        let mut plan = Plan::new(events.len());
        let messages: Vec<Vec<u8>> = events.iter().map(forwarded).collect();
        let sizes: Vec<usize> = messages.iter().map(Vec::len).collect();
        let sent_at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        for run in mapping::pack(&sizes, KIND.defaults.max_batch_size, MAX_BATCH_BYTES) {
            let mut body = b"{\"batch\":".to_vec();
            body.extend(mapping::json_array(
                messages[run.clone()].iter().map(|m| &m[..]),
            ));
            body.extend_from_slice(
                format!(",\"sentAt\":{}}}", Value::from(sent_at.as_str())).as_bytes(),
            );
            let mut request = HttpRequest::post_json(self.url.clone(), body);
            request
                .headers
                .insert(AUTHORIZATION, mapping::basic_auth(&self.write_key, ""));
            plan.send(Part {
                label: "batch",
                events: run.collect(),
                request,
            });
        }
        plan
    }
}

impl Destination for Segment {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(
            self.plan(events)
                .deliver(ctx, |_, answer, _| Verdict::All(classify_status(answer))),
        )
    }
}
