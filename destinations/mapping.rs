//! What several destination kinds share: reading fields of the enriched Segment message,
//! vendor idempotency ids derived from `messageId`, `{{path}}` templates, vendor URLs and auth,
//! and packing events into requests by count and bytes (for [`crate::destination::Plan`]).
//!
//! A vendor file keeps only what is its vendor's: field names, endpoints and how to read the
//! vendor's answers.

use std::ops::Range;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use reqwest::header::HeaderValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use url::Url;

use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::destination::{Built, Call, Destination, Event, HttpResponse, SettingError, Settings};

/// One enriched Segment message (as ingest committed it), with the accessors kinds map from.
#[derive(Debug, Clone)]
pub struct Message {
    pub json: Value,
}

impl Message {
    pub fn of(event: &Event) -> Message {
        Message { json: event.json() }
    }

    pub fn call(&self) -> Option<Call> {
        Call::parse(self.str("type")?)
    }

    /// The value at a dotted path (`context.page.url`, `properties.products.0.price`).
    pub fn get(&self, path: &str) -> Option<&Value> {
        lookup(&self.json, path)
    }

    /// A non-empty string at `path`.
    pub fn str(&self, path: &str) -> Option<&str> {
        self.get(path)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn message_id(&self) -> Option<&str> {
        self.str("messageId")
    }

    pub fn user_id(&self) -> Option<&str> {
        self.str("userId")
    }

    pub fn anonymous_id(&self) -> Option<&str> {
        self.str("anonymousId")
    }

    /// The id analytics vendors count people by: `userId`, else `anonymousId`.
    pub fn distinct_id(&self) -> Option<&str> {
        self.user_id().or_else(|| self.anonymous_id())
    }

    /// `event` of a track call.
    pub fn event(&self) -> Option<&str> {
        self.str("event")
    }

    /// The name of a page or screen: `name`, else `properties.name`.
    pub fn name(&self) -> Option<&str> {
        self.str("name").or_else(|| self.str("properties.name"))
    }

    /// `properties` (an empty object when absent).
    pub fn properties(&self) -> Map<String, Value> {
        object(self.get("properties"))
    }

    /// The user's traits: `traits` of identify and group calls, `context.traits` of the rest.
    pub fn traits(&self) -> Map<String, Value> {
        match self.call() {
            Some(Call::Identify | Call::Group) => object(self.get("traits")),
            _ => object(self.get("context.traits")),
        }
    }

    /// When it happened: `timestamp` (skew-corrected by ingest), else `receivedAt`.
    pub fn timestamp(&self) -> Option<OffsetDateTime> {
        ["timestamp", "receivedAt"]
            .iter()
            .find_map(|field| OffsetDateTime::parse(self.str(field)?, &Rfc3339).ok())
    }

    pub fn epoch_seconds(&self) -> Option<i64> {
        self.timestamp().map(OffsetDateTime::unix_timestamp)
    }

    pub fn epoch_millis(&self) -> Option<i64> {
        self.timestamp()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
    }

    pub fn epoch_micros(&self) -> Option<i64> {
        self.timestamp()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000).ok())
    }

    /// The event name of a page or screen call, as Segment's Actions destinations name it:
    /// `Viewed {name}`; without a name, Segment's classic `Loaded a Page` / `Loaded a Screen`.
    pub fn viewed_event(&self) -> String {
        match (self.name(), self.call()) {
            (Some(name), _) => format!("Viewed {name}"),
            (None, Some(Call::Screen)) => "Loaded a Screen".into(),
            (None, _) => "Loaded a Page".into(),
        }
    }

    /// The type of a group call's group: `traits.groupType`, else `"group"`.
    pub fn group_type(&self) -> String {
        self.str("traits.groupType").unwrap_or("group").to_owned()
    }

    /// The products of a Segment e-commerce event: `properties.products`, or for the
    /// single-product events (`Product Added`, `Product Viewed`, ...) the properties themselves.
    pub fn products(&self) -> Vec<Map<String, Value>> {
        match self.get("properties.products") {
            Some(Value::Array(products)) => products
                .iter()
                .filter_map(|p| p.as_object().cloned())
                .collect(),
            _ => {
                let properties = self.properties();
                let single = ["product_id", "sku"]
                    .iter()
                    .any(|k| properties.contains_key(*k));
                if single {
                    vec![properties]
                } else {
                    Vec::new()
                }
            }
        }
    }
}

fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.')
        .try_fold(value, |value, segment| match value {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
            _ => None,
        })
}

fn object(value: Option<&Value>) -> Map<String, Value> {
    match value {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    }
}

/// Inserts `value` under `key` when it is present (not null).
pub fn put(map: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(value) = value {
        let value = value.into();
        if !value.is_null() {
            map.insert(key.to_owned(), value);
        }
    }
}

