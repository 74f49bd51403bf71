//! The one error type of the HTTP surface: every failure becomes `{"code", "message"}` JSON
//! with a fitting status, never a bare 500.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::ingest::IngestError;

/// An answer other than success.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds) with 429 and 503.
    pub retry_after: Option<Duration>,
    /// Messages of a batch that were refused, when that is why the request failed.
    pub rejected: Vec<Rejection>,
}

pub use crate::ingest::Rejection;

/// Characters of a caller's name (a destination, a source, a message id) an error echoes.
const SHOWN: usize = 100;

/// A name the caller sent, as an error message echoes it: whole up to [`SHOWN`] characters,
/// else its start and `…`, so that a megabyte of name is not sent back.
pub fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    match name.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &name[..end]).into(),
        None => name.into(),
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            rejected: Vec::new(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The database cannot take writes now: the client should retry.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(Duration::from_secs(5)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// Too much queued work: the client should slow down.
    pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
        }
    }
}

/// What each ingest refusal answers.
impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> ApiError {
        match error {
            IngestError::Invalid {
                code,
                message,
                rejected,
            } => ApiError {
                rejected,
                ..ApiError::bad_request(code, message)
            },
            IngestError::TooLarge(message) => ApiError::too_large(message),
            IngestError::UnsupportedEncoding(message) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                message,
            ),
            IngestError::Unauthorized(message) => ApiError::unauthorized(message),
            IngestError::OriginNotAllowed => {
                ApiError::new(StatusCode::FORBIDDEN, error.code(), error.to_string())
            }
            IngestError::Overloaded {
                message,
                retry_after,
            } => ApiError::overloaded(message, retry_after),
            IngestError::Unavailable(message) => ApiError::unavailable(message),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[Rejection]>::is_empty")]
    rejected: &'a [Rejection],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            code: self.code,
            message: &self.message,
            rejected: &self.rejected,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

/// A store failure seen by an admin call: the database is unavailable, retry shortly.
impl From<crate::store::StoreError> for ApiError {
    fn from(_: crate::store::StoreError) -> ApiError {
        ApiError::unavailable("the database is unavailable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_is_shown_by_its_start_cut_between_characters() {
        assert_eq!(shown("hook"), "hook");
        let hundred = "é".repeat(SHOWN);
        assert_eq!(shown(&hundred), hundred);
        assert_eq!(shown(&"é".repeat(1_000_000)), format!("{hundred}…"));
    }
}
