//! Where events went: one recent event's path, a user's recent events, and the live stream of
//! every event as it arrives. All three read this process's memory, not the database.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{path_error, query_error};
use crate::filter::Reason;
use crate::http::error::{shown, ApiError};
use crate::http::openapi::{
    AdminErrors, EventAttempt, EventPath, EventRoute, EventSearch, Failure,
};
use crate::http::server::AppState;
use crate::ingest;
use crate::pipeline::Pipeline;

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
pub(in crate::http) async fn event_path(
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
            "no recent event `{}` in this process (each process keeps the last {} events it \
             routed: `[server] event_trail`)",
            shown(&message_id),
            trail.capacity()
        ))
    };
    let event = trail.find(&message_id).ok_or_else(unknown)?;
    Ok(Json(event_path_of(&state.pipeline.load(), &event)))
}

#[derive(Deserialize)]
pub(in crate::http) struct EventQuery {
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
pub(in crate::http) async fn search_events(
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
pub(in crate::http) fn event_path_of(
    pipeline: &Pipeline,
    event: &crate::trail::EventTrail,
) -> EventPath {
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
        .chain(event.unsubscribed(&pipeline.routes).map(|route| {
            EventRoute {
                destination: Some(route.name.clone()),
                state: crate::trail::State::Filtered(Reason::Events.as_str())
                    .as_str()
                    .into(),
                reason: Some(Reason::Events.as_str().into()),
                attempts: Vec::new(),
            }
        }))
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
fn trail_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "event_trail_off",
        "this process keeps no event trail (`[server] event_trail = 0` in its config): set it \
         above 0 to look events up",
    )
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
pub(in crate::http) async fn live(
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