/// `text` cut to at most `max` characters.
pub fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

// Idempotency ids.

/// `message_id` when it is at most `max_len` characters and every one is `allowed`; otherwise a
/// stable id derived from it (hex SHA-256, `max_len` digits at most), so that a retried event
/// carries the same id and two different messageIds never share one in practice.
pub fn fitting_id(message_id: &str, max_len: usize, allowed: impl Fn(char) -> bool) -> String {
    let fits = !message_id.is_empty()
        && message_id.chars().count() <= max_len
        && message_id.chars().all(allowed);
    if fits {
        return message_id.to_owned();
    }
    let digest = Sha256::digest(message_id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..max_len.min(hex.len())].to_owned()
}

/// `message_id` when it is a UUID (in canonical hyphenated lower case); otherwise a UUID derived
/// from it: the first 16 bytes of SHA-256 with the version 8 ("custom") and variant bits set
/// (RFC 9562, section 5.8), the same for every retry.
pub fn uuid_for(message_id: &str) -> String {
    if let Ok(uuid) = uuid::Uuid::try_parse(message_id) {
        return uuid.hyphenated().to_string();
    }
    let digest = Sha256::digest(message_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

// Templates.

/// Text with `{{path}}` placeholders over the event's JSON (`{{event}}`, `{{userId}}`,
/// `{{properties.revenue}}`); `{{userId|anonymousId}}` takes the first that is present. A
/// missing value renders as nothing; objects and arrays render as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(Vec<String>),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("`{{{{` at {} is never closed with `}}}}`", open + 1))?;
            let paths: Vec<String> = after[..close]
                .split('|')
                .map(|p| p.trim().to_owned())
                .collect();
            if let Some(bad) = paths.iter().find(|p| !valid_path(p)) {
                return Err(format!(
                    "`{{{{{}}}}}` is not a field path such as `{{{{properties.revenue}}}}` \
                     (bad part: `{bad}`)",
                    &after[..close]
                ));
            }
            pieces.push(Piece::Field(paths));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Template { pieces })
    }

    /// The text for `json`; `escape` is applied to substituted values only.
    pub fn render(&self, json: &Value, escape: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Field(paths) => {
                    let value = paths
                        .iter()
                        .filter_map(|path| lookup(json, path))
                        .find(|v| !v.is_null() && v.as_str() != Some(""));
                    if let Some(value) = value {
                        out.push_str(&escape(&display(value)));
                    }
                }
            }
        }
        out
    }
}

fn valid_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '$'))
        })
}

/// A JSON value as text: strings as they are, other values as JSON.
pub fn display(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

// Settings.

/// A required text setting must not be empty.
pub fn non_empty(key: &str, value: &str, errors: &mut Vec<SettingError>) {
    if value.trim().is_empty() {
        errors.push(SettingError::new(key, "must not be empty"));
    }
}

// Requests.

/// Builds a kind whose own keys hold one credential (`api_key`, `write_key`): they parse into
/// `C`, the credential (the key named `key`) may not be empty, and it is what two destinations
/// of one vendor account share (the default `rate_limit_key`). `plugin` makes the destination.
pub fn with_credential<C: DeserializeOwned>(
    settings: &Settings,
    key: &str,
    credential: impl Fn(&C) -> &str,
    plugin: impl FnOnce(C) -> Arc<dyn Destination>,
) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<C>(&mut errors) else {
        return Err(errors);
    };
    let credential = credential(&config).to_owned();
    non_empty(key, &credential, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Built {
        credential: Some(credential),
        plugin: plugin(config),
    })
}

