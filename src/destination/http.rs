//! The HTTP a plugin speaks: the request it wants sent, the vendor's answer, why a request
//! got none ([`SendError`]), and the classification every HTTP vendor shares.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use reqwest::Method;
use url::Url;

use super::Outcome;

/// A request a plugin wants sent. The engine sends it with the destination's timeout, never
/// follows redirects, and refuses addresses the security settings forbid.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpRequest {
    /// A JSON `POST`.
    pub fn post_json(url: Url, body: impl Into<Bytes>) -> HttpRequest {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        HttpRequest {
            method: Method::POST,
            url,
            headers,
            body: body.into(),
        }
    }
}

/// The vendor's answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    /// The `Retry-After` header as a duration (delta seconds or an HTTP date).
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self
            .headers
            .get(reqwest::header::RETRY_AFTER)?
            .to_str()
            .ok()?;
        parse_retry_after(value, std::time::SystemTime::now())
    }

    /// The body as text, cut to a size worth keeping in a dead letter.
    pub fn body_excerpt(&self) -> String {
        const KEEP: usize = 1024;
        let text = String::from_utf8_lossy(&self.body);
        match text.char_indices().nth(KEEP) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.into_owned(),
        }
    }
}

/// The longest `Retry-After` taken from any vendor, before the destination's own cap
/// (`retry.max_backoff`, applied by [`RetryAfterCap`]): far enough to mean "a long time",
/// near enough that adding it to any clock reading cannot overflow.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `Retry-After`: delta seconds, or an HTTP date relative to `now`. Never fails on
/// size: any run of digits, however long, is at most [`MAX_RETRY_AFTER`]; a date in the past
/// is zero; anything else (negative, fractional, garbage) is `None`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// The classification every HTTP vendor shares unless it documents otherwise: 2xx delivered;
/// 408, 429 and 5xx retried (honoring `Retry-After`); every other answer, 3xx included, is
/// permanent.
pub fn classify_status(response: &HttpResponse) -> Outcome {
    let status = response.status;
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 | 500..=599 => Outcome::Retry {
            status: Some(status),
            retry_after: response.retry_after(),
            throttled: status == 429 || (status == 503 && response.retry_after().is_some()),
            message: format!("HTTP {status}: {}", response.body_excerpt()),
        },
        _ => Outcome::Failed {
            status: Some(status),
            message: format!("HTTP {status}: {}", response.body_excerpt()),
        },
    }
}

/// Sends a plugin's HTTP request; implemented by the engine (timeouts, address policy).
pub trait HttpSender: Send + Sync {
    fn send(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, SendError>>;

    /// The addresses `host` resolves to that the security settings let deliveries reach, for
    /// kinds that connect by themselves (`postgres`); `Err` says why there is none. A sender
    /// that knows no policy allows nothing.
    fn allowed_addresses<'a>(
        &'a self,
        host: &'a str,
        _port: u16,
    ) -> BoxFuture<'a, Result<Vec<std::net::IpAddr>, String>> {
        Box::pin(async move { Err(format!("no address policy to check {host} against")) })
    }
}

/// Why a request got no answer. The sender says which, so that a plugin (and the engine)
/// never has to guess from an outcome's flags.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// No answer within the destination's timeout.
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection could not be made, or broke before the answer was read.
    #[error("{0}")]
    Connect(String),
    /// The security settings refuse the vendor's address: no retry changes that.
    #[error("{0}")]
    Refused(String),
}

impl SendError {
    /// What it means for the events: a timeout is the vendor saying "slow down" (it counts
    /// against the destination: AIMD); a failed connection is retried; a refused address is
    /// permanent.
    pub fn outcome(&self) -> Outcome {
        match self {
            SendError::Timeout(_) => Outcome::Retry {
                status: None,
                retry_after: None,
                throttled: true,
                message: self.to_string(),
            },
            SendError::Connect(message) => Outcome::retry(message.clone()),
            SendError::Refused(message) => Outcome::failed(message.clone()),
        }
    }
}
