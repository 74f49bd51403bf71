//! Destination kinds against mock vendors: each kind's conformance test (fixtures from the
//! vendors' docs in `tests/fixtures/destinations/`), the vendor answers that are specific to a
//! kind, each kind end to end through a running Switchyard, and `switchyard check` on bad kind
//! settings.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::destination::{Destination, Outcome, Settings, Verdict};
use switchyard::destinations::{amplitude, ga4, mixpanel, postgres, posthog, segment, slack};
use switchyard::testkit::conformance::{self, load_fixtures, Conformance, Fixture};
use switchyard::testkit::{start_switchyard, MockServer, Received, Reply, TestDatabase};

const WEBHOOK_URL: &str =
    "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX";
const SLACK_TEMPLATE: &str = "{{event|type}}: ${{properties.revenue}} from {{userId}}";

fn fixtures(kind: &str) -> Vec<Fixture> {
    load_fixtures(format!(
        "{}/tests/fixtures/destinations/{kind}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// The strings at `path` (dotted) of every item of the array at `array` (dotted, "" = root).
fn pluck(request: &Received, array: &str, path: &str) -> Vec<String> {
    let body = request.json();
    let items = if array.is_empty() {
        &body
    } else {
        array.split('.').fold(&body, |v, k| &v[k])
    };
    items
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| path.split('.').fold(item, |v, k| &v[k]).as_str())
        .map(str::to_owned)
        .collect()
}

fn message(value: Value) -> switchyard::destination::Event {
    conformance::event(&value)
}

fn track(id: &str, user: &str) -> Value {
    json!({"type": "track", "event": "Signed Up", "userId": user, "messageId": id,
           "timestamp": "2024-03-01T12:00:00.000Z", "properties": {"plan": "pro"}})
}

fn outcomes(verdict: &Verdict, count: usize) -> Vec<Outcome> {
    conformance::outcomes(verdict, count)
}

// Conformance, one test per kind.

#[tokio::test]
async fn amplitude_conformance() {
    Conformance::new(
        &amplitude::KIND,
        r#"api_key = "AMPLITUDE_API_KEY""#,
        fixtures("amplitude"),
    )
    .idempotency(|r| pluck(r, "events", "insert_id"))
    .run()
    .await;
}

#[tokio::test]
async fn mixpanel_conformance() {
    Conformance::new(
        &mixpanel::KIND,
        "project_token = \"MIXPANEL_PROJECT_TOKEN\"\napi_secret = \"MIXPANEL_API_SECRET\"",
        fixtures("mixpanel"),
    )
    .idempotency(|r| pluck(r, "", "properties.$insert_id"))
    .run()
    .await;
}

#[tokio::test]
async fn ga4_conformance() {
    Conformance::new(
        &ga4::KIND,
        "measurement_id = \"G-XXXXXXXXXX\"\napi_secret = \"GA4_API_SECRET\"",
        fixtures("ga4"),
    )
    .events_in(|r| r.json()["events"].as_array().map_or(0, Vec::len))
    .run()
    .await;
}

#[tokio::test]
async fn posthog_conformance() {
    Conformance::new(
        &posthog::KIND,
        r#"api_key = "phc_project_api_key""#,
        fixtures("posthog"),
    )
    .idempotency(|r| pluck(r, "batch", "uuid"))
    .run()
    .await;
}

#[tokio::test]
async fn slack_conformance() {
    let settings = format!("webhook_url = \"{WEBHOOK_URL}\"\ntemplate = \"{SLACK_TEMPLATE}\"");
    Conformance::new(&slack::KIND, &settings, fixtures("slack"))
        .events_in(|r| usize::from(r.json()["text"].is_string()))
        .run()
        .await;
}

#[tokio::test]
async fn segment_conformance() {
    Conformance::new(
        &segment::KIND,
        r#"write_key = "wk_downstream""#,
        fixtures("segment"),
    )
    .idempotency(|r| pluck(r, "batch", "messageId"))
    .run()
    .await;
}

// What is specific to one vendor.

#[tokio::test]
async fn amplitude_400_dead_letters_only_the_events_it_lists() {
    let body = json!({"code": 400, "error": "Invalid field values on some events",
                      "events_with_invalid_fields": {"time": [1]}});
    let mock =
        MockServer::scripted(move |_, _| Reply::status(400).with_body(&body.to_string())).await;
    let plugin = conformance::build(&amplitude::KIND, r#"api_key = "k""#, &mock);
    let alias = json!({"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "alias"});
    let events = [
        message(track("t0", "u1")),
        message(alias),
        message(track("t1", "u1")),
        message(track("t2", "u1")),
    ];
    let verdict = conformance::deliver(&*plugin, &events, Duration::from_secs(5)).await;
    let outcomes = outcomes(&verdict, 4);
    assert!(
        matches!(
            outcomes[0],
            Outcome::Retry {
                status: Some(400),
                ..
            }
        ),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Delivered, "alias needs no request");
    // Index 1 of the request is the third event of the batch (the alias was left out).
    assert!(
        matches!(&outcomes[2], Outcome::Failed { status: Some(400), message } if message.contains("`time`")),
        "{outcomes:?}"
    );
    assert!(matches!(outcomes[3], Outcome::Retry { .. }), "{outcomes:?}");
    assert_eq!(
        pluck(&mock.received()[0], "events", "insert_id"),
        ["t0", "t1", "t2"]
    );

    mock.script(|_, _| {
        Reply::status(429)
            .with_body(r#"{"code":429,"error":"Too many requests for some devices and users"}"#)
    });
    let verdict = conformance::deliver(&*plugin, &events[..1], Duration::from_secs(5)).await;
    assert!(
        matches!(&outcomes_of(&verdict)[0], Outcome::Retry { throttled: true, retry_after: Some(pause), .. }
            if *pause == Duration::from_secs(30)),
        "Amplitude sends no Retry-After: the documented 30 s pause: {verdict:?}"
    );
}

fn outcomes_of(verdict: &Verdict) -> Vec<Outcome> {
    outcomes(verdict, 1)
}

#[tokio::test]
async fn mixpanel_routes_each_call_to_its_endpoint_and_reads_failed_records() {
    let mock = MockServer::scripted(|_, request| {
        if request.path == "/import" {
            let body = json!({"code": 400, "error": "some data points in the request failed validation",
                "status": "Bad Request", "num_records_imported": 1,
                "failed_records": [{"index": 1, "insert_id": "t3", "field": "properties.time",
                    "message": "'properties.time' is invalid: must be specified as seconds since epoch"}]});
            Reply::status(400).with_body(&body.to_string())
        } else {
            Reply::ok().with_body(r#"{"error": null, "status": 1}"#)
        }
    })
    .await;
    let plugin = conformance::build(
        &mixpanel::KIND,
        "project_token = \"tok\"\napi_secret = \"sec\"",
        &mock,
    );
    let events = [
        message(track("t0", "u1")),
        message(
            json!({"type": "identify", "userId": "u1", "messageId": "i1", "traits": {"plan": "pro"}}),
        ),
        message(json!({"type": "group", "userId": "u1", "groupId": "g1", "messageId": "g1"})),
        message(track("t3", "u1")),
    ];
    let verdict = conformance::deliver(&*plugin, &events, Duration::from_secs(5)).await;
    let outcomes = outcomes(&verdict, 4);
    assert_eq!(
        outcomes[..3],
        [Outcome::Delivered, Outcome::Delivered, Outcome::Delivered]
    );
    assert!(
        matches!(&outcomes[3], Outcome::Failed { status: Some(400), message } if message.contains("seconds since epoch")),
        "{outcomes:?}"
    );
    let paths: Vec<String> = mock.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/engage", "/groups", "/import"]);
    assert_eq!(
        pluck(&mock.received()[2], "", "properties.$insert_id"),
        ["t0", "t3"]
    );

    mock.script(|_, _| {
        Reply::ok().with_body(r#"{"error": "$set must be an object", "status": 0}"#)
    });
    let verdict = conformance::deliver(&*plugin, &events[1..2], Duration::from_secs(5)).await;
    assert!(
        matches!(&outcomes_of(&verdict)[0], Outcome::Failed { .. }),
        "/engage answers 200 with status 0 for a rejected update: {verdict:?}"
    );
}

#[tokio::test]
async fn ga4_sends_one_request_per_user_with_identify_traits() {
    let mock = MockServer::start().await;
    let plugin = conformance::build(
        &ga4::KIND,
        "measurement_id = \"G-ABC123\"\napi_secret = \"s\"",
        &mock,
    );
    let user = |id: &str, anonymous: &str, kind: &str| {
        let mut event = json!({"type": kind, "anonymousId": anonymous, "messageId": id,
                               "timestamp": "2024-03-01T12:00:00.000Z"});
        if kind == "track" {
            event["event"] = "Signed Up".into();
        } else {
            event["traits"] =
                json!({"plan": "premium", "first_visit_time": "x", "address": {"city": "Oslo"}});
        }
        message(event)
    };
    let events = [
        user("a1", "client-a", "track"),
        user("b1", "client-b", "track"),
        user("a2", "client-a", "identify"),
        user("a3", "client-a", "track"),
    ];
    let verdict = conformance::deliver(&*plugin, &events, Duration::from_secs(5)).await;
    assert!(
        outcomes(&verdict, 4)
            .iter()
            .all(|o| *o == Outcome::Delivered),
        "{verdict:?}"
    );
    let received = mock.received();
    assert_eq!(received.len(), 2, "one request per client_id");
    let a = received[0].json();
    assert_eq!(a["client_id"], "client-a");
    assert_eq!(a["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(a["events"][0]["name"], "sign_up");
    assert_eq!(
        a["user_properties"],
        json!({"plan": {"value": "premium"}, "custom_first_visit_time": {"value": "x"}}),
        "flat values only; reserved names renamed"
    );
    assert_eq!(received[1].json()["client_id"], "client-b");
}

#[tokio::test]
async fn segment_keeps_requests_under_500_kb_and_restamps_sent_at() {
    let mock = MockServer::start().await;
    let plugin = conformance::build(&segment::KIND, r#"write_key = "wk""#, &mock);
    let filler = "x".repeat(20_000);
    let events: Vec<_> = (0..100)
        .map(|i| {
            let mut event = track(&format!("m{i}"), "u1");
            event["properties"]["filler"] = filler.as_str().into();
            event["sentAt"] = "2024-03-01T11:00:00.000Z".into();
            message(event)
        })
        .collect();
    let verdict = conformance::deliver(&*plugin, &events, Duration::from_secs(10)).await;
    assert!(outcomes(&verdict, 100)
        .iter()
        .all(|o| *o == Outcome::Delivered));
    let received = mock.received();
    assert!(
        received.len() >= 4,
        "2 MB of events: {} requests",
        received.len()
    );
    let mut ids = Vec::new();
    for request in &received {
        assert!(
            request.body.len() <= 500 * 1024,
            "{} bytes",
            request.body.len()
        );
        let body = request.json();
        assert!(body["sentAt"].is_string());
        assert!(body["batch"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e.get("sentAt").is_none()));
        ids.extend(pluck(request, "batch", "messageId"));
    }
    assert_eq!(ids.len(), 100);
}

#[tokio::test]
async fn kind_defaults_come_from_the_vendors() {
    let config = switchyard::config::parse(
        &format!(
            r#"
[[destinations]]
name = "a"
kind = "amplitude"
api_key = "key-1"

[[destinations]]
name = "b"
kind = "amplitude"
api_key = "key-1"
batch_size = 5000

[[destinations]]
name = "alerts"
kind = "slack"
webhook_url = "{WEBHOOK_URL}"

[[destinations]]
name = "fwd"
kind = "segment"
write_key = "wk"

[[destinations]]
name = "ga"
kind = "ga4"
measurement_id = "G-ABC123"
api_secret = "s"
batch_size = 100
"#
        ),
        "t.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let d = &config.destinations;
    assert_eq!(
        d[0].rate_limit_key, d[1].rate_limit_key,
        "one API key, one limit"
    );
    assert_eq!(d[0].batch_size, 10);
    assert_eq!(d[1].batch_size, 2000, "capped at Amplitude's maximum");
    let slack = &d[2];
    assert_eq!(slack.batch_size, 1);
    let rate = slack.rate_limit.expect("Slack's documented limit");
    assert_eq!((rate.requests, rate.per), (1, Duration::from_secs(1)));
    let rate = d[3].rate_limit.expect("Segment's partner guidance");
    assert_eq!((rate.requests, rate.per), (50, Duration::from_secs(1)));
    assert_eq!(d[4].batch_size, 25, "GA4 takes 25 events per request");
}

// The warehouse: the same checks as the conformance test, against a real database.

fn warehouse(url: &str, table: &str) -> std::sync::Arc<dyn Destination> {
    let table: toml::Table =
        toml::from_str(&format!("url = \"{url}\"\ntable = \"{table}\"")).expect("settings");
    let settings = Settings {
        name: "warehouse",
        table: &table,
        endpoint: None,
    };
    match (postgres::KIND.build)(&settings) {
        Ok(built) => built.plugin,
        Err(errors) => panic!("{errors:?}"),
    }
}

#[tokio::test]
async fn postgres_conformance() {
    let db = TestDatabase::create("warehouse").await;
    let plugin = warehouse(&db.url, "analytics_events");
    let timeout = Duration::from_secs(10);

    // Mapping: every call type becomes a row with typed columns.
    let calls = [
        json!({"type": "track", "event": "Order Completed", "userId": "u1", "anonymousId": "a1",
               "messageId": "m-track", "timestamp": "2024-03-01T12:00:00.000Z",
               "receivedAt": "2024-03-01T12:00:01.000Z", "properties": {"revenue": 9.5},
               "context": {"ip": "1.2.3.4"}}),
        json!({"type": "identify", "userId": "u1", "messageId": "m-identify", "traits": {"plan": "pro"},
               "timestamp": "2024-03-01T12:00:02.000Z"}),
        json!({"type": "page", "anonymousId": "a1", "name": "Home", "messageId": "m-page",
               "timestamp": "2024-03-01T12:00:03.000Z"}),
        json!({"type": "screen", "userId": "u1", "name": "Main", "messageId": "m-screen",
               "timestamp": "2024-03-01T12:00:04.000Z"}),
        json!({"type": "group", "userId": "u1", "groupId": "g1", "messageId": "m-group",
               "timestamp": "2024-03-01T12:00:05.000Z"}),
        json!({"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "m-alias",
               "timestamp": "2024-03-01T12:00:06.000Z"}),
    ];
    let events: Vec<_> = calls.iter().cloned().map(message).collect();
    let verdict = conformance::deliver(&*plugin, &events, timeout).await;
    assert_eq!(verdict, Verdict::All(Outcome::Delivered));
    let row = db
        .scalar(
            "SELECT concat_ws('|', type, event, user_id, anonymous_id, \
             extract(epoch from \"timestamp\")::bigint, properties->>'revenue', context->>'ip', \
             raw->>'messageId') FROM analytics_events WHERE message_id = 'm-track'",
        )
        .await;
    assert_eq!(
        row.as_deref(),
        Some("track|Order Completed|u1|a1|1709294400|9.5|1.2.3.4|m-track")
    );
    assert_eq!(
        db.scalar("SELECT traits->>'plan' FROM analytics_events WHERE message_id = 'm-identify'")
            .await
            .as_deref(),
        Some("pro")
    );

    // Idempotency: the same events again add nothing.
    let verdict = conformance::deliver(&*plugin, &events, timeout).await;
    assert_eq!(verdict, Verdict::All(Outcome::Delivered));
    assert_eq!(
        db.scalar("SELECT count(*)::text FROM analytics_events")
            .await
            .as_deref(),
        Some("6")
    );

    // Batching at the limit: one statement for max_batch_size events.
    let batch: Vec<_> = (0..postgres::KIND.defaults.max_batch_size)
        .map(|i| message(track(&format!("bulk-{i}"), "u2")))
        .collect();
    let verdict = conformance::deliver(&*plugin, &batch, timeout).await;
    assert_eq!(verdict, Verdict::All(Outcome::Delivered));
    assert_eq!(
        db.scalar("SELECT count(*)::text FROM analytics_events WHERE user_id = 'u2'")
            .await
            .as_deref(),
        Some("1000")
    );

    // A bad event fails alone: jsonb refuses \u0000 in text.
    let bad = json!({"type": "track", "event": "Bad", "userId": "u3", "messageId": "bad",
                     "properties": {"text": "nul\u{0}here"}});
    let events = [
        message(track("good-1", "u3")),
        message(bad),
        message(track("good-2", "u3")),
    ];
    let outcomes = outcomes(&conformance::deliver(&*plugin, &events, timeout).await, 3);
    assert_eq!(outcomes[0], Outcome::Delivered);
    assert!(
        matches!(&outcomes[1], Outcome::Failed { message, .. } if message.contains("22")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], Outcome::Delivered);

    // Retry classification: an unreachable server is retried; permission denied is permanent.
    let closed = warehouse("postgres://postgres@127.0.0.1:1/nowhere", "events");
    let verdict = conformance::deliver(&*closed, &events[..1], timeout).await;
    assert!(
        matches!(outcomes_of(&verdict)[0], Outcome::Retry { .. }),
        "{verdict:?}"
    );

    let role = format!("sy_reader_{}", &db.name[db.name.len() - 8..]);
    db.scalar(&format!("CREATE ROLE {role} LOGIN PASSWORD 'reader'"))
        .await;
    db.scalar("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        .await;
    // The test database may be reached with any user and password (SWITCHYARD_TEST_DATABASE_URL):
    // swap in the reader's, whatever they were.
    let mut reader_url = url::Url::parse(&db.url).expect("the test database URL parses");
    reader_url.set_username(&role).expect("a URL with a host");
    reader_url
        .set_password(Some("reader"))
        .expect("a URL with a host");
    let reader_url = reader_url.to_string();
    let denied = warehouse(&reader_url, "not_allowed");
    let verdict = conformance::deliver(&*denied, &events[..1], timeout).await;
    drop(denied);
    assert!(
        matches!(&outcomes_of(&verdict)[0], Outcome::Failed { message, .. } if message.contains("42501")),
        "permission denied is permanent: {verdict:?}"
    );
    // The role is cluster-wide: it goes with the test.
    db.scalar(&format!("DROP OWNED BY {role}")).await;
    db.scalar(&format!("DROP ROLE {role}")).await;
}

// End to end: ingest → store → scheduler → plugin → mock vendor.

/// Where an end-to-end run's events land: a mock vendor (done when `done(answered requests)`
/// holds) or a warehouse database (done when its `events` table has `rows` rows).
enum Vendor<'a> {
    Mock(&'a MockServer, &'a dyn Fn(&[Received]) -> bool),
    Warehouse(&'a TestDatabase, &'a str),
}

impl Vendor<'_> {
    async fn done(&self) -> bool {
        match self {
            Vendor::Mock(sink, done) => {
                let answered: Vec<Received> = sink
                    .received()
                    .into_iter()
                    .filter(|r| (200..300).contains(&r.status))
                    .collect();
                done(&answered)
            }
            Vendor::Warehouse(db, rows) => {
                db.scalar("SELECT count(*)::text FROM events")
                    .await
                    .as_deref()
                    == Some(*rows)
            }
        }
    }

    fn seen(&self) -> String {
        match self {
            Vendor::Mock(sink, _) => sink
                .received()
                .iter()
                .map(|r| format!("{} {}\n", r.path, String::from_utf8_lossy(&r.body)))
                .collect(),
            Vendor::Warehouse(..) => "(see the warehouse)".into(),
        }
    }
}

/// Starts Switchyard with one destination of the kind (its own keys in `keys`, `endpoint` at
/// the mock), sends one message of each call type, and waits until the vendor has them.
async fn end_to_end(label: &str, keys: &str, vendor: Vendor<'_>, ids: &[String]) {
    let db = TestDatabase::create(label).await;
    let endpoint = match &vendor {
        Vendor::Mock(sink, _) => format!("endpoint = \"{}\"", sink.url("/")),
        Vendor::Warehouse(..) => String::new(),
    };
    let config = format!(
        r#"
[[sources]]
name = "web"
write_key = "wk_e2e"

[[destinations]]
name = "vendor"
{endpoint}
retry.initial_backoff = "100ms"
{keys}
"#
    );
    let sy = start_switchyard(&config, &db.url).await;
    let batch = json!({"batch": sample_calls(ids)});
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/batch", sy.addr))
        .basic_auth("wk_e2e", Some(""))
        .json(&batch)
        .send()
        .await
        .expect("switchyard answers");
    assert_eq!(response.status(), 200);
    let mut arrived = false;
    for _ in 0..300 {
        if vendor.done().await {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(arrived, "{label}: the vendor got:\n{}", vendor.seen());
    sy.shutdown().await.expect("clean shutdown");
}

fn sample_calls(ids: &[String]) -> Vec<Value> {
    let base = |kind: &str, i: usize| json!({"type": kind, "userId": "user-42", "anonymousId": "anon-42", "messageId": ids[i]});
    let mut calls = vec![
        base("track", 0),
        base("identify", 1),
        base("page", 2),
        base("screen", 3),
        base("group", 4),
        base("alias", 5),
    ];
    calls[0]["event"] = "Order Completed".into();
    calls[0]["properties"] = json!({"revenue": 42.5, "order_id": "T1"});
    calls[1]["traits"] = json!({"email": "ada@example.com"});
    calls[2]["name"] = "Pricing".into();
    calls[3]["name"] = "Main".into();
    calls[4]["groupId"] = "acme".into();
    calls[5]["previousId"] = "anon-42".into();
    calls
}

fn uuids() -> Vec<String> {
    (0..6).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

fn all_carried(
    requests: &[Received],
    keys: impl Fn(&Received) -> Vec<String>,
    want: &[String],
) -> bool {
    let carried: BTreeSet<String> = requests.iter().flat_map(keys).collect();
    want.iter().all(|id| carried.contains(id))
}

#[tokio::test]
async fn amplitude_end_to_end() {
    let sink = MockServer::start().await;
    let ids = uuids();
    let want = ids[..5].to_vec();
    end_to_end(
        "e2e_amplitude",
        "kind = \"amplitude\"\napi_key = \"k\"",
        Vendor::Mock(&sink, &|r| {
            all_carried(r, |r| pluck(r, "events", "insert_id"), &want)
        }),
        &ids,
    )
    .await;
    let events: Vec<Value> = sink
        .received()
        .iter()
        .flat_map(|r| r.json()["events"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(events
        .iter()
        .any(|e| e["event_type"] == "Order Completed" && e["revenue"] == 42.5));
    assert!(
        events.iter().all(|e| e["insert_id"] != ids[5].as_str()),
        "alias is skipped"
    );
}

#[tokio::test]
async fn mixpanel_end_to_end() {
    let sink = MockServer::scripted(|_, r| {
        if r.path == "/import" {
            Reply::ok()
        } else {
            Reply::ok().with_body(r#"{"error": null, "status": 1}"#)
        }
    })
    .await;
    let ids = uuids();
    let events = [
        ids[0].clone(),
        ids[2].clone(),
        ids[3].clone(),
        ids[5].clone(),
    ];
    end_to_end(
        "e2e_mixpanel",
        "kind = \"mixpanel\"\nproject_token = \"tok\"\napi_secret = \"sec\"",
        Vendor::Mock(&sink, &|r| {
            let imports: Vec<Received> =
                r.iter().filter(|r| r.path == "/import").cloned().collect();
            all_carried(&imports, |r| pluck(r, "", "properties.$insert_id"), &events)
                && r.iter().any(|r| r.path == "/engage")
                && r.iter().any(|r| r.path == "/groups")
        }),
        &ids,
    )
    .await;
}

#[tokio::test]
async fn ga4_end_to_end() {
    let sink = MockServer::start().await;
    let names = ["purchase", "page_view", "screen_viewed", "join_group"];
    end_to_end(
        "e2e_ga4",
        "kind = \"ga4\"\nmeasurement_id = \"G-ABC123\"\napi_secret = \"s\"",
        Vendor::Mock(&sink, &|r| {
            let sent: BTreeSet<String> =
                r.iter().flat_map(|r| pluck(r, "events", "name")).collect();
            names.iter().all(|n| sent.contains(*n))
        }),
        &uuids(),
    )
    .await;
    let request = &sink.received()[0];
    assert_eq!(request.json()["client_id"], "anon-42");
    assert!(request
        .query
        .as_deref()
        .is_some_and(|q| q.contains("measurement_id=G-ABC123")));
}

#[tokio::test]
async fn posthog_end_to_end() {
    let sink = MockServer::start().await;
    let ids = uuids();
    end_to_end(
        "e2e_posthog",
        "kind = \"posthog\"\napi_key = \"phc_k\"",
        Vendor::Mock(&sink, &|r| {
            all_carried(r, |r| pluck(r, "batch", "uuid"), &ids)
        }),
        &ids,
    )
    .await;
    let names: BTreeSet<String> = sink
        .received()
        .iter()
        .flat_map(|r| pluck(r, "batch", "event"))
        .collect();
    for name in [
        "Order Completed",
        "$identify",
        "$pageview",
        "$screen",
        "$groupidentify",
        "$create_alias",
    ] {
        assert!(names.contains(name), "{name} in {names:?}");
    }
}

#[tokio::test]
async fn slack_end_to_end() {
    let sink = MockServer::scripted(|_, _| Reply::ok().with_body("ok")).await;
    let keys = format!(
        "kind = \"slack\"\nwebhook_url = \"{WEBHOOK_URL}\"\nevents = [\"Order Completed\", \"identify\"]"
    );
    end_to_end(
        "e2e_slack",
        &keys,
        Vendor::Mock(&sink, &|r| r.len() >= 2),
        &uuids(),
    )
    .await;
    let received = sink.received();
    let texts: BTreeSet<String> = received
        .iter()
        .map(|r| r.json()["text"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(texts.contains("Order Completed from user-42"), "{texts:?}");
    assert!(texts.contains("identify from user-42"), "{texts:?}");
    assert!(received
        .iter()
        .all(|r| r.path == "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"));
    let gap = received[1].at.duration_since(received[0].at);
    assert!(
        gap >= Duration::from_millis(900),
        "1 message/s by default: {gap:?}"
    );
}

#[tokio::test]
async fn segment_end_to_end() {
    let sink = MockServer::start().await;
    let ids = uuids();
    end_to_end(
        "e2e_segment",
        "kind = \"segment\"\nwrite_key = \"wk_downstream\"",
        Vendor::Mock(&sink, &|r| {
            all_carried(r, |r| pluck(r, "batch", "messageId"), &ids)
        }),
        &ids,
    )
    .await;
    let request = &sink.received()[0];
    assert_eq!(
        request.header("authorization"),
        Some("Basic d2tfZG93bnN0cmVhbTo=")
    );
}

#[tokio::test]
async fn postgres_end_to_end() {
    let warehouse = TestDatabase::create("e2e_warehouse").await;
    let keys = format!("kind = \"postgres\"\nurl = \"{}\"", warehouse.url);
    let vendor = Vendor::Warehouse(&warehouse, "6");
    end_to_end("e2e_postgres", &keys, vendor, &uuids()).await;
}

#[tokio::test]
async fn integrations_route_to_vendor_kinds_by_name_or_kind() {
    let db = TestDatabase::create("e2e_integrations").await;
    let amplitude = MockServer::start().await;
    let posthog = MockServer::start().await;
    let config = format!(
        r#"
[[sources]]
name = "web"
write_key = "wk_e2e"

[[destinations]]
name = "Amplitude"
kind = "amplitude"
api_key = "k"
endpoint = "{}"

[[destinations]]
name = "product"
kind = "posthog"
api_key = "phc_k"
endpoint = "{}"
"#,
        amplitude.url("/"),
        posthog.url("/")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let batch = json!({"batch": [
        {"type": "track", "event": "Only Amplitude", "userId": "u1", "messageId": "m-amp",
         "integrations": {"All": false, "Amplitude": true}},
        {"type": "track", "event": "Only PostHog", "userId": "u1", "messageId": "m-ph",
         "integrations": {"All": false, "posthog": true}},
        {"type": "track", "event": "Not Amplitude", "userId": "u1", "messageId": "m-not-amp",
         "integrations": {"amplitude": false}},
    ]});
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/batch", sy.addr))
        .basic_auth("wk_e2e", Some(""))
        .json(&batch)
        .send()
        .await
        .expect("switchyard answers");
    assert_eq!(response.status(), 200);
    let posthog_ids = |s: &MockServer| -> BTreeSet<String> {
        s.received()
            .iter()
            .flat_map(|r| pluck(r, "batch", "event"))
            .collect()
    };
    assert!(
        posthog
            .wait_until(Duration::from_secs(20), |s| posthog_ids(s).len() == 2)
            .await
    );
    assert!(
        amplitude
            .wait_until(Duration::from_secs(20), |s| !s.received().is_empty())
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let amplitude_events: Vec<String> = amplitude
        .received()
        .iter()
        .flat_map(|r| pluck(r, "events", "event_type"))
        .collect();
    assert_eq!(amplitude_events, ["Only Amplitude"]);
    assert_eq!(
        posthog_ids(&posthog),
        BTreeSet::from(["Only PostHog".to_owned(), "Not Amplitude".to_owned()])
    );
    sy.shutdown().await.expect("clean shutdown");
}

// `switchyard check` locates every bad kind setting.

#[test]
fn check_reports_bad_kind_settings_where_they_are() {
    let dir = std::env::temp_dir().join(format!("sy-check-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("bad.toml");
    let text = r#"[[sources]]
name = "web"
write_key = "wk"

[[destinations]]
name = "ga"
kind = "ga4"
measurement_id = "UA-12345-1"
api_secret = "s"

[[destinations]]
name = "alerts"
kind = "slack"
webhook_url = "hooks.slack.com/services/T0/B0/x"
template = "{{event"

[[destinations]]
name = "warehouse"
kind = "postgres"
url = "mysql://localhost/wh"
table = "events; drop table users"

[[destinations]]
name = "amp"
kind = "amplitude"
apikey = "x"
"#;
    std::fs::write(&path, text).expect("writing the config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("running switchyard check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let file = path.display();
    let expected = [
        format!("{file}:8:1: `measurement_id`: `UA-12345-1` is not a Measurement ID: expected `G-` then capitals and digits, such as `G-ABC123XYZ`"),
        format!("{file}:14:1: `webhook_url`: `hooks.slack.com/***` is not a valid URL: relative URL without a base"),
        format!("{file}:15:1: `template`: `{{{{` at 1 is never closed with `}}}}`"),
        format!("{file}:20:1: `url`: must be a postgres:// URL"),
        format!("{file}:21:1: `table`: `events; drop table users` is not a table name: use letters, digits and `_` (not first), at most 63, optionally as `schema.table`"),
        format!("{file}:23:1: missing field `api_key`"),
        format!("{file}:26:1: unknown key `apikey` for a `amplitude` destination (expected `api_key`, or a key every destination takes)"),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        expected,
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
