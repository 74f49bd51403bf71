//! Ingest: turns a Segment HTTP Tracking API request into messages ready to commit.
//!
//! It authenticates the write key, decodes gzip within Segment's size limits, validates each
//! call type's required fields, enriches messages the way Segment does (`messageId`,
//! `receivedAt`, `sentAt`, skew-corrected `timestamp`, batch-level `context` and
//! `integrations`), and routes each message to the destinations whose filters match. Nothing
//! here touches the network or the database, so all of it is tested directly.

pub mod backpressure;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::filter::Reason;
use crate::http::error::{ApiError, Rejection};
use crate::store::Target;
use crate::trail::EventTrail;

/// Segment's limits: 32 KB a message, 500 KB a request, 2,500 messages a batch.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
pub const MAX_REQUEST_BYTES: usize = 500 * 1024;
pub const MAX_BATCH_MESSAGES: usize = 2500;
/// What enrichment may add to a message (`messageId`, `receivedAt`, `sentAt`, `timestamp`,
/// `originalTimestamp`, `type`) before the rest counts against the limits: a batch-level
/// `context` copied into every message counts, so a small body cannot grow into a large one.
const ENRICHMENT_BYTES: usize = 512;

/// Says whether the request may go on once its body's `writeKey` (if any) is known, before
/// any message is expanded: an unknown key costs no more than reading the body.
pub type Authorize<'a> = &'a dyn Fn(Option<&str>) -> Result<(), ApiError>;

/// The Segment calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallType {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl CallType {
    pub const ALL: [CallType; 6] = [
        CallType::Track,
        CallType::Identify,
        CallType::Page,
        CallType::Screen,
        CallType::Group,
        CallType::Alias,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Track => "track",
            CallType::Identify => "identify",
            CallType::Page => "page",
            CallType::Screen => "screen",
            CallType::Group => "group",
            CallType::Alias => "alias",
        }
    }

    pub fn parse(name: &str) -> Option<CallType> {
        CallType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The one-letter paths of the browser and mobile SDKs (`/v1/t`, `/v1/i`, ...).
    pub fn parse_short(letter: &str) -> Option<CallType> {
        CallType::ALL
            .into_iter()
            .find(|t| t.as_str().get(..1) == Some(letter))
    }
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Single(CallType),
    /// `/v1/batch` and `/v1/import`.
    Batch,
}

/// A configured source, as ingest knows it.
#[derive(Debug)]
pub struct Source {
    pub id: i32,
    pub name: String,
    pub allowed_origins: crate::http::browser::AllowedOrigins,
}

/// Write keys to sources. Keys are held only as SHA-256 digests, so a lookup compares digests
/// (no timing signal about the key itself) and a memory dump shows no key.
#[derive(Debug, Default)]
pub struct SourceDirectory {
    by_key: HashMap<[u8; 32], Arc<Source>>,
}

impl SourceDirectory {
    pub fn new(sources: impl IntoIterator<Item = (String, Arc<Source>)>) -> SourceDirectory {
        SourceDirectory {
            by_key: sources
                .into_iter()
                .map(|(key, source)| (digest(&key), source))
                .collect(),
        }
    }

    pub fn find(&self, write_key: &str) -> Option<&Arc<Source>> {
        self.by_key.get(&digest(write_key))
    }

    /// A source's id by its name.
    pub fn id_of(&self, name: &str) -> Option<i32> {
        self.by_key
            .values()
            .find(|source| source.name == name)
            .map(|source| source.id)
    }

    /// Each configured source once (several write keys may name one source).
    pub fn sources(&self) -> Vec<&Arc<Source>> {
        let mut sources: Vec<&Arc<Source>> = self.by_key.values().collect();
        sources.sort_by_key(|source| source.id);
        sources.dedup_by_key(|source| source.id);
        sources
    }

