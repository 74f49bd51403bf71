//! Enrichment, as Segment does it: `messageId`, `receivedAt`, `sentAt`, skew-corrected
//! `timestamp`, batch-level `context` and `integrations`, the client's address.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::parse::{invalid, BatchDefaults, Invalid};
use super::*;

/// Validates one message and enriches it as Segment does.
pub(super) fn enrich(
    endpoint_call: Option<Call>,
    mut object: Map<String, Value>,
    defaults: &BatchDefaults,
    now: OffsetDateTime,
) -> Result<Message, Invalid> {
    // The write key authenticated the request; it is never passed on to destinations.
    object.remove("writeKey");
    let call = match endpoint_call {
        Some(call) => call,
        None => match object.get("type") {
            Some(Value::String(name)) => Call::parse(name)
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
        Call::Track => match object.get("event") {
            Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(invalid("a track call needs an `event` name"))
            }
            Some(_) => return Err(invalid("`event` must be a string")),
        },
        _ => None,
    };
    if call == Call::Group && id_field(&mut object, "groupId")?.is_none() {
        return Err(invalid("a group call needs a `groupId`"));
    }
    if call == Call::Alias && id_field(&mut object, "previousId")?.is_none() {
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

pub(super) fn time_field(value: &Value, name: &str) -> Result<OffsetDateTime, Invalid> {
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
