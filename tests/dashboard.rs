//! The dashboard in a real browser: Debian's headless Chromium, driven by playwright-core
//! (`tests/browser/dashboard.mjs`), against Switchyard in this process. An operator signs in,
//! sees a delivered event counted, replays a dead letter, watches the live stream (with each
//! message's routing), follows an archive replay's progress, pauses and resumes a destination,
//! finds an event's attempts by messageId and by userId, and opens a destination's charts; the
//! screenshots land in `target/dashboard*.png` (kept by CI as artifacts).
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium` package), Node.js, and `npm ci` in
//! `tests/browser`; `.ci/test` sets all three up. A missing piece fails the test, saying
//! which, rather than skipping it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::testkit::{
    admin_ok, start_switchyard, MockServer, Reply, TestDatabase, ADMIN_TOKEN,
};

const KEY: &str = "wk_dashboard";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The browser, or a failure that says how to get it.
fn chromium() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "Chromium is not installed at {}: install Debian's `chromium` package \
         (`apt-get install chromium`; .ci/test does it) or set SWITCHYARD_TEST_CHROMIUM",
        path.display()
    );
    path
}

/// The driver's folder, with playwright-core installed, or a failure that says how.
fn driver_dir() -> PathBuf {
    let dir = manifest_dir().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in {} (.ci/test does it)",
        dir.display()
    );
    dir
}

fn config(good: &MockServer, broken: &MockServer, flaky: &MockServer) -> String {
    format!(
        r#"
[[sources]]
name = "web"
write_key = "{KEY}"

[[destinations]]
name = "orders"
kind = "webhook"
url = "{}"

[[destinations]]
name = "crm"
kind = "webhook"
url = "{}"

[[destinations]]
name = "warehouse"
kind = "webhook"
url = "{}"
retry.initial_backoff = "50ms"
"#,
        good.url("/orders"),
        broken.url("/crm"),
        flaky.url("/warehouse")
    )
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Value {
    admin_ok(&format!("http://{addr}"), reqwest::Method::GET, path, None).await
}

/// The CRM's dead letters: (id, messageId).
async fn dead_letters(addr: std::net::SocketAddr) -> Vec<(i64, String)> {
    admin_get(addr, "/admin/v1/dead-letters?destination=crm&limit=100").await["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| Some((i["id"].as_i64()?, i["message_id"].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_sees_deliveries_and_replays_a_dead_letter() {
    let chromium = chromium();
    let driver = driver_dir();
    let db = TestDatabase::create("dashboard").await;
    let good = MockServer::start().await;
    // The CRM refuses everything (400: dead at once) until the operator has looked.
    let broken = MockServer::scripted(|_, _| Reply::status(400).with_body("unknown field")).await;
    // The warehouse fails dash-0's first attempt (500), then takes everything.
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let flaky = MockServer::scripted(move |_, received| {
        let first = String::from_utf8_lossy(&received.body).contains("\"dash-0\"")
            && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst);
        if first {
            Reply::status(500).with_body("warehouse is restarting")
        } else {
            Reply::ok()
        }
    })
    .await;
    let sy = start_switchyard(&config(&good, &broken, &flaky), &db.url).await;

    let events: Vec<Value> = (0..4)
        .map(|i| {
            json!({"type": "track", "userId": format!("u{i}"), "event": "Order Completed",
                   "messageId": format!("dash-{i}"), "properties": {"revenue": 10 + i}})
        })
        .collect();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/batch", sy.addr))
        .basic_auth(KEY, Some(""))
        .json(&json!({ "batch": events }))
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(response.status(), 200);
    assert!(
        good.wait_until(Duration::from_secs(20), |s| s.events().len() >= 4)
            .await,
        "the good destination did not receive the events"
    );
    let mut dead = Vec::new();
    for _ in 0..200 {
        dead = dead_letters(sy.addr).await;
        if dead.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 4, "every event to the CRM became a dead letter");
    assert!(
        flaky
            .wait_until(Duration::from_secs(20), |s| s
                .message_ids()
                .contains(&"dash-0".to_owned()))
            .await,
        "dash-0 reached the warehouse on its second attempt"
    );
    broken.script(|_, _| Reply::ok());
    // A replay of the orders' archive since an hour ago, for the dashboard to show.
    let now = time::OffsetDateTime::now_utc();
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let started = reqwest::Client::new()
        .post(format!("http://{}/admin/v1/replays", sy.addr))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"destination": "orders", "from": rfc3339(now - time::Duration::hours(1)),
                      "to": rfc3339(now + time::Duration::minutes(1))}),
        )
        .send()
        .await
        .expect("the admin API answers");
    assert_eq!(started.status(), 202);
    let replay: Value = started.json().await.expect("JSON");
    let replay_id = replay["id"].as_i64().expect("a replay id");
    let replay_events = replay["events"].as_u64().expect("its events");

    let screenshot = manifest_dir().join("target/dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let run = tokio::process::Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(&driver)
        .env("SWITCHYARD_URL", format!("http://{}", sy.addr))
        .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SWITCHYARD_WRITE_KEY", KEY)
        .env("DELIVERED_DESTINATION", "orders")
        .env("DEAD_DESTINATION", "crm")
        .env("FLAKY_DESTINATION", "warehouse")
        .env("EVENT_ID", "dash-0")
        .env("EVENT_USER", "u0")
        .env("REPLAY_ID", replay_id.to_string())
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser run finished within 2 minutes")
        .expect("node runs (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser run failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("the driver prints a JSON report last:\n{stdout}"));

    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["refusal"].as_str().is_some_and(|m| !m.is_empty()),
        "a wrong token is refused with a message: {report}"
    );
    assert!(
        report["delivered"].as_u64().is_some_and(|n| n >= 4),
        "{report}"
    );
    assert_eq!(report["dead_before"], 4, "{report}");
    let failed = report["failed_loads"]
        .as_array()
        .expect("failed loads listed");
    assert!(
        failed.len() == 1 && failed[0].as_str().is_some_and(|l| l.starts_with("401 ")),
        "only the refused sign-in failed to load: {report}"
    );

    assert!(
        report["spark_points"].as_u64().is_some_and(|n| n > 0),
        "{report}"
    );
    let paused_id = report["paused_message_id"]
        .as_str()
        .expect("a paused event")
        .to_owned();
    assert!(
        good.message_ids().contains(&paused_id),
        "the event sent while paused was delivered after the resume: {report}"
    );
    assert_eq!(report["event_state"], "delivered", "{report}");
    let attempts = report["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len(),
        2,
        "one failed attempt, then the delivery: {report}"
    );
    assert_eq!(attempts[0]["failed"], true, "{report}");
    assert!(
        attempts[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("500")),
        "{report}"
    );
    assert_eq!(attempts[1]["failed"], false, "{report}");
    assert!(
        report["user_events"].as_u64().is_some_and(|n| n >= 1),
        "the search by userId lists the user's events: {report}"
    );
    assert_eq!(report["user_attempts"], 2, "{report}");
    let routes = report["live_routes"].as_array().expect("live routes");
    assert!(
        routes
            .iter()
            .any(|r| r["destination"] == "orders" && r["state"] == "queued"),
        "the live panel shows where the event was routed: {report}"
    );
    let overview = &report["replay_overview"];
    assert_eq!(overview["destination"], "orders", "{report}");
    assert_eq!(overview["state"], "done", "{report}");
    assert_eq!(overview["max"], replay_events as f64, "{report}");
    assert!(replay_events >= 4, "{replay}");
    assert!(
        overview["label"].as_str().is_some_and(|l| l.contains("of")),
        "the progress bar has a label: {report}"
    );
    assert_eq!(
        report["replay_page"]["max"], replay_events as f64,
        "{report}"
    );
    assert_eq!(
        report["replay_page"]["value"], replay_events as f64,
        "{report}"
    );
    let charts = report["charts"].as_array().expect("charts");
    assert_eq!(charts.len(), 3, "{report}");
    assert!(
        charts
            .iter()
            .all(|c| c["points"].as_u64().is_some_and(|n| n > 0)),
        "every chart has data points after traffic: {report}"
    );
    assert_eq!(report["focused_title"], "page-title", "{report}");

    let replayed = report["replayed_id"].as_i64().expect("a replayed id");
    let message_id = dead
        .iter()
        .find(|(id, _)| *id == replayed)
        .map(|(_, message_id)| message_id.clone())
        .unwrap_or_else(|| panic!("{replayed} was one of {dead:?}"));
    let left = dead_letters(sy.addr).await;
    assert!(
        left.iter().all(|(id, _)| *id != replayed),
        "{replayed} left the dead letters"
    );
    assert_eq!(left.len(), 3, "only the one clicked was replayed");
    assert!(
        broken
            .wait_until(Duration::from_secs(20), |s| s
                .message_ids()
                .contains(&message_id))
            .await,
        "the replayed event ({message_id}) reached the CRM"
    );
    for name in [
        "dashboard.png",
        "dashboard-destination.png",
        "dashboard-event.png",
    ] {
        let shot = manifest_dir().join("target").join(name);
        assert!(
            shot.exists() && std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "a screenshot at {}",
            shot.display()
        );
    }
    assert!(
        is_png(&screenshot),
        "a screenshot at {}",
        screenshot.display()
    );
    sy.shutdown().await.expect("a clean shutdown");
}
