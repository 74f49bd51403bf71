//! Defects found by trying Switchyard from outside (issue #11), each with its guard: huge
//! `Retry-After` values, made-up methods as metric labels, gzip amplification, SSRF gaps,
//! secrets in errors and labels, and GA4's partial deliveries.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard::testkit::{self, start_switchyard, MockServer, Reply, TestDatabase, ADMIN_TOKEN};

const KEY: &str = "wk_hostile";

fn source() -> String {
    format!("[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n")
}

/// [`source`] and a webhook `hook` to a port nothing listens on, with `extra` lines.
fn with_hook(extra: &str) -> String {
    format!(
        "{}\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/in\"\n{extra}",
        source()
    )
}

async fn send_batch(addr: std::net::SocketAddr, events: &[Value]) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/batch"))
        .basic_auth(KEY, Some(""))
        .json(&json!({ "batch": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

fn track(id: &str, user: &str) -> Value {
    json!({"type": "track", "event": "Order Completed", "userId": user, "messageId": id})
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Value {
    testkit::admin(&format!("http://{addr}"), reqwest::Method::GET, path, None)
        .await
        .1
}

/// Item 3: a 429 asking for a pause of centuries (or past `u64`/`Instant` range) pauses the key
/// for at most `retry.max_backoff`, and nothing panics.
#[tokio::test]
async fn a_huge_retry_after_pauses_a_key_for_at_most_max_backoff() {
    let db = TestDatabase::create("retry_after").await;
    let sink = MockServer::scripted(|n, _| match n {
        1 => Reply::status(429).with_header("Retry-After", "99999999999"),
        2 => Reply::status(429).with_header("Retry-After", "9300000000000000000"),
        3 => Reply::status(503).with_header("Retry-After", "-1"),
        4 => Reply::status(429).with_header("Retry-After", "Tue, 01 Jan 1980 00:00:00 GMT"),
        _ => Reply::ok(),
    })
    .await;
    let config = format!(
        r#"{}
[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
max_in_flight = 1
retry.initial_backoff = "100ms"
retry.max_backoff = "2s"
"#,
        source(),
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let events: Vec<Value> = (0..40).map(|i| track(&format!("ra-{i}"), "u1")).collect();
    let started = Instant::now();
    send_batch(sy.addr, &events).await;
    let all = sink
        .wait_until(Duration::from_secs(15), |sink| {
            let mut ids = sink.message_ids();
            ids.sort();
            ids.dedup();
            ids.len() == 40
        })
        .await;
    assert!(
        all,
        "only {} of 40 delivered after {:?}",
        sink.message_ids().len(),
        started.elapsed()
    );
    sy.shutdown().await.unwrap();
}

/// Item 4: methods a client makes up, and paths that match no route, add no metric series.
#[tokio::test]
async fn made_up_methods_and_paths_add_no_metric_series() {
    let db = TestDatabase::create("labels").await;
    let config = with_hook("enabled = false\n");
    let sy = start_switchyard(&config, &db.url).await;
    let client = reqwest::Client::new();
    for i in 0..60 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let path = if i % 2 == 0 {
            "/v1/track".to_owned()
        } else {
            format!("/random/path-{i}")
        };
        let response = client
            .request(method, format!("http://{}{path}", sy.addr))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    let metrics = client
        .get(format!("http://{}/metrics", sy.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("MADEUP"), "{metrics}");
    assert!(!metrics.contains("/random/path"), "{metrics}");
    let closed = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "other",
    ];
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_http_requests_total{"))
    {
        let method = line
            .split("method=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        assert!(closed.contains(&method), "{line}");
        let route = line
            .split("route=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        assert!(
            route == "unmatched" || route.starts_with('/') && !route.contains("path-"),
            "{line}"
        );
    }
    sy.shutdown().await.unwrap();
}

/// Item 16: a config error quoting a URL shows no credentials, query or path (in the reload
/// API's answer), and metric labels carry no webhook path.
#[tokio::test]
async fn urls_in_config_errors_and_metric_labels_are_masked() {
    let db = TestDatabase::create("masked").await;
    let first = MockServer::start().await;
    let second = MockServer::start().await;
    let good = format!(
        r#"{}
[[destinations]]
name = "hooks"
kind = "webhook"
urls = ["{}", "{}"]
"#,
        source(),
        first.url("/hook/T0K3N-one?sig=qs3cret"),
        second.url("/hook/T0K3N-two"),
    );
    let dir = std::env::temp_dir().join(format!("sy-masked-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, &good).unwrap();
    let sy = switchyard::testkit::start_switchyard_from(&path, &db.url).await;
    let events: Vec<Value> = (0..6).map(|i| track(&format!("mask-{i}"), "u")).collect();
    send_batch(sy.addr, &events).await;
    let both = |_: &MockServer| first.received().len() + second.received().len() >= 6;
    assert!(first.wait_until(Duration::from_secs(10), both).await);
    let metrics = reqwest::get(format!("http://{}/metrics", sy.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchyard_endpoint_requests_total{"),
        "{metrics}"
    );
    for secret in ["T0K3N", "qs3cret", "/hook"] {
        assert!(!metrics.contains(secret), "{secret} in {metrics}");
    }

    let bad = format!(
        r#"{}
[[destinations]]
name = "hooks"
kind = "webhook"
url = "ftp://user:pa55word@hooks.example/services/T0K3N?key=qs3cret"

[[destinations]]
name = "twice"
kind = "webhook"
urls = ["https://hooks.example/a/T0K3N", "https://hooks.example/a/T0K3N"]

[[destinations]]
name = "slack"
kind = "slack"
webhook_url = "hooks.slack.com/services/T0K3N"
"#,
        source()
    );
    std::fs::write(&path, bad).unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}/admin/v1/reload", sy.addr))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains("hooks.example"),
        "still says which: {message}"
    );
    for secret in ["T0K3N", "qs3cret", "pa55word"] {
        assert!(!message.contains(secret), "{secret} in {message}");
    }
    sy.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 15: the `postgres` destination is under the address policy too.
#[tokio::test]
async fn the_postgres_destination_obeys_deny_private_networks() {
    let db = TestDatabase::create("pg_egress").await;
    let by_name = db.url.replacen("127.0.0.1", "localhost", 1);
    let config = format!(
        r#"
[security]
deny_private_networks = true

{}
[[destinations]]
name = "literal"
kind = "postgres"
url = "{}"
table = "warehouse_literal"

[[destinations]]
name = "named"
kind = "postgres"
url = "{by_name}"
table = "warehouse_named"
"#,
        source(),
        db.url
    );
    let sy = start_switchyard(&config, &db.url).await;
    send_batch(sy.addr, &[track("pg-1", "u")]).await;
    let mut items = Vec::new();
    for _ in 0..100 {
        let body = admin_get(sy.addr, "/admin/v1/dead-letters").await;
        items = body["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(items.len(), 2, "both refused: {items:?}");
    for item in &items {
        let reason = item["last_error"].as_str().unwrap();
        assert!(reason.contains("refused to connect to"), "{reason}");
        assert!(reason.contains("loopback"), "{reason}");
    }
    for table in ["warehouse_literal", "warehouse_named"] {
        let exists = db
            .scalar(&format!("SELECT to_regclass('{table}')::text"))
            .await;
        assert_eq!(exists, None, "{table} was never created");
    }
    sy.shutdown().await.unwrap();
}

/// Item 18: GA4 sends one request per user; one user's hanging request neither pushes the
/// batch past its deadline nor costs the others their delivery (they are not sent again).
#[tokio::test]
async fn ga4_keeps_what_was_delivered_when_one_user_hangs() {
    let db = TestDatabase::create("ga4_hang").await;
    let mock = MockServer::scripted(|_, request| {
        let client = request.json()["client_id"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if client == "hangs" {
            Reply::Hang
        } else {
            Reply::status(204).after(Duration::from_millis(1500))
        }
    })
    .await;
    let config = format!(
        r#"{}
[[destinations]]
name = "ga"
kind = "ga4"
measurement_id = "G-ABC123XYZ"
api_secret = "s"
endpoint = "{}"
timeout = "2s"
retry.initial_backoff = "100ms"
retry.max_backoff = "200ms"
"#,
        source(),
        mock.url("")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let users = ["u1", "u2", "u3", "u4", "hangs"];
    let events: Vec<Value> = users
        .iter()
        .map(|user| track(&format!("ga-{user}"), user))
        .collect();
    send_batch(sy.addr, &events).await;
    let retried = |mock: &MockServer| {
        mock.received()
            .iter()
            .filter(|r| r.json()["client_id"] == "hangs")
            .count()
            >= 3
    };
    assert!(mock.wait_until(Duration::from_secs(30), retried).await);
    for user in &users[..4] {
        let sent = mock
            .received()
            .iter()
            .filter(|r| r.json()["client_id"] == *user)
            .count();
        assert_eq!(sent, 1, "{user} was delivered once and not sent again");
    }
    sy.shutdown().await.unwrap();
}

/// `VmRSS` or `VmHWM` of a process, in MB.
fn memory_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    kb / 1024.0
}

/// Item 5: small gzip bodies whose batch-level `context` would be copied into 2,500 messages,
/// sent eight at a time without a valid key, do not grow the server: the key is checked before
/// any message is expanded, and the copies count against the size limits.
#[tokio::test]
async fn gzip_amplification_is_bounded() {
    use std::io::Write;
    let db = TestDatabase::create("amplify").await;
    let config = with_hook("enabled = false\n");
    let sy =
        switchyard::testkit::Process::spawn(env!("CARGO_BIN_EXE_switchyard"), &config, &db.url)
            .await;
    let message = json!({"type": "track", "event": "E", "userId": "u"});
    let body = |write_key: Option<&str>| {
        let mut batch = json!({
            "batch": vec![message.clone(); 2500],
            "context": {"padding": "x".repeat(8 * 1024)},
        });
        if let Some(key) = write_key {
            batch["writeKey"] = json!(key);
        }
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(batch.to_string().as_bytes()).unwrap();
        gzip.finish().unwrap()
    };
    let bodies = [body(Some("wk_not_a_key")), body(None)];
    assert!(bodies[0].len() < 8 * 1024, "{} bytes", bodies[0].len());
    let client = reqwest::Client::new();
    let before = memory_mb(sy.pid(), "VmRSS");
    for round in 0..4 {
        let requests = (0..8).map(|i| {
            client
                .post(format!("{}/v1/batch", sy.base()))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(bodies[(i + round) % 2].clone())
                .send()
        });
        for response in futures::future::join_all(requests).await {
            let response = response.unwrap();
            assert_eq!(response.status(), 401);
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["code"], "unauthorized", "{answer}");
        }
    }
    let peak = memory_mb(sy.pid(), "VmHWM");
    assert!(
        peak - before < 40.0,
        "the server grew from {before:.1} MB to a peak of {peak:.1} MB"
    );
    let valid = client
        .post(format!("{}/v1/batch", sy.base()))
        .basic_auth(KEY, Some(""))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(bodies[1].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(valid.status(), 413, "a valid key does not make it fit");
}

/// An admin body past the 2 MB limit was answered by the framework, in plain text
/// ("Failed to buffer the request body: length limit exceeded"): every admin endpoint that
/// reads a body answers in JSON, like every other error.
#[tokio::test]
async fn an_oversized_admin_body_gets_a_json_error() {
    let db = TestDatabase::create("admin_body").await;
    let config = with_hook("");
    let sy = start_switchyard(&config, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let ids: Vec<u64> = (0..400_000).collect();
    let huge = json!({"destination": "hook", "ids": ids, "event": {"ids": ids}});
    for path in [
        "/admin/v1/dead-letters/replay",
        "/admin/v1/replays",
        "/admin/v1/destinations/hook/test",
    ] {
        let (status, answer) =
            testkit::admin(&base, reqwest::Method::POST, path, Some(huge.clone())).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (413, Some("too_large")),
            "{path}: {answer}"
        );
    }
    sy.shutdown().await.unwrap();
}

/// An unknown name of a megabyte (destination, source, event type) was sent back whole in the
/// error message: it is echoed by its start.
#[tokio::test]
async fn an_unknown_name_of_a_megabyte_is_not_echoed_back_whole() {
    let db = TestDatabase::create("long_names").await;
    let config = with_hook("");
    let sy = start_switchyard(&config, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let long = "x".repeat(1_000_000);
    let (from, to) = ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z");
    for (path, body) in [
        (
            "/admin/v1/replays",
            json!({"destination": long, "from": from, "to": to}),
        ),
        (
            "/admin/v1/replays",
            json!({"destination": "hook", "from": from, "to": to, "sources": [long]}),
        ),
        (
            "/admin/v1/dead-letters/replay",
            json!({"destination": long}),
        ),
        (
            "/admin/v1/destinations/hook/test",
            json!({"event": {"type": long}}),
        ),
    ] {
        let (status, answer) = testkit::admin(&base, reqwest::Method::POST, path, Some(body)).await;
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            matches!(status, 400 | 404) && message.contains("xxx…") && message.len() < 500,
            "{path}: {status}, a message of {} bytes: {}",
            message.len(),
            &message[..message.len().min(200)]
        );
    }
    sy.shutdown().await.unwrap();
}

/// A method a route does not have was answered with an empty body: it gets a JSON error like
/// any other bad request, and still the `Allow` header.
#[tokio::test]
async fn a_method_a_route_lacks_gets_a_json_error_and_allow() {
    let db = TestDatabase::create("method_405").await;
    let sy = start_switchyard(&source(), &db.url).await;
    let client = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/v1/track"),
        (reqwest::Method::DELETE, "/v1/batch"),
        (reqwest::Method::PUT, "/admin/v1/replays"),
        (reqwest::Method::POST, "/healthz"),
    ] {
        let response = client
            .request(method.clone(), format!("http://{}{path}", sy.addr))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        let allow = response.headers().get("allow").cloned();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            answer["code"], "method_not_allowed",
            "{method} {path}: {answer}"
        );
        assert!(allow.is_some_and(|a| !a.is_empty()), "{method} {path}");
    }
    sy.shutdown().await.unwrap();
}
