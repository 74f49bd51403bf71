//! The OpenAPI 3.1 description of the ingest and admin APIs, served at `GET /openapi.json`.
//!
//! The handlers live in [`crate::http::server`]; the `#[utoipa::path]` signatures below describe each
//! route exactly as it answers there (statuses, bodies, `Retry-After`, which credential), so
//! that a client generator or a fuzzer (schemathesis) can rely on the document. Schemas say
//! what the server accepts, no more and no less: Segment messages allow any extra field, and
//! where JSON Schema can say what ingest checks (`userId` or `anonymousId`, `event` for track,
//! `groupId`, `previousId`, field types) it does. Limits it cannot express (32 KB a message,
//! 500 KB a request, timestamps that must parse) are in the descriptions and the 413/400
//! answers.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema,
    SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as JSON (what `/openapi.json` serves).
pub fn json() -> String {
    // Serializing a document of plain maps and strings cannot fail.
    document().to_pretty_json().unwrap_or_default()
}

/// `GET /openapi.json`: built once, then served from memory.
pub async fn serve() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        JSON.get_or_init(json).as_str(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchyard",
        description = "A Segment-compatible event router. The ingest API is Segment's HTTP \
                       Tracking API; the admin API needs `Authorization: Bearer` with \
                       SWITCHYARD_ADMIN_TOKEN."
    ),
    paths(
        routes::track,
        routes::identify,
        routes::page,
        routes::screen,
        routes::group,
        routes::alias,
        routes::batch,
        routes::import,
        routes::track_short,
        routes::identify_short,
        routes::page_short,
        routes::screen_short,
        routes::group_short,
        routes::alias_short,
        routes::batch_short,
        routes::telemetry,
        routes::settings,
        routes::destinations,
        routes::dead_letters,
        routes::replay,
        routes::start_replay,
        routes::list_replays,
        routes::show_replay,
        routes::cancel_replay,
        routes::live,
        routes::reload,
        routes::test_destination,
        routes::pause_destination,
        routes::resume_destination,
        routes::event_path,
        routes::search_events,
        routes::stats_series,
        routes::dashboard,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        PauseState,
        EventPath,
        EventSearch,
        EventRoute,
        EventAttempt,
        ArchiveReplayRequest,
        ArchiveReplayStarted,
        ArchiveReplay,
        ArchiveReplays,
        Identity,
        CommonFields,
        TrackMessage,
        IdentifyMessage,
        PageMessage,
        ScreenMessage,
        GroupMessage,
        AliasMessage,
        BatchMessage,
        BatchRequest,
        Telemetry,
        SdkSettings,
        Accepted,
        Failure,
        Rejection,
        DestinationStatus,
        EndpointStatus,
        DeadLetter,
        DeadLetters,
        ReplayRequest,
        Replayed,
        Reloaded,
        ReloadReport,
        Status,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "ingest", description = "Segment's HTTP Tracking API: answers 200 only once \
                                         every accepted message is committed"),
        (name = "admin", description = "Operating Switchyard (bearer token)"),
        (name = "health", description = "Open endpoints for probes and scrapers"),
    )
)]
struct ApiDoc;

/// The two credentials: a source's write key (HTTP Basic username, empty password) and the
/// admin token (bearer).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "writeKey",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "The source's write key as the Basic username, with an empty \
                         password. It may come as `writeKey` in the body instead.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "adminToken",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("SWITCHYARD_ADMIN_TOKEN"))
                    .build(),
            ),
        );
    }
}

/// Documentation-only signatures: the handlers are in `crate::http::server`, and these functions
/// exist so `#[utoipa::path]` has something to describe each route on.
#[allow(dead_code)]
mod routes {
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

