//! `amplitude`: Amplitude's HTTP V2 API (`POST /2/httpapi`).
//!
//! Mapping: track → `event_type` = event name, `event_properties` = properties,
//! `user_properties` = `context.traits`; page/screen → `Viewed {name}`; identify → `$identify`
//! with `user_properties: {"$set": traits}`; group → `$identify` with `groups: {type: groupId}`;
//! alias is skipped (Amplitude's user mapping is a separate, paid API). Every event carries
//! `insert_id` = messageId, `time` in epoch milliseconds, and the request sets
//! `options.min_id_length = 1` so short user ids are kept.
//!
//! Answers: 400 lists the rejected events by index: those are dead-lettered and the rest are
//! retried (Amplitude ingests none of a rejected request); 413 is permanent; 429 pauses 30 s
//! (Amplitude sends no `Retry-After`); 5xx is retried (`insert_id` makes that safe).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use url::Url;

use super::mapping::{self, Message};
use crate::destination::{
    classify_status, Built, Call, DeliveryContext, Destination, Event, HttpRequest, HttpResponse,
    Kind, KindDefaults, Outcome, Part, Plan, SettingError, Settings, Verdict,
};

pub static KIND: Kind = Kind {
    name: "amplitude",
    catalog_name: "Amplitude",
    defaults: KindDefaults {
        // Amplitude asks Starter plans for at most 10 events per request; 2,000 is the maximum.
        batch_size: 10,
        max_batch_size: 2000,
        rate_limit: None,
    },
    build,
};

const DEFAULT_BASE: &str = "https://api2.amplitude.com";
/// Requests must stay under 1 MB; the envelope around the events is small.
const MAX_EVENT_BYTES: usize = 1_000_000 - 4_096;
/// Amplitude's documented pause for a throttled user or device.
const THROTTLE_PAUSE: Duration = Duration::from_secs(30);

/// The keys an `amplitude` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AmplitudeConfig {
    /// The project's API key (Amplitude: Settings > Projects > API Key). Sent in the request
    /// body; with the kind it is the default `rate_limit_key`. For the EU data center set
    /// `endpoint = "https://api.eu.amplitude.com"`.
    api_key: String,
}

/// A configured Amplitude destination.
pub struct Amplitude {
    api_key: String,
    url: Url,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    mapping::with_credential(
        settings,
        "api_key",
        |config: &AmplitudeConfig| &config.api_key,
        |config| {
            Arc::new(Amplitude {
                url: mapping::endpoint_url(settings.endpoint, DEFAULT_BASE, "/2/httpapi"),
                api_key: config.api_key,
            })
        },
    )
}

/// One Segment message as an Amplitude event; `None` for a call Amplitude has no event for.
fn event(message: &Message) -> Option<Value> {
    let call = message.call()?;
    let mut event = Map::new();
    match call {
        Call::Track => {
            mapping::put(&mut event, "event_type", message.event());
            event.insert("event_properties".into(), message.properties().into());
            let traits = message.traits();
            if !traits.is_empty() {
                event.insert("user_properties".into(), traits.into());
            }
            revenue(message, &mut event);
        }
        Call::Page | Call::Screen => {
            event.insert("event_type".into(), message.viewed_event().into());
            event.insert("event_properties".into(), message.properties().into());
        }
        Call::Identify => {
            event.insert("event_type".into(), "$identify".into());
            event.insert("user_properties".into(), json!({"$set": message.traits()}));
        }
        Call::Group => {
            let mut group = Map::new();
            mapping::put(&mut group, &message.group_type(), message.str("groupId"));
            let group = Value::Object(group);
            event.insert("event_type".into(), "$identify".into());
            event.insert("groups".into(), group.clone());
            event.insert("user_properties".into(), json!({ "$set": group }));
        }
        Call::Alias => return None,
    }
    mapping::put(&mut event, "user_id", message.user_id());
    let device = message
        .str("context.device.id")
        .or_else(|| message.anonymous_id());
    mapping::put(&mut event, "device_id", device);
    mapping::put(&mut event, "time", message.epoch_millis());
    mapping::put(&mut event, "insert_id", message.message_id());
    for (field, path) in CONTEXT_FIELDS {
        mapping::put(&mut event, field, message.get(path).cloned());
    }
    Some(event.into())
}

