//! The HTTP surface: Segment's ingest API, health, metrics and the admin API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use arc_swap::ArcSwap;

use crate::http::browser::Peer;
use crate::http::error::ApiError;
use crate::http::openapi::{DeadLetter, DeadLetters};
use crate::ingest::backpressure::QueueDepth;
use crate::ingest::{self, Call, Endpoint, IngestError};
use crate::pipeline::{Pipeline, ReloadError, Reloader};
use crate::store::commit::{CommitError, GroupCommit};
use crate::store::{NewEvent, Store};

/// Connections served at once at most; more are closed at accept.
const MAX_CONNECTIONS: usize = 10_000;
/// Largest request head (request line and headers); past it hyper answers 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a client may take to send a request's headers (slowloris) and its body.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    pub headers: Duration,
    pub body: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            headers: Duration::from_secs(15),
            body: Duration::from_secs(30),
        }
    }
}

/// Serves `app` over HTTP/1.1 until `stop`, then lets requests in progress finish (15 s at
/// most). Headers must arrive in time, heads are bounded in size, and connections in number,
/// so slow or greedy clients cannot pile up memory.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: HttpTimeouts,
    stop: tokio_util::sync::CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("too many connections; closing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The peer's address rides along with each request (`context.ip`, trusted proxies).
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(timeouts.headers)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), graceful.shutdown()).await;
}

/// Which parts of the API a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
}

/// Everything the handlers share.
pub struct AppState {
    pub store: Store,
    /// The config in force; a reload swaps it.
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub reloader: Arc<Reloader>,
    pub commit: GroupCommit,
    pub admin_token: Option<String>,
    pub metrics: PrometheusHandle,
    /// Set once shutdown begins: intake stops and `/readyz` answers 503.
    pub draining: AtomicBool,
    /// How long an ingest request waits for its commit before answering 503.
    pub commit_timeout: Duration,
    pub depth: Arc<QueueDepth>,
    pub timeouts: HttpTimeouts,
    /// The live debugger's feed (`GET /admin/v1/live`).
    pub live: crate::http::live::LiveFeed,
    /// Accepted and rejected events per source and second, for the dashboard.
    pub source_rates: crate::rates::SourceRates,
}

pub fn router(state: Arc<AppState>, roles: Roles) -> Router {
    let admin = admin_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        });
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::http::openapi::serve))
        // The dashboard's page and assets hold no data: a browser cannot send a bearer token
        // when it navigates, so they are served openly and fetch everything from /admin/v1/*.
        .merge(crate::http::dashboard::router())
        .merge(admin);
    if roles.ingest {
        app = app
            .route("/v1/batch", post(batch))
            .route("/v1/import", post(batch))
            .route("/v1/b", post(batch))
            .route("/v1/m", post(crate::http::browser::telemetry))
            .route(
                "/v1/projects/{write_key}/settings",
                get(crate::http::browser::settings),
            )
            .route("/v1/{call}", post(single));
    }
    app.fallback(not_found)
        // Around everything, so no route under /admin/v1/ can be left open, wherever it is
        // mounted: even an unknown one answers 401 before 404.
        .layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::browser::cors,
        ))
        .layer(middleware::from_fn(observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

/// Where the token-protected admin API lives.
pub const ADMIN_API: &str = "/admin/v1/";

/// Every admin route; [`admin_paths`] lets a test walk them.
fn admin_routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/admin/v1/destinations", get(destinations)),
        ("/admin/v1/dead-letters", get(dead_letters)),
        ("/admin/v1/dead-letters/replay", post(replay)),
        ("/admin/v1/reload", post(reload)),
        ("/admin/v1/live", get(live)),
        ("/admin/v1/replays", post(start_replay).get(list_replays)),
        (
            "/admin/v1/replays/{id}",
            get(show_replay).delete(cancel_replay),
        ),
        ("/admin/v1/destinations/{name}/test", post(test_destination)),
        (
            "/admin/v1/destinations/{name}/pause",
            post(pause_destination),
        ),
        (
            "/admin/v1/destinations/{name}/resume",
            post(resume_destination),
        ),
        ("/admin/v1/events", get(search_events)),
        ("/admin/v1/events/{message_id}", get(event_path)),
        ("/admin/v1/stats/series", get(stats_series)),
    ]
}

/// The paths of every admin route.
pub fn admin_paths() -> Vec<&'static str> {
    admin_routes().into_iter().map(|(path, _)| path).collect()
}

