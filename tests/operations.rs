//! Operating Switchyard: the live debugger, the OpenAPI document, the dashboard page, the demo,
//! and the deployment files, each checked the way an operator would meet it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection as _;
use switchyard::cli::serve::Role;
use switchyard::testkit::{self, start_switchyard, MockServer, Reply, TestDatabase, ADMIN_TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB_KEY: &str = "wk_ops_web";
const APP_KEY: &str = "wk_ops_app";

fn config(sink: &MockServer) -> String {
    format!(
        r#"
[[sources]]
name = "web"
write_key = "{WEB_KEY}"

[[sources]]
name = "app"
write_key = "{APP_KEY}"

[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
"#,
        sink.url("/in")
    )
}

async fn track(addr: SocketAddr, key: &str, message_id: &str) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/track"))
        .basic_auth(key, Some(""))
        .json(&json!({"userId": "u1", "event": "Signed Up", "messageId": message_id}))
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(response.status(), 200);
}

async fn subscribe(addr: SocketAddr, query: &str) -> reqwest::Response {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/admin/v1/live{query}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the live stream answers");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "server-sent events"
    );
    response
}

/// The `event: message` payloads of a stream, read until `done` holds or `limit` passes.
async fn read_messages(
    response: &mut reqwest::Response,
    limit: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut text = String::new();
    let mut messages = Vec::new();
    while !done(&messages) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
        messages = text
            .split("\n\n")
            .filter(|frame| frame.lines().any(|l| l == "event: message"))
            .filter_map(|frame| {
                let data = frame.lines().find_map(|l| l.strip_prefix("data: "))?;
                serde_json::from_str(data).ok()
            })
            .collect();
    }
    messages
}

#[tokio::test]
async fn the_live_stream_shows_accepted_events_of_the_chosen_source() {
    let db = TestDatabase::create("live").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;

    let anonymous = reqwest::get(format!("http://{}/admin/v1/live", sy.addr))
        .await
        .expect("answers");
    assert_eq!(
        anonymous.status(),
        401,
        "the debugger needs the admin token"
    );

    let mut web = subscribe(sy.addr, "?source=web").await;
    track(sy.addr, APP_KEY, "live-app-1").await;
    track(sy.addr, WEB_KEY, "live-web-1").await;
    let messages = read_messages(&mut web, Duration::from_secs(10), |m| {
        m.iter().any(|m| m["message"]["messageId"] == "live-web-1")
    })
    .await;
    let seen: Vec<&Value> = messages
        .iter()
        .map(|m| &m["message"]["messageId"])
        .collect();
    assert!(
        seen.contains(&&json!("live-web-1")),
        "the web event streamed: {messages:?}"
    );
    assert!(
        !seen.contains(&&json!("live-app-1")),
        "the app event is filtered out: {messages:?}"
    );
    let event = messages
        .iter()
        .find(|m| m["message"]["messageId"] == "live-web-1")
        .expect("the web event");
    assert_eq!(event["source"], "web");
    assert_eq!(event["message"]["event"], "Signed Up");
    assert!(
        event["message"]["receivedAt"].is_string(),
        "the message as stored, enriched"
    );
    assert!(event["received_at"].is_string());
    drop(web);
    sy.shutdown()
        .await
        .expect("a clean shutdown with no viewer");
}

