//! Parsing a request: the body decoded within the limits, the `writeKey` found before any
//! message is expanded, each message validated per call type and enriched.

use std::io::Read;

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::enrich::{enrich, time_field};
use super::*;

/// Decodes the body per `Content-Encoding`, within the request limit.
pub fn decode_body(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, IngestError> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => Ok(body.to_vec()),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity(body.len() * 4);
            let limit = MAX_REQUEST_BYTES as u64 + 1;
            flate2::read::MultiGzDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(|e| {
                    IngestError::invalid("invalid_gzip", format!("the gzip body is invalid: {e}"))
                })?;
            if out.len() > MAX_REQUEST_BYTES {
                return Err(request_too_large());
            }
            Ok(out)
        }
        Some(other) => Err(IngestError::UnsupportedEncoding(format!(
            "Content-Encoding `{other}` is not supported; send identity or gzip"
        ))),
    }
}

pub fn request_too_large() -> IngestError {
    IngestError::TooLarge(format!(
        "the request is larger than {MAX_REQUEST_BYTES} bytes; send smaller batches"
    ))
}

/// Parses and validates a decoded body. Request-level problems are errors; problems with single
/// messages of a batch are listed in `rejected` and the rest goes on.
pub fn parse(endpoint: Endpoint, body: &[u8], now: OffsetDateTime) -> Result<Parsed, IngestError> {
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
) -> Result<Parsed, IngestError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(request_too_large());
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| IngestError::invalid("invalid_utf8", "the body is not valid UTF-8"))?;
    match endpoint {
        Endpoint::Single(call) => {
            if text.len() > MAX_MESSAGE_BYTES {
                return Err(IngestError::TooLarge(format!(
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
                .map_err(|(code, message)| IngestError::invalid(code, message))?;
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
pub(super) struct BatchDefaults {
    pub(super) sent_at: Option<Value>,
    pub(super) context: Option<Map<String, Value>>,
    pub(super) integrations: Option<Map<String, Value>>,
    /// The request's client, for `context.ip`.
    pub(super) client_ip: Option<std::net::IpAddr>,
}

fn parse_batch(
    text: &str,
    now: OffsetDateTime,
    client_ip: Option<std::net::IpAddr>,
    authorize: Authorize,
) -> Result<Parsed, IngestError> {
    let fields: HashMap<String, &RawValue> = serde_json::from_str(text).map_err(json_error)?;
    let items: Vec<&RawValue> = match fields.get("batch") {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
            IngestError::invalid("invalid_batch", "`batch` must be an array of messages")
        })?,
        None => {
            return Err(IngestError::invalid(
                "invalid_batch",
                "the body needs a `batch` array of messages",
            ))
        }
    };
    if items.len() > MAX_BATCH_MESSAGES {
        return Err(IngestError::TooLarge(format!(
            "a batch may hold at most {MAX_BATCH_MESSAGES} messages, this one has {}",
            items.len()
        )));
    }
    let field = |name: &str| -> Result<Option<Value>, IngestError> {
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
            return Err(IngestError::invalid(
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
        return Err(IngestError::TooLarge(format!(
            "the batch-level `context` and `integrations` are copied into every message, so \
             together they may be at most {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    let sent_at = field("sentAt")?.filter(|v| !v.is_null());
    if let Some(value) = &sent_at {
        time_field(value, "sentAt")
            .map_err(|(code, message)| IngestError::invalid(code, message))?;
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
            return Err(IngestError::TooLarge(format!(
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

fn parse_object(text: &str) -> Result<Map<String, Value>, IngestError> {
    match serde_json::from_str::<Value>(text).map_err(json_error)? {
        Value::Object(object) => Ok(object),
        _ => Err(IngestError::invalid(
            "invalid_json",
            "the body must be a JSON object",
        )),
    }
}

fn json_error(error: serde_json::Error) -> IngestError {
    IngestError::invalid(
        "invalid_json",
        format!("the body is not valid JSON: {error}"),
    )
}

fn object_field(
    value: Option<Value>,
    name: &str,
) -> Result<Option<Map<String, Value>>, IngestError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(IngestError::invalid(
            "invalid_field",
            format!("`{name}` must be an object"),
        )),
    }
}

fn write_key_of(object: &Map<String, Value>) -> Result<Option<String>, IngestError> {
    match object.get("writeKey") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(key)) => Ok(Some(key.clone())),
        Some(_) => Err(IngestError::invalid(
            "invalid_field",
            "`writeKey` must be a string",
        )),
    }
}

pub(super) type Invalid = (&'static str, String);

pub(super) fn invalid(message: impl Into<String>) -> Invalid {
    ("invalid_message", message.into())
}
