//! `mixpanel`: Mixpanel's ingestion API.
//!
//! Events (track, page, screen, alias) go to `POST /import?strict=1` with HTTP Basic auth
//! (`api_secret` as user name) as a JSON array of `{event, properties: {time (ms), distinct_id,
//! $insert_id, token, $user_id, $device_id, ...properties}}`; page/screen are `Viewed {name}`
//! and alias is `$create_alias` (`distinct_id` = previousId, `alias` = userId). Identify sets
//! profile properties with `POST /engage` (`$set`), group sets group properties with
//! `POST /groups`; a batch that mixes them makes one request per endpoint.
//!
//! Answers: a 400 from `/import` lists `failed_records` (dead-lettered; Mixpanel ingested the
//! rest); `/engage` and `/groups` answer 200 even for invalid updates, so they are called with
//! `verbose=1` and `{"status": 0}` is a permanent failure; 401, 403 and 413 are permanent;
//! 429 and 5xx are retried.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use reqwest::header::AUTHORIZATION;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use url::Url;

use super::mapping::{self, Message};
use crate::destination::{
    classify_status, Built, Call, DeliveryContext, Destination, Event, HttpRequest, HttpResponse,
    Kind, KindDefaults, Outcome, Part, Plan, SettingError, Settings, Verdict,
};

pub static KIND: Kind = Kind {
    name: "mixpanel",
    catalog_name: "Mixpanel",
    defaults: KindDefaults {
        // Mixpanel's SDKs flush 50 at a time; /import takes up to 2,000 events per request.
        batch_size: 50,
        max_batch_size: 2000,
        rate_limit: None,
    },
    build,
};

const DEFAULT_BASE: &str = "https://api.mixpanel.com";
/// /import takes at most 10 MB of uncompressed JSON per request.
const MAX_IMPORT_BYTES: usize = 10_000_000 - 4_096;
/// /engage and /groups take at most 1 MB per update; keep their requests small too.
const MAX_PROFILE_BYTES: usize = 1_000_000;
/// `$insert_id`: at most 36 characters of `[A-Za-z0-9-]`.
const INSERT_ID_MAX: usize = 36;

/// The keys a `mixpanel` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MixpanelConfig {
    /// The project token (Project Settings > Access Keys): sent with every event and profile
    /// update; with the kind it is the default `rate_limit_key`.
    project_token: String,
    /// The project's API secret (Project Settings > Access Keys), the user name of the HTTP
    /// Basic auth that `/import` requires. For EU data residency set
    /// `endpoint = "https://api-eu.mixpanel.com"`.
    api_secret: String,
}

/// A configured Mixpanel destination.
pub struct Mixpanel {
    token: String,
    secret: String,
    import: Url,
    engage: Url,
    groups: Url,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<MixpanelConfig>(&mut errors) else {
        return Err(errors);
    };
    mapping::non_empty("project_token", &config.project_token, &mut errors);
    mapping::non_empty("api_secret", &config.api_secret, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let url = |path: &str| mapping::endpoint_url(settings.endpoint, DEFAULT_BASE, path);
    let mut import = url("/import");
    import.set_query(Some("strict=1"));
    let mut engage = url("/engage");
    engage.set_query(Some("verbose=1"));
    let mut groups = url("/groups");
    groups.set_query(Some("verbose=1"));
    Ok(Built {
        credential: Some(config.project_token.clone()),
        plugin: Arc::new(Mixpanel {
            token: config.project_token,
            secret: config.api_secret,
            import,
            engage,
            groups,
        }),
    })
}

/// Which endpoint a message goes to, and what it sends there.
enum Mapped {
    Import(Value),
    Engage(Value),
    Groups(Value),
}

impl Mixpanel {
    fn map(&self, message: &Message) -> Option<Mapped> {
        let insert_id = message.message_id().map(|id| {
            mapping::fitting_id(id, INSERT_ID_MAX, |c| c.is_ascii_alphanumeric() || c == '-')
        });
        let event = |name: String, mut properties: Map<String, Value>| {
            properties.insert("token".into(), self.token.as_str().into());
            mapping::put(&mut properties, "time", message.epoch_millis());
            mapping::put(&mut properties, "$insert_id", insert_id.clone());
            Mapped::Import(json!({"event": name, "properties": properties}))
        };
        let call = message.call()?;
        Some(match call {
            Call::Track | Call::Page | Call::Screen => {
                let mut properties = message.properties();
                properties.insert(
                    "distinct_id".into(),
                    message.distinct_id().unwrap_or_default().into(),
                );
                mapping::put(&mut properties, "$user_id", message.user_id());
                mapping::put(&mut properties, "$device_id", message.anonymous_id());
                mapping::put(&mut properties, "ip", message.str("context.ip"));
                let url = message
                    .str("properties.url")
                    .or(message.str("context.page.url"));
                mapping::put(&mut properties, "$current_url", url);
                let name = match call {
                    Call::Track => message.event().unwrap_or_default().to_owned(),
                    _ => message.viewed_event(),
                };
                event(name, properties)
            }
            Call::Alias => {
                let mut properties = Map::new();
                mapping::put(&mut properties, "distinct_id", message.str("previousId"));
                mapping::put(&mut properties, "alias", message.user_id());
                event("$create_alias".into(), properties)
            }
            Call::Identify => {
                let mut update = Map::new();
                update.insert("$token".into(), self.token.as_str().into());
                mapping::put(&mut update, "$distinct_id", message.distinct_id());
                mapping::put(&mut update, "$ip", message.str("context.ip"));
                update.insert("$set".into(), profile(message.traits()).into());
                Mapped::Engage(update.into())
            }
            Call::Group => Mapped::Groups(json!({
                "$token": self.token,
                "$group_key": message.group_type(),
                "$group_id": message.str("groupId"),
                "$set": message.traits(),
            })),
        })
    }

