//! `slack`: a message per event to a Slack incoming webhook, `{"text": ...}` rendered from
//! `template`.
//!
//! One event per request, at most one request a second by default (Slack's limit for incoming
//! webhooks). Slack answers 200 `ok`; 429 (with `Retry-After`) and 5xx are retried; every other
//! answer (`invalid_payload`, `channel_not_found`, 410 `channel_is_archived`, ...) is permanent.
//! Slack has no idempotency key: a message can repeat if Slack answers too late.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::mapping::Template;
use crate::destination::{
    Built, Event, HttpDestination, HttpRequest, Kind, KindDefaults, SettingError, Settings,
};
use crate::destinations::webhook::parse_http_url;

pub static KIND: Kind = Kind {
    name: "slack",
    catalog_name: "Slack",
    defaults: KindDefaults {
        batch_size: 1,
        max_batch_size: 1,
        rate_limit: Some((1, Duration::from_secs(1))),
    },
    build,
};

const DEFAULT_TEMPLATE: &str = "{{event|type}} from {{userId|anonymousId}}";

/// The keys a `slack` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackConfig {
    /// The incoming webhook URL Slack gave (`https://hooks.slack.com/services/T.../B.../...`).
    /// It is the credential: keep it secret. With the kind it is the default `rate_limit_key`,
    /// so destinations posting to one channel share its limit. `endpoint`, when set, replaces
    /// its scheme, host and port (the path stays).
    webhook_url: String,
    /// The message text, with `{{path}}` placeholders over the event: `{{event}}`,
    /// `{{userId}}`, `{{properties.revenue}}`; `{{userId|anonymousId}}` takes the first present.
    /// Default: `{{event|type}} from {{userId|anonymousId}}` ("Order Completed from u1").
    template: Option<String>,
}

/// A configured Slack destination.
pub struct Slack {
    url: Url,
    template: Template,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<SlackConfig>(&mut errors) else {
        return Err(errors);
    };
    let url = match parse_http_url(&config.webhook_url) {
        Ok(url) => Some(url),
        Err(message) => {
            errors.push(SettingError::new("webhook_url", message));
            None
        }
    };
    let text = config.template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
    let template = match Template::parse(text) {
        Ok(template) => Some(template),
        Err(message) => {
            errors.push(SettingError::new("template", message));
            None
        }
    };
    let (Some(url), Some(template)) = (url, template) else {
        return Err(errors);
    };
    let url = match settings.endpoint {
        Some(endpoint) => {
            let mut moved = endpoint.clone();
            moved.set_path(url.path());
            moved.set_query(url.query());
            moved
        }
        None => url,
    };
    Ok(Built {
        credential: Some(config.webhook_url),
        plugin: Arc::new(Slack { url, template }),
    })
}

/// Slack's message formatting reserves `&`, `<` and `>` in text.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl HttpDestination for Slack {
    fn request(&self, events: &[Event]) -> Result<HttpRequest, String> {
        let lines: Vec<String> = events
            .iter()
            .map(|event| self.template.render(&event.json(), escape))
            .collect();
        let text = lines.join("\n");
        if text.trim().is_empty() {
            return Err("the template renders an empty message for this event".into());
        }
        let body = serde_json::json!({ "text": text });
        Ok(HttpRequest::post_json(self.url.clone(), body.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keeps_the_webhook_path() {
        let table: toml::Table =
            toml::from_str("webhook_url = 'https://hooks.slack.com/services/T0/B0/x'").unwrap();
        let endpoint = Url::parse("http://127.0.0.1:9000").unwrap();
        let settings = Settings {
            name: "s",
            table: &table,
            endpoint: Some(&endpoint),
        };
        assert!(build(&settings).is_ok());
        let slack = Slack {
            url: Url::parse("http://127.0.0.1:9000/services/T0/B0/x").unwrap(),
            template: Template::parse(DEFAULT_TEMPLATE).unwrap(),
        };
        let event = Event {
            message_id: "m".into(),
            payload: serde_json::value::RawValue::from_string(
                r#"{"type":"track","event":"<Signed Up>","anonymousId":"a1"}"#.into(),
            )
            .unwrap(),
            source: None,
        };
        let request = slack.request(&[event]).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["text"], "&lt;Signed Up&gt; from a1");
    }
}
