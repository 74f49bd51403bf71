//! Parsing, enrichment and routing, tested directly.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::route::integrations_allow;
use super::*;
use crate::http::error::ApiError;
use axum::http::StatusCode;
use serde_json::json;

fn now() -> OffsetDateTime {
    OffsetDateTime::parse("2026-11-21T12:00:10Z", &Rfc3339).unwrap()
}

fn single(call: Call, body: Value) -> Result<Message, ApiError> {
    let bytes = serde_json::to_vec(&body).unwrap();
    parse(Endpoint::Single(call), &bytes, now())
        .map(|mut p| p.messages.remove(0).1)
        .map_err(ApiError::from)
}

fn json_of(message: &Message) -> Value {
    serde_json::from_slice(&message.payload).unwrap()
}

#[test]
fn corrects_clock_skew_and_sets_server_fields() {
    let message = single(
        Call::Track,
        json!({"event": "E", "userId": "u", "timestamp": "2026-11-21T11:00:00Z",
               "sentAt": "2026-11-21T11:00:05Z", "writeKey": "secret"}),
    )
    .unwrap();
    let body = json_of(&message);
    // The client's clock is an hour behind: sent 5 s after the event, received at 12:00:10.
    assert_eq!(body["timestamp"], "2026-11-21T12:00:05.000Z");
    assert_eq!(body["originalTimestamp"], "2026-11-21T11:00:00Z");
    assert_eq!(body["receivedAt"], "2026-11-21T12:00:10.000Z");
    assert_eq!(body["sentAt"], "2026-11-21T11:00:05.000Z");
    assert_eq!(body["type"], "track");
    assert!(
        body.get("writeKey").is_none(),
        "the write key is never forwarded"
    );
    assert_eq!(body["messageId"].as_str().unwrap().len(), 36);
}

#[test]
fn a_null_anonymous_id_is_fine_next_to_a_user_id() {
    let message = single(
        Call::Identify,
        json!({"userId": "u", "anonymousId": null, "messageId": "m1"}),
    )
    .unwrap();
    assert_eq!(message.message_id, "m1");
    assert_eq!(json_of(&message)["timestamp"], "2026-11-21T12:00:10.000Z");
}

#[test]
fn required_fields_per_call_type() {
    let cases = [
        (Call::Track, json!({"userId": "u"})),
        (Call::Track, json!({"event": "", "userId": "u"})),
        (Call::Group, json!({"userId": "u"})),
        (Call::Alias, json!({"userId": "u"})),
        (Call::Page, json!({"anonymousId": null, "userId": null})),
        (Call::Track, json!({"event": "E", "userId": {"a": 1}})),
        (
            Call::Track,
            json!({"event": "E", "userId": "u", "properties": [1]}),
        ),
        (
            Call::Track,
            json!({"event": "E", "userId": "u", "timestamp": 5}),
        ),
        (
            Call::Track,
            json!({"event": "E", "userId": "u", "timestamp": "yesterday"}),
        ),
    ];
    for (call, body) in cases {
        let error = single(call, body.clone()).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert!(single(Call::Group, json!({"userId": 7, "groupId": 9})).is_ok());
    assert!(single(Call::Alias, json!({"userId": "u", "previousId": "p"})).is_ok());
    assert!(single(Call::Screen, json!({"anonymousId": "a"})).is_ok());
}

#[test]
fn batches_keep_the_valid_and_list_the_rest() {
    let body = json!({
        "batch": [
            {"type": "track", "event": "A", "userId": "u"},
            {"type": "bogus", "userId": "u"},
            {"type": "identify"},
            "not an object",
            {"type": "page", "anonymousId": "a", "context": {"ip": "own"}}
        ],
        "context": {"library": {"name": "x"}, "ip": "batch"},
        "integrations": {"All": false},
        "sentAt": "2026-11-21T12:00:00Z"
    });
    let parsed = parse(Endpoint::Batch, body.to_string().as_bytes(), now()).unwrap();
    let kept: Vec<usize> = parsed.messages.iter().map(|(i, _)| *i).collect();
    assert_eq!(kept, [0, 4]);
    let refused: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
    assert_eq!(refused, [1, 2, 3]);
    let page = json_of(&parsed.messages[1].1);
    assert_eq!(
        page["context"]["ip"], "own",
        "the message's own context wins"
    );
    assert_eq!(page["context"]["library"]["name"], "x");
    assert_eq!(page["integrations"]["All"], false);
}

#[test]
fn the_client_address_fills_context_ip_unless_the_sdk_sent_one() {
    let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let body = json!({"batch": [
        {"type": "track", "event": "A", "userId": "u", "writeKey": "wk"},
        {"type": "track", "event": "B", "userId": "u", "context": {"ip": "198.51.100.1"}},
        {"type": "track", "event": "C", "userId": "u", "context": null}
    ], "writeKey": "wk"});
    let parsed = parse_authorized(
        Endpoint::Batch,
        body.to_string().as_bytes(),
        now(),
        Some(ip),
        &|_| Ok(()),
    );
    let ips: Vec<Value> = parsed
        .unwrap()
        .messages
        .iter()
        .map(|(_, m)| json_of(m)["context"]["ip"].clone())
        .collect();
    assert_eq!(
        ips,
        [
            json!("203.0.113.9"),
            json!("198.51.100.1"),
            json!("203.0.113.9")
        ]
    );
    assert_eq!(Call::parse_short("t"), Some(Call::Track));
    assert_eq!(Call::parse_short("s"), Some(Call::Screen));
    assert_eq!(Call::parse_short("a"), Some(Call::Alias));
    assert_eq!(Call::parse_short("x"), None);
    assert_eq!(Call::parse_short(""), None);
}

#[test]
fn a_malformed_batch_sent_at_is_refused_even_when_no_message_uses_it() {
    let body = json!({"batch": [], "sentAt": "not a date"});
    let error = parse(Endpoint::Batch, body.to_string().as_bytes(), now())
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.status, StatusCode::BAD_REQUEST);
}

