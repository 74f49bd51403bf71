//! The admin API (`/admin/v1/*`): its routes, the bearer token that guards them, and what its
//! handlers share. The handlers live one file per resource: [`destinations`] (live state,
//! pauses, a trial on a sample event), [`dead_letters`], [`replays`] (of the archive),
//! [`events`] (recent events' paths and the live stream), [`stats`] (per-second rates) and
//! [`reload`].

pub(super) mod dead_letters;
pub(super) mod destinations;
pub(super) mod events;
pub(super) mod reload;
pub(super) mod replays;
pub(super) mod stats;

pub use dead_letters::ReplayRequest;
pub(super) use events::event_path_of;
pub use replays::replay_json;

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use subtle::ConstantTimeEq;

use crate::http::error::ApiError;
use crate::http::server::AppState;

/// Where the token-protected admin API lives.
pub const ADMIN_API: &str = "/admin/v1/";

/// The admin API's routes. They need [`require_admin`] around them, which the server puts
/// around everything.
pub(super) fn router() -> Router<Arc<AppState>> {
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        })
}

/// Every admin route; [`admin_paths`] lets a test walk them.
fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/admin/v1/destinations", get(destinations::destinations)),
        ("/admin/v1/dead-letters", get(dead_letters::dead_letters)),
        ("/admin/v1/dead-letters/replay", post(dead_letters::replay)),
        ("/admin/v1/reload", post(reload::reload)),
        ("/admin/v1/live", get(events::live)),
        (
            "/admin/v1/replays",
            post(replays::start_replay).get(replays::list_replays),
        ),
        (
            "/admin/v1/replays/{id}",
            get(replays::show_replay).delete(replays::cancel_replay),
        ),
        (
            "/admin/v1/destinations/{name}/test",
            post(destinations::test_destination),
        ),
        (
            "/admin/v1/destinations/{name}/pause",
            post(destinations::pause_destination),
        ),
        (
            "/admin/v1/destinations/{name}/resume",
            post(destinations::resume_destination),
        ),
        ("/admin/v1/events", get(events::search_events)),
        ("/admin/v1/events/{message_id}", get(events::event_path)),
        ("/admin/v1/stats/series", get(stats::stats_series)),
    ]
}

/// The paths of every admin route.
pub fn admin_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).collect()
}

/// Every path under `/admin/v1/`: a bearer token compared in constant time. (The dashboard's
/// page and assets, under `/admin` and `/admin/assets/`, hold no data and stay open.)
pub(super) async fn require_admin(
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

/// A path parameter that does not parse, as the admin API's 400.
fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", rejection.body_text())
}

/// A query string that does not parse, as the admin API's 400.
fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", rejection.body_text())
}

/// A body that could not be read, as the admin API's JSON error (the framework's own answer
/// is plain text).
fn body_error(rejection: BytesRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::too_large("an admin request's body may be at most 2 MiB")
        }
        _ => ApiError::bad_request("invalid_body", rejection.body_text()),
    }
}
