//! Dead letters: listing them, and queueing them for delivery again.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::query_error;
use crate::http::error::{shown, ApiError};
use crate::http::openapi::{AdminErrors, DeadLetter, DeadLetters, Failure, Replayed};
use crate::http::server::AppState;

#[derive(Deserialize)]
pub(in crate::http) struct DeadLetterQuery {
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
pub(in crate::http) async fn dead_letters(
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
        (status = 409, description = "The destination is disabled", body = Failure),
        AdminErrors,
    ),
    security(("adminToken" = [])),
)]
pub(in crate::http) async fn replay(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<Replayed>, ApiError> {
    let body = body.map_err(super::body_error)?;
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
        .ok_or_else(
            || match pipeline.destination_ids.contains_key(&request.destination) {
                true => ApiError::new(
                    StatusCode::CONFLICT,
                    "destination_disabled",
                    format!(
                        "destination `{}` is disabled (`enabled = false`): enable it, then send \
                     its dead letters again",
                        shown(&request.destination)
                    ),
                ),
                false => {
                    ApiError::not_found(format!("no destination `{}`", shown(&request.destination)))
                }
            },
        )?;
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

fn integral(number: &serde_json::Number) -> Option<i64> {
    number.as_i64().or_else(|| {
        let value = number.as_f64()?;
        (value.fract() == 0.0 && value.abs() < 9.0e15).then_some(value as i64)
    })
}