    fn plan(&self, events: &[Event]) -> Plan {
        let mut plan = Plan::new(events.len());
        let mut by_endpoint: BTreeMap<&'static str, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
        for (index, source) in events.iter().enumerate() {
            let (label, value) = match self.map(&Message::of(source)) {
                Some(Mapped::Import(value)) => ("import", value),
                Some(Mapped::Engage(value)) => ("engage", value),
                Some(Mapped::Groups(value)) => ("groups", value),
                None => {
                    plan.fail(index, "not a Segment message Mixpanel can take");
                    continue;
                }
            };
            let bytes = value.to_string().into_bytes();
            by_endpoint.entry(label).or_default().push((index, bytes));
        }
        for (label, items) in by_endpoint {
            let (url, max_bytes) = match label {
                "import" => (&self.import, MAX_IMPORT_BYTES),
                "engage" => (&self.engage, MAX_PROFILE_BYTES),
                _ => (&self.groups, MAX_PROFILE_BYTES),
            };
            let sizes: Vec<usize> = items.iter().map(|(_, bytes)| bytes.len()).collect();
            for run in mapping::pack(&sizes, KIND.defaults.max_batch_size, max_bytes) {
                let items = &items[run];
                let body = mapping::json_array(items.iter().map(|(_, bytes)| &bytes[..]));
                let mut request = HttpRequest::post_json(url.clone(), body);
                if label == "import" {
                    let auth = mapping::basic_auth(&self.secret, "");
                    request.headers.insert(AUTHORIZATION, auth);
                }
                plan.send(Part {
                    label,
                    events: items.iter().map(|(index, _)| *index).collect(),
                    request,
                });
            }
        }
        plan
    }
}

/// Segment's reserved traits under Mixpanel's reserved profile property names.
fn profile(traits: Map<String, Value>) -> Map<String, Value> {
    const RESERVED: [(&str, &str); 8] = [
        ("email", "$email"),
        ("phone", "$phone"),
        ("name", "$name"),
        ("firstName", "$first_name"),
        ("lastName", "$last_name"),
        ("avatar", "$avatar"),
        ("createdAt", "$created"),
        ("username", "$username"),
    ];
    traits
        .into_iter()
        .map(|(key, value)| {
            let key = RESERVED
                .iter()
                .find(|(segment, _)| *segment == key)
                .map_or(key, |(_, mixpanel)| (*mixpanel).to_owned());
            (key, value)
        })
        .collect()
}

impl Destination for Mixpanel {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(self.plan(events).deliver(ctx, classify))
    }
}

