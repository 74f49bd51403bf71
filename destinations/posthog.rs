//! `posthog`: PostHog's batch capture API (`POST /batch/`).
//!
//! Body: `{api_key, batch: [{event, distinct_id, properties, timestamp, uuid}]}`. track → the
//! event name; identify → `$identify` with `properties.$set` = traits (and `$anon_distinct_id`
//! to merge the anonymous user); group → `$groupidentify` with `$group_type`
//! (`traits.groupType`, else `group`), `$group_key` = groupId and `$group_set` = traits; alias →
//! `$create_alias` (`distinct_id` = userId, `properties.alias` = previousId); page →
//! `$pageview` with `$current_url`; screen → `$screen` with `$screen_name`. `distinct_id` is
//! userId, else anonymousId (anonymous track/page/screen events set `$process_person_profile: false`,
//! as PostHog documents). `uuid` is the messageId, or a UUID derived from it when it is not one.
//!
//! Answers: 2xx delivered; 400 and 401 permanent; 429 and 5xx retried.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;

use super::mapping::{self, Message};
use crate::destination::{
    Built, Call, Event, HttpDestination, HttpRequest, Kind, KindDefaults, SettingError, Settings,
};

pub static KIND: Kind = Kind {
    name: "posthog",
    catalog_name: "PostHog",
    defaults: KindDefaults {
        batch_size: 100,
        // PostHog counts no events per batch but takes bodies under 20 MB: 500 Segment
        // messages of at most 32 KB each stay below it.
        max_batch_size: 500,
        rate_limit: None,
    },
    build,
};

const DEFAULT_BASE: &str = "https://us.i.posthog.com";

/// The keys a `posthog` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PosthogConfig {
    /// The project API key (`phc_...`, Project settings > Project API key), sent in the body.
    /// With the kind it is the default `rate_limit_key`. For EU Cloud set
    /// `endpoint = "https://eu.i.posthog.com"`; for a self-hosted PostHog, its URL.
    api_key: String,
}

/// A configured PostHog destination.
pub struct Posthog {
    api_key: String,
    url: Url,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    mapping::with_credential(
        settings,
        "api_key",
        |config: &PosthogConfig| &config.api_key,
        |config| {
            Arc::new(Posthog {
                url: mapping::endpoint_url(settings.endpoint, DEFAULT_BASE, "/batch/"),
                api_key: config.api_key,
            })
        },
    )
}

/// One Segment message as a PostHog event.
fn event(message: &Message) -> Result<Value, String> {
    let call = message.call().ok_or("not a Segment call type")?;
    let mut properties = message.properties();
    let mut distinct_id = message.distinct_id();
    let name = match call {
        Call::Track => message.event().unwrap_or_default().to_owned(),
        Call::Identify => {
            properties.insert("$set".into(), message.traits().into());
            if message.user_id().is_some() {
                mapping::put(&mut properties, "$anon_distinct_id", message.anonymous_id());
            }
            "$identify".into()
        }
        Call::Group => {
            properties.insert("$group_type".into(), message.group_type().into());
            mapping::put(&mut properties, "$group_key", message.str("groupId"));
            properties.insert("$group_set".into(), message.traits().into());
            "$groupidentify".into()
        }
        Call::Alias => {
            distinct_id = message.user_id();
            mapping::put(&mut properties, "alias", message.str("previousId"));
            "$create_alias".into()
        }
        Call::Page => {
            let url = message
                .str("properties.url")
                .or(message.str("context.page.url"));
            mapping::put(&mut properties, "$current_url", url);
            mapping::put(&mut properties, "title", message.name());
            "$pageview".into()
        }
        Call::Screen => {
            mapping::put(&mut properties, "$screen_name", message.name());
            "$screen".into()
        }
    };
    let distinct_id = distinct_id.ok_or("PostHog needs a distinct_id: no userId or anonymousId")?;
    let plain = matches!(call, Call::Track | Call::Page | Call::Screen);
    if plain && message.user_id().is_none() {
        properties.insert("$process_person_profile".into(), false.into());
    }
    mapping::put(&mut properties, "$ip", message.str("context.ip"));
    properties.insert("$lib".into(), "switchyard".into());
    let mut event = Map::new();
    event.insert("event".into(), name.into());
    event.insert("distinct_id".into(), distinct_id.into());
    event.insert("properties".into(), properties.into());
    mapping::put(&mut event, "timestamp", message.str("timestamp"));
    mapping::put(
        &mut event,
        "uuid",
        message.message_id().map(mapping::uuid_for),
    );
    Ok(event.into())
}

impl HttpDestination for Posthog {
    fn request(&self, events: &[Event]) -> Result<HttpRequest, String> {
        let batch = events
            .iter()
            .map(|e| event(&Message::of(e)).map_err(|m| format!("{}: {m}", e.message_id)))
            .collect::<Result<Vec<Value>, String>>()?;
        let body = serde_json::json!({"api_key": self.api_key, "batch": batch});
        Ok(HttpRequest::post_json(self.url.clone(), body.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_map_to_posthog_events() {
        let identify = event(&Message {
            json: json!({"type": "identify", "userId": "u1", "anonymousId": "a1",
                         "messageId": "m1", "traits": {"email": "a@b.c"}}),
        })
        .unwrap();
        assert_eq!(identify["event"], "$identify");
        assert_eq!(identify["properties"]["$set"]["email"], "a@b.c");
        assert_eq!(identify["properties"]["$anon_distinct_id"], "a1");
        assert_eq!(identify["uuid"], mapping::uuid_for("m1"));

        let alias = event(&Message {
            json: json!({"type": "alias", "userId": "u1", "previousId": "a1"}),
        })
        .unwrap();
        assert_eq!(alias["distinct_id"], "u1");
        assert_eq!(alias["properties"]["alias"], "a1");

        let anonymous = event(&Message {
            json: json!({"type": "page", "anonymousId": "a1", "name": "Home",
                         "context": {"page": {"url": "https://x.test/"}}}),
        })
        .unwrap();
        assert_eq!(anonymous["event"], "$pageview");
        assert_eq!(anonymous["properties"]["$current_url"], "https://x.test/");
        assert_eq!(anonymous["properties"]["$process_person_profile"], false);
    }
}