#[test]
fn limits_and_encodings() {
    let huge = format!(
        r#"{{"event":"E","userId":"u","properties":{{"x":"{}"}}}}"#,
        "a".repeat(40_000)
    );
    let error = parse(Endpoint::Single(Call::Track), huge.as_bytes(), now())
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
    let many = json!({"batch": vec![json!({"type": "track"}); MAX_BATCH_MESSAGES + 1]});
    let error = parse(Endpoint::Batch, many.to_string().as_bytes(), now())
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
    let error = decode_body(Some("gzip"), b"\x1f\x8bnot gzip")
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.code, "invalid_gzip");
    let error = decode_body(Some("br"), b"{}")
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let error = parse(
        Endpoint::Single(Call::Track),
        b"{\"event\":\"\xff\"}",
        now(),
    )
    .map_err(ApiError::from)
    .unwrap_err();
    assert_eq!(error.code, "invalid_utf8");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep = format!(r#"{{"event":"E","userId":"u","properties":{{"d":{deep}}}}}"#);
    let error = parse(Endpoint::Single(Call::Track), deep.as_bytes(), now());
    assert_eq!(ApiError::from(error.unwrap_err()).status.as_u16() / 100, 4);
    let error = parse(
        Endpoint::Single(Call::Track),
        br#"{"event":"E","userId":"u","properties":{"n":1e999}}"#,
        now(),
    );
    assert_eq!(ApiError::from(error.unwrap_err()).code, "invalid_json");
}

#[test]
fn integrations_route_by_name_or_kind_case_sensitively() {
    let off = json!({"All": false, "Amplitude": true});
    let off = off.as_object();
    assert!(integrations_allow(
        off,
        ["amp-prod", "amplitude", "Amplitude"]
    ));
    assert!(!integrations_allow(off, ["hook", "webhook", "Webhooks"]));
    let one_off = json!({"hook": false});
    assert!(!integrations_allow(
        one_off.as_object(),
        ["hook", "webhook", "Webhooks"]
    ));
    assert!(integrations_allow(
        one_off.as_object(),
        ["Hook", "webhook", "Webhooks"]
    ));
    assert!(integrations_allow(None, ["hook", "webhook", "Webhooks"]));
    let specific = json!({"Amplitude": false, "amp-prod": true});
    assert!(integrations_allow(
        specific.as_object(),
        ["amp-prod", "amplitude", "Amplitude"]
    ));
}

#[test]
fn write_keys_are_found_by_digest() {
    let web = Arc::new(Source {
        id: 1,
        name: "web".into(),
        allowed_origins: Default::default(),
    });
    let directory = SourceDirectory::new([("wk_1".to_string(), web)]);
    assert_eq!(directory.find("wk_1").map(|s| s.id), Some(1));
    assert!(directory.find("wk_2").is_none());
}

