//! The ingest paths (`/v1/track` ... `/v1/b`), built from the list of call types.
//!
//! They are the only routes whose handler cannot carry its own `#[utoipa::path]`: one handler
//! serves every call type and its one-letter alias (the call is a path parameter), another
//! serves `/v1/batch`, `/v1/import` and `/v1/b`, and an annotation describes one path. So
//! [`IngestPaths`] adds them to the document, two paths for each [`Call`] with its own message
//! schema, then the three batch paths. Every other route (admin, `/v1/m`, the SDK settings,
//! health, metrics, the dashboard, this document) is described on its handler.

use std::borrow::Cow;

use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponsesBuilder;
use utoipa::openapi::security::SecurityRequirement;
use utoipa::openapi::Required;

use super::*;
use crate::ingest::Call;

/// What every single call's answer promises.
const COMMITTED: &str = "Answers 200 only once the message is committed; a repeated `messageId` \
                         from the same\nsource within 24 h is acknowledged and not delivered \
                         again. At most 32 KB, gzip allowed.";

/// Adds every `/v1/*` ingest path to the document.
pub(super) struct IngestPaths;

impl Modify for IngestPaths {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let paths = &mut openapi.paths;
        let mut add = |path: String, operation: Operation| {
            paths.add_path_operation(path, vec![HttpMethod::Post], operation)
        };
        for call in Call::ALL {
            let (summary, schema, callers) = about(call);
            let name = call.as_str();
            // The letter `Call::parse_short` reads.
            let letter = &name[..1];
            add(
                format!("/v1/{name}"),
                ingest(name, summary, Some(COMMITTED), &schema, "Committed"),
            );
            add(
                format!("/v1/{letter}"),
                ingest(
                    &format!("{name}_short"),
                    &format!("`/v1/{name}` as {callers}."),
                    None,
                    &schema,
                    "Committed",
                ),
            );
        }
        let batch = |id: &str, summary: &str, description: Option<&str>| {
            let answer = "Every valid message is committed";
            ingest(id, summary, description, &BatchRequest::name(), answer)
        };
        add(
            "/v1/batch".into(),
            batch(
                "batch",
                "Send many messages in one request.",
                Some(
                    "Valid messages are kept and invalid ones are listed in `rejected` with \
                     their index and\nreason; the request fails (400) only when no message is \
                     valid. At most 2,500 messages\nand 500 KB (after gzip decoding).",
                ),
            ),
        );
        add(
            "/v1/import".into(),
            batch(
                "import",
                "The same as `/v1/batch` (Segment's historical import endpoint).",
                None,
            ),
        );
        add(
            "/v1/b".into(),
            batch(
                "batch_short",
                "`/v1/batch` as the SDKs call it (analytics.js batching, analytics-kotlin, \
                 analytics-swift).",
                None,
            ),
        );
    }
}

/// A call's summary, its message schema, and who calls its one-letter path.
fn about(call: Call) -> (&'static str, Cow<'static, str>, &'static str) {
    match call {
        Call::Track => (
            "Record an action a user took.",
            TrackMessage::name(),
            "analytics.js and the mobile SDKs call it (`text/plain` JSON allowed)",
        ),
        Call::Identify => (
            "Tie a user to their traits.",
            IdentifyMessage::name(),
            "the browser SDK calls it",
        ),
        Call::Page => (
            "Record a page view.",
            PageMessage::name(),
            "the browser SDK calls it",
        ),
        Call::Screen => (
            "Record a screen view in an app.",
            ScreenMessage::name(),
            "the SDKs call it",
        ),
        Call::Group => (
            "Tie a user to a group.",
            GroupMessage::name(),
            "the browser SDK calls it",
        ),
        Call::Alias => (
            "Merge two user identities.",
            AliasMessage::name(),
            "the browser SDK calls it",
        ),
    }
}

/// One ingest operation: a JSON body of `schema`, the write key (or none: it may come in the
/// body), `{"success": true}` once committed, and every ingest error.
fn ingest(
    id: &str,
    summary: &str,
    description: Option<&str>,
    schema: &str,
    answer: &str,
) -> Operation {
    let json = |schema: &str| {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name(schema)))
            .build()
    };
    OperationBuilder::new()
        .tag("ingest")
        .summary(Some(summary))
        .description(description)
        .operation_id(Some(id))
        .request_body(Some(
            RequestBodyBuilder::new()
                .content("application/json", json(schema))
                .required(Some(Required::True))
                .build(),
        ))
        .responses(
            ResponsesBuilder::new()
                .response(
                    "200",
                    ResponseBuilder::new()
                        .description(answer)
                        .content("application/json", json(&Accepted::name())),
                )
                .responses_from_into_responses::<IngestErrors>()
                .build(),
        )
        .securities(Some([
            SecurityRequirement::new("writeKey", Vec::<String>::new()),
            SecurityRequirement::default(),
        ]))
        .build()
}