/// Per request: a tracing span, and the HTTP metrics (`switchyard_http_requests_total`,
/// `switchyard_http_request_duration_seconds`) labelled by route pattern, never by raw path.
async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let span = tracing::info_span!("request", %method, %route);
    let started = std::time::Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.in_scope(|| tracing::debug!(status, elapsed_ms = elapsed.as_millis() as u64, "answered"));
    metrics::counter!("switchyard_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("switchyard_http_request_duration_seconds", "route" => route)
        .record(elapsed.as_secs_f64());
    response
}

/// A method as a metric label: the standard ones by name, anything a client makes up as
/// `other`, so no client can add series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A handler that panicked (a bug): the client still gets a JSON answer, and the process lives.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request could not be handled; nothing was stored",
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    if !state.store.ready().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "database unavailable"})),
        )
            .into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    crate::http::series::sample(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn single(
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

async fn batch(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ingest(&state, Endpoint::Batch, peer, &headers, body).await
}

/// The ingest path: authenticate, decode, validate, route, commit, answer.
async fn ingest(
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

fn no_write_key() -> IngestError {
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
fn memory_kib(bytes: usize) -> u32 {
    (bytes.min(3 * ingest::MAX_REQUEST_BYTES).div_ceil(1024)).max(1) as u32
}

async fn reserve_memory(body: usize) -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
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
fn shrink(permit: &mut tokio::sync::SemaphorePermit<'static>, bytes: usize) {
    let keep = memory_kib(bytes) as usize;
    if permit.num_permits() > keep {
        drop(permit.split(permit.num_permits() - keep));
    }
}

fn reject_unknown_key() -> IngestError {
    metrics::counter!("switchyard_rejected_events_total", "source" => "unknown", "code" => "unauthorized")
        .increment(1);
    IngestError::Unauthorized("unknown write key".into())
}

/// The write key from `Authorization: Basic base64(key:)`, if the request has one.
fn basic_write_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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

/// Every path under `/admin/v1/`: a bearer token compared in constant time. (The dashboard's
/// page and assets, under `/admin` and `/admin/assets/`, hold no data and stay open.)
async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !request.uri().path().starts_with(ADMIN_API) {
        return Ok(next.run(request).await);
    }
    let Some(token) = &state.admin_token else {
        return Err(ApiError::unauthorized(
            "the admin API is off: set SWITCHYARD_ADMIN_TOKEN to enable it",
        ));
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return Err(ApiError::unauthorized(
            "send the admin token as `Authorization: Bearer <token>`",
        ));
    }
    Ok(next.run(request).await)
}

async fn destinations(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let dead = state.store.dead_counts().await?;
    let paused = state.store.paused().await?;
    let pipeline = state.pipeline.load();
    let list: Vec<Value> = pipeline
        .lanes
        .iter()
        .map(|lane| {
            let config = &lane.config;
            let (queued, retrying) = state.depth.destination(lane.id);
            let status = lane.status();
            json!({
                "name": config.name,
                "kind": config.kind,
                "paused": paused.contains(&lane.id),
                "queued": queued,
                "in_flight": status.in_flight,
                "delivered": status.delivered,
                "retrying": retrying,
                "dead": dead.get(&lane.id).copied().unwrap_or(0),
                "rate_limit": config.rate_limit.map(|r| crate::config::format_rate(&r)),
                "concurrency_limit": status.concurrency_limit,
                "rate_factor": status.rate_factor,
                "last_error": status.last_error,
                "endpoints": status.endpoints,
                "filters": crate::filter::describe(&config.gate, &config.shaping),
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

async fn pause_destination(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    set_paused(&state, name, true).await
}

async fn resume_destination(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    set_paused(&state, name, false).await
}

/// Pauses or resumes a configured destination (enabled or not), in every process and across
/// restarts: the state lives in Postgres, where claims read it.
async fn set_paused(state: &AppState, name: String, paused: bool) -> Result<Json<Value>, ApiError> {
    let pipeline = state.pipeline.load_full();
    let id = pipeline
        .destination_ids
        .get(&name)
        .copied()
        .ok_or_else(|| ApiError::not_found(format!("no destination `{name}`")))?;
    state.store.set_paused(id, paused).await?;
    // This process's lane stops before the answer (others follow the notice within moments).
    if let Some(lane) = pipeline.lanes.iter().find(|lane| lane.id == id) {
        lane.stats.set_paused(paused);
    }
    Ok(Json(json!({ "name": name, "paused": paused })))
}

/// `GET /admin/v1/events/{messageId}`: the event's path as this process saw it.
async fn event_path(
    State(state): State<Arc<AppState>>,
    message_id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(message_id) = message_id.map_err(path_error)?;
    let trail = &crate::trail::TRAIL;
    if trail.capacity() == 0 {
        return Err(trail_off());
    }
    let unknown = || {
        ApiError::not_found(format!(
            "no recent event `{message_id}` in this process (each process keeps the last {} \
             events it routed: `[server] event_trail`)",
            trail.capacity()
        ))
    };
    let event = trail.find(&message_id).ok_or_else(unknown)?;
    Ok(Json(event_json(&state.pipeline.load(), &event)))
}

#[derive(Deserialize)]
struct EventSearch {
    #[serde(rename = "userId")]
    user_id: Option<String>,
    limit: Option<i64>,
}

/// Events a search by user answers at most, and by default.
const SEARCH_MAX: i64 = 100;
const SEARCH_DEFAULT: i64 = 20;

/// `GET /admin/v1/events?userId=U&limit=N`: the user's newest events in this process's trail
/// (matched on userId, else anonymousId), newest first, each as `GET /admin/v1/events/{id}`
/// shows it.
async fn search_events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventSearch>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let user = query
        .user_id
        .filter(|user| !user.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "give `userId` (events are found by messageId at /admin/v1/events/{messageId})",
            )
        })?;
    let limit = query.limit.unwrap_or(SEARCH_DEFAULT);
    if !(1..=SEARCH_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be 1 to {SEARCH_MAX}"),
        ));
    }
    let trail = &crate::trail::TRAIL;
    if trail.capacity() == 0 {
        return Err(trail_off());
    }
    let pipeline = state.pipeline.load();
    let items: Vec<Value> = trail
        .by_user(&user, limit as usize)
        .iter()
        .map(|event| event_json(&pipeline, event))
        .collect();
    Ok(Json(json!({
        "user_id": user,
        "scope": "process",
        "items": items,
    })))
}

fn source_name(pipeline: &Pipeline, id: i32) -> Option<String> {
    pipeline
        .sources
        .sources()
        .into_iter()
        .find(|source| source.id == id)
        .map(|source| source.name.clone())
}

fn destination_name(pipeline: &Pipeline, id: i32) -> Option<String> {
    pipeline
        .destination_ids
        .iter()
        .find(|(_, &known)| known == id)
        .map(|(name, _)| name.clone())
}

/// An event's path as the admin API shows it, names resolved through the config in force.
fn event_json(pipeline: &Pipeline, event: &crate::trail::EventTrail) -> Value {
    let source = source_name(pipeline, event.source_id);
    let destination = |id: i32| destination_name(pipeline, id);
    let routes: Vec<Value> = event
        .routes
        .iter()
        .map(|route| {
            let attempts: Vec<Value> = route
                .attempts
                .iter()
                .map(|attempt| {
                    json!({
                        "at": ingest::format_time(attempt.at),
                        "status": attempt.status,
                        "error": attempt.error.as_deref(),
                    })
                })
                .collect();
            let reason = match route.state {
                crate::trail::State::Filtered(reason) => Some(reason),
                _ => None,
            };
            json!({
                "destination": destination(route.destination_id),
                "state": route.state.as_str(),
                "reason": reason,
                "attempts": attempts,
            })
        })
        .collect();
    json!({
        "message_id": &*event.message_id,
        "source": source,
        "received_at": ingest::format_time(event.received_at),
        "scope": "process",
        "routes": routes,
    })
}

/// The answer of the event lookups when this process records no trail.
fn trail_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "event_trail_off",
        "this process keeps no event trail (`[server] event_trail = 0` in its config): set it \
         above 0 to look events up",
    )
}

#[derive(Deserialize)]
struct SeriesQuery {
    seconds: Option<u32>,
}

/// `GET /admin/v1/stats/series?seconds=N`: per-second rates for the last N seconds (at most an
/// hour), oldest first, from this process's memory.
async fn stats_series(
    State(state): State<Arc<AppState>>,
    query: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let seconds = query.seconds.unwrap_or(crate::rates::SECONDS as u32);
    if seconds == 0 || seconds as usize > crate::rates::SECONDS {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`seconds` must be 1 to {}", crate::rates::SECONDS),
        ));
    }
    let until = crate::rates::now();
    let pipeline = state.pipeline.load();
    let sources: Vec<Value> = pipeline
        .sources
        .sources()
        .into_iter()
        .map(|source| {
            let series = state
                .source_rates
                .series(source.id, until, seconds as usize);
            json!({
                "name": source.name,
                "accepted": series.accepted,
                "rejected": series.rejected,
            })
        })
        .collect();
    let destinations: Vec<Value> = pipeline
        .lanes
        .iter()
        .map(|lane| {
            let series = lane.stats.rates.series(until, seconds as usize);
            json!({
                "name": lane.config.name,
                "delivered": series.delivered,
                "retried": series.retried,
                "dead": series.dead,
                "queue_depth": series.queue_depth,
                "p50_ms": series.p50_ms,
                "p99_ms": series.p99_ms,
            })
        })
        .collect();
    Ok(Json(json!({
        "scope": "process",
        "until": until,
        "step_seconds": 1,
        "sources": sources,
        "destinations": destinations,
    })))
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    destination: Option<String>,
    limit: Option<i64>,
}

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<DeadLetters>, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    if query
        .destination
        .as_deref()
        .is_some_and(|d| d.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`destination` must not contain a NUL character",
        ));
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let letters = state
        .store
        .dead_letters(query.destination.as_deref(), limit)
        .await?;
    Ok(Json(DeadLetters {
        items: letters.into_iter().map(DeadLetter::from).collect(),
    }))
}

