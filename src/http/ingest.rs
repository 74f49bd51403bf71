//! The ingest API's handlers (`/v1/*`): what is HTTP about a request (the write key in
//! `Authorization`, the body read within its time and memory bounds, the client's address and
//! origin, the live feed), then [`Intake::ingest`], and the answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use time::OffsetDateTime;

use crate::http::admin::event_path_of;
use crate::http::browser::Peer;
use crate::http::error::ApiError;
use crate::http::live::Prepared;
use crate::http::openapi::Accepted;
use crate::http::server::AppState;
use crate::ingest::{self, Call, Door, Endpoint, IngestError, Intake, Request, Source};
use crate::pipeline::Pipeline;
use crate::store::NewEvent;
use crate::trail::EventTrail;

pub(super) async fn single(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(call): axum::extract::Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
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
) -> Result<Json<Accepted>, ApiError> {
    ingest(&state, Endpoint::Batch, peer, &headers, body).await
}

/// The ingest path: what is HTTP about the request, then ingest's algorithm, then the answer.
pub(super) async fn ingest(
    state: &AppState,
    endpoint: Endpoint,
    peer: Peer,
    headers: &HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::unavailable(
            "shutting down; retry against another instance",
        ));
    }
    let pipeline = state.pipeline.load_full();
    let intake = Intake {
        sources: &pipeline.sources,
        routes: &pipeline.routes,
        limits: &pipeline.limits,
        depth: &state.depth,
        rates: &state.source_rates,
        commit: &state.commit,
        commit_timeout: state.commit_timeout,
    };
    let basic_key = basic_write_key(headers)?;
    intake.check_basic_key(basic_key.as_deref())?;
    let content_encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .filter(|_| content_encoding.is_none());
    let memory = reserve_memory(declared.unwrap_or(ingest::MAX_REQUEST_BYTES)).await?;
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
    let request = Request {
        endpoint,
        body: raw,
        content_encoding,
        basic_key,
        client_ip: crate::http::browser::client_ip(peer.0, headers, &pipeline.server),
        received_at: OffsetDateTime::now_utc(),
    };
    let mut door = HttpDoor {
        state,
        pipeline: &pipeline,
        headers,
        memory,
    };
    let accepted = intake.ingest(request, &mut door).await?;
    Ok(Json(Accepted::new(accepted.rejected)))
}

/// What HTTP adds around ingest: the origin check, the memory the request holds, the live feed.
struct HttpDoor<'a> {
    state: &'a AppState,
    pipeline: &'a Pipeline,
    headers: &'a HeaderMap,
    memory: tokio::sync::SemaphorePermit<'static>,
}

impl Door for HttpDoor<'_> {
    type Watched = Prepared;

    fn decoded(&mut self, raw: usize, decoded: usize) {
        shrink(&mut self.memory, raw + 2 * decoded);
    }

    fn admits(&self, source: &Source) -> Result<(), IngestError> {
        crate::http::browser::check_origin(&source.allowed_origins, self.headers)
    }

    fn committing(&self, source: &Source, events: &[NewEvent], trails: &[EventTrail]) -> Prepared {
        let live = &self.state.live;
        match live.is_watched() {
            true => live.prepare(
                &source.name,
                events.iter().zip(trails).map(|(event, trail)| {
                    let routes = event_path_of(self.pipeline, trail).routes;
                    let routes = serde_json::to_value(routes).unwrap_or_default();
                    (event.payload.as_slice(), routes)
                }),
            ),
            false => Default::default(),
        }
    }

    fn committed(&self, watched: Prepared) {
        self.state.live.send(watched);
    }
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