/// `base` (the destination's `endpoint`, else the vendor's `default_base`) with `path` appended
/// to its path: `http://127.0.0.1:9000/` + `/2/httpapi`.
pub fn endpoint_url(base: Option<&Url>, default_base: &str, path: &str) -> Url {
    let mut url = match base {
        Some(base) => base.clone(),
        None => Url::parse(default_base).expect("vendor base URLs are valid"),
    };
    let joined = format!("{}{path}", url.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

/// `Authorization: Basic base64(user:password)`, marked sensitive (kept out of debug output).
pub fn basic_auth(user: &str, password: &str) -> HeaderValue {
    let encoded = BASE64.encode(format!("{user}:{password}"));
    let mut value =
        HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// The vendor's answer parsed as JSON, if it is JSON.
pub fn response_json(response: &HttpResponse) -> Option<Value> {
    serde_json::from_slice(&response.body).ok()
}

/// Splits serialized items into runs for requests of at most `max_items` items and `max_bytes`
/// bytes of items (commas counted); an item larger than `max_bytes` goes alone, and the vendor
/// decides about it.
pub fn pack(sizes: &[usize], max_items: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, size) in sizes.iter().enumerate() {
        let count = i - start;
        if count > 0 && (count >= max_items.max(1) || bytes + 1 + size > max_bytes) {
            runs.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size + usize::from(i > start);
    }
    if start < sizes.len() {
        runs.push(start..sizes.len());
    }
    runs
}

/// `[a,b,...]` from serialized JSON values.
pub fn json_array<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(json: Value) -> Message {
        Message { json }
    }

    #[test]
    fn fields_and_times() {
        let m = message(json!({
            "type": "page", "userId": "", "anonymousId": "a-1", "name": "Home",
            "timestamp": "2024-03-01T12:00:00.123Z",
            "context": {"traits": {"plan": "pro"}, "page": {"url": "https://x.test/"}},
            "properties": {"products": [{"sku": "s1"}, 3]}
        }));
        assert_eq!(m.call(), Some(Call::Page));
        assert_eq!(m.distinct_id(), Some("a-1"), "an empty userId is absent");
        assert_eq!(m.str("context.page.url"), Some("https://x.test/"));
        assert_eq!(m.get("properties.products.0.sku"), Some(&json!("s1")));
        assert_eq!(m.traits()["plan"], "pro");
        assert_eq!(m.epoch_millis(), Some(1_709_294_400_123));
        assert_eq!(m.epoch_micros(), Some(1_709_294_400_123_000));
        assert_eq!(m.epoch_seconds(), Some(1_709_294_400));
        assert_eq!(m.viewed_event(), "Viewed Home");
        assert_eq!(m.products().len(), 1);
        let screen = message(json!({"type": "screen"}));
        assert_eq!(screen.viewed_event(), "Loaded a Screen");
        let single = message(json!({"type": "track", "properties": {"product_id": "p"}}));
        assert_eq!(single.products()[0]["product_id"], "p");
    }

    #[test]
    fn ids_fit_or_are_derived_stably() {
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-';
        assert_eq!(fitting_id("abc-123", 36, allowed), "abc-123");
        let long = "x".repeat(80);
        let derived = fitting_id(&long, 36, allowed);
        assert_eq!(derived.len(), 36);
        assert_eq!(derived, fitting_id(&long, 36, allowed));
        assert_ne!(fitting_id("a b", 36, allowed), "a b");

        let uuid = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
        assert_eq!(uuid_for(uuid), uuid.to_lowercase());
        let derived = uuid_for("msg_1");
        let parsed = uuid::Uuid::parse_str(&derived).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
        assert_eq!(derived, uuid_for("msg_1"));
        assert_ne!(derived, uuid_for("msg_2"));
    }

    #[test]
    fn templates_render_paths_and_alternatives() {
        let t = Template::parse(
            "{{type}}: {{event}} by {{userId|anonymousId}} ${{properties.revenue}}",
        )
        .unwrap();
        let event = json!({"type": "track", "event": "Order <Completed>", "anonymousId": "a1",
                           "properties": {"revenue": 9.5}});
        let escape = |s: &str| s.replace('<', "&lt;").replace('>', "&gt;");
        assert_eq!(
            t.render(&event, escape),
            "track: Order &lt;Completed&gt; by a1 $9.5"
        );
        assert!(Template::parse("{{event").is_err());
        assert!(Template::parse("{{ }}").is_err());
        assert!(Template::parse("{{a..b}}").is_err());
        assert_eq!(
            Template::parse("plain")
                .unwrap()
                .render(&json!({}), str::to_owned),
            "plain"
        );
    }

    #[test]
    fn endpoints_join_paths() {
        let base = Url::parse("http://127.0.0.1:9000/").unwrap();
        assert_eq!(
            endpoint_url(Some(&base), "https://x.test", "/2/httpapi").as_str(),
            "http://127.0.0.1:9000/2/httpapi"
        );
        let prefixed = Url::parse("https://proxy.test/amp/").unwrap();
        assert_eq!(
            endpoint_url(Some(&prefixed), "https://x.test", "/batch/").as_str(),
            "https://proxy.test/amp/batch/"
        );
        assert_eq!(
            endpoint_url(None, "https://api2.amplitude.com", "/2/httpapi").as_str(),
            "https://api2.amplitude.com/2/httpapi"
        );
    }

    #[test]
    fn packing_respects_items_and_bytes() {
        assert_eq!(pack(&[10, 10, 10], 2, 1000), vec![0..2, 2..3]);
        assert_eq!(pack(&[10, 10, 10], 10, 21), vec![0..2, 2..3]);
        assert_eq!(
            pack(&[50, 10], 10, 20),
            vec![0..1, 1..2],
            "too big goes alone"
        );
        assert!(pack(&[], 10, 10).is_empty());
        assert_eq!(json_array([&b"1"[..], b"{}"]), b"[1,{}]");
    }
}
