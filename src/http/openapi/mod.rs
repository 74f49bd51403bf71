//! The OpenAPI 3.1 description of the ingest and admin APIs, served at `GET /openapi.json`.
//!
//! Each handler carries its own `#[utoipa::path]`, which describes its route exactly as it
//! answers (statuses, bodies, `Retry-After`, which credential), so that a client generator or
//! a fuzzer (schemathesis) can rely on the document; the ingest paths, which share their
//! handlers, are built from the list of call types in [`routes`]. Schemas say
//! what the server accepts, no more and no less: Segment messages allow any extra field, and
//! where JSON Schema can say what ingest checks (`userId` or `anonymousId`, `event` for track,
//! `groupId`, `previousId`, field types) it does. Limits it cannot express (32 KB a message,
//! 500 KB a request, timestamps that must parse) are in the descriptions and the 413/400
//! answers.
//!
//! [`messages`] holds the Segment messages' schemas (built by hand) and [`answers`] the
//! answers' schemas.

mod answers;
mod messages;
mod routes;

use routes::IngestPaths;

pub use answers::*;
use messages::*;

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
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    operation_id = "openapi_json",
    summary = "This document.",
    responses(
        (status = 200, description = "OpenAPI 3.1",
         body = Object, content_type = "application/json"),
    ),
)]
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
        crate::http::browser::telemetry,
        crate::http::browser::settings,
        crate::http::admin::destinations::destinations,
        crate::http::admin::dead_letters::dead_letters,
        crate::http::admin::dead_letters::replay,
        crate::http::admin::replays::start_replay,
        crate::http::admin::replays::list_replays,
        crate::http::admin::replays::show_replay,
        crate::http::admin::replays::cancel_replay,
        crate::http::admin::events::live,
        crate::http::admin::reload::reload,
        crate::http::admin::destinations::test_destination,
        crate::http::admin::destinations::pause_destination,
        crate::http::admin::destinations::resume_destination,
        crate::http::admin::events::event_path,
        crate::http::admin::events::search_events,
        crate::http::admin::stats::stats_series,
        crate::http::dashboard::page,
        crate::http::server::healthz,
        crate::http::server::readyz,
        crate::http::server::metrics,
        serve,
    ),
    components(schemas(
        PauseState,
        StatsSeries,
        StatsSource,
        StatsDestination,
        EventPath,
        EventSearch,
        EventRoute,
        EventAttempt,
        super::admin::replays::ReplayArchiveRequest,
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
        EndpointStats,
        DeadLetter,
        DeadLetters,
        ReplayRequest,
        Replayed,
        Reloaded,
        ReloadReport,
        Status,
    )),
    modifiers(&SecuritySchemes, &IngestPaths),
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
pub(crate) struct AdminErrors;

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