    /// Whether some source allows this browser origin (a preflight names no source).
    pub fn any_allows(&self, origin: &str) -> bool {
        self.by_key
            .values()
            .any(|source| source.allowed_origins.allows(origin))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// One destination's routing rules.
#[derive(Debug, Clone)]
pub struct Route {
    pub destination_id: i32,
    pub name: String,
    pub kind: String,
    /// The kind's name in Segment's catalog (`"Amplitude"`).
    pub catalog_name: String,
    /// Source ids it receives from (`None`: all).
    pub sources: Option<Vec<i32>>,
    /// Event names or call types (`None`: all).
    pub events: Option<Vec<String>>,
    /// `ordering = "per_user"`.
    pub ordered: bool,
    /// Events per queued run.
    pub run_size: usize,
    /// `where`, `consent` and `sample`, checked after `sources`, `integrations` and `events`.
    pub gate: crate::filter::Gate,
}

impl Route {
    /// Whether `sources`, the message's `integrations` and `events` let it through.
    pub fn accepts(&self, source_id: i32, message: &Message) -> bool {
        self.routing(source_id, message).is_ok()
    }

    /// Lets the message through, or says why not: `Err(None)` when the destination does not
    /// take its source (not a filter: the event was never meant for it), else the first of
    /// `integrations` and `events` (in that order) that stops it.
    pub fn routing(&self, source_id: i32, message: &Message) -> Result<(), Option<Reason>> {
        if let Some(sources) = &self.sources {
            if !sources.contains(&source_id) {
                return Err(None);
            }
        }
        if !integrations_allow(
            message.integrations.as_ref(),
            [&self.name, &self.kind, &self.catalog_name],
        ) {
            return Err(Some(Reason::Integrations));
        }
        if let Some(events) = &self.events {
            let matches = events.iter().any(|e| {
                e == message.call.as_str() || message.event.as_deref() == Some(e.as_str())
            });
            if !matches {
                return Err(Some(Reason::Events));
            }
        }
        Ok(())
    }
}

/// Segment's `integrations` object: `{"All": false, "Amplitude": true}` turns every destination
/// off but the named ones; `{"Amplitude": false}` turns one off. Names are matched exactly
/// (case-sensitive) against the destination's name, its kind, or the kind's catalog name, in
/// that order: the most specific setting wins.
fn integrations_allow(integrations: Option<&Map<String, Value>>, names: [&str; 3]) -> bool {
    let Some(integrations) = integrations else {
        return true;
    };
    let setting = |key: &str| match integrations.get(key) {
        Some(Value::Bool(on)) => Some(*on),
        // An options object (as Segment allows) means "on".
        Some(Value::Object(_)) => Some(true),
        _ => None,
    };
    names
        .into_iter()
        .find_map(setting)
        .or_else(|| setting("All"))
        .unwrap_or(true)
}

/// A message that passed validation, enriched and serialized.
#[derive(Debug, Clone)]
pub struct Message {
    pub call: CallType,
    pub message_id: String,
    /// userId, else anonymousId: whose event this is (per-user ordering).
    pub user_key: String,
    /// `event` of a track call.
    pub event: Option<String>,
    pub integrations: Option<Map<String, Value>>,
    pub payload: Vec<u8>,
}

impl Message {
    /// A message as stored (enriched JSON, parsed), read back for a replay's routing. `None`
    /// when it is not a message (it never is: ingest wrote it).
    pub fn from_stored(value: &Value) -> Option<Message> {
        let object = value.as_object()?;
        let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_owned);
        Some(Message {
            call: CallType::parse(object.get("type")?.as_str()?)?,
            message_id: text("messageId").unwrap_or_default(),
            user_key: text("userId")
                .or_else(|| text("anonymousId"))
                .unwrap_or_default(),
            event: text("event"),
            integrations: object
                .get("integrations")
                .and_then(Value::as_object)
                .cloned(),
            payload: Vec::new(),
        })
    }
}

/// The result of parsing a request body.
#[derive(Debug)]
pub struct Parsed {
    /// `writeKey` from the body, if it had one.
    pub write_key: Option<String>,
    /// Accepted messages with their index in the request.
    pub messages: Vec<(usize, Message)>,
    pub rejected: Vec<Rejection>,
}

/// Decodes the body per `Content-Encoding`, within the request limit.
pub fn decode_body(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => Ok(body.to_vec()),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity(body.len() * 4);
            let limit = MAX_REQUEST_BYTES as u64 + 1;
            flate2::read::MultiGzDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| {
                    ApiError::bad_request("invalid_gzip", format!("the gzip body is invalid: {e}"))
                })?;
            if out.len() > MAX_REQUEST_BYTES {
                return Err(request_too_large());
            }
            Ok(out)
        }
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("Content-Encoding `{other}` is not supported; send identity or gzip"),
        )),
    }
}

pub fn request_too_large() -> ApiError {
    ApiError::too_large(format!(
        "the request is larger than {MAX_REQUEST_BYTES} bytes; send smaller batches"
    ))
}

