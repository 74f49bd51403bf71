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
    /// Past the `[limits]` bounds on queued work: retry after the pause.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
}

impl IngestError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> IngestError {
        IngestError::Invalid {
            code,
            message: message.into(),
            rejected: Vec::new(),
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
