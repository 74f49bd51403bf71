//! The admin API's handlers (`/admin/v1/*`, behind the bearer token): destinations and their
//! pauses, dead letters and replays, event paths, rates, reloads, the live stream.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::http::error::ApiError;
use crate::http::openapi::{
    AdminErrors, ArchiveReplay, ArchiveReplayStarted, ArchiveReplays, DeadLetter, DeadLetters,
    DestinationStatus, DestinationTest, DestinationTestResult, EventAttempt, EventPath, EventRoute,
    EventSearch, Failure, PauseState, Reloaded, Replayed, StatsDestination, StatsSeries,
    StatsSource,
};
use crate::http::server::AppState;
use crate::ingest::{self, Call};
use crate::pipeline::{Pipeline, ReloadError};

/// Every destination with its live counts (since this process started, except `queued`,
/// `retrying` and `dead`, which come from the database).
#[utoipa::path(
    get,
    path = "/admin/v1/destinations",
    tag = "admin",
    responses(
        (status = 200, description = "The destinations", body = Vec<DestinationStatus>),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn destinations(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<DestinationStatus>>, ApiError> {
    let dead = state.store.dead_counts().await?;
    let paused = state.store.paused().await?;
    let pipeline = state.pipeline.load();
    let list = pipeline
        .lanes
        .iter()
        .map(|lane| {
            let config = &lane.config;
            let (queued, retrying) = state.depth.destination(lane.id);
            let status = lane.status();
            DestinationStatus {
                name: config.name.clone(),
                kind: config.kind.clone(),
                paused: paused.contains(&lane.id),
                queued,
                in_flight: status.in_flight as u64,
                delivered: status.delivered,
                retrying,
                dead: dead.get(&lane.id).copied().unwrap_or(0),
                rate_limit: config.rate_limit.map(|r| crate::config::format_rate(&r)),
                concurrency_limit: status.concurrency_limit as u64,
                rate_factor: status.rate_factor,
                last_error: status.last_error,
                endpoints: status.endpoints,
                filters: crate::filter::describe(&config.gate, &config.shaping),
            }
        })
        .collect();
    Ok(Json(list))
}

/// Pause a destination: its events keep queueing and nothing is delivered (requests
/// already in flight finish) until it is resumed. Kept in Postgres: every process and
/// every restart honors it.
#[utoipa::path(
    post,
    path = "/admin/v1/destinations/{name}/pause",
    tag = "admin",
    params(("name" = String, Path, description = "The destination")),
    responses(
        (status = 200, description = "`{name, paused: true}`", body = PauseState),
        (status = 404, description = "No destination of that name", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn pause_destination(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<PauseState>, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    set_paused(&state, name, true).await
}

/// Resume a paused destination: its backlog is delivered at once.
#[utoipa::path(
    post,
    path = "/admin/v1/destinations/{name}/resume",
    tag = "admin",
    params(("name" = String, Path, description = "The destination")),
    responses(
        (status = 200, description = "`{name, paused: false}`", body = PauseState),
        (status = 404, description = "No destination of that name", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn resume_destination(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<PauseState>, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    set_paused(&state, name, false).await
}

/// Pauses or resumes a configured destination (enabled or not), in every process and across
/// restarts: the state lives in Postgres, where claims read it.
pub(super) async fn set_paused(
    state: &AppState,
    name: String,
    paused: bool,
) -> Result<Json<PauseState>, ApiError> {
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
    Ok(Json(PauseState { name, paused }))
}

/// Where one recent event went: when this process accepted it, the destinations it was
/// routed to or filtered from, and each delivery attempt this process made. Kept in a
/// bounded in-memory ring per process: every process serves its own (`scope: "process"`).
#[utoipa::path(
    get,
    path = "/admin/v1/events/{message_id}",
    tag = "admin",
    params(("message_id" = String, Path, description = "The event's messageId")),
    responses(
        (status = 200, description = "The event's path", body = EventPath),
        (status = 404, description = "Unknown here, or aged out of the ring (`not_found`), or this process records no trail (`event_trail_off`: `[server] event_trail = 0`)", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn event_path(
    State(state): State<Arc<AppState>>,
    message_id: Result<Path<String>, PathRejection>,
) -> Result<Json<EventPath>, ApiError> {
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
    Ok(Json(event_path_of(&state.pipeline.load(), &event)))
}

#[derive(Deserialize)]
pub(super) struct EventQuery {
    #[serde(rename = "userId")]
    user_id: Option<String>,
    limit: Option<i64>,
}

/// Events a search by user answers at most, and by default.
const SEARCH_MAX: i64 = 100;
const SEARCH_DEFAULT: i64 = 20;

/// A user's newest events in this process's trail, newest first, each as
/// `/admin/v1/events/{message_id}` shows it: matched on `userId`, or `anonymousId` for
/// events without one.
#[utoipa::path(
    get,
    path = "/admin/v1/events",
    tag = "admin",
    params(
        ("userId" = String, Query, description = "The user (userId, else anonymousId)"),
        ("limit" = Option<u32>, Query, description = "Events at most, 1..=100 (default 20)"),
    ),
    responses(
        (status = 200, description = "The user's recent events", body = EventSearch),
        (status = 400, description = "No `userId`, or `limit` out of range", body = Failure),
        (status = 404, description = "This process records no trail (`event_trail_off`: `[server] event_trail = 0`)", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn search_events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<EventSearch>, ApiError> {
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
    let items = trail
        .by_user(&user, limit as usize)
        .iter()
        .map(|event| event_path_of(&pipeline, event))
        .collect();
    Ok(Json(EventSearch {
        user_id: user,
        scope: "process".into(),
        items,
    }))
}

pub(super) fn source_name(pipeline: &Pipeline, id: i32) -> Option<String> {
    pipeline
        .sources
        .sources()
        .into_iter()
        .find(|source| source.id == id)
        .map(|source| source.name.clone())
}

pub(super) fn destination_name(pipeline: &Pipeline, id: i32) -> Option<String> {
    pipeline
        .destination_ids
        .iter()
        .find(|(_, &known)| known == id)
        .map(|(name, _)| name.clone())
}

/// An event's path as the admin API shows it, names resolved through the config in force.
pub(super) fn event_path_of(pipeline: &Pipeline, event: &crate::trail::EventTrail) -> EventPath {
    let routes = event
        .routes
        .iter()
        .map(|route| EventRoute {
            destination: destination_name(pipeline, route.destination_id),
            state: route.state.as_str().into(),
            reason: match route.state {
                crate::trail::State::Filtered(reason) => Some(reason.into()),
                _ => None,
            },
            attempts: route
                .attempts
                .iter()
                .map(|attempt| EventAttempt {
                    at: ingest::format_time(attempt.at),
                    status: attempt.status,
                    error: attempt.error.as_deref().map(str::to_owned),
                })
                .collect(),
        })
        .collect();
    EventPath {
        message_id: event.message_id.to_string(),
        source: source_name(pipeline, event.source_id),
        received_at: ingest::format_time(event.received_at),
        scope: "process".into(),
        routes,
    }
}

/// The answer of the event lookups when this process records no trail.
pub(super) fn trail_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "event_trail_off",
        "this process keeps no event trail (`[server] event_trail = 0` in its config): set it \
         above 0 to look events up",
    )
}

#[derive(Deserialize)]
pub(super) struct SeriesQuery {
    seconds: Option<u32>,
}

/// Per-second counts for the last hour, from this process's in-memory ring:
/// accepted/rejected per source; delivered/retried/dead, queue depth and p50/p99 latency
/// per destination.
#[utoipa::path(
    get,
    path = "/admin/v1/stats/series",
    tag = "admin",
    params(("seconds" = Option<u32>, Query, description = "How far back, 1..=3600 (default 3600)")),
    responses(
        (status = 200, description = "The series", body = StatsSeries),
        (status = 400, description = "`seconds` out of range", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn stats_series(
    State(state): State<Arc<AppState>>,
    query: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Json<StatsSeries>, ApiError> {
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
    let sources = pipeline
        .sources
        .sources()
        .into_iter()
        .map(|source| {
            let series = state
                .source_rates
                .series(source.id, until, seconds as usize);
            StatsSource {
                name: source.name.clone(),
                accepted: series.accepted,
                rejected: series.rejected,
            }
        })
        .collect();
    let destinations = pipeline
        .lanes
        .iter()
        .map(|lane| {
            let series = lane.stats.rates.series(until, seconds as usize);
            StatsDestination {
                name: lane.config.name.clone(),
                delivered: series.delivered,
                retried: series.retried,
                dead: series.dead,
                queue_depth: series.queue_depth,
                p50_ms: series.p50_ms,
                p99_ms: series.p99_ms,
            }
        })
        .collect();
    Ok(Json(StatsSeries {
        scope: "process".into(),
        until,
        step_seconds: 1,
        sources,
        destinations,
    }))
}

#[derive(Deserialize)]
pub(super) struct DeadLetterQuery {
    destination: Option<String>,
    limit: Option<i64>,
}

/// Dead letters, newest first.
#[utoipa::path(
    get,
    path = "/admin/v1/dead-letters",
    tag = "admin",
    params(
        ("destination" = Option<String>, Query, nullable = false,
         description = "Only this destination's (by name)"),
        ("limit" = Option<i64>, Query, nullable = false,
         description = "At most this many (clamped to 1..=1000; default 100)"),
    ),
    responses(
        (status = 200, description = "The dead letters", body = DeadLetters),
        (status = 400, description = "A parameter is malformed", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn dead_letters(
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

/// Queue dead letters for delivery again: the given ids, or all of the destination's.
#[utoipa::path(
    post,
    path = "/admin/v1/dead-letters/replay",
    tag = "admin",
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "How many were queued again", body = Replayed),
        (status = 400, description = "The body is not a replay request", body = Failure),
        (status = 404, description = "No such destination", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn replay(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<Replayed>, ApiError> {
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
    Ok(Json(Replayed { requeued }))
}

/// Reload the config file: destinations added, changed or removed take effect without a
/// restart and without losing queued work. A file with errors is refused and the running
/// config stays.
#[utoipa::path(
    post,
    path = "/admin/v1/reload",
    tag = "admin",
    responses(
        (status = 200, description = "The new config is in force", body = Reloaded),
        (status = 400, description = "The file has errors; nothing changed", body = Failure),
        (status = 409, description = "Started without a config file", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn reload(State(state): State<Arc<AppState>>) -> Result<Json<Reloaded>, ApiError> {
    match state.reloader.reload().await {
        Ok(report) => Ok(Json(Reloaded {
            reloaded: true,
            report,
        })),
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

/// Try a destination's `events`, `integrations`, `where`, `consent`, `sample`, `transform`
/// and property drops on a sample event: the answer is what would be delivered. Nothing is
/// stored or sent.
#[utoipa::path(
    post,
    path = "/admin/v1/destinations/{name}/test",
    tag = "admin",
    params(("name" = String, Path, description = "The destination")),
    request_body(content = DestinationTest, description = "`{\"event\": {...}}`"),
    responses(
        (status = 200, description = "What the destination would get", body = DestinationTestResult),
        (status = 400, description = "No `event` object, or an unknown `type`", body = Failure),
        (status = 404, description = "No enabled destination of that name", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn test_destination(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<crate::filter::Preview>, ApiError> {
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

/// The live debugger: every accepted message as it arrives, as server-sent events.
///
/// `event: message` carries `{"source", "received_at", "message", "routes"}` (`routes`:
/// `[{destination, state: "queued"|"filtered", reason?}]`, `reason` the first rule that
/// stopped it); `event: outcome` carries an attempt that did not deliver, `{"message_id",
/// "source", "destination", "state", "reason"?, "status"?, "error"?}` (a transform's `null`
/// or failure, a retry, a dead letter); `event: lagged` carries `{"skipped": N}` when the
/// viewer read too slowly and missed N frames (ingest never waits for a viewer). A comment
/// every 15 s keeps the connection open.
#[utoipa::path(
    get,
    path = "/admin/v1/live",
    tag = "admin",
    params(
        ("source" = Option<String>, Query, nullable = false,
         description = "Only this source's messages (by name)"),
    ),
    responses(
        (status = 200, description = "An endless event stream",
         body = String, content_type = "text/event-stream"),
        (status = 401, description = "No or a wrong admin token", body = Failure),
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn live(
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
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ArchiveReplayRequest)]
pub(super) struct ReplayArchiveRequest {
    /// The destination's name.
    destination: String,
    /// Start of the range (RFC 3339), inclusive.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    from: OffsetDateTime,
    /// End of the range (RFC 3339), exclusive.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    to: OffsetDateTime,
    /// Source names (default: every source).
    sources: Option<Vec<String>>,
}

/// Replay archived events received in `[from, to)` (of `sources`, or every source) to one
/// destination: every event its filters take is delivered to it alone, on a lane that
/// yields to live traffic, under its rate limit, retries and dead letters. Events are sent
/// with their original `messageId`, so a vendor that dedupes drops what it already has.
#[utoipa::path(
    post,
    path = "/admin/v1/replays",
    tag = "admin",
    request_body(content = ReplayArchiveRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Recorded; delivery has begun", body = ArchiveReplayStarted),
        (status = 400, description = "The body is not a replay request", body = Failure),
        (status = 404, description = "No such destination or source", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn start_replay(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ArchiveReplayStarted>), ApiError> {
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
        Json(ArchiveReplayStarted {
            id: replay.id,
            events: replay.events,
        }),
    ))
}

/// Every replay, newest first.
#[utoipa::path(
    get,
    path = "/admin/v1/replays",
    tag = "admin",
    responses(
        (status = 200, description = "The replays", body = ArchiveReplays),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn list_replays(
    State(state): State<Arc<AppState>>,
) -> Result<Json<ArchiveReplays>, ApiError> {
    let replays = state.store.replays(None).await?;
    Ok(Json(ArchiveReplays {
        replays: replays.iter().map(ArchiveReplay::from).collect(),
    }))
}

/// One replay's progress.
#[utoipa::path(
    get,
    path = "/admin/v1/replays/{id}",
    tag = "admin",
    params(("id" = i64, Path, description = "The replay's id")),
    responses(
        (status = 200, description = "The replay", body = ArchiveReplay),
        (status = 400, description = "The id is not a number", body = Failure),
        (status = 404, description = "No such replay", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn show_replay(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ArchiveReplay>, ApiError> {
    let id = replay_id(&id)?;
    Ok(Json(ArchiveReplay::from(&find_replay(&state, id).await?)))
}

/// Cancel a replay: nothing more is selected, and its queued events not in flight are
/// dropped.
#[utoipa::path(
    delete,
    path = "/admin/v1/replays/{id}",
    tag = "admin",
    params(("id" = i64, Path, description = "The replay's id")),
    responses(
        (status = 200, description = "The replay, cancelled", body = ArchiveReplay),
        (status = 400, description = "The id is not a number", body = Failure),
        (status = 404, description = "No such replay", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(super) async fn cancel_replay(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ArchiveReplay>, ApiError> {
    let id = replay_id(&id)?;
    let found = state.store.cancel_replay(id).await?;
    if !found {
        return Err(ApiError::not_found(format!("no replay {id}")));
    }
    Ok(Json(ArchiveReplay::from(&find_replay(&state, id).await?)))
}

pub(super) async fn find_replay(
    state: &AppState,
    id: i64,
) -> Result<crate::store::Replay, ApiError> {
    state
        .store
        .replay(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no replay {id}")))
}

pub(super) fn replay_id(text: &str) -> Result<i64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "a replay id is a whole number"))
}

/// A replay as the admin API shows it, as JSON (for the command line).
pub fn replay_json(replay: &crate::store::Replay) -> Value {
    serde_json::to_value(ArchiveReplay::from(replay)).unwrap_or_default()
}

pub(super) fn integral(number: &serde_json::Number) -> Option<i64> {
    number.as_i64().or_else(|| {
        let value = number.as_f64()?;
        (value.fract() == 0.0 && value.abs() < 9.0e15).then_some(value as i64)
    })
}

pub(super) fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", rejection.body_text())
}

pub(super) fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", rejection.body_text())
}
