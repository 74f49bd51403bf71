//! `/metrics`: the contract's metric names are present and move with the traffic.

use std::time::Duration;

use serde_json::json;
use switchyard::testkit::{send_batch, start_switchyard, MockServer, Reply, TestDatabase};

const KEY: &str = "wk_metrics";

/// The value of the first sample whose line starts with `name{` and holds every label.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn the_contract_metrics_exist_and_move() {
    let db = TestDatabase::create("metrics").await;
    let ok = MockServer::start().await;
    let flaky = MockServer::scripted(|n, _| {
        if n == 1 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let broken = MockServer::scripted(|_, _| Reply::status(400)).await;
    let config = format!(
        r#"
[[sources]]
name = "metrics-web"
write_key = "{KEY}"

[[destinations]]
name = "m-ok"
kind = "webhook"
url = "{}"
rate_limit = "5/s"

[[destinations]]
name = "m-flaky"
kind = "webhook"
url = "{}"
retry.initial_backoff = "100ms"

[[destinations]]
name = "m-broken"
kind = "webhook"
url = "{}"
"#,
        ok.url("/in"),
        flaky.url("/in"),
        broken.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let client = reqwest::Client::new();
    let batch: Vec<_> = (0..12)
        .map(|i| json!({"type": "track", "event": "E", "userId": "u", "messageId": format!("met-{i}")}))
        .chain([json!({"type": "track", "userId": "u"})])
        .collect();
    let (status, _) = send_batch(&format!("http://{}", sy.addr), KEY, &batch).await;
    assert_eq!(status, 200);
    assert!(
        ok.wait_until(Duration::from_secs(10), |s| s.events().len() == 12)
            .await
    );
    assert!(
        flaky
            .wait_until(Duration::from_secs(10), |s| s.events().len() == 12)
            .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = client
        .get(format!("http://{}/metrics", sy.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str, labels: &[&str]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
    };
    assert_eq!(
        value(
            "switchyard_ingested_events_total",
            &["source=\"metrics-web\""]
        ),
        12.0
    );
    assert_eq!(
        value(
            "switchyard_rejected_events_total",
            &["source=\"metrics-web\"", "code=\"invalid_message\""]
        ),
        1.0
    );
    assert_eq!(
        value(
            "switchyard_deliveries_total",
            &["destination=\"m-ok\"", "outcome=\"delivered\""]
        ),
        12.0
    );
    assert!(
        value(
            "switchyard_deliveries_total",
            &["destination=\"m-flaky\"", "outcome=\"retried\""]
        ) >= 1.0
    );
    assert_eq!(
        value(
            "switchyard_deliveries_total",
            &["destination=\"m-broken\"", "outcome=\"dead\""]
        ),
        12.0
    );
    assert_eq!(
        value(
            "switchyard_delivery_latency_seconds_count",
            &["destination=\"m-ok\""]
        ),
        12.0
    );
    assert!(
        value("switchyard_rate_limited_total", &["destination=\"m-ok\""]) >= 1.0,
        "12 events at 5/s wait"
    );
    assert_eq!(
        value("switchyard_queue_depth", &["destination=\"m-ok\""]),
        0.0
    );
    assert!(
        value(
            "switchyard_http_requests_total",
            &["route=\"/v1/batch\"", "status=\"200\""]
        ) >= 1.0
    );
    assert!(
        value(
            "switchyard_http_request_duration_seconds_count",
            &["route=\"/v1/batch\""]
        ) >= 1.0
    );
    // The pool's connections as Postgres sees them: the gauges must add up to a real count, at
    // least one (the service is running) and at most the pool's size.
    let idle = value("switchyard_db_pool_connections", &["state=\"idle\""]);
    let used = value("switchyard_db_pool_connections", &["state=\"used\""]);
    let seen: i64 = db
        .scalar("SELECT count(*)::text FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        .await
        .and_then(|n| n.parse().ok())
        .expect("pg_stat_activity answers");
    assert!(
        idle >= 0.0 && used >= 0.0 && idle + used >= 1.0 && idle + used <= 32.0,
        "db pool gauges: idle {idle}, used {used}"
    );
    assert!(
        (idle + used) as i64 <= seen,
        "the pool reports {} connections, Postgres sees {seen}",
        idle + used
    );
    sy.shutdown().await.unwrap();
}
