//! Per-second rates for the dashboard's charts, from this process's rings.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::query_error;
use crate::http::error::ApiError;
use crate::http::openapi::{AdminErrors, Failure, StatsDestination, StatsSeries, StatsSource};
use crate::http::server::AppState;

#[derive(Deserialize)]
pub(in crate::http) struct SeriesQuery {
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
pub(in crate::http) async fn stats_series(
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