#[tokio::test]
async fn an_open_stream_does_not_hold_up_shutdown() {
    let db = TestDatabase::create("live_shutdown").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let mut viewer = subscribe(sy.addr, "").await;
    let started = Instant::now();
    sy.shutdown().await.expect("a clean shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with a viewer connected",
        started.elapsed()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = viewer.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ends at shutdown");
}

#[tokio::test]
async fn a_viewer_that_never_reads_does_not_slow_ingest() {
    let db = TestDatabase::create("live_slow").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    // Subscribed over a socket with a small receive buffer, and not read from: the buffers fill
    // and the feed drops messages for this viewer instead of waiting for it. 3,000 messages of
    // 8 kB (24 MB) are far more than the socket buffers and the 1,024-message feed can hold.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(sy.addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "GET /admin/v1/live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the viewer is subscribed");

    let padding = "x".repeat(8000);
    let client = reqwest::Client::new();
    let started = Instant::now();
    for request in 0..60 {
        let batch: Vec<Value> = (0..50)
            .map(|i| {
                json!({"type": "track", "userId": "u1", "event": "Bulk",
                       "messageId": format!("slow-{request}-{i}"),
                       "properties": {"padding": padding}})
            })
            .collect();
        let response = client
            .post(format!("http://{}/v1/batch", sy.addr))
            .basic_auth(WEB_KEY, Some(""))
            .json(&json!({ "batch": batch }))
            .send()
            .await
            .expect("ingest answers");
        assert_eq!(response.status(), 200);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "3,000 events took {took:?} with a stalled viewer"
    );
    assert!(
        sink.wait_until(Duration::from_secs(120), |s| s.events().len() == 3000)
            .await,
        "delivery went on too"
    );
    // Now read: somewhere in the stream, the viewer is told how much it missed.
    let skipped = tokio::time::timeout(Duration::from_secs(30), async {
        let mut seen: Vec<u8> = Vec::new();
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let n = stalled.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the stream ended without a lagged frame");
            seen.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&seen);
            if let Some(at) = text.find("event: lagged\ndata: ") {
                let rest = &text[at + "event: lagged\ndata: ".len()..];
                if let Some(end) = rest.find('\n') {
                    let data: Value = serde_json::from_str(&rest[..end]).unwrap();
                    return data["skipped"].as_u64().expect("skipped is a count");
                }
            }
            // Keep only a tail that may hold the start of the frame.
            if seen.len() > 64 * 1024 {
                seen.drain(..seen.len() - 1024);
            }
        }
    })
    .await
    .expect("a lagged frame within 30 s of reading");
    assert!(skipped > 0, "the lagged frame says what was skipped");
    println!("stalled viewer: {skipped} messages skipped");
    drop(stalled);
    sy.shutdown().await.expect("a clean shutdown");
}

#[tokio::test]
async fn openapi_json_describes_ingest_and_admin_as_openapi_3_1() {
    let db = TestDatabase::create("openapi").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let response = reqwest::get(format!("http://{}/openapi.json", sy.addr))
        .await
        .expect("answers");
    assert_eq!(response.status(), 200, "open, no token needed");
    assert!(response.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("application/json")));
    let document: Value = response.json().await.expect("JSON");
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    for path in [
        "/v1/track",
        "/v1/identify",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/alias",
        "/v1/batch",
        "/v1/import",
        "/admin/v1/destinations",
        "/admin/v1/dead-letters",
        "/admin/v1/dead-letters/replay",
        "/admin/v1/live",
        "/admin/v1/reload",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(document["paths"][path].is_object(), "{path} is documented");
    }
    sy.shutdown().await.expect("a clean shutdown");
}

