//! The ingest API's handlers (`/v1/*`): what is HTTP about a request (the write key in
//! `Authorization`, the body read within its time and memory bounds, the client's address and
//! origin), then ingest's parse and routing, the group commit, and the answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::json;
use time::OffsetDateTime;

use crate::http::admin::event_json;
use crate::http::browser::Peer;
use crate::http::error::ApiError;
use crate::http::server::AppState;
use crate::ingest::{self, Call, Endpoint, IngestError};
use crate::store::commit::CommitError;
use crate::store::NewEvent;

pub(super) async fn single(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(call): axum::extract::Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let call = Call::parse(&call)
        .or_else(|| Call::parse_short(&call))
        .ok_or_else(|| ApiError::not_found("no such endpoint"))?;
    ingest(&state, Endpoint::Single(call), peer, &headers, body).await
}

pub(super) async fn batch(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ingest(&state, Endpoint::Batch, peer, &headers, body).await
}

/// The ingest path: authenticate, decode, validate, route, commit, answer.
pub(super) async fn ingest(
    state: &AppState,
    endpoint: Endpoint,
    peer: Peer,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::unavailable(
            "shutting down; retry against another instance",
        ));
    }
    let pipeline = state.pipeline.load_full();
    let basic_key = basic_write_key(headers)?;
    if let Some(key) = &basic_key {
        if pipeline.sources.find(key).is_none() {
            return Err(reject_unknown_key().into());
        }
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .filter(|_| encoding.is_none());
    let mut memory = reserve_memory(declared.unwrap_or(ingest::MAX_REQUEST_BYTES)).await?;
    let limit = state.timeouts.body;
    let read = tokio::time::timeout(limit, axum::body::to_bytes(body, ingest::MAX_REQUEST_BYTES));
    let raw = read
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {} s", limit.as_secs_f64()),
            )
        })?
        .map_err(|error| {
            if std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>())
            {
                ingest::request_too_large().into()
            } else {
                ApiError::bad_request("invalid_body", format!("reading the body failed: {error}"))
            }
        })?;
    let body = ingest::decode_body(encoding, &raw)?;
    shrink(&mut memory, raw.len() + 2 * body.len());
    let received_at = OffsetDateTime::now_utc();
    let authorize = |body_key: Option<&str>| match (&basic_key, body_key) {
        (Some(_), _) => Ok(()),
        (None, Some(key)) if pipeline.sources.find(key).is_some() => Ok(()),
        (None, Some(_)) => Err(reject_unknown_key()),
        (None, None) => Err(no_write_key()),
    };
    let client_ip = crate::http::browser::client_ip(peer.0, headers, &pipeline.server);
    let parsed = ingest::parse_authorized(endpoint, &body, received_at, client_ip, &authorize)?;
    drop(body);
    drop(raw);
    let key = basic_key.or(parsed.write_key).ok_or_else(no_write_key)?;
    let source = pipeline
        .sources
        .find(&key)
        .ok_or_else(reject_unknown_key)?
        .clone();
    if let Err(refused) = crate::http::browser::check_origin(&source.allowed_origins, headers) {
        metrics::counter!("switchyard_rejected_events_total", "source" => source.name.clone(), "code" => refused.code)
            .increment((parsed.messages.len() + parsed.rejected.len()) as u64);
        return Err(refused);
    }

    for rejection in &parsed.rejected {
        metrics::counter!("switchyard_rejected_events_total", "source" => source.name.clone(), "code" => rejection.code)
            .increment(1);
    }
    if !parsed.rejected.is_empty() {
        state
            .source_rates
            .ingested(source.id, 0, parsed.rejected.len() as u32);
    }
    if parsed.messages.is_empty() && !parsed.rejected.is_empty() {
        let mut error = ApiError::bad_request("invalid_batch", "no message in the batch was valid");
        error.rejected = parsed.rejected;
        return Err(error);
    }
    let accepted = parsed.messages.len();
    let mut trails = Vec::with_capacity(accepted);
    let events: Vec<NewEvent> = parsed
        .messages
        .into_iter()
        .map(|(_, message)| {
            let (targets, trail) = pipeline.routes.targets(source.id, &message, received_at);
            trails.push(trail);
            NewEvent {
                source_id: source.id,
                targets,
                message_id: message.message_id,
                user_key: message.user_key,
                received_at,
                payload: message.payload,
            }
        })
        .collect();
    let jobs: usize = events.iter().map(|e| e.targets.len()).sum();
    state.depth.admit(&pipeline.limits, source.id, jobs)?;
    let live = match state.live.is_watched() {
        true => state.live.prepare(
            &source.name,
            events.iter().zip(&trails).map(|(event, trail)| {
                let routes = event_json(&pipeline, trail)["routes"].take();
                (event.payload.as_slice(), routes)
            }),
        ),
        false => Default::default(),
    };
    if !events.is_empty() {
        match tokio::time::timeout(state.commit_timeout, state.commit.commit(events)).await {
            Ok(Ok(_)) => {
                state.depth.queued(source.id, jobs as u64);
                state.live.send(live);
                crate::trail::TRAIL.accepted(trails);
            }
            Ok(Err(CommitError::Closed)) => {
                return Err(ApiError::unavailable("shutting down; retry shortly"))
            }
            Ok(Err(CommitError::Store(_))) => {
                return Err(ApiError::unavailable(
                    "the database is unavailable; nothing was stored, retry shortly",
                ))
            }
            Err(_) => {
                return Err(ApiError::unavailable(
                    "the database did not answer in time; retry shortly",
                ))
            }
        }
    }
    metrics::counter!("switchyard_ingested_events_total", "source" => source.name.clone())
        .increment(accepted as u64);
    state.source_rates.ingested(source.id, accepted as u32, 0);
    let mut answer = json!({"success": true});
    if !parsed.rejected.is_empty() {
        answer["rejected"] = serde_json::to_value(&parsed.rejected).unwrap_or_default();
    }
    Ok(Json(answer).into_response())
}

