//! A website on another origin with the real `@segment/analytics-next` from npm, bundled with
//! esbuild, in Debian's headless Chromium (`tests/browser/website.mjs`): the settings request,
//! the preflighted calls with the write key, the batching strategy, and an origin the source does
//! not allow. Needs `/usr/bin/chromium`, Node.js and `npm ci` in `tests/browser` (`.ci/test`
//! sets them up); a missing piece fails the test, saying which.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use switchyard::testkit::{start_switchyard, MockServer, TestDatabase};

const KEY: &str = "wk_website";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn browser_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    for package in ["playwright-core", "esbuild", "@segment/analytics-next"] {
        assert!(
            dir.join("node_modules").join(package).exists(),
            "{package} is not installed: run `npm ci` in {} (.ci/test does it)",
            dir.display()
        );
    }
    dir
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "Chromium is not installed at {}: `apt-get install chromium` (.ci/test does it) or set \
         SWITCHYARD_TEST_CHROMIUM",
        path.display()
    );
    path
}

#[tokio::test]
async fn analytics_next_on_another_origin_reaches_the_webhook() {
    let (dir, chromium) = (browser_dir(), chromium());
    let db = TestDatabase::create("website").await;
    let sink = MockServer::start().await;
    let (site_port, other_port) = (free_port(), free_port());
    let config = format!(
        r#"
[[sources]]
name = "shop"
write_key = "{KEY}"
allowed_origins = ["http://127.0.0.1:{site_port}"]

[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
"#,
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;

    let run = tokio::process::Command::new("node")
        .arg("website.mjs")
        .current_dir(&dir)
        .env("SWITCHYARD_URL", format!("http://{}", sy.addr))
        .env("WRITE_KEY", KEY)
        .env("SITE_PORT", site_port.to_string())
        .env("OTHER_PORT", other_port.to_string())
        .env("RUN", "website")
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser run finishes within two minutes")
        .expect("node runs (install Node.js; .ci/test does it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| {
            panic!(
                "the driver prints a JSON report last:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["outside"],
        serde_json::json!([]),
        "only loopback was asked: {report}"
    );
    let requests = &report["requests"];
    let settings = format!("/v1/projects/{KEY}/settings");
    assert!(requests[&settings].as_u64() >= Some(1), "{report}");
    for path in ["/v1/i", "/v1/t", "/v1/p", "/v1/g", "/v1/a"] {
        assert_eq!(requests[path], 1, "{path}: {report}");
    }
    assert_eq!(
        requests["/v1/b"], 2,
        "six tracks in batches of three: {report}"
    );
    assert!(
        report["refused"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed")),
        "the other origin's settings request is refused: {report}"
    );

    let arrived = sink
        .wait_until(Duration::from_secs(30), |s| s.events().len() >= 11)
        .await;
    let events = sink.events();
    assert!(arrived, "{} of 11 events arrived: {events:?}", events.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = sink.events();
    assert_eq!(
        events.len(),
        11,
        "nothing from the other origin: {events:?}"
    );
    let of_type = |t: &str| events.iter().filter(|e| e["type"] == t).count();
    assert_eq!(
        [
            of_type("identify"),
            of_type("track"),
            of_type("page"),
            of_type("group"),
            of_type("alias")
        ],
        [1, 7, 1, 1, 1]
    );
    for event in &events {
        assert!(event.get("writeKey").is_none(), "{event}");
        assert_eq!(event["context"]["ip"], "127.0.0.1", "{event}");
        assert_eq!(
            event["context"]["library"]["name"], "analytics.js",
            "{event}"
        );
    }
    let order = events
        .iter()
        .find(|e| e["event"] == "Order Completed")
        .unwrap();
    assert_eq!(order["properties"]["revenue"], 42);
    assert_eq!(order["anonymousId"].as_str().map(str::len), Some(36));
    assert_eq!(order["userId"], "user-1");
    sy.shutdown().await.unwrap();
}