#[tokio::test]
async fn the_dashboard_page_loads_without_the_token_and_its_data_does_not() {
    let db = TestDatabase::create("dashboard_page").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let client = reqwest::Client::new();

    let page = client
        .get(format!("http://{}/admin", sy.addr))
        .send()
        .await
        .expect("answers");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/html")));
    assert!(page
        .headers()
        .get("content-security-policy")
        .is_some_and(|v| v.to_str().is_ok_and(|v| v.contains("default-src 'none'"))));
    let html = page.text().await.expect("text");
    assert!(html.contains("<title>Switchyard</title>"));
    assert!(!html.contains(ADMIN_TOKEN), "the shell holds no secret");
    assert!(!html.contains("\"hook\""), "nor any data");

    for (path, kind) in [
        ("/admin/assets/dashboard.js", "text/javascript"),
        ("/admin/assets/dashboard.css", "text/css"),
    ] {
        let asset = client
            .get(format!("http://{}{path}", sy.addr))
            .send()
            .await
            .expect("answers");
        assert_eq!(asset.status(), 200, "{path}");
        assert!(asset.headers()["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with(kind)));
    }

    let data = client
        .get(format!("http://{}/admin/v1/destinations", sy.addr))
        .send()
        .await
        .expect("answers");
    assert_eq!(data.status(), 401, "the data still needs the token");
    sy.shutdown().await.expect("a clean shutdown");
}

#[tokio::test]
async fn the_demo_shows_what_each_destination_received_and_leaves_nothing_behind() {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("demo")
        .env(
            "DATABASE_URL",
            format!("{}/postgres", testkit::server_url()),
        )
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("a pid");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the demo finishes within a minute")
        .expect("its output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the demo exits 0:\n{stdout}\n{stderr}"
    );
    for expected in [
        "every-event",
        "signed-batches",
        "orders-only",
        "POST /v1/identify  200",
        "[track \"Order Completed\" demo-01]",
        "webhook-signature=v1,",
        "alias demo-06",
        "/admin",
        "/metrics",
    ] {
        assert!(
            stdout.contains(expected),
            "the demo prints `{expected}`:\n{stdout}"
        );
    }

    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", testkit::server_url()))
        .await
        .expect("the test Postgres answers");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(format!("switchyard_demo_{pid}"))
        .fetch_one(&mut admin)
        .await
        .expect("a count");
    assert_eq!(left, 0, "the demo database is dropped");
}

fn repository_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A compose `environment` as a map, whichever of its two forms the file uses.
fn environment(service: &serde_norway::Value) -> std::collections::HashMap<String, String> {
    match &service["environment"] {
        serde_norway::Value::Mapping(map) => map
            .iter()
            .filter_map(|(k, v)| {
                let value = match v {
                    serde_norway::Value::String(s) => s.clone(),
                    serde_norway::Value::Number(n) => n.to_string(),
                    serde_norway::Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                Some((k.as_str()?.to_owned(), value))
            })
            .collect(),
        serde_norway::Value::Sequence(items) => items
            .iter()
            .filter_map(|item| {
                let (k, v) = item.as_str()?.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
        _ => Default::default(),
    }
}

#[test]
fn docker_compose_runs_switchyard_after_a_healthy_postgres() {
    let compose: serde_norway::Value =
        serde_norway::from_str(&repository_file("docker-compose.yml")).expect("valid YAML");
    let services = &compose["services"];
    let postgres = &services["postgres"];
    let switchyard = &services["switchyard"];
    assert!(postgres.is_mapping(), "a `postgres` service");
    assert!(switchyard.is_mapping(), "a `switchyard` service");
    assert!(
        !postgres["healthcheck"]["test"].is_null(),
        "postgres has a health check"
    );
    assert_eq!(
        switchyard["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy"),
        "switchyard waits for a healthy postgres"
    );
    let ports: Vec<&str> = switchyard["ports"]
        .as_sequence()
        .map(|p| p.iter().filter_map(|p| p.as_str()).collect())
        .unwrap_or_default();
    assert!(
        ports.iter().any(|p| p.ends_with("8080:8080")),
        "port 8080 is published: {ports:?}"
    );

    let env = environment(switchyard);
    assert!(
        env.get("DATABASE_URL")
            .is_some_and(|url| url.starts_with("postgres://") && url.contains("@postgres:5432/")),
        "DATABASE_URL points at the postgres service: {env:?}"
    );
    assert_eq!(
        env.get("SWITCHYARD_LISTEN").map(String::as_str),
        Some("0.0.0.0:8080")
    );
    let token = env
        .get("SWITCHYARD_ADMIN_TOKEN")
        .expect("SWITCHYARD_ADMIN_TOKEN is passed on");
    assert!(
        token.starts_with("${SWITCHYARD_ADMIN_TOKEN:?"),
        "the admin token comes from the environment, required, with no default: {token}"
    );
    assert!(
        !repository_file("docker-compose.yml").contains("change-me"),
        "no well-known token"
    );
    assert!(
        ports
            .iter()
            .all(|p| p.starts_with("127.0.0.1:")
                || p.starts_with("${SWITCHYARD_PUBLISH:-127.0.0.1}:")),
        "published on loopback unless asked otherwise: {ports:?}"
    );
    let config_path = env
        .get("SWITCHYARD_CONFIG")
        .expect("SWITCHYARD_CONFIG is set");
    let mounted = switchyard["volumes"].as_sequence().is_some_and(|volumes| {
        volumes.iter().filter_map(|v| v.as_str()).any(|v| {
            let mut parts = v.split(':');
            parts.next().is_some_and(|host| host.ends_with(".toml"))
                && parts.next() == Some(config_path.as_str())
        })
    });
    assert!(mounted, "the config file is mounted at {config_path}");
}

#[test]
fn the_image_is_built_in_stages_and_runs_as_a_user() {
    let dockerfile = repository_file("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let stages = instructions
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .count();
    assert!(stages >= 2, "a multi-stage build");
    let user = instructions
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER instruction");
    assert!(
        !matches!(user.trim(), "root" | "0" | "0:0"),
        "the image runs as a user, not {user}"
    );
}

async fn admin_call(addr: SocketAddr, method: reqwest::Method, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the admin API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn paused_in_list(list: &Value) -> bool {
    list.as_array().unwrap()[0]["paused"] == true
}

#[tokio::test]
async fn a_paused_destination_queues_until_resumed_even_across_a_restart() {
    let db = TestDatabase::create("pause").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    let (status, answer) = admin_call(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/destinations/hook/pause",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"name": "hook", "paused": true}));
    let (status, answer) = admin_call(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/destinations/nope/pause",
    )
    .await;
    assert_eq!(status, 404);
    assert!(answer["code"].is_string() && answer["message"].is_string());
    for n in 0..3 {
        track(sy.addr, WEB_KEY, &format!("p-{n}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        sink.received().is_empty(),
        "a paused destination sends nothing"
    );
    let (_, list) = admin_call(sy.addr, reqwest::Method::GET, "/admin/v1/destinations").await;
    assert!(paused_in_list(&list), "{list}");

    // Still paused after a restart.
    sy.shutdown().await.unwrap();
    let sy = start_switchyard(&config(&sink), &db.url).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sink.received().is_empty(), "still paused after a restart");
    let (_, list) = admin_call(sy.addr, reqwest::Method::GET, "/admin/v1/destinations").await;
    assert!(paused_in_list(&list), "{list}");

    let (status, answer) = admin_call(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/destinations/hook/resume",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"name": "hook", "paused": false}));
    let started = Instant::now();
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.message_ids().len() == 3)
            .await,
        "the backlog drains after a resume: {:?}",
        sink.message_ids()
    );
    // Woken by the resume, not by the next poll for due work.
    assert!(started.elapsed() < Duration::from_secs(5));
    let (_, list) = admin_call(sy.addr, reqwest::Method::GET, "/admin/v1/destinations").await;
    assert!(!paused_in_list(&list), "{list}");
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_events_path_shows_a_failed_attempt_and_the_delivery() {
    let db = TestDatabase::create("event_path").await;
    let sink = MockServer::scripted(|n, _| match n {
        1 => Reply::status(500).with_body("upstream broke"),
        _ => Reply::ok(),
    })
    .await;
    let toml = format!(
        "{}retry.initial_backoff = \"50ms\"\n\n[[destinations]]\nname = \"picky\"\nkind = \"webhook\"\nurl = \"{}\"\nwhere = \"event = 'Other'\"\n",
        config(&sink),
        sink.url("/picky")
    );
    let sy = start_switchyard(&toml, &db.url).await;
    let message_id = format!("path-{}", std::process::id());
    track(sy.addr, WEB_KEY, &message_id).await;
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.received().len() >= 2)
            .await
    );
    // The trail is written right after the request; allow the outcome a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let path = loop {
        let (status, path) = admin_call(
            sy.addr,
            reqwest::Method::GET,
            &format!("/admin/v1/events/{message_id}"),
        )
        .await;
        assert_eq!(status, 200, "{path}");
        if path["routes"][0]["state"] == "delivered" || Instant::now() > deadline {
            break path;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(path["message_id"], message_id.as_str());
    assert_eq!(path["source"], "web");
    assert_eq!(path["scope"], "process");
    assert!(path["received_at"].is_string());
    let routes = path["routes"].as_array().unwrap();
    let hook = routes.iter().find(|r| r["destination"] == "hook").unwrap();
    assert_eq!(hook["state"], "delivered", "{path}");
    let attempts = hook["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{path}");
    assert_eq!(attempts[0]["status"], 500);
    assert!(
        attempts[0]["error"].as_str().unwrap().contains("500"),
        "{path}"
    );
    assert!(attempts[1]["error"].is_null());
    let picky = routes.iter().find(|r| r["destination"] == "picky").unwrap();
    assert_eq!(picky["state"], "filtered");
    assert_eq!(picky["reason"], "where");

    let (status, answer) =
        admin_call(sy.addr, reqwest::Method::GET, "/admin/v1/events/never-sent").await;
    assert_eq!(status, 404);
    assert!(answer["code"].is_string());
    // Not UTF-8 once decoded: a JSON error, not a panic or plain text.
    for path in ["/admin/v1/events/%FF", "/admin/v1/destinations/%FF/pause"] {
        let method = if path.ends_with("pause") {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let (status, answer) = admin_call(sy.addr, method, path).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["code"], "invalid_path", "{path}: {answer}");
    }

    // The same traffic shows in the per-second series.
    let (status, series) = admin_call(
        sy.addr,
        reqwest::Method::GET,
        "/admin/v1/stats/series?seconds=60",
    )
    .await;
    assert_eq!(status, 200, "{series}");
    let hook = series["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "hook")
        .unwrap();
    let sum = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(hook["delivered"].as_array().unwrap().len(), 60);
    assert_eq!(sum(&hook["delivered"]), 1, "{hook}");
    assert_eq!(sum(&hook["retried"]), 1, "{hook}");
    assert!(hook["p99_ms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.is_u64()));
    let web = series["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    assert!(sum(&web["accepted"]) >= 1);
    let (status, answer) = admin_call(
        sy.addr,
        reqwest::Method::GET,
        "/admin/v1/stats/series?seconds=0",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(answer["code"], "invalid_query");
    let (status, _) = admin_call(
        sy.addr,
        reqwest::Method::GET,
        "/admin/v1/stats/series?seconds=x",
    )
    .await;
    assert_eq!(status, 400);
    sy.shutdown().await.unwrap();
}

async fn track_as(addr: SocketAddr, user: Value, message_id: &str) {
    let mut body = json!({"event": "Viewed", "messageId": message_id, "anonymousId": "anon-1"});
    body["userId"] = user;
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/track"))
        .basic_auth(WEB_KEY, Some(""))
        .json(&body)
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_users_last_events_are_found_by_user_id() {
    let db = TestDatabase::create("event_search").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&config(&sink), &db.url).await;
    // The trail is one per test process: ids and the user are this run's own.
    let run = std::process::id();
    let user = format!("search-user-{run}");
    for n in 1..=3 {
        track_as(sy.addr, json!(user), &format!("search-{run}-{n}")).await;
    }
    track_as(
        sy.addr,
        json!(format!("someone-else-{run}")),
        &format!("search-{run}-other"),
    )
    .await;
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.message_ids().len() == 4)
            .await
    );
    let addr = sy.addr;
    let query = |path: String| async move { admin_call(addr, reqwest::Method::GET, &path).await };
    let (status, found) = query(format!("/admin/v1/events?userId={user}")).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["scope"], "process");
    let items = found["items"].as_array().unwrap();
    let ids: Vec<&str> = items
        .iter()
        .map(|item| item["message_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (1..=3).rev().map(|n| format!("search-{run}-{n}")).collect();
    assert_eq!(ids, expected, "newest first: {found}");
    // Each one as `GET /admin/v1/events/{messageId}` shows it.
    assert_eq!(items[0]["source"], "web");
    assert!(items[0]["received_at"].is_string());
    assert_eq!(items[0]["routes"][0]["destination"], "hook");
    assert!(items[0]["routes"][0]["attempts"].is_array());

    let (_, two) = query(format!("/admin/v1/events?userId={user}&limit=2")).await;
    assert_eq!(two["items"].as_array().unwrap().len(), 2, "{two}");
    let (status, none) = query(format!("/admin/v1/events?userId=nobody-{run}")).await;
    assert_eq!(status, 200);
    assert_eq!(none["items"], json!([]));
    for bad in [
        "/admin/v1/events",
        "/admin/v1/events?userId=",
        "/admin/v1/events?userId=u&limit=0",
    ] {
        let (status, answer) = query(bad.to_owned()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["code"], "invalid_query", "{bad}: {answer}");
    }
    sy.shutdown().await.unwrap();
}

/// Pausing while a destination holds claimed work: requests already out finish, and nothing
/// new starts after the pause is answered: neither events claimed but not yet sent nor the
/// retry of a failed one. A resume delivers all of it.
#[tokio::test]
async fn a_pause_stops_claimed_work_and_retries_until_resumed() {
    pause_with_claimed_work("pause_claimed", false).await;
}

/// The same when the pause is answered by another process than the one holding the work (an
/// ingest-only front, and a worker that hears of the pause through its notice).
#[tokio::test]
async fn a_pause_answered_elsewhere_stops_the_worker_holding_claimed_work() {
    pause_with_claimed_work("pause_claimed_split", true).await;
}

async fn pause_with_claimed_work(label: &str, split: bool) {
    let db = TestDatabase::create(label).await;
    // The first request fails (a retry comes due soon), the next ones take 3 s each.
    let sink = MockServer::scripted(|n, _| match n {
        1 => Reply::status(500),
        _ => Reply::ok().after(Duration::from_secs(3)),
    })
    .await;
    let toml = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{WEB_KEY}\"\n\n[[destinations]]\nname = \"slow\"\n\
         kind = \"webhook\"\nurl = \"{}\"\nmax_in_flight = 4\nretry.initial_backoff = \"100ms\"\n",
        sink.url("/in")
    );
    // `sy` takes the events and answers the admin calls; `worker`, when split, delivers.
    let (sy, worker) = if split {
        let front = testkit::start_switchyard_as(&toml, &db.url, Role::Ingest).await;
        let worker = testkit::start_switchyard_as(&toml, &db.url, Role::Worker).await;
        (front, Some(worker))
    } else {
        (start_switchyard(&toml, &db.url).await, None)
    };
    let ids: Vec<String> = (0..8).map(|n| format!("claimed-{n}")).collect();
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "userId": "u", "event": "E", "messageId": id}))
        .collect();
    let (status, _) = testkit::send_batch(&format!("http://{}", sy.addr), WEB_KEY, &batch).await;
    assert_eq!(status, 200);
    // Four requests out, the failed one's slot reused: five requests, and the rest of the
    // second claimed run waits in the process for a free slot.
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.received().len() >= 5)
            .await
    );
    let (status, _) = admin_call(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/destinations/slow/pause",
    )
    .await;
    assert_eq!(status, 200);
    let at_pause = sink.received().len();
    assert_eq!(at_pause, 5, "{:?}", sink.message_ids());
    // The requests out finish (3 s); the slots they free start nothing.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let received = sink.received();
    assert_eq!(
        received.len(),
        at_pause,
        "nothing started after the pause: {:?}",
        sink.message_ids()
    );
    assert!(
        received[1..].iter().all(|r| r.status == 200),
        "in-flight requests finished"
    );
    let deliverer = worker.as_ref().map_or(sy.addr, |w| w.addr);
    let (_, list) = admin_call(deliverer, reqwest::Method::GET, "/admin/v1/destinations").await;
    assert_eq!(list[0]["in_flight"], 0, "{list}");

    sink.script(|_, _| Reply::ok());
    let (status, _) = admin_call(
        sy.addr,
        reqwest::Method::POST,
        "/admin/v1/destinations/slow/resume",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| {
            let mut got = s.message_ids();
            got.retain(|id| id.starts_with("claimed-"));
            ids.iter().all(|id| got.contains(id))
        })
        .await,
        "everything arrives after the resume: {:?}",
        sink.message_ids()
    );
    if let Some(worker) = worker {
        worker.shutdown().await.unwrap();
    }
    sy.shutdown().await.unwrap();
}