/// `POST /admin/v1/dead-letters/replay`.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct ReplayRequest {
    /// The destination's name.
    pub destination: String,
    /// Which dead letters; all of the destination's when absent or null. JSON numbers with an
    /// integral value (`7` or `7.0`).
    #[schema(value_type = Option<Vec<i64>>)]
    pub ids: Option<Vec<serde_json::Number>>,
}

async fn replay(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: ReplayRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("expected {{\"destination\", \"ids\"?}}: {e}"),
        )
    })?;
    let pipeline = state.pipeline.load();
    let lane = pipeline
        .lanes
        .iter()
        .find(|lane| lane.config.name == request.destination)
        .ok_or_else(|| ApiError::not_found(format!("no destination `{}`", request.destination)))?;
    let ids: Option<Vec<i64>> = request
        .ids
        .map(|ids| ids.iter().map(integral).collect::<Option<_>>())
        .map(|ids| {
            ids.ok_or_else(|| ApiError::bad_request("invalid_ids", "`ids` must be whole numbers"))
        })
        .transpose()?;
    let requeued = state
        .store
        .requeue_dead_letters(
            lane.id,
            ids.as_deref(),
            lane.config.ordering == crate::config::Ordering::PerUser,
        )
        .await?;
    Ok(Json(json!({ "requeued": requeued })))
}

