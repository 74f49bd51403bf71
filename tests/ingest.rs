//! The Segment ingest API against a real Postgres and a real receiver: every endpoint, both
//! auth styles, gzip, bad input, dedup and skew correction.

use std::io::Write;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard::testkit::{start_switchyard, MockServer, TestDatabase};

const KEY: &str = "wk_test";

fn config(sink: &MockServer) -> String {
    format!(
        r#"
[[sources]]
name = "web"
write_key = "{KEY}"

[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
"#,
        sink.url("/in")
    )
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(addr: std::net::SocketAddr) -> Client {
        Client {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.raw(
            path,
            body.to_string().into_bytes(),
            &[("authorization", basic(KEY))],
        )
        .await
    }

    async fn raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("switchyard answers");
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }
}

fn basic(key: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn every_endpoint_both_auth_styles_and_gzip_reach_the_webhook() {
    let db = TestDatabase::create("endpoints").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = Client::new(sy.addr);

    let calls = [
        (
            "track",
            json!({"event": "Signed Up", "userId": "u1", "messageId": "m-track"}),
        ),
        (
            "identify",
            json!({"traits": {"email": "a@example.com"}, "userId": "u1", "messageId": "m-identify"}),
        ),
        (
            "page",
            json!({"name": "Home", "anonymousId": "a1", "messageId": "m-page"}),
        ),
        (
            "screen",
            json!({"name": "Main", "userId": "u1", "messageId": "m-screen"}),
        ),
        (
            "group",
            json!({"groupId": "g1", "userId": "u1", "messageId": "m-group"}),
        ),
        (
            "alias",
            json!({"previousId": "a1", "userId": "u1", "messageId": "m-alias"}),
        ),
    ];
    for (call, body) in &calls {
        let (status, answer) = client.post(&format!("/v1/{call}"), body).await;
        assert_eq!(status, StatusCode::OK, "{call}: {answer}");
        assert_eq!(answer, json!({"success": true}));
    }
    // The write key in the body instead of Basic auth, on /v1/batch and /v1/import.
    for (path, id) in [("/v1/batch", "m-batch"), ("/v1/import", "m-import")] {
        let body = json!({"writeKey": KEY, "batch": [{"type": "track", "event": "E", "userId": "u", "messageId": id}]});
        let (status, _) = client.raw(path, body.to_string().into_bytes(), &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // rudder-sdk-python's style: gzip body, key only in Basic auth.
    let body = json!({"batch": [{"type": "track", "event": "Zipped", "userId": "u", "messageId": "m-gzip", "anonymousId": null}]});
    let (status, _) = client
        .raw(
            "/v1/batch",
            gzip(body.to_string().as_bytes()),
            &[
                ("authorization", basic(KEY)),
                ("content-encoding", "gzip".into()),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let expected = [
        "m-track",
        "m-identify",
        "m-page",
        "m-screen",
        "m-group",
        "m-alias",
        "m-batch",
        "m-import",
        "m-gzip",
    ];
    let arrived = sink
        .wait_until(Duration::from_secs(20), |s| {
            let ids = s.message_ids();
            expected.iter().all(|id| ids.iter().any(|got| got == id))
        })
        .await;
    assert!(arrived, "delivered: {:?}", sink.message_ids());
    let by_id = |id: &str| {
        sink.events()
            .into_iter()
            .find(|e| e["messageId"] == id)
            .unwrap()
    };
    assert_eq!(by_id("m-group")["type"], "group");
    assert_eq!(by_id("m-identify")["traits"]["email"], "a@example.com");
    assert!(
        by_id("m-batch").get("writeKey").is_none(),
        "write keys are not forwarded"
    );
    sy.shutdown().await.unwrap();
}

/// What, where, body, headers, expected status.
type BadCase = (
    &'static str,
    &'static str,
    Vec<u8>,
    Vec<(&'static str, String)>,
    StatusCode,
);

#[tokio::test]
async fn bad_input_gets_a_clear_json_error_and_nothing_is_delivered() {
    let db = TestDatabase::create("bad_input").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = Client::new(sy.addr);
    let auth = || vec![("authorization", basic(KEY))];
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let many_props: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("p{i}"), json!(i))).collect();

    let cases: Vec<BadCase> = vec![
        ("malformed JSON", "/v1/track", br#"{"type": "track", "#.to_vec(), auth(), StatusCode::BAD_REQUEST),
        ("not JSON", "/v1/track", b"hello there".to_vec(), auth(), StatusCode::BAD_REQUEST),
        ("a JSON array", "/v1/track", b"[1,2]".to_vec(), auth(), StatusCode::BAD_REQUEST),
        ("wrong write key", "/v1/track", json!({"event": "E", "userId": "u"}).to_string().into(), vec![("authorization", basic("nope"))], StatusCode::UNAUTHORIZED),
        ("no write key", "/v1/track", json!({"event": "E", "userId": "u"}).to_string().into(), vec![], StatusCode::UNAUTHORIZED),
        ("wrong key in body", "/v1/batch", json!({"writeKey": "nope", "batch": []}).to_string().into(), vec![], StatusCode::UNAUTHORIZED),
        ("garbage auth header", "/v1/track", json!({"event": "E", "userId": "u"}).to_string().into(), vec![("authorization", "Basic %%%".into())], StatusCode::UNAUTHORIZED),
        ("oversize message", "/v1/track", json!({"event": "E", "userId": "u", "properties": {"x": "a".repeat(40_000)}}).to_string().into(), auth(), StatusCode::PAYLOAD_TOO_LARGE),
        ("oversize request", "/v1/batch", json!({"batch": [{"type": "track", "event": "E", "userId": "u", "properties": {"x": "a".repeat(600_000)}}]}).to_string().into(), auth(), StatusCode::PAYLOAD_TOO_LARGE),
        ("too many messages", "/v1/batch", json!({"batch": vec![json!({"type": "track", "event": "E", "userId": "u"}); 2501]}).to_string().into(), auth(), StatusCode::PAYLOAD_TOO_LARGE),
        ("gzip bomb", "/v1/batch", gzip(&vec![b' '; 5_000_000]), { let mut h = auth(); h.push(("content-encoding", "gzip".into())); h }, StatusCode::PAYLOAD_TOO_LARGE),
        ("no userId or anonymousId", "/v1/track", json!({"event": "E", "anonymousId": null}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("track without event", "/v1/track", json!({"userId": "u"}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("group without groupId", "/v1/group", json!({"userId": "u"}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("alias without previousId", "/v1/alias", json!({"userId": "u"}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("userId as an object", "/v1/track", json!({"event": "E", "userId": {"a": 1}}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("properties as a string", "/v1/track", json!({"event": "E", "userId": "u", "properties": "x"}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("invalid gzip", "/v1/track", b"\x1f\x8bnot-gzip".to_vec(), { let mut h = auth(); h.push(("content-encoding", "gzip".into())); h }, StatusCode::BAD_REQUEST),
        ("unknown encoding", "/v1/track", b"{}".to_vec(), { let mut h = auth(); h.push(("content-encoding", "br".into())); h }, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("only unknown types in a batch", "/v1/batch", json!({"batch": [{"type": "purchase", "userId": "u"}]}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("batch is not an array", "/v1/batch", json!({"batch": {"type": "track"}}).to_string().into(), auth(), StatusCode::BAD_REQUEST),
        ("huge number", "/v1/track", br#"{"event":"E","userId":"u","properties":{"n":1e999}}"#.to_vec(), auth(), StatusCode::BAD_REQUEST),
        ("deep nesting", "/v1/track", format!(r#"{{"event":"E","userId":"u","properties":{{"d":{deep}}}}}"#).into_bytes(), auth(), StatusCode::BAD_REQUEST),
        ("invalid UTF-8", "/v1/track", b"{\"event\":\"\xff\xfe\",\"userId\":\"u\"}".to_vec(), auth(), StatusCode::BAD_REQUEST),
        ("unknown endpoint", "/v1/purchase", b"{}".to_vec(), auth(), StatusCode::NOT_FOUND),
    ];
    for (what, path, body, headers, want) in cases {
        let (status, answer) = client.raw(path, body, &headers).await;
        assert_eq!(status, want, "{what}: {answer}");
        assert!(
            answer["code"].is_string() && answer["message"].is_string(),
            "{what}: {answer}"
        );
    }
    // 10,000 properties fit in 32 KB? No: they are refused as too large, clearly.
    let (status, answer) = client
        .post(
            "/v1/track",
            &json!({"event": "E", "userId": "u", "properties": many_props}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");

    // The service is fine afterwards and only the good event is delivered.
    let (status, _) = client
        .post(
            "/v1/track",
            &json!({"event": "Good", "userId": "u", "messageId": "good"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| s
            .message_ids()
            .contains(&"good".to_string()))
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.message_ids(),
        ["good"],
        "nothing refused was delivered"
    );
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_keeps_valid_messages_and_lists_the_rest() {
    let db = TestDatabase::create("partial").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = Client::new(sy.addr);
    let body = json!({"batch": [
        {"type": "track", "event": "A", "userId": "u", "messageId": "ok-1"},
        {"type": "track", "userId": "u", "messageId": "no-event"},
        {"type": "teleport", "userId": "u", "messageId": "bad-type"},
        {"type": "identify", "anonymousId": "a", "messageId": "ok-2"}
    ]});
    let (status, answer) = client.post("/v1/batch", &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["success"], true);
    let rejected: Vec<u64> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected, [1, 2], "{answer}");
    assert!(answer["rejected"][1]["message"]
        .as_str()
        .unwrap()
        .contains("teleport"));
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| s.message_ids().len() == 2)
            .await
    );
    let mut ids = sink.message_ids();
    ids.sort();
    assert_eq!(ids, ["ok-1", "ok-2"]);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_repeated_message_id_is_acknowledged_and_delivered_once() {
    let db = TestDatabase::create("dedup").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = Client::new(sy.addr);
    let event = json!({"event": "E", "userId": "u", "messageId": "same"});
    for _ in 0..3 {
        let (status, _) = client.post("/v1/track", &event).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Also twice inside one batch, and concurrently.
    let batch = json!({"batch": [
        {"type": "track", "event": "E", "userId": "u", "messageId": "twice"},
        {"type": "track", "event": "E", "userId": "u", "messageId": "twice"}
    ]});
    let (a, b) = tokio::join!(
        client.post("/v1/batch", &batch),
        client.post("/v1/batch", &batch)
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| s.message_ids().len() >= 2)
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut ids = sink.message_ids();
    ids.sort();
    assert_eq!(ids, ["same", "twice"]);
    sy.shutdown().await.unwrap();

    // After a restart the dedup window still holds.
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = Client::new(sy.addr);
    let (status, _) = client.post("/v1/track", &event).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.message_ids().len(), 2);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn timestamps_are_corrected_for_client_clock_skew() {
    let db = TestDatabase::create("skew").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = Client::new(sy.addr);
    // The client's clock runs 2 hours behind; it sent the batch 30 s after the event happened.
    let client_now = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    let event_time = client_now - time::Duration::seconds(30);
    let fmt = &time::format_description::well_known::Rfc3339;
    let body = json!({
        "sentAt": client_now.format(fmt).unwrap(),
        "batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "skewed",
                   "timestamp": event_time.format(fmt).unwrap()}]
    });
    let (status, _) = client.post("/v1/batch", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| !s.events().is_empty())
            .await
    );
    let event = sink.events().remove(0);
    let parse = |key: &str| time::OffsetDateTime::parse(event[key].as_str().unwrap(), fmt).unwrap();
    let received = parse("receivedAt");
    let corrected = parse("timestamp");
    let skew_free = received - time::Duration::seconds(30);
    assert!(
        (corrected - skew_free).abs() < time::Duration::milliseconds(5),
        "timestamp {corrected} should be receivedAt - 30 s = {skew_free}"
    );
    assert_eq!(event["originalTimestamp"], body["batch"][0]["timestamp"]);
    let sent = time::OffsetDateTime::parse(body["sentAt"].as_str().unwrap(), fmt).unwrap();
    assert!(
        (parse("sentAt") - sent).abs() < time::Duration::milliseconds(1),
        "sentAt is kept (to the millisecond)"
    );
    sy.shutdown().await.unwrap();
}
