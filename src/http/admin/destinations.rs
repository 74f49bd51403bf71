//! Destinations: their live state (`GET /admin/v1/destinations`), pausing and resuming them,
//! and trying one on a sample event (`POST /admin/v1/destinations/{name}/test`).

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::path_error;
use crate::http::error::{shown, ApiError};
use crate::http::openapi::{
    AdminErrors, DestinationStatus, DestinationTestResult, Failure, PauseState,
};
use crate::http::server::AppState;
use crate::ingest::{self, Call};

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
pub(in crate::http) async fn destinations(
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
pub(in crate::http) async fn pause_destination(
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
pub(in crate::http) async fn resume_destination(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<PauseState>, ApiError> {
    let Path(name) = name.map_err(path_error)?;
    set_paused(&state, name, false).await
}

/// Pauses or resumes a configured destination (enabled or not), in every process and across
/// restarts: the state lives in Postgres, where claims read it.
async fn set_paused(
    state: &AppState,
    name: String,
    paused: bool,
) -> Result<Json<PauseState>, ApiError> {
    let pipeline = state.pipeline.load_full();
    let id = pipeline
        .destination_ids
        .get(&name)
        .copied()
        .ok_or_else(|| ApiError::not_found(format!("no destination `{}`", shown(&name))))?;
    state.store.set_paused(id, paused).await?;
    // This process's lane stops before the answer (others follow the notice within moments).
    if let Some(lane) = pipeline.lanes.iter().find(|lane| lane.id == id) {
        lane.stats.set_paused(paused);
    }
    Ok(Json(PauseState { name, paused }))
}

/// A sample event for `POST /admin/v1/destinations/{name}/test`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(try_from = "Map<String, Value>")]
pub(in crate::http) struct DestinationTest {
    /// A Segment message (`type` defaults to `track`; a `messageId` is made when missing).
    #[schema(value_type = Object)]
    event: Map<String, Value>,
}

/// Only a JSON object whose `event` is an object (a derived `Deserialize` would also take
/// `[{...}]`, the fields in order).
impl TryFrom<Map<String, Value>> for DestinationTest {
    type Error = &'static str;

    fn try_from(mut body: Map<String, Value>) -> Result<DestinationTest, Self::Error> {
        match body.remove("event") {
            Some(Value::Object(event)) => Ok(DestinationTest { event }),
            _ => Err("no `event` object"),
        }
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
pub(in crate::http) async fn test_destination(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<crate::filter::Preview>, ApiError> {
    let body = body.map_err(super::body_error)?;
    let invalid = |message: String| ApiError::bad_request("invalid_body", message);
    // JSON first, then its shape: each has its own answer.
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let DestinationTest { mut event } = serde_json::from_value(body).map_err(|_| {
        invalid("expected {\"event\": {...}}: the event to try, as an SDK would send it".into())
    })?;
    let pipeline = state.pipeline.load_full();
    let unknown = || ApiError::not_found(format!("no enabled destination `{}`", shown(&name)));
    let lane = pipeline
        .lanes
        .iter()
        .find(|lane| lane.config.name == name)
        .ok_or_else(unknown)?;
    let route = pipeline.routes.find(&name).ok_or_else(unknown)?;
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("track");
    let call =
        Call::parse(kind).ok_or_else(|| invalid(format!("unknown type `{}`", shown(kind))))?;
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