async fn reload(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    match state.reloader.reload().await {
        Ok(report) => Ok(Json(json!({ "reloaded": true, "report": report }))),
        Err(ReloadError::Invalid(errors)) => {
            let mut error = ApiError::bad_request(
                "invalid_config",
                "the config file has errors; the running config stays",
            );
            error.message = format!("{}\n{errors}", error.message);
            Err(error)
        }
        Err(ReloadError::NoFile) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_config_file",
            "there is no config file to reload (start with --config or ./switchyard.toml)",
        )),
        Err(ReloadError::Database(_)) => Err(ApiError::unavailable("the database is unavailable")),
    }
}

/// `POST /admin/v1/destinations/{name}/test` `{"event": {...}}`: what the
/// destination's routing, filters and transform make of the event. Nothing is stored or sent.
async fn test_destination(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let invalid = |message: String| ApiError::bad_request("invalid_body", message);
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let Some(Value::Object(mut event)) = body.get("event").cloned() else {
        return Err(invalid(
            "expected {\"event\": {...}}: the event to try, as an SDK would send it".into(),
        ));
    };
    let pipeline = state.pipeline.load_full();
    let lane = pipeline
        .lanes
        .iter()
        .find(|lane| lane.config.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no enabled destination `{name}`")))?;
    let route = pipeline
        .routes
        .find(&name)
        .ok_or_else(|| ApiError::not_found(format!("no enabled destination `{name}`")))?;
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("track");
    let call = Call::parse(kind).ok_or_else(|| invalid(format!("unknown type `{kind}`")))?;
    event.insert("type".into(), Value::from(call.as_str()));
    let message_id = match event.get("messageId").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            event.insert("messageId".into(), Value::from(id.clone()));
            id
        }
    };
    let message = ingest::Message {
        call,
        message_id: message_id.clone(),
        user_key: String::new(),
        event: event
            .get("event")
            .and_then(Value::as_str)
            .map(str::to_owned),
        integrations: event
            .get("integrations")
            .and_then(Value::as_object)
            .cloned(),
        payload: Vec::new(),
    };
    // A sample event comes from no source: `sources` is not checked.
    let mut route = route.clone();
    route.sources = None;
    let refused = route.routing(0, &message).err().flatten();
    let metadata = crate::filter::Metadata {
        destination_name: lane.config.name.clone(),
        destination_kind: lane.config.kind.clone(),
    };
    let answer = crate::filter::preview(
        &lane.config.gate,
        &lane.config.shaping,
        &metadata,
        refused,
        &message_id,
        Value::Object(event),
    )
    .await;
    Ok(Json(answer))
}