/// Mixpanel's answer to a request of `count` events to the endpoint `label`.
fn classify(label: &'static str, response: &HttpResponse, count: usize) -> Verdict {
    let status = response.status;
    let body = mapping::response_json(response);
    match (label, status) {
        ("import", 400) => {
            let failed: BTreeMap<usize, String> = body
                .as_ref()
                .and_then(|b| b["failed_records"].as_array())
                .into_iter()
                .flatten()
                .filter_map(|record| {
                    let index = usize::try_from(record["index"].as_u64()?).ok()?;
                    let field = record["field"].as_str().unwrap_or("the event");
                    let message = record["message"].as_str().unwrap_or("invalid");
                    Some((index, format!("Mixpanel rejected {field}: {message}")))
                })
                .collect();
            if failed.is_empty() {
                return Verdict::All(classify_status(response));
            }
            Verdict::PerEvent(
                (0..count)
                    .map(|i| match failed.get(&i) {
                        Some(message) => Outcome::Failed {
                            status: Some(400),
                            message: message.clone(),
                        },
                        None => Outcome::Delivered,
                    })
                    .collect(),
            )
        }
        (_, 413) => Verdict::All(Outcome::Failed {
            status: Some(413),
            message: format!(
                "HTTP 413: the request is larger than Mixpanel accepts: lower `batch_size` \
                 and replay: {}",
                response.body_excerpt()
            ),
        }),
        ("engage" | "groups", 200..=299) => {
            // verbose=1: {"status": 1} or {"status": 0, "error": "..."}; plain: 1 or 0.
            let rejected = match &body {
                Some(Value::Object(answer)) => answer.get("status") == Some(&json!(0)),
                Some(Value::Number(n)) => n.as_u64() == Some(0),
                _ => false,
            };
            if !rejected {
                return Verdict::All(Outcome::Delivered);
            }
            Verdict::All(Outcome::Failed {
                status: Some(status),
                message: format!(
                    "Mixpanel /{label} rejected the update: {}",
                    response.body_excerpt()
                ),
            })
        }
        _ => Verdict::All(classify_status(response)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixpanel() -> Mixpanel {
        let url = Url::parse("http://127.0.0.1/").unwrap();
        Mixpanel {
            token: "tok".into(),
            secret: "sec".into(),
            import: url.clone(),
            engage: url.clone(),
            groups: url,
        }
    }

    #[test]
    fn calls_go_to_their_endpoints() {
        let m = mixpanel();
        let track = Message {
            json: json!({"type": "track", "event": "Signed Up", "userId": "u1", "anonymousId": "a1",
                         "messageId": "not a valid insert id because it is far too long",
                         "timestamp": "2024-03-01T12:00:00.000Z", "properties": {"plan": "pro"}}),
        };
        let Some(Mapped::Import(event)) = m.map(&track) else {
            panic!("track goes to /import");
        };
        let properties = &event["properties"];
        assert_eq!(properties["distinct_id"], "u1");
        assert_eq!(properties["time"], 1_709_294_400_000i64);
        assert_eq!(properties["token"], "tok");
        assert_eq!(properties["plan"], "pro");
        let insert_id = properties["$insert_id"].as_str().unwrap();
        assert_eq!(insert_id.len(), 36);
        assert!(insert_id.chars().all(|c| c.is_ascii_hexdigit()));

        let identify = Message {
            json: json!({"type": "identify", "userId": "u1", "traits": {"email": "a@b.c", "plan": "pro"}}),
        };
        let Some(Mapped::Engage(update)) = m.map(&identify) else {
            panic!("identify goes to /engage");
        };
        assert_eq!(update["$set"], json!({"$email": "a@b.c", "plan": "pro"}));
        assert_eq!(update["$token"], "tok");
    }

    #[test]
    fn failed_records_fail_only_their_events() {
        let body = json!({"code": 400, "failed_records": [{"index": 1, "$insert_id": "x",
            "field": "properties.time", "message": "'properties.time' is invalid"}],
            "num_records_imported": 1, "status": "Bad Request"});
        let response = HttpResponse {
            status: 400,
            headers: Default::default(),
            body: body.to_string().into(),
        };
        assert_eq!(
            classify("import", &response, 2),
            Verdict::PerEvent(vec![
                Outcome::Delivered,
                Outcome::Failed {
                    status: Some(400),
                    message: "Mixpanel rejected properties.time: 'properties.time' is invalid"
                        .into()
                }
            ])
        );
        let rejected = HttpResponse {
            status: 200,
            headers: Default::default(),
            body: r#"{"status": 0, "error": "bad $set"}"#.into(),
        };
        assert!(matches!(
            classify("engage", &rejected, 1),
            Verdict::All(Outcome::Failed { .. })
        ));
    }
}