#[test]
fn a_batch_context_copied_into_every_message_counts_against_the_limits() {
    let message = json!({"type": "track", "event": "E", "userId": "u"});
    // 2,500 tiny messages and an 8 KB context: 60 KB of body, 20 MB once copied.
    let amplified = json!({
        "batch": vec![message.clone(); MAX_BATCH_MESSAGES],
        "context": {"padding": "x".repeat(8 * 1024)},
    });
    let error = parse(Endpoint::Batch, amplified.to_string().as_bytes(), now())
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error.code, "too_large");
    let oversized = json!({
        "batch": [message.clone()],
        "context": {"padding": "x".repeat(MAX_MESSAGE_BYTES)},
    });
    let error = parse(Endpoint::Batch, oversized.to_string().as_bytes(), now())
        .map_err(ApiError::from)
        .unwrap_err();
    assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
    // One message that the context pushes past 32 KB is rejected alone.
    let big = json!({"type": "track", "event": "E", "userId": "u",
                     "properties": {"p": "y".repeat(20 * 1024)}});
    let mixed = json!({
        "batch": [message.clone(), big],
        "context": {"padding": "x".repeat(20 * 1024)},
    });
    let parsed = parse(Endpoint::Batch, mixed.to_string().as_bytes(), now()).unwrap();
    assert_eq!(parsed.messages.len(), 1);
    assert_eq!(parsed.rejected[0].index, 1);
    assert_eq!(parsed.rejected[0].code, "too_large");
    // A modest shared context on a normal batch is fine.
    let normal = json!({
        "batch": vec![message; 100],
        "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
    });
    let parsed = parse(Endpoint::Batch, normal.to_string().as_bytes(), now()).unwrap();
    assert_eq!(parsed.messages.len(), 100);
}

#[test]
fn an_unknown_body_key_is_refused_before_any_message_is_expanded() {
    let body = json!({"writeKey": "wk_nope", "batch": [{"type": "nonsense"}]});
    let refuse = |key: Option<&str>| match key {
        Some("wk_ok") => Ok(()),
        _ => Err(IngestError::Unauthorized("unknown write key".into())),
    };
    let error = parse_authorized(
        Endpoint::Batch,
        body.to_string().as_bytes(),
        now(),
        None,
        &refuse,
    )
    .map_err(ApiError::from)
    .unwrap_err();
    assert_eq!(error.status, StatusCode::UNAUTHORIZED);
    let single = json!({"writeKey": "wk_nope", "event": "E", "userId": "u"});
    let error = parse_authorized(
        Endpoint::Single(Call::Track),
        single.to_string().as_bytes(),
        now(),
        None,
        &refuse,
    )
    .map_err(ApiError::from)
    .unwrap_err();
    assert_eq!(error.status, StatusCode::UNAUTHORIZED);
}

/// A replay routes archived events from what `from_stored` reads: the same fields ingest
/// routed on, whatever else the event holds.
#[test]
fn a_stored_message_reads_back_as_it_was_routed() {
    let sent = single(
        Call::Track,
        json!({"userId": "u\"1", "event": "Order \u{e9}", "messageId": "m-1",
               "integrations": {"All": false, "Webhook": {"x": [1, 2]}},
               "properties": {"deep": [{"a": null}], "n": 1.5}}),
    )
    .unwrap();
    let stored = Message::from_stored(&sent.payload).unwrap();
    assert_eq!(stored.call, Call::Track);
    assert_eq!(stored.message_id, "m-1");
    assert_eq!(stored.user_key, "u\"1");
    assert_eq!(stored.event.as_deref(), Some("Order \u{e9}"));
    assert_eq!(stored.integrations, sent.integrations);

    // An identify has no event; a field of another type reads as absent.
    let other = br#"{"type":"identify","userId":7,"anonymousId":"a","integrations":[1]}"#;
    let stored = Message::from_stored(other).unwrap();
    assert_eq!((stored.event, stored.user_key), (None, "a".to_owned()));
    assert_eq!(stored.integrations, None);
    assert!(Message::from_stored(br#"{"type":"nope"}"#).is_none());
    assert!(Message::from_stored(b"[1]").is_none());
}
