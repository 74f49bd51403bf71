//! Reloading the config file (`POST /admin/v1/reload`; SIGHUP does the same).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::http::error::ApiError;
use crate::http::openapi::{AdminErrors, Failure, Reloaded};
use crate::http::server::AppState;
use crate::pipeline::ReloadError;

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
pub(in crate::http) async fn reload(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Reloaded>, ApiError> {
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