/// Parses and validates a decoded body. Request-level problems are errors; problems with single
/// messages of a batch are listed in `rejected` and the rest goes on.
pub fn parse(endpoint: Endpoint, body: &[u8], now: OffsetDateTime) -> Result<Parsed, ApiError> {
    parse_authorized(endpoint, body, now, None, &|_| Ok(()))
}

/// [`parse`] for a request from `client_ip` (which becomes `context.ip` of every message that
/// has none), asking `authorize` about the body's `writeKey` before any message is enriched.
pub fn parse_authorized(
    endpoint: Endpoint,
    body: &[u8],
    now: OffsetDateTime,
    client_ip: Option<std::net::IpAddr>,
    authorize: Authorize,
) -> Result<Parsed, ApiError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(request_too_large());
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid_utf8", "the body is not valid UTF-8"))?;
    match endpoint {
        Endpoint::Single(call) => {
            if text.len() > MAX_MESSAGE_BYTES {
                return Err(ApiError::too_large(format!(
                    "a message may be at most {MAX_MESSAGE_BYTES} bytes"
                )));
            }
            let object = parse_object(text)?;
            let write_key = write_key_of(&object)?;
            authorize(write_key.as_deref())?;
            let defaults = BatchDefaults {
                client_ip,
                ..BatchDefaults::default()
            };
            let message = enrich(Some(call), object, &defaults, now)
                .map_err(|(code, message)| ApiError::bad_request(code, message))?;
            Ok(Parsed {
                write_key,
                messages: vec![(0, message)],
                rejected: Vec::new(),
            })
        }
        Endpoint::Batch => parse_batch(text, now, client_ip, authorize),
    }
}

/// Fields of a batch body that apply to every message in it.
#[derive(Default)]
struct BatchDefaults {
    sent_at: Option<Value>,
    context: Option<Map<String, Value>>,
    integrations: Option<Map<String, Value>>,
    /// The request's client, for `context.ip`.
    client_ip: Option<std::net::IpAddr>,
}

fn parse_batch(
    text: &str,
    now: OffsetDateTime,
    client_ip: Option<std::net::IpAddr>,
    authorize: Authorize,
) -> Result<Parsed, ApiError> {
    let fields: HashMap<String, &RawValue> = serde_json::from_str(text).map_err(json_error)?;
    let items: Vec<&RawValue> = match fields.get("batch") {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
            ApiError::bad_request("invalid_batch", "`batch` must be an array of messages")
        })?,
        None => {
            return Err(ApiError::bad_request(
                "invalid_batch",
                "the body needs a `batch` array of messages",
            ))
        }
    };
    if items.len() > MAX_BATCH_MESSAGES {
        return Err(ApiError::too_large(format!(
            "a batch may hold at most {MAX_BATCH_MESSAGES} messages, this one has {}",
            items.len()
        )));
    }
    let field = |name: &str| -> Result<Option<Value>, ApiError> {
        match fields.get(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(json_error),
        }
    };
    let write_key = match field("writeKey")? {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(key),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "`writeKey` must be a string",
            ))
        }
    };
    authorize(write_key.as_deref())?;
    let shared = ["context", "integrations"]
        .iter()
        .filter_map(|name| fields.get(*name))
        .map(|raw| raw.get().len())
        .sum::<usize>();
    if shared > MAX_MESSAGE_BYTES {
        return Err(ApiError::too_large(format!(
            "the batch-level `context` and `integrations` are copied into every message, so \
             together they may be at most {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    let sent_at = field("sentAt")?.filter(|v| !v.is_null());
    if let Some(value) = &sent_at {
        time_field(value, "sentAt")
            .map_err(|(code, message)| ApiError::bad_request(code, message))?;
    }
    let defaults = BatchDefaults {
        sent_at,
        context: object_field(field("context")?, "context")?,
        integrations: object_field(field("integrations")?, "integrations")?,
        client_ip,
    };
    let mut messages = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    let mut expanded = 0usize;
    for (index, raw) in items.into_iter().enumerate() {
        let outcome = if raw.get().len() > MAX_MESSAGE_BYTES {
            Err((
                "too_large",
                format!("a message may be at most {MAX_MESSAGE_BYTES} bytes"),
            ))
        } else {
            match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::Object(object)) => enrich(None, object, &defaults, now)
                    .and_then(|message| within_message_limit(message, &mut expanded)),
                Ok(_) => Err(("invalid_message", "a message must be a JSON object".into())),
                Err(e) => Err((
                    "invalid_json",
                    format!("the message is not valid JSON: {e}"),
                )),
            }
        };
        if expanded > MAX_REQUEST_BYTES {
            return Err(ApiError::too_large(format!(
                "with the batch-level `context` and `integrations` copied into each message, \
                 the batch is larger than {MAX_REQUEST_BYTES} bytes; send smaller batches"
            )));
        }
        match outcome {
            Ok(message) => messages.push((index, message)),
            Err((code, message)) => rejected.push(Rejection {
                index,
                code,
                message,
            }),
        }
    }
    Ok(Parsed {
        write_key,
        messages,
        rejected,
    })
}

/// A message as stored, past what enrichment adds, counts against the per-message limit and
/// (in `expanded`) the per-request one.
fn within_message_limit(message: Message, expanded: &mut usize) -> Result<Message, Invalid> {
    let size = message.payload.len().saturating_sub(ENRICHMENT_BYTES);
    *expanded += size;
    if size > MAX_MESSAGE_BYTES {
        return Err((
            "too_large",
            format!(
                "with the batch-level `context` and `integrations` copied in, the message is \
                 larger than {MAX_MESSAGE_BYTES} bytes"
            ),
        ));
    }
    Ok(message)
}

fn parse_object(text: &str) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_str::<Value>(text).map_err(json_error)? {
        Value::Object(object) => Ok(object),
        _ => Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        )),
    }
}

