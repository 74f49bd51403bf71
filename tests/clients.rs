//! What browser and mobile SDKs send, over real HTTP against a real Postgres: the one-letter
//! paths, `text/plain` and gzip bodies with the write key inside, the analytics.js settings,
//! CORS per source, and `context.ip`.

use std::io::Write;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard::testkit::{start_switchyard, MockServer, TestDatabase};

const SHOP_KEY: &str = "wk_shop";
const APP_KEY: &str = "wk_app";
const SHOP: &str = "http://shop.test:3000";

fn config(sink: &MockServer, extra: &str) -> String {
    format!(
        r#"
[[sources]]
name = "shop"
write_key = "{SHOP_KEY}"
allowed_origins = ["{SHOP}"]

[[sources]]
name = "app"
write_key = "{APP_KEY}"

[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
{extra}
"#,
        sink.url("/in")
    )
}

fn basic(key: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    format!("Basic {encoded}")
}

async fn post(
    base: &str,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("switchyard answers");
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn by_message_id(sink: &MockServer, id: &str) -> Option<Value> {
    sink.events().into_iter().find(|e| e["messageId"] == id)
}

#[tokio::test]
async fn the_sdk_paths_and_bodies_reach_the_webhook_without_the_write_key() {
    let db = TestDatabase::create("sdk_paths").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink, ""), &db.url).await;
    let base = format!("http://{}", sy.addr);
    let text = [("content-type", "text/plain")];

    // analytics.js: one call per request, `writeKey` in the body and as Basic auth.
    let auth = basic(APP_KEY);
    let calls = [
        ("t", json!({"event": "Clicked", "anonymousId": "a1"})),
        ("i", json!({"traits": {"plan": "pro"}, "userId": "u1"})),
        ("p", json!({"name": "Home", "anonymousId": "a1"})),
        ("s", json!({"name": "Main", "anonymousId": "a1"})),
        ("g", json!({"groupId": "g1", "userId": "u1"})),
        ("a", json!({"previousId": "a1", "userId": "u1"})),
    ];
    for (path, mut body) in calls.clone() {
        body["writeKey"] = json!(APP_KEY);
        body["messageId"] = json!(format!("m-{path}"));
        let headers = [
            ("content-type", "text/plain"),
            ("authorization", auth.as_str()),
        ];
        let (status, answer) = post(
            &base,
            &format!("/v1/{path}"),
            body.to_string().into(),
            &headers,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "/v1/{path}: {answer}");
    }
    // analytics-kotlin: `/b`, gzip, `text/plain`, the key only in the body.
    let batch = json!({
        "batch": [{"type": "track", "event": "Opened", "userId": "u2", "messageId": "m-b", "writeKey": APP_KEY}],
        "sentAt": "2026-01-01T00:00:00.000Z",
        "writeKey": APP_KEY
    });
    let headers = [("content-type", "text/plain"), ("content-encoding", "gzip")];
    let (status, answer) = post(&base, "/v1/b", gzip(batch.to_string().as_bytes()), &headers).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // SDK telemetry: 200, stored nowhere.
    let metrics =
        json!({"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1}]});
    let (status, _) = post(&base, "/v1/m", metrics.to_string().into(), &text).await;
    assert_eq!(status, StatusCode::OK);

    let arrived = sink
        .wait_until(Duration::from_secs(20), |s| s.events().len() >= 7)
        .await;
    assert!(arrived, "{} of 7 events arrived", sink.events().len());
    for (path, _) in &calls {
        let event = by_message_id(&sink, &format!("m-{path}")).expect("delivered");
        assert!(event.get("writeKey").is_none(), "{event}");
        assert_eq!(event["context"]["ip"], "127.0.0.1", "{event}");
    }
    assert_eq!(by_message_id(&sink, "m-t").unwrap()["type"], "track");
    assert_eq!(by_message_id(&sink, "m-s").unwrap()["type"], "screen");
    assert_eq!(by_message_id(&sink, "m-a").unwrap()["type"], "alias");
    let opened = by_message_id(&sink, "m-b").unwrap();
    assert!(opened.get("writeKey").is_none(), "{opened}");
    assert_eq!(opened["sentAt"], "2026-01-01T00:00:00.000Z");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.events().len(), 7, "telemetry is not an event");
    let stored = db.scalar("SELECT count(*)::text FROM events").await;
    assert_eq!(stored.as_deref(), Some("7"));

    // Unknown one-letter paths stay unknown.
    let (status, answer) = post(&base, "/v1/x", b"{}".to_vec(), &text).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(answer["code"], "not_found");
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_settings_name_this_server_or_the_public_url() {
    let db = TestDatabase::create("sdk_settings").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink, ""), &db.url).await;
    let http = reqwest::Client::new();

    let url = format!("http://{}/v1/projects/{APP_KEY}/settings", sy.addr);
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let settings: Value = response.json().await.unwrap();
    let segment = &settings["integrations"]["Segment.io"];
    assert_eq!(segment["apiKey"], APP_KEY);
    assert_eq!(segment["apiHost"], format!("{}/v1", sy.addr));
    assert_eq!(segment["protocol"], "http");

    let unknown = format!("http://{}/v1/projects/wk_nobody/settings", sy.addr);
    let response = http.get(&unknown).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    sy.shutdown().await.unwrap();

    let db = TestDatabase::create("sdk_settings_public").await;
    let public = "[server]\npublic_url = \"https://events.example.com/\"\n";
    let sy = start_switchyard(&config(&sink, public), &db.url).await;
    let url = format!("http://{}/v1/projects/{APP_KEY}/settings", sy.addr);
    let settings: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let segment = &settings["integrations"]["Segment.io"];
    assert_eq!(segment["apiHost"], "events.example.com/v1");
    assert_eq!(segment["protocol"], "https");
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn cors_follows_each_sources_allowed_origins() {
    let db = TestDatabase::create("sdk_cors").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink, ""), &db.url).await;
    let base = format!("http://{}", sy.addr);
    let http = reqwest::Client::new();
    let preflight = |origin: &str| {
        http.request(reqwest::Method::OPTIONS, format!("{base}/v1/t"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };

    let allowed = preflight(SHOP).await.unwrap();
    assert_eq!(allowed.status(), StatusCode::NO_CONTENT);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header(&allowed, "access-control-allow-origin").as_deref(),
        Some(SHOP)
    );
    assert_eq!(
        header(&allowed, "access-control-allow-headers").as_deref(),
        Some("authorization,content-type")
    );
    let refused = preflight("http://evil.test").await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(header(&refused, "access-control-allow-origin").is_none());

    let track = |key: &str, id: &str| {
        json!({"event": "E", "userId": "u", "messageId": id, "writeKey": key}).to_string()
    };
    let shop_auth = basic(SHOP_KEY);
    let from_shop = [("origin", SHOP), ("authorization", shop_auth.as_str())];
    let (status, answer) = post(&base, "/v1/t", track(SHOP_KEY, "c-shop").into(), &from_shop).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The shop's origin may not use the app's key, which allows no browser at all.
    let app_from_shop = [("origin", SHOP)];
    let (status, answer) = post(
        &base,
        "/v1/t",
        track(APP_KEY, "c-app").into(),
        &app_from_shop,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(answer["code"], "origin_not_allowed");
    let evil = [("origin", "http://evil.test")];
    let (status, answer) = post(&base, "/v1/t", track(SHOP_KEY, "c-evil").into(), &evil).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let settings = http
        .get(format!("{base}/v1/projects/{APP_KEY}/settings"))
        .header("origin", SHOP)
        .send()
        .await
        .unwrap();
    assert_eq!(settings.status(), StatusCode::FORBIDDEN);
    // Servers send no Origin: the app's key works from them.
    let (status, _) = post(&base, "/v1/t", track(APP_KEY, "c-server").into(), &[]).await;
    assert_eq!(status, StatusCode::OK);

    sink.wait_until(Duration::from_secs(20), |s| s.events().len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids = sink.message_ids();
    ids.sort();
    assert_eq!(ids, ["c-server", "c-shop"]);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let sink = MockServer::start().await;
    let send = |base: String, id: &'static str, context: Value| async move {
        let body = json!({"event": "E", "userId": "u", "messageId": id, "context": context});
        let headers = [
            ("authorization", basic(APP_KEY)),
            ("x-forwarded-for", "203.0.113.7, 127.0.0.1".to_owned()),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (status, answer) = post(&base, "/v1/track", body.to_string().into(), &headers).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    };

    let db = TestDatabase::create("sdk_ip_direct").await;
    let sy = start_switchyard(&config(&sink, ""), &db.url).await;
    send(format!("http://{}", sy.addr), "ip-direct", json!({})).await;
    sink.wait_until(Duration::from_secs(20), |s| !s.events().is_empty())
        .await;
    sy.shutdown().await.unwrap();

    let db = TestDatabase::create("sdk_ip_proxied").await;
    let proxied = "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";
    let sy = start_switchyard(&config(&sink, proxied), &db.url).await;
    send(format!("http://{}", sy.addr), "ip-proxied", json!({})).await;
    send(
        format!("http://{}", sy.addr),
        "ip-own",
        json!({"ip": "198.51.100.4"}),
    )
    .await;

    let arrived = sink
        .wait_until(Duration::from_secs(20), |s| s.events().len() >= 3)
        .await;
    assert!(arrived);
    let ip = |id| by_message_id(&sink, id).unwrap()["context"]["ip"].clone();
    assert_eq!(
        ip("ip-direct"),
        "127.0.0.1",
        "an untrusted X-Forwarded-For is ignored"
    );
    assert_eq!(ip("ip-proxied"), "203.0.113.7");
    assert_eq!(
        ip("ip-own"),
        "198.51.100.4",
        "the SDK's own context.ip stays"
    );
    sy.shutdown().await.unwrap();
}
