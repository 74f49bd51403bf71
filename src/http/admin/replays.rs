//! Replays of the archive: starting one, following it, cancelling it.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;
use time::OffsetDateTime;

use crate::http::error::{shown, ApiError};
use crate::http::openapi::{
    AdminErrors, ArchiveReplay, ArchiveReplayStarted, ArchiveReplays, Failure,
};
use crate::http::server::AppState;

/// `POST /admin/v1/replays`: `{"destination", "from", "to", "sources"?}`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ArchiveReplayRequest)]
pub(in crate::http) struct ReplayArchiveRequest {
    /// The destination's name.
    destination: String,
    /// Start of the range (RFC 3339), inclusive.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    from: OffsetDateTime,
    /// End of the range (RFC 3339), exclusive; a time still ahead counts as now.
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
pub(in crate::http) async fn start_replay(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ArchiveReplayStarted>), ApiError> {
    let body = body.map_err(super::body_error)?;
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
        .ok_or_else(|| {
            ApiError::not_found(format!("no destination `{}`", shown(&request.destination)))
        })?;
    let sources = match &request.sources {
        None => None,
        Some(names) => {
            let mut ids = Vec::with_capacity(names.len());
            for name in names {
                let id = pipeline
                    .sources
                    .id_of(name)
                    .ok_or_else(|| ApiError::not_found(format!("no source `{}`", shown(name))))?;
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
pub(in crate::http) async fn list_replays(
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
pub(in crate::http) async fn show_replay(
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
pub(in crate::http) async fn cancel_replay(
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

/// A replay as the admin API shows it, as JSON (for the command line).
pub fn replay_json(replay: &crate::store::Replay) -> Value {
    serde_json::to_value(ArchiveReplay::from(replay)).unwrap_or_default()
}