fn json_error(error: serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "invalid_json",
        format!("the body is not valid JSON: {error}"),
    )
}

fn object_field(value: Option<Value>, name: &str) -> Result<Option<Map<String, Value>>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(ApiError::bad_request(
            "invalid_field",
            format!("`{name}` must be an object"),
        )),
    }
}

fn write_key_of(object: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match object.get("writeKey") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(key)) => Ok(Some(key.clone())),
        Some(_) => Err(ApiError::bad_request(
            "invalid_field",
            "`writeKey` must be a string",
        )),
    }
}

type Invalid = (&'static str, String);

fn invalid(message: impl Into<String>) -> Invalid {
    ("invalid_message", message.into())
}

/// Validates one message and enriches it as Segment does.
fn enrich(
    endpoint_call: Option<CallType>,
    mut object: Map<String, Value>,
    defaults: &BatchDefaults,
    now: OffsetDateTime,
) -> Result<Message, Invalid> {
    // The write key authenticated the request; it is never passed on to destinations.
    object.remove("writeKey");
    let call = match endpoint_call {
        Some(call) => call,
        None => match object.get("type") {
            Some(Value::String(name)) => CallType::parse(name)
                .ok_or_else(|| invalid(format!("unknown message type `{name}`")))?,
            Some(_) => return Err(invalid("`type` must be a string")),
            None => return Err(invalid("the message has no `type`")),
        },
    };
    object.insert("type".into(), Value::String(call.as_str().into()));

    let user_id = id_field(&mut object, "userId")?;
    let anonymous_id = id_field(&mut object, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(invalid("a message needs a `userId` or an `anonymousId`"));
    }
    let event = match call {
        CallType::Track => match object.get("event") {
            Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(invalid("a track call needs an `event` name"))
            }
            Some(_) => return Err(invalid("`event` must be a string")),
        },
        _ => None,
    };
    if call == CallType::Group && id_field(&mut object, "groupId")?.is_none() {
        return Err(invalid("a group call needs a `groupId`"));
    }
    if call == CallType::Alias && id_field(&mut object, "previousId")?.is_none() {
        return Err(invalid("an alias call needs a `previousId`"));
    }
    for name in ["properties", "traits", "context", "integrations"] {
        match object.get(name) {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => return Err(invalid(format!("`{name}` must be an object"))),
        }
    }
    for name in ["name", "category"] {
        match object.get(name) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => return Err(invalid(format!("`{name}` must be a string"))),
        }
    }

    let message_id = match id_field(&mut object, "messageId")? {
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            object.insert("messageId".into(), Value::String(id.clone()));
            id
        }
    };
    if message_id.len() > 512 {
        return Err(invalid("`messageId` may be at most 512 bytes"));
    }

    merge_defaults(&mut object, "context", defaults.context.as_ref());
    merge_defaults(&mut object, "integrations", defaults.integrations.as_ref());
    if let Some(ip) = defaults.client_ip {
        set_client_ip(&mut object, ip);
    }
    correct_times(&mut object, defaults.sent_at.as_ref(), now)?;

    let integrations = match object.get("integrations") {
        Some(Value::Object(map)) => Some(map.clone()),
        _ => None,
    };
    let payload = serde_json::to_vec(&object).map_err(|e| invalid(e.to_string()))?;
    Ok(Message {
        call,
        message_id,
        user_key: user_id.or(anonymous_id).unwrap_or_default(),
        event,
        integrations,
        payload,
    })
}

