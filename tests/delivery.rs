//! Webhook delivery against a real receiver: signing, batching, retries, dead letters, replay.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use switchyard::testkit::{
    admin_ok, send_batch, start_switchyard, MockServer, Reply, TestDatabase,
};

const KEY: &str = "wk_delivery";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn config(destination: &str) -> String {
    format!(
        r#"
[[sources]]
name = "web"
write_key = "{KEY}"

[[destinations]]
name = "hook"
kind = "webhook"
{destination}
"#
    )
}

async fn send(addr: std::net::SocketAddr, events: &[Value]) {
    let (status, answer) = send_batch(&format!("http://{addr}"), KEY, events).await;
    assert_eq!(status, 200, "{answer}");
}

fn track(id: &str) -> Value {
    json!({"type": "track", "event": "Order Completed", "userId": "u1", "messageId": id,
           "properties": {"revenue": 12.5}})
}

async fn admin(
    addr: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    admin_ok(&format!("http://{addr}"), method, path, body).await
}

/// Verifies a request the way a Standard Webhooks receiver does.
fn verify_standard_webhook(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
    signatures: &str,
) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

#[tokio::test]
async fn signed_webhooks_verify_with_the_standard_webhooks_algorithm() {
    let db = TestDatabase::create("signing").await;
    let sink = MockServer::start().await;
    let destination = format!(
        "url = \"{}\"\nsecret = \"{SECRET}\"\nheaders = {{ \"x-team\" = \"growth\" }}",
        sink.url("/hooks")
    );
    let sy = start_switchyard(&config(&destination), &db.url).await;
    send(sy.addr, &[track("sig-1")]).await;
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| !s.events().is_empty())
            .await
    );
    let request = sink.received().remove(0);
    assert_eq!(request.path, "/hooks");
    assert_eq!(
        request.header("webhook-id"),
        Some("sig-1"),
        "webhook-id is the messageId"
    );
    assert_eq!(request.header("x-team"), Some("growth"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let timestamp = request.header("webhook-timestamp").unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.abs_diff(timestamp.parse().unwrap()) < 60,
        "timestamp is current"
    );
    let signature = request.header("webhook-signature").unwrap();
    assert!(
        verify_standard_webhook(SECRET, "sig-1", timestamp, &request.body, signature),
        "signature {signature} does not verify"
    );
    assert!(!verify_standard_webhook(
        SECRET,
        "sig-2",
        timestamp,
        &request.body,
        signature
    ));
    let body = request.json();
    assert_eq!(
        body["messageId"], "sig-1",
        "batch_size 1 sends the event itself"
    );
    assert_eq!(body["properties"]["revenue"], 12.5);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn batch_size_wraps_events_in_a_batch() {
    let db = TestDatabase::create("batching").await;
    let sink = MockServer::start().await;
    let destination = format!("url = \"{}\"\nbatch_size = 10", sink.url("/in"));
    let sy = start_switchyard(&config(&destination), &db.url).await;
    let events: Vec<Value> = (0..25).map(|i| track(&format!("b-{i}"))).collect();
    send(sy.addr, &events).await;
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| s.events().len() == 25)
            .await
    );
    for request in sink.received() {
        let batch = request.json()["batch"].as_array().cloned().unwrap();
        assert!(
            !batch.is_empty() && batch.len() <= 10,
            "{} events",
            batch.len()
        );
    }
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn retryable_answers_are_retried_until_delivered() {
    let db = TestDatabase::create("retry").await;
    // 500, 503, timeout (hang), connection-level 429 with Retry-After, then 200.
    let sink = MockServer::scripted(|n, _| match n {
        1 => Reply::status(500),
        2 => Reply::status(503),
        3 => Reply::Hang,
        4 => Reply::status(429).with_header("retry-after", "2"),
        _ => Reply::ok(),
    })
    .await;
    // Retry-After is honored up to retry.max_backoff, so the cap is above the 2 s asked for.
    let destination = format!(
        "url = \"{}\"\ntimeout = \"500ms\"\nretry.initial_backoff = \"50ms\"\nretry.max_backoff = \"5s\"",
        sink.url("/in")
    );
    let sy = start_switchyard(&config(&destination), &db.url).await;
    send(sy.addr, &[track("r-1")]).await;
    assert!(
        sink.wait_until(Duration::from_secs(30), |s| s.message_ids() == ["r-1"])
            .await,
        "received: {:?}",
        sink.received().iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let attempts = sink.received();
    assert_eq!(attempts.len(), 5);
    let waited = attempts[4].at - attempts[3].at;
    assert!(
        waited >= Duration::from_millis(1900),
        "Retry-After: 2 was honored ({waited:?})"
    );
    let dead = admin(
        sy.addr,
        reqwest::Method::GET,
        "/admin/v1/dead-letters",
        None,
    )
    .await;
    assert_eq!(dead["items"], json!([]));
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn permanent_failures_are_dead_lettered_and_replayed() {
    let db = TestDatabase::create("dead").await;
    let sink =
        MockServer::scripted(|_, _| Reply::status(422).with_body(r#"{"error":"bad shape"}"#)).await;
    let destination = format!("url = \"{}\"", sink.url("/in"));
    let sy = start_switchyard(&config(&destination), &db.url).await;
    send(sy.addr, &[track("d-1"), track("d-2")]).await;

    let mut items = Value::Null;
    for _ in 0..100 {
        let dead = admin(
            sy.addr,
            reqwest::Method::GET,
            "/admin/v1/dead-letters?destination=hook",
            None,
        )
        .await;
        items = dead["items"].clone();
        if items.as_array().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(sink.received().len(), 2, "a 4xx is not retried");
    let first = &items[0];
    assert_eq!(first["destination"], "hook");
    assert_eq!(first["last_status"], 422);
    assert_eq!(first["attempts"], 1);
    assert!(
        first["last_error"].as_str().unwrap().contains("bad shape"),
        "{first}"
    );
    assert_eq!(first["event"]["event"], "Order Completed");

    // The receiver is fixed; replay one by id, then the rest.
    sink.script(|_, _| Reply::ok());
    let one = first["id"].clone();
    let replayed = admin(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/dead-letters/replay",
        Some(json!({"destination": "hook", "ids": [one]})),
    )
    .await;
    assert_eq!(replayed["requeued"], 1);
    let replayed = admin(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/dead-letters/replay",
        Some(json!({"destination": "hook"})),
    )
    .await;
    assert_eq!(replayed["requeued"], 1);
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| s.message_ids().len() == 2)
            .await
    );
    let dead = admin(
        sy.addr,
        reqwest::Method::GET,
        "/admin/v1/dead-letters",
        None,
    )
    .await;
    assert_eq!(dead["items"], json!([]));
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_exhausted_retry_budget_ends_in_a_dead_letter() {
    let db = TestDatabase::create("budget").await;
    let sink = MockServer::scripted(|_, _| Reply::status(502)).await;
    let destination = format!(
        "url = \"{}\"\nretry.max_attempts = 3\nretry.initial_backoff = \"50ms\"",
        sink.url("/in")
    );
    let sy = start_switchyard(&config(&destination), &db.url).await;
    send(sy.addr, &[track("x-1")]).await;
    let mut items = json!([]);
    for _ in 0..100 {
        items = admin(
            sy.addr,
            reqwest::Method::GET,
            "/admin/v1/dead-letters",
            None,
        )
        .await["items"]
            .clone();
        if !items.as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(items[0]["attempts"], 3, "{items}");
    assert_eq!(items[0]["last_status"], 502);
    assert!(items[0]["last_error"]
        .as_str()
        .unwrap()
        .starts_with("gave up after 3 attempts"));
    assert_eq!(sink.received().len(), 3);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_calls_need_the_token() {
    let db = TestDatabase::create("admin").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&format!("url = \"{}\"", sink.url("/"))), &db.url).await;
    let client = reqwest::Client::new();
    for path in ["/admin/v1/destinations", "/admin/v1/dead-letters"] {
        let url = format!("http://{}{path}", sy.addr);
        let anonymous = client.get(&url).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
        let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    let destinations = admin(
        sy.addr,
        reqwest::Method::GET,
        "/admin/v1/destinations",
        None,
    )
    .await;
    assert_eq!(destinations[0]["name"], "hook");
    assert_eq!(destinations[0]["kind"], "webhook");
    sy.shutdown().await.unwrap();
}
