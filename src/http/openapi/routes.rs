//! Documentation-only signatures for the routes whose handlers do not carry their own
//! `#[utoipa::path]` (every admin handler in `crate::http::admin` does): one ingest handler
//! serves every `/v1/*` call type and alias, each documented here with its own message schema,
//! and the health, metrics, SDK and dashboard routes answer no JSON worth typing. Nothing calls
//! these functions: `#[utoipa::path]` only needs something to describe each route on.
#![allow(dead_code)]

use super::*;

/// Record an action a user took.
///
/// Answers 200 only once the message is committed; a repeated `messageId` from the same
/// source within 24 h is acknowledged and not delivered again. At most 32 KB, gzip allowed.
#[utoipa::path(
    post,
    path = "/v1/track",
    tag = "ingest",
    request_body(content = TrackMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn track() {}

/// Tie a user to their traits.
///
/// Answers 200 only once the message is committed; a repeated `messageId` from the same
/// source within 24 h is acknowledged and not delivered again. At most 32 KB, gzip allowed.
#[utoipa::path(
    post,
    path = "/v1/identify",
    tag = "ingest",
    request_body(content = IdentifyMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn identify() {}

/// Record a page view.
///
/// Answers 200 only once the message is committed; a repeated `messageId` from the same
/// source within 24 h is acknowledged and not delivered again. At most 32 KB, gzip allowed.
#[utoipa::path(
    post,
    path = "/v1/page",
    tag = "ingest",
    request_body(content = PageMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn page() {}

/// Record a screen view in an app.
///
/// Answers 200 only once the message is committed; a repeated `messageId` from the same
/// source within 24 h is acknowledged and not delivered again. At most 32 KB, gzip allowed.
#[utoipa::path(
    post,
    path = "/v1/screen",
    tag = "ingest",
    request_body(content = ScreenMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn screen() {}

/// Tie a user to a group.
///
/// Answers 200 only once the message is committed; a repeated `messageId` from the same
/// source within 24 h is acknowledged and not delivered again. At most 32 KB, gzip allowed.
#[utoipa::path(
    post,
    path = "/v1/group",
    tag = "ingest",
    request_body(content = GroupMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn group() {}

/// Merge two user identities.
///
/// Answers 200 only once the message is committed; a repeated `messageId` from the same
/// source within 24 h is acknowledged and not delivered again. At most 32 KB, gzip allowed.
#[utoipa::path(
    post,
    path = "/v1/alias",
    tag = "ingest",
    request_body(content = AliasMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn alias() {}

/// Send many messages in one request.
///
/// Valid messages are kept and invalid ones are listed in `rejected` with their index and
/// reason; the request fails (400) only when no message is valid. At most 2,500 messages
/// and 500 KB (after gzip decoding).
#[utoipa::path(
    post,
    path = "/v1/batch",
    tag = "ingest",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every valid message is committed", body = Accepted),
        IngestErrors,
    ),
    security(("writeKey" = []), ()),
)]
pub fn batch() {}

/// The same as `/v1/batch` (Segment's historical import endpoint).
#[utoipa::path(
    post,
    path = "/v1/import",
    tag = "ingest",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every valid message is committed", body = Accepted),
        IngestErrors,
    ),
    security(("writeKey" = []), ()),
)]
pub fn import() {}

/// `/v1/track` as analytics.js and the mobile SDKs call it (`text/plain` JSON allowed).
#[utoipa::path(
    post,
    path = "/v1/t",
    tag = "ingest",
    request_body(content = TrackMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn track_short() {}

/// `/v1/identify` as the browser SDK calls it.
#[utoipa::path(
    post,
    path = "/v1/i",
    tag = "ingest",
    request_body(content = IdentifyMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn identify_short() {}

/// `/v1/page` as the browser SDK calls it.
#[utoipa::path(
    post,
    path = "/v1/p",
    tag = "ingest",
    request_body(content = PageMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn page_short() {}

/// `/v1/screen` as the SDKs call it.
#[utoipa::path(
    post,
    path = "/v1/s",
    tag = "ingest",
    request_body(content = ScreenMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn screen_short() {}

/// `/v1/group` as the browser SDK calls it.
#[utoipa::path(
    post,
    path = "/v1/g",
    tag = "ingest",
    request_body(content = GroupMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn group_short() {}

/// `/v1/alias` as the browser SDK calls it.
#[utoipa::path(
    post,
    path = "/v1/a",
    tag = "ingest",
    request_body(content = AliasMessage, content_type = "application/json"),
    responses((status = 200, description = "Committed", body = Accepted), IngestErrors),
    security(("writeKey" = []), ()),
)]
pub fn alias_short() {}

/// `/v1/batch` as the SDKs call it (analytics.js batching, analytics-kotlin, analytics-swift).
#[utoipa::path(
    post,
    path = "/v1/b",
    tag = "ingest",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every valid message is committed", body = Accepted),
        IngestErrors,
    ),
    security(("writeKey" = []), ()),
)]
pub fn batch_short() {}

/// The SDKs' own telemetry: read, answered 200, stored nowhere.
#[utoipa::path(
    post,
    path = "/v1/m",
    tag = "ingest",
    request_body(content = Telemetry, content_type = "application/json"),
    responses(
        (status = 200, description = "Read and dropped", body = Accepted),
        (status = 403, description = "An `Origin` no source allows", body = Failure),
        (status = 413, description = "Larger than 500 KB", body = Failure),
    ),
)]
pub fn telemetry() {}

/// The analytics.js settings of a source (what `AnalyticsBrowser.load({writeKey, cdnURL})`
/// and the mobile SDKs fetch first): the Segment.io integration names this server.
#[utoipa::path(
    get,
    path = "/v1/projects/{writeKey}/settings",
    tag = "ingest",
    params(("writeKey" = String, Path, description = "The source's write key")),
    responses(
        (status = 200, description = "The settings", body = SdkSettings),
        (status = 403, description = "An `Origin` the source does not allow", body = Failure),
        (status = 404, description = "No source has this write key", body = Failure),
    ),
)]
pub fn settings() {}

/// The dashboard. The page itself holds no data and needs no token (a browser cannot send
/// one when navigating); it asks for the admin token and calls the admin API with it.
#[utoipa::path(
    get,
    path = "/admin",
    tag = "admin",
    responses(
        (status = 200, description = "The dashboard page",
         body = String, content_type = "text/html"),
    ),
)]
pub fn dashboard() {}

/// The process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "Alive", body = Status)),
)]
pub fn healthz() {}

/// The database answers, migrations are applied, and the process is not shutting down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "Draining, or the database is unavailable", body = Status),
    ),
)]
pub fn readyz() {}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format",
         body = String, content_type = "text/plain"),
    ),
)]
pub fn metrics() {}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses(
        (status = 200, description = "OpenAPI 3.1",
         body = Object, content_type = "application/json"),
    ),
)]
pub fn openapi_json() {}