/// An identifier field: a non-empty string, or a number (kept as its string form). Null and
/// empty count as absent.
fn id_field(object: &mut Map<String, Value>, name: &str) -> Result<Option<String>, Invalid> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        // Postgres text cannot hold NUL, and no real identifier has one.
        Some(Value::String(s)) if s.contains('\0') => Err(invalid(format!(
            "`{name}` must not contain a NUL character"
        ))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => {
            let text = n.to_string();
            object.insert(name.into(), Value::String(text.clone()));
            Ok(Some(text))
        }
        Some(_) => Err(invalid(format!("`{name}` must be a string"))),
    }
}

/// Batch-level `context`/`integrations` fill in keys a message does not set itself.
fn merge_defaults(
    object: &mut Map<String, Value>,
    name: &str,
    defaults: Option<&Map<String, Value>>,
) {
    let Some(defaults) = defaults else { return };
    let entry = object
        .entry(name.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    if let Value::Object(own) = entry {
        for (key, value) in defaults {
            own.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
}

/// `context.ip` is the client's address unless the SDK sent one.
fn set_client_ip(object: &mut Map<String, Value>, ip: std::net::IpAddr) {
    let context = object
        .entry("context")
        .or_insert_with(|| Value::Object(Map::new()));
    if context.is_null() {
        *context = Value::Object(Map::new());
    }
    if let Value::Object(context) = context {
        if context.get("ip").is_none_or(Value::is_null) {
            context.insert("ip".into(), Value::String(ip.to_string()));
        }
    }
}

/// Sets `receivedAt` and `sentAt`, and corrects `timestamp` for the client's clock skew:
/// `timestamp = receivedAt - (sentAt - originalTimestamp)`, keeping `originalTimestamp`.
fn correct_times(
    object: &mut Map<String, Value>,
    batch_sent_at: Option<&Value>,
    received_at: OffsetDateTime,
) -> Result<(), Invalid> {
    let sent_at = match object
        .get("sentAt")
        .filter(|v| !v.is_null())
        .or(batch_sent_at)
    {
        Some(value) => Some(time_field(value, "sentAt")?),
        None => None,
    };
    let original = match object.get("timestamp").filter(|v| !v.is_null()) {
        Some(value) => Some(time_field(value, "timestamp")?),
        None => None,
    };
    let timestamp = match (original, sent_at) {
        (Some(original), Some(sent)) => received_at
            .checked_sub(sent - original)
            .ok_or_else(|| invalid("`sentAt` and `timestamp` are too far apart to correct"))?,
        (Some(original), None) => original,
        (None, _) => received_at,
    };
    if let Some(original_value) = object.get("timestamp").filter(|v| !v.is_null()).cloned() {
        object.insert("originalTimestamp".into(), original_value);
    }
    object.insert("timestamp".into(), Value::String(format_time(timestamp)));
    object.insert(
        "sentAt".into(),
        Value::String(format_time(sent_at.unwrap_or(received_at))),
    );
    object.insert("receivedAt".into(), Value::String(format_time(received_at)));
    Ok(())
}

fn time_field(value: &Value, name: &str) -> Result<OffsetDateTime, Invalid> {
    let text = value
        .as_str()
        .ok_or_else(|| invalid(format!("`{name}` must be an ISO-8601 date string")))?;
    parse_time(text).ok_or_else(|| invalid(format!("`{name}` is not an ISO-8601 date: `{text}`")))
}

/// ISO-8601 / RFC 3339; a date-time without an offset is taken as UTC.
pub fn parse_time(text: &str) -> Option<OffsetDateTime> {
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(time);
    }
    let naive = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(text, &naive)
        .ok()
        .map(|t| t.assume_utc())
}

/// RFC 3339 in UTC with milliseconds, as Segment writes times.
pub fn format_time(time: OffsetDateTime) -> String {
    let utc = time.to_offset(time::UtcOffset::UTC);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    utc.format(&format).unwrap_or_default()
}

/// Destinations of one source, and the rule for each.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(routes: Vec<Route>) -> Routes {
        Routes { routes }
    }

    /// The route to one destination, if it is configured and enabled.
    pub fn route(&self, destination_id: i32) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| route.destination_id == destination_id)
    }

    /// The destinations that get `message` from `source_id`. The filters that read the event
    /// parse it once for all of them; each one dropped is counted in
    /// `switchyard_filtered_events_total`.
    /// Also returns the routing for the event trail ([`crate::trail`]), with the filters that
    /// stopped it, to be recorded once the event is stored.
    pub fn targets(
        &self,
        source_id: i32,
        message: &Message,
        received_at: OffsetDateTime,
    ) -> (Vec<Target>, EventTrail) {
        let mut parsed: Option<Value> = None;
        let mut targets = Vec::new();
        let mut filtered: Vec<(i32, &'static str)> = Vec::new();
        for route in self.routes.iter() {
            match route.routing(source_id, message) {
                Ok(()) => {}
                Err(None) => continue,
                Err(Some(reason)) => {
                    crate::filter::count(&route.name, reason);
                    filtered.push((route.destination_id, reason.as_str()));
                    continue;
                }
            }
            let event = match route.gate.reads_event() {
                true => &*parsed.get_or_insert_with(|| {
                    serde_json::from_slice(&message.payload).unwrap_or(Value::Null)
                }),
                false => &Value::Null,
            };
            if let Err(reason) = route.gate.check(&route.name, &message.message_id, event) {
                crate::filter::count(&route.name, reason);
                filtered.push((route.destination_id, reason.as_str()));
                continue;
            }
            targets.push(Target {
                destination_id: route.destination_id,
                ordered: route.ordered,
                run_size: route.run_size,
            });
        }
        let routed = targets.iter().map(|t| (t.destination_id, None));
        let stopped = filtered.into_iter().map(|(id, reason)| (id, Some(reason)));
        let trail = EventTrail::new(
            &message.message_id,
            source_id,
            &message.user_key,
            received_at,
            routed.chain(stopped),
        );
        (targets, trail)
    }

    /// The route of the destination called `name`.
    pub fn find(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-11-21T12:00:10Z", &Rfc3339).unwrap()
    }

    fn single(call: CallType, body: Value) -> Result<Message, ApiError> {
        let bytes = serde_json::to_vec(&body).unwrap();
        parse(Endpoint::Single(call), &bytes, now()).map(|mut p| p.messages.remove(0).1)
    }

    fn json_of(message: &Message) -> Value {
        serde_json::from_slice(&message.payload).unwrap()
    }

    #[test]
    fn corrects_clock_skew_and_sets_server_fields() {
        let message = single(
            CallType::Track,
            json!({"event": "E", "userId": "u", "timestamp": "2026-11-21T11:00:00Z",
                   "sentAt": "2026-11-21T11:00:05Z", "writeKey": "secret"}),
        )
        .unwrap();
        let body = json_of(&message);
        // The client's clock is an hour behind: sent 5 s after the event, received at 12:00:10.
        assert_eq!(body["timestamp"], "2026-11-21T12:00:05.000Z");
        assert_eq!(body["originalTimestamp"], "2026-11-21T11:00:00Z");
        assert_eq!(body["receivedAt"], "2026-11-21T12:00:10.000Z");
        assert_eq!(body["sentAt"], "2026-11-21T11:00:05.000Z");
        assert_eq!(body["type"], "track");
        assert!(
            body.get("writeKey").is_none(),
            "the write key is never forwarded"
        );
        assert_eq!(body["messageId"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn a_null_anonymous_id_is_fine_next_to_a_user_id() {
        let message = single(
            CallType::Identify,
            json!({"userId": "u", "anonymousId": null, "messageId": "m1"}),
        )
        .unwrap();
        assert_eq!(message.message_id, "m1");
        assert_eq!(json_of(&message)["timestamp"], "2026-11-21T12:00:10.000Z");
    }

    #[test]
    fn required_fields_per_call_type() {
        let cases = [
            (CallType::Track, json!({"userId": "u"})),
            (CallType::Track, json!({"event": "", "userId": "u"})),
            (CallType::Group, json!({"userId": "u"})),
            (CallType::Alias, json!({"userId": "u"})),
            (CallType::Page, json!({"anonymousId": null, "userId": null})),
            (CallType::Track, json!({"event": "E", "userId": {"a": 1}})),
            (
                CallType::Track,
                json!({"event": "E", "userId": "u", "properties": [1]}),
            ),
            (
                CallType::Track,
                json!({"event": "E", "userId": "u", "timestamp": 5}),
            ),
            (
                CallType::Track,
                json!({"event": "E", "userId": "u", "timestamp": "yesterday"}),
            ),
        ];
        for (call, body) in cases {
            let error = single(call, body.clone()).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
        }
        assert!(single(CallType::Group, json!({"userId": 7, "groupId": 9})).is_ok());
        assert!(single(CallType::Alias, json!({"userId": "u", "previousId": "p"})).is_ok());
        assert!(single(CallType::Screen, json!({"anonymousId": "a"})).is_ok());
    }

    #[test]
    fn batches_keep_the_valid_and_list_the_rest() {
        let body = json!({
            "batch": [
                {"type": "track", "event": "A", "userId": "u"},
                {"type": "bogus", "userId": "u"},
                {"type": "identify"},
                "not an object",
                {"type": "page", "anonymousId": "a", "context": {"ip": "own"}}
            ],
            "context": {"library": {"name": "x"}, "ip": "batch"},
            "integrations": {"All": false},
            "sentAt": "2026-11-21T12:00:00Z"
        });
        let parsed = parse(Endpoint::Batch, body.to_string().as_bytes(), now()).unwrap();
        let kept: Vec<usize> = parsed.messages.iter().map(|(i, _)| *i).collect();
        assert_eq!(kept, [0, 4]);
        let refused: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
        assert_eq!(refused, [1, 2, 3]);
        let page = json_of(&parsed.messages[1].1);
        assert_eq!(
            page["context"]["ip"], "own",
            "the message's own context wins"
        );
        assert_eq!(page["context"]["library"]["name"], "x");
        assert_eq!(page["integrations"]["All"], false);
    }

    #[test]
    fn the_client_address_fills_context_ip_unless_the_sdk_sent_one() {
        let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        let body = json!({"batch": [
            {"type": "track", "event": "A", "userId": "u", "writeKey": "wk"},
            {"type": "track", "event": "B", "userId": "u", "context": {"ip": "198.51.100.1"}},
            {"type": "track", "event": "C", "userId": "u", "context": null}
        ], "writeKey": "wk"});
        let parsed = parse_authorized(
            Endpoint::Batch,
            body.to_string().as_bytes(),
            now(),
            Some(ip),
            &|_| Ok(()),
        );
        let ips: Vec<Value> = parsed
            .unwrap()
            .messages
            .iter()
            .map(|(_, m)| json_of(m)["context"]["ip"].clone())
            .collect();
        assert_eq!(
            ips,
            [
                json!("203.0.113.9"),
                json!("198.51.100.1"),
                json!("203.0.113.9")
            ]
        );
        assert_eq!(CallType::parse_short("t"), Some(CallType::Track));
        assert_eq!(CallType::parse_short("s"), Some(CallType::Screen));
        assert_eq!(CallType::parse_short("a"), Some(CallType::Alias));
        assert_eq!(CallType::parse_short("x"), None);
        assert_eq!(CallType::parse_short(""), None);
    }

    #[test]
    fn a_malformed_batch_sent_at_is_refused_even_when_no_message_uses_it() {
        let body = json!({"batch": [], "sentAt": "not a date"});
        let error = parse(Endpoint::Batch, body.to_string().as_bytes(), now()).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn limits_and_encodings() {
        let huge = format!(
            r#"{{"event":"E","userId":"u","properties":{{"x":"{}"}}}}"#,
            "a".repeat(40_000)
        );
        let error = parse(Endpoint::Single(CallType::Track), huge.as_bytes(), now()).unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        let many = json!({"batch": vec![json!({"type": "track"}); MAX_BATCH_MESSAGES + 1]});
        let error = parse(Endpoint::Batch, many.to_string().as_bytes(), now()).unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        let error = decode_body(Some("gzip"), b"\x1f\x8bnot gzip").unwrap_err();
        assert_eq!(error.code, "invalid_gzip");
        let error = decode_body(Some("br"), b"{}").unwrap_err();
        assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let error = parse(
            Endpoint::Single(CallType::Track),
            b"{\"event\":\"\xff\"}",
            now(),
        )
        .unwrap_err();
        assert_eq!(error.code, "invalid_utf8");
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep = format!(r#"{{"event":"E","userId":"u","properties":{{"d":{deep}}}}}"#);
        let error = parse(Endpoint::Single(CallType::Track), deep.as_bytes(), now());
        assert_eq!(error.unwrap_err().status.as_u16() / 100, 4);
        let error = parse(
            Endpoint::Single(CallType::Track),
            br#"{"event":"E","userId":"u","properties":{"n":1e999}}"#,
            now(),
        );
        assert_eq!(error.unwrap_err().code, "invalid_json");
    }

    #[test]
    fn integrations_route_by_name_or_kind_case_sensitively() {
        let off = json!({"All": false, "Amplitude": true});
        let off = off.as_object();
        assert!(integrations_allow(
            off,
            ["amp-prod", "amplitude", "Amplitude"]
        ));
        assert!(!integrations_allow(off, ["hook", "webhook", "Webhooks"]));
        let one_off = json!({"hook": false});
        assert!(!integrations_allow(
            one_off.as_object(),
            ["hook", "webhook", "Webhooks"]
        ));
        assert!(integrations_allow(
            one_off.as_object(),
            ["Hook", "webhook", "Webhooks"]
        ));
        assert!(integrations_allow(None, ["hook", "webhook", "Webhooks"]));
        let specific = json!({"Amplitude": false, "amp-prod": true});
        assert!(integrations_allow(
            specific.as_object(),
            ["amp-prod", "amplitude", "Amplitude"]
        ));
    }

    #[test]
    fn write_keys_are_found_by_digest() {
        let web = Arc::new(Source {
            id: 1,
            name: "web".into(),
            allowed_origins: Default::default(),
        });
        let directory = SourceDirectory::new([("wk_1".to_string(), web)]);
        assert_eq!(directory.find("wk_1").map(|s| s.id), Some(1));
        assert!(directory.find("wk_2").is_none());
    }

    #[test]
    fn a_batch_context_copied_into_every_message_counts_against_the_limits() {
        let message = json!({"type": "track", "event": "E", "userId": "u"});
        // 2,500 tiny messages and an 8 KB context: 60 KB of body, 20 MB once copied.
        let amplified = json!({
            "batch": vec![message.clone(); MAX_BATCH_MESSAGES],
            "context": {"padding": "x".repeat(8 * 1024)},
        });
        let error = parse(Endpoint::Batch, amplified.to_string().as_bytes(), now()).unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error.code, "too_large");
        let oversized = json!({
            "batch": [message.clone()],
            "context": {"padding": "x".repeat(MAX_MESSAGE_BYTES)},
        });
        let error = parse(Endpoint::Batch, oversized.to_string().as_bytes(), now()).unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        // One message that the context pushes past 32 KB is rejected alone.
        let big = json!({"type": "track", "event": "E", "userId": "u",
                         "properties": {"p": "y".repeat(20 * 1024)}});
        let mixed = json!({
            "batch": [message.clone(), big],
            "context": {"padding": "x".repeat(20 * 1024)},
        });
        let parsed = parse(Endpoint::Batch, mixed.to_string().as_bytes(), now()).unwrap();
        assert_eq!(parsed.messages.len(), 1);
        assert_eq!(parsed.rejected[0].index, 1);
        assert_eq!(parsed.rejected[0].code, "too_large");
        // A modest shared context on a normal batch is fine.
        let normal = json!({
            "batch": vec![message; 100],
            "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
        });
        let parsed = parse(Endpoint::Batch, normal.to_string().as_bytes(), now()).unwrap();
        assert_eq!(parsed.messages.len(), 100);
    }

    #[test]
    fn an_unknown_body_key_is_refused_before_any_message_is_expanded() {
        let body = json!({"writeKey": "wk_nope", "batch": [{"type": "nonsense"}]});
        let refuse = |key: Option<&str>| match key {
            Some("wk_ok") => Ok(()),
            _ => Err(ApiError::unauthorized("unknown write key")),
        };
        let error = parse_authorized(
            Endpoint::Batch,
            body.to_string().as_bytes(),
            now(),
            None,
            &refuse,
        )
        .unwrap_err();
        assert_eq!(error.status, StatusCode::UNAUTHORIZED);
        let single = json!({"writeKey": "wk_nope", "event": "E", "userId": "u"});
        let error = parse_authorized(
            Endpoint::Single(CallType::Track),
            single.to_string().as_bytes(),
            now(),
            None,
            &refuse,
        )
        .unwrap_err();
        assert_eq!(error.status, StatusCode::UNAUTHORIZED);
    }
}