async fn live(
    State(state): State<Arc<AppState>>,
    query: Result<Query<crate::http::live::LiveQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_error)?;
    let pipeline = state.pipeline.clone();
    let render: crate::http::live::OutcomeRenderer = Arc::new(move |outcome| {
        let pipeline = pipeline.load();
        let destination = destination_name(&pipeline, outcome.destination_id)?;
        let source = outcome.source_id.and_then(|id| source_name(&pipeline, id));
        let reason = match outcome.state {
            crate::trail::State::Filtered(reason) => Some(reason),
            _ => None,
        };
        let data = json!({
            "message_id": &*outcome.message_id,
            "source": source,
            "destination": destination,
            "state": outcome.state.as_str(),
            "reason": reason,
            "status": outcome.status,
            "error": outcome.error.as_deref(),
        });
        Some((source, data.to_string()))
    });
    Ok(state.live.sse(query.source, render))
}

/// `POST /admin/v1/replays`: `{"destination", "from", "to", "sources"?}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayArchiveRequest {
    destination: String,
    #[serde(with = "time::serde::rfc3339")]
    from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    to: OffsetDateTime,
    sources: Option<Vec<String>>,
}

async fn start_replay(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: ReplayArchiveRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!(
                "expected {{\"destination\", \"from\", \"to\", \"sources\"?}} with RFC 3339 times: {e}"
            ),
        )
    })?;
    if request.from >= request.to {
        return Err(ApiError::bad_request(
            "invalid_range",
            "`from` must be before `to`",
        ));
    }
    let pipeline = state.pipeline.load();
    let destination_id = *pipeline
        .destination_ids
        .get(&request.destination)
        .ok_or_else(|| ApiError::not_found(format!("no destination `{}`", request.destination)))?;
    let sources = match &request.sources {
        None => None,
        Some(names) => {
            let mut ids = Vec::with_capacity(names.len());
            for name in names {
                let id = pipeline
                    .sources
                    .id_of(name)
                    .ok_or_else(|| ApiError::not_found(format!("no source `{name}`")))?;
                ids.push(id);
            }
            Some(ids)
        }
    };
    let replay = state
        .store
        .create_replay(destination_id, request.from, request.to, sources.as_deref())
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": replay.id, "events": replay.events })),
    ))
}

async fn list_replays(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let replays = state.store.replays(None).await?;
    Ok(Json(json!({
        "replays": replays.iter().map(replay_json).collect::<Vec<_>>()
    })))
}

async fn show_replay(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = replay_id(&id)?;
    Ok(Json(replay_json(&find_replay(&state, id).await?)))
}

async fn cancel_replay(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = replay_id(&id)?;
    let found = state.store.cancel_replay(id).await?;
    if !found {
        return Err(ApiError::not_found(format!("no replay {id}")));
    }
    Ok(Json(replay_json(&find_replay(&state, id).await?)))
}

async fn find_replay(state: &AppState, id: i64) -> Result<crate::store::Replay, ApiError> {
    state
        .store
        .replay(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no replay {id}")))
}

fn replay_id(text: &str) -> Result<i64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "a replay id is a whole number"))
}

/// A replay as the admin API shows it.
pub fn replay_json(replay: &crate::store::Replay) -> Value {
    json!({
        "id": replay.id,
        "destination": replay.destination,
        "state": replay.state,
        "from": ingest::format_time(replay.from_at),
        "to": ingest::format_time(replay.to_at),
        "events": replay.events,
        "selected": replay.selected,
        "delivered": replay.delivered,
        "failed": replay.failed,
        "created_at": ingest::format_time(replay.created_at),
        "finished_at": replay.finished_at.map(ingest::format_time),
    })
}

fn integral(number: &serde_json::Number) -> Option<i64> {
    number.as_i64().or_else(|| {
        let value = number.as_f64()?;
        (value.fract() == 0.0 && value.abs() < 9.0e15).then_some(value as i64)
    })
}

fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", rejection.body_text())
}

fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", rejection.body_text())
}