/// Amplitude event fields taken from the Segment `context`.
const CONTEXT_FIELDS: [(&str, &str); 12] = [
    ("ip", "context.ip"),
    ("app_version", "context.app.version"),
    ("os_name", "context.os.name"),
    ("os_version", "context.os.version"),
    ("device_manufacturer", "context.device.manufacturer"),
    ("device_model", "context.device.model"),
    ("carrier", "context.network.carrier"),
    ("language", "context.locale"),
    ("country", "context.location.country"),
    ("city", "context.location.city"),
    ("location_lat", "context.location.latitude"),
    ("location_lng", "context.location.longitude"),
];

/// Revenue fields of a track with `revenue` or `price` (Segment's Order Completed and the like).
fn revenue(message: &Message, event: &mut Map<String, Value>) {
    let number = |path: &str| message.get(path).filter(|v| v.is_number()).cloned();
    mapping::put(event, "revenue", number("properties.revenue"));
    mapping::put(event, "price", number("properties.price"));
    mapping::put(event, "quantity", number("properties.quantity"));
    mapping::put(event, "productId", message.str("properties.product_id"));
}

impl Amplitude {
    fn plan(&self, events: &[Event]) -> Plan {
        let mut plan = Plan::new(events.len());
        let mut mapped = Vec::new();
        for (index, source) in events.iter().enumerate() {
            let message = Message::of(source);
            match event(&message) {
                Some(event) => mapped.push((index, event.to_string().into_bytes())),
                None => plan.skip(index),
            }
        }
        let sizes: Vec<usize> = mapped.iter().map(|(_, bytes)| bytes.len()).collect();
        for run in mapping::pack(&sizes, KIND.defaults.max_batch_size, MAX_EVENT_BYTES) {
            let items = &mapped[run];
            let events = mapping::json_array(items.iter().map(|(_, bytes)| &bytes[..]));
            let mut body = format!(
                r#"{{"api_key":{},"options":{{"min_id_length":1}},"events":"#,
                Value::from(self.api_key.as_str())
            )
            .into_bytes();
            body.extend_from_slice(&events);
            body.push(b'}');
            plan.send(Part {
                label: "httpapi",
                events: items.iter().map(|(index, _)| *index).collect(),
                request: HttpRequest::post_json(self.url.clone(), body),
            });
        }
        plan
    }
}

impl Destination for Amplitude {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(
            self.plan(events)
                .deliver(ctx, |_, answer, count| classify(answer, count)),
        )
    }
}

/// Amplitude's answer to a request of `count` events.
fn classify(response: &HttpResponse, count: usize) -> Verdict {
    let status = response.status;
    match status {
        400 => {
            let body = mapping::response_json(response).unwrap_or_default();
            let rejected = rejected_events(&body);
            if rejected.is_empty() {
                return Verdict::All(classify_status(response));
            }
            let error = body["error"].as_str().unwrap_or("invalid event");
            Verdict::PerEvent(
                (0..count)
                    .map(|i| match rejected.get(&i) {
                        Some(fields) => Outcome::Failed {
                            status: Some(400),
                            message: format!("Amplitude rejected the event ({fields}): {error}"),
                        },
                        None => Outcome::Retry {
                            status: Some(400),
                            retry_after: None,
                            throttled: false,
                            message: "not ingested: Amplitude rejected other events of the \
                                      request; resent without them"
                                .into(),
                        },
                    })
                    .collect(),
            )
        }
        413 => Verdict::All(Outcome::Failed {
            status: Some(413),
            message: format!(
                "HTTP 413: the request is larger than Amplitude accepts (2,000 events, 1 MB): \
                 lower `batch_size` and replay: {}",
                response.body_excerpt()
            ),
        }),
        429 => Verdict::All(Outcome::Retry {
            status: Some(429),
            retry_after: Some(response.retry_after().unwrap_or(THROTTLE_PAUSE)),
            throttled: true,
            message: format!("HTTP 429: {}", response.body_excerpt()),
        }),
        _ => Verdict::All(classify_status(response)),
    }
}

