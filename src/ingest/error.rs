//! Why ingest refuses a request, or some messages of a batch. Ingest knows nothing of HTTP:
//! `crate::http` turns each refusal into its answer (status, code, `Retry-After`).

use std::time::Duration;

use serde::Serialize;

/// A request ingest refuses as a whole.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IngestError {
    /// Malformed: bad JSON, a missing field, an invalid batch (`code` says which).
    #[error("{message}")]
    Invalid {
        code: &'static str,
        message: String,
        /// The batch's messages, every one refused, when that is the reason.
        rejected: Vec<Rejection>,
    },
    /// Past Segment's limits (32 KB a message, 500 KB a request, 2,500 messages a batch).
    #[error("{0}")]
    TooLarge(String),
    /// A `Content-Encoding` other than identity or gzip.
    #[error("{0}")]
    UnsupportedEncoding(String),
    /// No write key, or one no source has.
    #[error("{0}")]
    Unauthorized(String),
    /// A browser origin the source's `allowed_origins` does not list.
    #[error(
        "this origin may not send with this write key: add it to the source's allowed_origins"
    )]
    OriginNotAllowed,
    /// Past the `[limits]` bounds on queued work: retry after the pause.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// Nothing was stored (shutting down, or the database did not take the commit): retry.
    #[error("{0}")]
    Unavailable(String),
}

impl IngestError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> IngestError {
        IngestError::Invalid {
            code,
            message: message.into(),
            rejected: Vec::new(),
        }
    }

    /// The code the answer carries, also the label of the rejected-events metric.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Invalid { code, .. } => code,
            IngestError::TooLarge(_) => "too_large",
            IngestError::UnsupportedEncoding(_) => "unsupported_encoding",
            IngestError::Unauthorized(_) => "unauthorized",
            IngestError::OriginNotAllowed => "origin_not_allowed",
            IngestError::Overloaded { .. } => "overloaded",
            IngestError::Unavailable(_) => "unavailable",
        }
    }
}

/// One message of a batch that was refused, and why.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Rejection {
    /// Its position in `batch`, from 0.
    #[schema(value_type = u64, minimum = 0)]
    pub index: usize,
    #[schema(value_type = String)]
    pub code: &'static str,
    pub message: String,
}