pub(super) fn no_write_key() -> IngestError {
    IngestError::Unauthorized(
        "no write key: send it as the HTTP Basic username or as `writeKey` in the body".into(),
    )
}

/// Bytes that ingest requests may hold at once, in KiB: their bodies as read and decoded, and
/// the messages made from them, until they are committed. Past it, requests wait (then get a
/// 503) instead of growing the process: memory stays bounded however many clients send at
/// once, and a small gzip body cannot claim more than its decoded size allows.
const INGEST_MEMORY_KIB: usize = 64 * 1024;
static INGEST_MEMORY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(INGEST_MEMORY_KIB);
/// How long a request waits for its share of [`INGEST_MEMORY`].
const INGEST_MEMORY_WAIT: Duration = Duration::from_secs(5);

/// What a request of `body` bytes may hold at most: the body as read, decoded, and the
/// messages made from it.
pub(super) fn memory_kib(bytes: usize) -> u32 {
    (bytes.min(3 * ingest::MAX_REQUEST_BYTES).div_ceil(1024)).max(1) as u32
}

pub(super) async fn reserve_memory(
    body: usize,
) -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    let wanted = memory_kib(3 * body.min(ingest::MAX_REQUEST_BYTES));
    match tokio::time::timeout(INGEST_MEMORY_WAIT, INGEST_MEMORY.acquire_many(wanted)).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ApiError::overloaded(
            "too many large requests at once; nothing was stored, retry shortly",
            Duration::from_secs(1),
        )),
    }
}

/// Gives back what a request reserved beyond `bytes`, once its real size is known.
pub(super) fn shrink(permit: &mut tokio::sync::SemaphorePermit<'static>, bytes: usize) {
    let keep = memory_kib(bytes) as usize;
    if permit.num_permits() > keep {
        drop(permit.split(permit.num_permits() - keep));
    }
}

pub(super) fn reject_unknown_key() -> IngestError {
    metrics::counter!("switchyard_rejected_events_total", "source" => "unknown", "code" => "unauthorized")
        .increment(1);
    IngestError::Unauthorized("unknown write key".into())
}

/// The write key from `Authorization: Basic base64(key:)`, if the request has one.
pub(super) fn basic_write_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed =
        || ApiError::unauthorized("the Authorization header must be Basic base64(writeKey:)");
    let text = value.to_str().map_err(|_| malformed())?;
    let Some(encoded) = text
        .strip_prefix("Basic ")
        .or_else(|| text.strip_prefix("basic "))
    else {
        return Err(malformed());
    };
    let decoded = BASE64.decode(encoded.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let user = decoded.split(':').next().unwrap_or_default();
    if user.is_empty() {
        return Ok(None);
    }
    Ok(Some(user.to_owned()))
}