/// Indexes of the events a 400 names, with what is wrong with each: `events_with_invalid_fields`,
/// `events_with_missing_fields`, `events_with_invalid_id_lengths` (`{field: [index, ...]}`) and
/// `silenced_events` (`[index, ...]`).
fn rejected_events(body: &Value) -> BTreeMap<usize, String> {
    let mut rejected: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let Some(fields) = body.as_object() else {
        return BTreeMap::new();
    };
    for (key, value) in fields {
        let problem = key
            .strip_prefix("events_with_")
            .unwrap_or(key)
            .replace('_', " ");
        match value {
            Value::Object(by_field) if key.starts_with("events_with_") => {
                for (field, indexes) in by_field {
                    for index in indexes.as_array().into_iter().flatten() {
                        if let Some(index) = index.as_u64().and_then(|i| usize::try_from(i).ok()) {
                            rejected
                                .entry(index)
                                .or_default()
                                .push(format!("{problem}: `{field}`"));
                        }
                    }
                }
            }
            Value::Array(indexes) if key == "silenced_events" => {
                for index in indexes.iter().filter_map(Value::as_u64) {
                    if let Ok(index) = usize::try_from(index) {
                        rejected
                            .entry(index)
                            .or_default()
                            .push("silenced device".into());
                    }
                }
            }
            _ => {}
        }
    }
    rejected
        .into_iter()
        .map(|(index, problems)| (index, problems.join(", ")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: Value) -> Message {
        Message { json }
    }

    #[test]
    fn calls_map_to_amplitude_events() {
        let track = event(&message(json!({
            "type": "track", "event": "Order Completed", "userId": "u1", "anonymousId": "a1",
            "messageId": "m1", "timestamp": "2024-03-01T12:00:00.000Z",
            "properties": {"revenue": 9.5, "product_id": "p1"},
            "context": {"ip": "8.8.8.8", "traits": {"plan": "pro"}, "os": {"name": "iOS"}}
        })))
        .unwrap();
        assert_eq!(track["event_type"], "Order Completed");
        assert_eq!(track["user_id"], "u1");
        assert_eq!(track["device_id"], "a1");
        assert_eq!(track["time"], 1_709_294_400_000i64);
        assert_eq!(track["insert_id"], "m1");
        assert_eq!(track["revenue"], 9.5);
        assert_eq!(track["productId"], "p1");
        assert_eq!(track["user_properties"]["plan"], "pro");
        assert_eq!(track["ip"], "8.8.8.8");
        assert_eq!(track["os_name"], "iOS");

        let group = event(&message(
            json!({"type": "group", "userId": "u1", "groupId": "g1",
                                           "traits": {"groupType": "org"}}),
        ))
        .unwrap();
        assert_eq!(group["event_type"], "$identify");
        assert_eq!(group["groups"], json!({"org": "g1"}));
        assert!(event(&message(
            json!({"type": "alias", "userId": "u1", "previousId": "a"})
        ))
        .is_none());
    }

    #[test]
    fn a_400_fails_the_listed_events_and_retries_the_rest() {
        let body = json!({"code": 400, "error": "Request missing required field",
            "events_with_invalid_fields": {"time": [2]}, "events_with_missing_fields": {"event_type": [0]}});
        let response = HttpResponse {
            status: 400,
            headers: Default::default(),
            body: body.to_string().into(),
        };
        let Verdict::PerEvent(outcomes) = classify(&response, 3) else {
            panic!("per-event verdict expected");
        };
        assert!(
            matches!(&outcomes[0], Outcome::Failed { message, .. } if message.contains("event_type"))
        );
        assert!(matches!(outcomes[1], Outcome::Retry { .. }));
        assert!(
            matches!(&outcomes[2], Outcome::Failed { message, .. } if message.contains("`time`"))
        );
    }
}
