//! `webhook`: POSTs events to your own HTTP endpoint.
//!
//! With `batch_size = 1` (the default) the body is the event itself; with more it is
//! `{"batch": [...]}`. When `secret` is set, every request is signed as Standard Webhooks
//! specifies (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;

use crate::destination::{
    Built, Event, HttpDestination, HttpRequest, Kind, KindDefaults, SettingError, Settings,
};

pub static KIND: Kind = Kind {
    name: "webhook",
    catalog_name: "Webhooks",
    defaults: KindDefaults {
        batch_size: 1,
        max_batch_size: 1000,
        rate_limit: None,
    },
    build,
};

/// The keys a `webhook` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookConfig {
    /// Where to POST.
    url: Option<String>,
    /// Several endpoints of one receiver; requests are spread over them.
    urls: Option<Vec<String>>,
    /// `whsec_` + base64 key: sign requests the Standard Webhooks way.
    secret: Option<String>,
    /// Extra headers sent with every request.
    #[serde(default)]
    headers: toml::Table,
}

/// A configured webhook destination.
pub struct Webhook {
    urls: Vec<Url>,
    next: AtomicUsize,
    signing_key: Option<Vec<u8>>,
    headers: HeaderMap,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<WebhookConfig>(&mut errors) else {
        return Err(errors);
    };
    let raw_urls: Vec<(&str, &String)> = match (&config.url, &config.urls) {
        (Some(url), None) => vec![("url", url)],
        (None, Some(urls)) if !urls.is_empty() => urls.iter().map(|u| ("urls", u)).collect(),
        (None, Some(_)) => {
            errors.push(SettingError::new("urls", "needs at least one URL"));
            Vec::new()
        }
        (Some(_), Some(_)) => {
            errors.push(SettingError::new("urls", "give `url` or `urls`, not both"));
            Vec::new()
        }
        (None, None) => {
            errors.push(SettingError {
                key: None,
                message: "a webhook destination needs `url` (or `urls`)".into(),
            });
            Vec::new()
        }
    };
    let mut urls = Vec::new();
    for (key, raw) in raw_urls {
        match parse_http_url(raw) {
            Ok(url) => urls.push(url),
            Err(message) => errors.push(SettingError::new(key, message)),
        }
    }
    let signing_key = match &config.secret {
        None => None,
        Some(secret) => match decode_secret(secret) {
            Ok(key) => Some(key),
            Err(message) => {
                errors.push(SettingError::new("secret", message));
                None
            }
        },
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &config.headers {
        let parsed = HeaderName::from_bytes(name.as_bytes()).ok().zip(
            value
                .as_str()
                .and_then(|value| HeaderValue::from_str(value).ok()),
        );
        match parsed {
            Some((name, value)) => {
                headers.insert(name, value);
            }
            None => errors.push(SettingError::new(
                "headers",
                format!("`{name}` must be a header name with a string value"),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Built {
        plugin: std::sync::Arc::new(Webhook {
            urls,
            next: AtomicUsize::new(0),
            signing_key,
            headers,
        }),
        credential: None,
    })
}

/// An absolute `http` or `https` URL.
pub fn parse_http_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("`{raw}` is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("`{raw}` must be an http:// or https:// URL"));
    }
    Ok(url)
}

fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("must start with `whsec_` followed by base64 (Standard Webhooks)")?;
    let key = BASE64
        .decode(encoded)
        .map_err(|_| "is not valid base64 after `whsec_`")?;
    if key.is_empty() {
        return Err("is empty after `whsec_`".into());
    }
    Ok(key)
}

/// `webhook-signature` for `id.timestamp.body`: `v1,` + base64(HMAC-SHA256).
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The `webhook-id` of a request: the messageId of a single event; for a batch, a digest of its
/// messageIds, so a retried batch keeps its id and a different batch never shares one.
fn webhook_id(events: &[Event]) -> String {
    match events {
        [event] => event.message_id.clone(),
        _ => {
            let mut digest = Sha256::new();
            for event in events {
                digest.update(event.message_id.as_bytes());
                digest.update([0]);
            }
            let hash = digest.finalize();
            let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("batch_{hex}")
        }
    }
}

/// The body: the event itself, or `{"batch": [...]}` with the raw events spliced in.
fn body(events: &[Event]) -> Vec<u8> {
    if let [event] = events {
        return event.payload.get().as_bytes().to_vec();
    }
    let size: usize = events.iter().map(|e| e.payload.get().len() + 1).sum();
    let mut body = Vec::with_capacity(size + 12);
    body.extend_from_slice(b"{\"batch\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event.payload.get().as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

impl HttpDestination for Webhook {
    fn request(&self, events: &[Event]) -> Result<HttpRequest, String> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len();
        let body = body(events);
        let mut request = HttpRequest::post_json(self.urls[index].clone(), body);
        for (name, value) in &self.headers {
            request.headers.insert(name.clone(), value.clone());
        }
        let id = webhook_id(events);
        if let Some(key) = &self.signing_key {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let signature = sign(key, &id, timestamp, &request.body);
            let headers = &mut request.headers;
            headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
            if let Ok(value) = HeaderValue::from_str(&signature) {
                headers.insert("webhook-signature", value);
            }
        }
        if let Ok(value) = HeaderValue::from_str(&id) {
            request.headers.insert("webhook-id", value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    fn event(id: &str, json: &str) -> Event {
        Event {
            message_id: id.into(),
            payload: serde_json::value::RawValue::from_string(json.into()).unwrap(),
        }
    }

    #[test]
    fn batches_wrap_events_and_single_events_go_as_is() {
        let a = event("a", r#"{"messageId":"a"}"#);
        let b = event("b", r#"{"messageId":"b"}"#);
        assert_eq!(body(std::slice::from_ref(&a)), br#"{"messageId":"a"}"#);
        let both: serde_json::Value = serde_json::from_slice(&body(&[a.clone(), b])).unwrap();
        assert_eq!(both["batch"][1]["messageId"], "b");
        assert_eq!(webhook_id(&[a]), "a");
    }

    #[test]
    fn bad_settings_are_reported_by_key() {
        let table: toml::Table =
            toml::from_str("url = 'ftp://x'\nsecret = 'nope'\nretries = 3").unwrap();
        let settings = Settings {
            name: "w",
            table: &table,
            endpoint: None,
        };
        let errors = build(&settings).err().unwrap();
        let keys: Vec<_> = errors.iter().filter_map(|e| e.key.as_deref()).collect();
        assert_eq!(keys, ["retries", "url", "secret"], "{errors:?}");
    }
}