    /// Every destination with its live counts (since this process started, except `queued`,
    /// `retrying` and `dead`, which come from the database).
    #[utoipa::path(
        get,
        path = "/admin/v1/destinations",
        tag = "admin",
        responses(
            (status = 200, description = "The destinations", body = Vec<DestinationStatus>),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn destinations() {}

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
    pub fn dead_letters() {}

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
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn replay() {}

    /// Replay archived events received in `[from, to)` (of `sources`, or every source) to one
    /// destination: every event its filters take is delivered to it alone, on a lane that
    /// yields to live traffic, under its rate limit, retries and dead letters. Events are sent
    /// with their original `messageId`, so a vendor that dedupes drops what it already has.
    #[utoipa::path(
        post,
        path = "/admin/v1/replays",
        tag = "admin",
        request_body(content = ArchiveReplayRequest, content_type = "application/json"),
        responses(
            (status = 202, description = "Recorded; delivery has begun", body = ArchiveReplayStarted),
            (status = 400, description = "The body is not a replay request", body = Failure),
            (status = 404, description = "No such destination or source", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn start_replay() {}

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
    pub fn list_replays() {}

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
    pub fn show_replay() {}

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
    pub fn cancel_replay() {}

    /// The live debugger: every accepted message as it arrives, as server-sent events.
    ///
    /// `event: message` carries `{"source", "received_at", "message", "routes"}` (`routes`:
    /// `[{destination, state: "queued"|"filtered", reason?}]`, `reason` the first rule that
    /// stopped it); `event: outcome` carries an attempt that did not deliver, `{"message_id",
    /// "source", "destination", "state", "reason"?, "status"?, "error"?}` (a transform's `null`
    /// or failure, a retry, a dead letter); `event: lagged` carries `{"skipped": N}` when the
    /// viewer read too slowly and missed N frames (ingest never waits for a viewer). A comment
    /// every 15 s keeps the connection open.
    #[utoipa::path(
        get,
        path = "/admin/v1/live",
        tag = "admin",
        params(
            ("source" = Option<String>, Query, nullable = false,
             description = "Only this source's messages (by name)"),
        ),
        responses(
            (status = 200, description = "An endless event stream",
             body = String, content_type = "text/event-stream"),
            (status = 401, description = "No or a wrong admin token", body = Failure),
        ),
        security(("adminToken" = [])),
    )]
    pub fn live() {}

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
    pub fn reload() {}

    /// Try a destination's `events`, `integrations`, `where`, `consent`, `sample`, `transform`
    /// and property drops on a sample event: the answer is what would be delivered. Nothing is
    /// stored or sent.
    #[utoipa::path(
        post,
        path = "/admin/v1/destinations/{name}/test",
        tag = "admin",
        params(("name" = String, Path, description = "The destination")),
        request_body(content = DestinationTest, description = "`{\"event\": {...}}`"),
        responses(
            (status = 200, description = "What the destination would get", body = DestinationTestResult),
            (status = 400, description = "No `event` object, or an unknown `type`", body = Failure),
            (status = 404, description = "No enabled destination of that name", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn test_destination() {}

    /// Pause a destination: its events keep queueing and nothing is delivered (requests
    /// already in flight finish) until it is resumed. Kept in Postgres: every process and
    /// every restart honors it.
    #[utoipa::path(
        post,
        path = "/admin/v1/destinations/{name}/pause",
        tag = "admin",
        params(("name" = String, Path, description = "The destination")),
        responses(
            (status = 200, description = "`{name, paused: true}`", body = PauseState),
            (status = 404, description = "No destination of that name", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn pause_destination() {}

    /// Resume a paused destination: its backlog is delivered at once.
    #[utoipa::path(
        post,
        path = "/admin/v1/destinations/{name}/resume",
        tag = "admin",
        params(("name" = String, Path, description = "The destination")),
        responses(
            (status = 200, description = "`{name, paused: false}`", body = PauseState),
            (status = 404, description = "No destination of that name", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn resume_destination() {}

    /// Where one recent event went: when this process accepted it, the destinations it was
    /// routed to or filtered from, and each delivery attempt this process made. Kept in a
    /// bounded in-memory ring per process: every process serves its own (`scope: "process"`).
    #[utoipa::path(
        get,
        path = "/admin/v1/events/{message_id}",
        tag = "admin",
        params(("message_id" = String, Path, description = "The event's messageId")),
        responses(
            (status = 200, description = "The event's path", body = EventPath),
            (status = 404, description = "Unknown here, or aged out of the ring (`not_found`), or this process records no trail (`event_trail_off`: `[server] event_trail = 0`)", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn event_path() {}

    /// A user's newest events in this process's trail, newest first, each as
    /// `/admin/v1/events/{message_id}` shows it: matched on `userId`, or `anonymousId` for
    /// events without one.
    #[utoipa::path(
        get,
        path = "/admin/v1/events",
        tag = "admin",
        params(
            ("userId" = String, Query, description = "The user (userId, else anonymousId)"),
            ("limit" = Option<u32>, Query, description = "Events at most, 1..=100 (default 20)"),
        ),
        responses(
            (status = 200, description = "The user's recent events", body = EventSearch),
            (status = 400, description = "No `userId`, or `limit` out of range", body = Failure),
            (status = 404, description = "This process records no trail (`event_trail_off`: `[server] event_trail = 0`)", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn search_events() {}

    /// Per-second counts for the last hour, from this process's in-memory ring:
    /// accepted/rejected per source; delivered/retried/dead, queue depth and p50/p99 latency
    /// per destination.
    #[utoipa::path(
        get,
        path = "/admin/v1/stats/series",
        tag = "admin",
        params(("seconds" = Option<u32>, Query, description = "How far back, 1..=3600 (default 3600)")),
        responses(
            (status = 200, description = "The series", body = Object),
            (status = 400, description = "`seconds` out of range", body = Failure),
            AdminErrors,
        ),
        security(("adminToken" = [])),
    )]
    pub fn stats_series() {}

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
}

/// Errors every ingest call may answer.
struct IngestErrors;

impl IntoResponses for IngestErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        failures(&[
            (
                "400",
                "Invalid: the body, or every message of a batch",
                false,
            ),
            ("401", "No write key, or an unknown one", false),
            (
                "413",
                "Larger than 32 KB a message, 500 KB a request or 2,500 messages a batch",
                false,
            ),
            (
                "415",
                "A Content-Encoding other than identity or gzip",
                false,
            ),
            (
                "429",
                "Too much queued work: slow down and retry after Retry-After",
                true,
            ),
            (
                "503",
                "The database is unavailable or the service is shutting down: nothing was \
                 stored, retry after Retry-After",
                true,
            ),
        ])
    }
}

/// Errors every admin call may answer.
struct AdminErrors;

impl IntoResponses for AdminErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        failures(&[
            (
                "401",
                "No or a wrong admin token, or SWITCHYARD_ADMIN_TOKEN is unset",
                false,
            ),
            ("503", "The database is unavailable", true),
        ])
    }
}

/// `(status, description, sends Retry-After)` as responses.
fn failures(
    list: &[(&str, &str, bool)],
) -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
    list.iter()
        .map(|(status, description, retry_after)| {
            ((*status).to_owned(), failure(description, *retry_after))
        })
        .collect()
}

/// A `{"code", "message"}` answer, with `Retry-After` when the client should come back.
fn failure(description: &str, retry_after: bool) -> RefOr<utoipa::openapi::response::Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Failure")))
            .build(),
    );
    if retry_after {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                )
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    response.build().into()
}

// ---- Segment messages ----------------------------------------------------------------------
//
// Built by hand rather than derived: what ingest accepts ("a userId or an anonymousId", ids that
// are non-empty strings or numbers, "at least one valid message in a batch") needs `anyOf` and
// `contains`, which derived schemas cannot say.

/// A schema that is a reference to a component.
fn reference(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

fn typed(types: &[Type]) -> ObjectBuilder {
    match types {
        [one] => ObjectBuilder::new().schema_type(one.clone()),
        many => ObjectBuilder::new().schema_type(SchemaType::Array(many.to_vec())),
    }
}

/// An identifier that counts as present: a non-empty string, or a number (kept as its text).
fn present_id(description: &str) -> Schema {
    AnyOfBuilder::new()
        .item(typed(&[Type::String]).min_length(Some(1)))
        .item(typed(&[Type::Number]))
        .description(Some(description))
        .into()
}

/// An identifier that may be absent: null and "" count as absent.
fn optional_id(description: &str) -> ObjectBuilder {
    typed(&[Type::String, Type::Number, Type::Null]).description(Some(description))
}

fn optional_object(description: &str) -> ObjectBuilder {
    typed(&[Type::Object, Type::Null]).description(Some(description))
}

fn optional_string(description: &str) -> ObjectBuilder {
    typed(&[Type::String, Type::Null]).description(Some(description))
}

/// What ingest parses as a time: RFC 3339 (`T`, `t` or a space between date and time), or a
/// date-time without an offset (read as UTC). Days that do not exist are left out (February
/// 29th too, though ingest takes it in leap years). Digits are spelled `[0-9]`, since some regex
/// engines take `\d` to mean any Unicode digit.
const TIME_PATTERN: &str = concat!(
    "^[0-9]{4}-(",
    "(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])",
    "|(0[469]|11)-(0[1-9]|[12][0-9]|30)",
    "|02-(0[1-9]|1[0-9]|2[0-8]))",
    // `T`, then an optional offset (none: UTC)
    "(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?",
    "([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?",
    // `t` or a space, then an offset
    "|[t ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?",
    "([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))$",
);

fn optional_time(description: &str) -> ObjectBuilder {
    // No `format: date-time`: that format needs an offset, and ingest also takes times without.
    optional_string(description).pattern(Some(TIME_PATTERN))
}

/// `{"type": "object", "required": [field], "properties": {field: schema}}`.
fn requires(field: &str, schema: impl Into<RefOr<Schema>>) -> Schema {
    typed(&[Type::Object])
        .property(field, schema)
        .required(field)
        .into()
}

/// Declares a schema type whose schema the named function builds.
macro_rules! schema {
    ($(#[$doc:meta])* $name:ident = $build:ident) => {
        $(#[$doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $build().into()
            }
        }

        impl ToSchema for $name {}
    };
}

schema!(
    /// A message names its user: `userId`, `anonymousId`, or both.
    Identity = identity
);
schema!(
    /// The fields every call may carry; anything else is kept and passed on as it is.
    CommonFields = common_fields
);
schema!(
    /// `track`: an action a user took.
    TrackMessage = track_message
);
schema!(
    /// `identify`: who a user is.
    IdentifyMessage = identify_message
);
schema!(
    /// `page`: a page view.
    PageMessage = page_message
);
schema!(
    /// `screen`: a screen view.
    ScreenMessage = screen_message
);
schema!(
    /// `group`: a user joins a group.
    GroupMessage = group_message
);
schema!(
    /// `alias`: two ids are one user.
    AliasMessage = alias_message
);
schema!(
    /// One message of a batch: any call, named by `type`.
    BatchMessage = batch_message
);
schema!(
    /// The body of `/v1/batch` and `/v1/import`.
    BatchRequest = batch_request
);

fn identity() -> Schema {
    AnyOfBuilder::new()
        .item(requires(
            "userId",
            present_id("The user's id in your database"),
        ))
        .item(requires(
            "anonymousId",
            present_id("An id for a user not yet known"),
        ))
        .description(Some(
            "A message needs a `userId` or an `anonymousId` (a null or empty one is fine when \
             the other is set)",
        ))
        .into()
}

fn common_fields() -> Schema {
    const WRITE_KEY: &str = "The source's write key, when not sent as HTTP Basic";
    typed(&[Type::Object])
        .property("userId", optional_id("The user's id in your database"))
        .property("anonymousId", optional_id("An id for a user not yet known"))
        .property(
            "messageId",
            optional_id(
                "Unique per message: a repeat within 24 h is not delivered again. Set by the \
                 server when missing.",
            )
            .max_length(Some(512)),
        )
        .property(
            "timestamp",
            optional_time("When it happened, by the client's clock (corrected with sentAt)"),
        )
        .property("sentAt", optional_time("When the client sent it"))
        .property(
            "context",
            optional_object("Extra information about the user and device"),
        )
        .property(
            "integrations",
            optional_object("Which destinations get it: {\"All\": false, \"Name\": true}"),
        )
        .property(
            "properties",
            optional_object("Properties of the event or page"),
        )
        .property("traits", optional_object("Traits of the user or group"))
        .property("name", optional_string("Page or screen name"))
        .property("category", optional_string("Page category"))
        .property("writeKey", optional_string(WRITE_KEY))
        .into()
}

/// A message of one call: who, the common fields, and the call's own required fields.
fn message(own: Option<Schema>, description: &str) -> Schema {
    let mut all = AllOfBuilder::new()
        .item(reference("Identity"))
        .item(reference("CommonFields"));
    if let Some(own) = own {
        all = all.item(own);
    }
    all.description(Some(description)).into()
}

fn track_fields() -> Schema {
    requires(
        "event",
        typed(&[Type::String])
            .min_length(Some(1))
            .description(Some("The action, e.g. `Order Completed`")),
    )
}

fn group_fields() -> Schema {
    requires("groupId", present_id("The group's id"))
}

fn alias_fields() -> Schema {
    requires("previousId", present_id("The user's earlier id"))
}

fn track_message() -> Schema {
    message(Some(track_fields()), "A track call")
}

fn identify_message() -> Schema {
    message(None, "An identify call")
}

fn page_message() -> Schema {
    message(None, "A page call")
}

fn screen_message() -> Schema {
    message(None, "A screen call")
}

fn group_message() -> Schema {
    message(Some(group_fields()), "A group call")
}

fn alias_message() -> Schema {
    message(Some(alias_fields()), "An alias call")
}

/// A batch item of one call type: the call's message with `type` naming it.
fn batch_item(call: &str, own: Option<Schema>) -> Schema {
    let mut all = AllOfBuilder::new()
        .item(reference("Identity"))
        .item(reference("CommonFields"))
        .item(requires(
            "type",
            typed(&[Type::String]).enum_values(Some([call])),
        ));
    if let Some(own) = own {
        all = all.item(own);
    }
    all.into()
}

fn batch_message() -> Schema {
    OneOfBuilder::new()
        .item(batch_item("track", Some(track_fields())))
        .item(batch_item("identify", None))
        .item(batch_item("page", None))
        .item(batch_item("screen", None))
        .item(batch_item("group", Some(group_fields())))
        .item(batch_item("alias", Some(alias_fields())))
        .description(Some("A message of any call type"))
        .into()
}

/// The `batch` array: empty, or holding at least one valid message. Invalid items do not fail
/// the request (they are listed in `rejected`), so items are not constrained one by one.
/// utoipa's schema model has no `contains`, so that keyword goes in through its extension map
/// (which serializes its keys as they are).
fn batch_array() -> Schema {
    let contains: Extensions = [(
        "contains",
        serde_json::json!({"$ref": "#/components/schemas/BatchMessage"}),
    )]
    .into_iter()
    .collect();
    let any_items = || RefOr::T(Schema::Object(Object::with_type(SchemaType::AnyValue)));
    AnyOfBuilder::new()
        .item(ArrayBuilder::new().items(any_items()).max_items(Some(0)))
        .item(
            ArrayBuilder::new()
                .items(any_items())
                .max_items(Some(crate::ingest::MAX_BATCH_MESSAGES))
                .extensions(Some(contains)),
        )
        .description(Some(
            "At most 2,500 messages; at least one of them valid unless empty",
        ))
        .into()
}

fn batch_request() -> Schema {
    const WRITE_KEY: &str = "The source's write key, when not sent as HTTP Basic";
    typed(&[Type::Object])
        .property("batch", batch_array())
        .required("batch")
        .property("writeKey", optional_string(WRITE_KEY))
        .property(
            "sentAt",
            optional_time("When the client sent the batch (for messages without their own)"),
        )
        .property(
            "context",
            optional_object("Defaults for every message's `context`"),
        )
        .property(
            "integrations",
            optional_object("Defaults for every message's `integrations`"),
        )
        .into()
}

// ---- Answers ---------------------------------------------------------------------------------

/// What the SDKs report about themselves at `/v1/m`.
#[derive(ToSchema)]
pub struct Telemetry {
    /// Counters such as `analytics_js.invoke`.
    pub series: Option<Vec<serde_json::Value>>,
}

/// The analytics.js settings document.
#[derive(ToSchema)]
pub struct SdkSettings {
    /// `{"Segment.io": {"apiKey", "apiHost": "<host>/v1", "protocol": "http" | "https"}}`.
    pub integrations: serde_json::Value,
    /// Every call type enabled.
    pub plan: serde_json::Value,
    /// SDK telemetry settings (`sampleRate` 0: off).
    pub metrics: serde_json::Value,
}

/// The answer to an accepted ingest request.
#[derive(ToSchema)]
pub struct Accepted {
    /// Always true.
    pub success: bool,
    /// Messages of a batch that were refused (absent when none was).
    #[schema(nullable = false)]
    pub rejected: Option<Vec<Rejection>>,
}

/// Every error: a stable `code` and a message for people.
#[derive(ToSchema)]
pub struct Failure {
    /// e.g. `invalid_json`, `unauthorized`, `too_large`, `overloaded`, `unavailable`.
    pub code: String,
    pub message: String,
    /// With `invalid_batch`: why each message was refused.
    #[schema(nullable = false)]
    pub rejected: Option<Vec<Rejection>>,
}

/// One refused message of a batch.
#[derive(ToSchema)]
pub struct Rejection {
    /// Its position in `batch`, from 0.
    #[schema(minimum = 0)]
    pub index: u64,
    pub code: String,
    pub message: String,
}

/// One destination, as `GET /admin/v1/destinations` shows it.
#[derive(ToSchema)]
pub struct DestinationStatus {
    pub name: String,
    /// `webhook`, `amplitude`, ...
    pub kind: String,
    /// Jobs waiting, at the last count (counted every second or so).
    pub queued: i64,
    /// Requests under way now.
    pub in_flight: u64,
    /// Events delivered since this process started.
    pub delivered: u64,
    /// Jobs waiting for a retry, at the last count.
    pub retrying: i64,
    /// Dead letters kept.
    pub dead: i64,
    /// `N/s`, `N/m` or `N/h`; null when unlimited.
    pub rate_limit: Option<String>,
    /// The last failure, if any (secrets masked).
    pub last_error: Option<String>,
    /// The in-flight limit in force (adaptive, at most `max_in_flight`).
    pub concurrency_limit: u64,
    /// The share of the rate limit in force (below 1 after the vendor throttled).
    pub rate_factor: f64,
    /// Per endpoint of a webhook with several `urls` (empty otherwise).
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint of a load-balanced destination, as this process sees it.
#[derive(ToSchema)]
pub struct EndpointStatus {
    /// The URL with credentials and query masked.
    pub url: String,
    pub in_flight: u64,
    /// Rolling share of failed requests, fading over time.
    pub error_rate: f64,
    /// The last `X-Server-Utilization` it reported (0.0 to 1.0), if any.
    pub utilization: Option<f64>,
    /// New or recovering: one request at a time until it answers.
    pub probation: bool,
    /// Its share of the draw while it ramps up (0.1 to 1).
    pub weight: f64,
    pub requests: u64,
    pub failures: u64,
}

/// A message that could not be delivered, with the last answer.
#[derive(ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: String,
    pub destination: String,
    pub attempts: i32,
    /// The vendor's last HTTP status; null when there was no answer (timeout, connection).
    pub last_status: Option<i32>,
    pub last_error: String,
    #[schema(format = DateTime)]
    pub failed_at: String,
    /// The event as it was stored.
    #[schema(value_type = Option<Object>, required = true)]
    pub event: Option<serde_json::Value>,
}

/// `GET /admin/v1/dead-letters`.
#[derive(ToSchema)]
pub struct DeadLetters {
    pub items: Vec<DeadLetter>,
}

/// `POST /admin/v1/dead-letters/replay`.
#[derive(ToSchema)]
pub struct ReplayRequest {
    /// The destination's name.
    pub destination: String,
    /// Which dead letters; all of the destination's when absent or null.
    pub ids: Option<Vec<i64>>,
}

/// The answer to a replay.
#[derive(ToSchema)]
pub struct Replayed {
    /// Dead letters queued for delivery again.
    pub requeued: u64,
}

/// `POST /admin/v1/replays`.
#[derive(ToSchema)]
pub struct ArchiveReplayRequest {
    /// The destination's name.
    pub destination: String,
    /// Start of the range (RFC 3339), inclusive.
    pub from: String,
    /// End of the range (RFC 3339), exclusive.
    pub to: String,
    /// Source names (default: every source).
    pub sources: Option<Vec<String>>,
}

/// The answer to `POST /admin/v1/replays`.
#[derive(ToSchema)]
pub struct ArchiveReplayStarted {
    pub id: i64,
    /// Archived events in range (the destination's filters may select fewer).
    pub events: i64,
}

/// A replay's progress.
#[derive(ToSchema)]
pub struct ArchiveReplay {
    pub id: i64,
    pub destination: String,
    /// `queued`, `running`, `done` or `cancelled`.
    pub state: String,
    pub from: String,
    pub to: String,
    /// Archived events in range until selection is done, then the events selected.
    pub events: i64,
    /// Events selected so far.
    pub selected: i64,
    pub delivered: i64,
    pub failed: i64,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// `GET /admin/v1/replays`.
#[derive(ToSchema)]
pub struct ArchiveReplays {
    pub replays: Vec<ArchiveReplay>,
}

/// A destination's pause state.
#[derive(ToSchema)]
pub struct PauseState {
    pub name: String,
    pub paused: bool,
}

/// One event's path (`GET /admin/v1/events/{messageId}`).
#[derive(ToSchema)]
pub struct EventPath {
    pub message_id: String,
    pub source: String,
    pub received_at: String,
    /// Always `process`: the answer is this process's memory only.
    pub scope: String,
    pub routes: Vec<EventRoute>,
}

/// A user's recent events (`GET /admin/v1/events?userId=...`).
#[derive(ToSchema)]
pub struct EventSearch {
    pub user_id: String,
    /// Always `process`: the answer is this process's memory only.
    pub scope: String,
    /// Newest first.
    pub items: Vec<EventPath>,
}

/// One destination in an event's path.
#[derive(ToSchema)]
pub struct EventRoute {
    pub destination: String,
    /// `queued`, `retrying`, `delivered`, `dead` or `filtered`.
    pub state: String,
    /// Why it was filtered: the first rule that stopped it, in the order they apply:
    /// `integrations`, `events`, `where`, `consent`, `sample` or `transform` (the script
    /// returned `null`).
    pub reason: Option<String>,
    pub attempts: Vec<EventAttempt>,
}

/// One delivery attempt.
#[derive(ToSchema)]
pub struct EventAttempt {
    pub at: String,
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// A sample event for `POST /admin/v1/destinations/{name}/test`.
#[derive(ToSchema)]
pub struct DestinationTest {
    /// A Segment message (`type` defaults to `track`; a `messageId` is made when missing).
    pub event: serde_json::Value,
}

/// What a destination would make of a sample event.
#[derive(ToSchema)]
pub struct DestinationTestResult {
    pub destination: String,
    /// Whether anything would be sent.
    pub delivered: bool,
    /// What stopped it, the first rule in the order they apply: `integrations`, `events`,
    /// `where`, `consent`, `sample` or `transform` (the script returned `null`).
    pub filtered: Option<String>,
    /// The transform's error: the event would be dead-lettered with it.
    pub error: Option<String>,
    /// The events the vendor mapping would get.
    pub events: Vec<serde_json::Value>,
}

/// The answer to a reload.
#[derive(ToSchema)]
pub struct Reloaded {
    /// Always true.
    pub reloaded: bool,
    pub report: ReloadReport,
}

/// What a reload changed.
#[derive(ToSchema)]
pub struct ReloadReport {
    /// Sources in the new config.
    pub sources: u64,
    /// Destinations in the new config.
    pub destinations: u64,
    /// Destinations no longer in the config; their queued jobs became dead letters.
    pub removed: Vec<String>,
    /// How many jobs that was.
    pub dead_lettered: u64,
}

/// `/healthz` and `/readyz`.
#[derive(ToSchema)]
pub struct Status {
    /// `ok`, `ready`, `draining` or `database unavailable`.
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_document_is_openapi_3_1_and_names_every_route() {
        let document: Value = serde_json::from_str(&json()).expect("JSON");
        assert_eq!(document["openapi"], "3.1.0");
        for path in [
            "/v1/track",
            "/v1/identify",
            "/v1/page",
            "/v1/screen",
            "/v1/group",
            "/v1/alias",
            "/v1/batch",
            "/v1/import",
            "/v1/t",
            "/v1/i",
            "/v1/p",
            "/v1/s",
            "/v1/g",
            "/v1/a",
            "/v1/b",
            "/v1/m",
            "/v1/projects/{writeKey}/settings",
            "/admin/v1/destinations",
            "/admin/v1/dead-letters",
            "/admin/v1/dead-letters/replay",
            "/admin/v1/live",
            "/admin/v1/reload",
            "/admin/v1/destinations/{name}/test",
            "/admin",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(document["paths"][path].is_object(), "{path} is missing");
        }
    }

    #[test]
    fn every_reference_resolves() {
        let document: Value = serde_json::from_str(&json()).expect("JSON");
        let mut references = Vec::new();
        collect_refs(&document, &mut references);
        assert!(!references.is_empty());
        for reference in references {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {reference}"));
            assert!(
                document["components"]["schemas"][name].is_object(),
                "{reference} does not resolve"
            );
        }
    }

    fn collect_refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    out.push(target.clone());
                }
                map.values().for_each(|v| collect_refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn ingest_takes_the_write_key_and_admin_the_bearer_token() {
        let document: Value = serde_json::from_str(&json()).expect("JSON");
        let schemes = &document["components"]["securitySchemes"];
        assert_eq!(schemes["writeKey"]["scheme"], "basic");
        assert_eq!(schemes["adminToken"]["scheme"], "bearer");
        let track = &document["paths"]["/v1/track"]["post"];
        assert_eq!(
            track["security"],
            serde_json::json!([{"writeKey": []}, {}]),
            "the key may come in the body instead"
        );
        for status in ["200", "400", "401", "413", "415", "429", "503"] {
            assert!(track["responses"][status].is_object(), "track {status}");
        }
        assert!(track["responses"]["429"]["headers"]["Retry-After"].is_object());
        let replay = &document["paths"]["/admin/v1/dead-letters/replay"]["post"];
        assert_eq!(replay["security"], serde_json::json!([{"adminToken": []}]));
        assert!(document["paths"]["/admin"]["get"]["security"].is_null());
    }

    #[test]
    fn message_schemas_require_what_ingest_requires() {
        let document: Value = serde_json::from_str(&json()).expect("JSON");
        let schemas = &document["components"]["schemas"];
        let identity = schemas["Identity"]["anyOf"].to_string();
        assert!(identity.contains(r#""required":["userId"]"#), "{identity}");
        assert!(
            identity.contains(r#""required":["anonymousId"]"#),
            "{identity}"
        );
        assert!(schemas["TrackMessage"]
            .to_string()
            .contains(r#""required":["event"]"#));
        assert!(schemas["GroupMessage"]
            .to_string()
            .contains(r#""required":["groupId"]"#));
        assert!(schemas["AliasMessage"]
            .to_string()
            .contains(r#""required":["previousId"]"#));
        let batch = schemas["BatchRequest"]["properties"]["batch"].to_string();
        assert!(
            batch.contains(r##""contains":{"$ref":"#/components/schemas/BatchMessage"}"##),
            "{batch}"
        );
        assert_eq!(
            schemas["BatchRequest"]["required"],
            serde_json::json!(["batch"])
        );
    }
}
