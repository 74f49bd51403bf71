//! Reloading the config without a restart and without losing queued work.

use std::time::Duration;

use serde_json::{json, Value};
use switchyard::testkit::{
    self, send_batch, start_switchyard_from, MockServer, Process, Reply, TestDatabase,
};

const KEY: &str = "wk_reload";

fn destination(name: &str, url: &str) -> String {
    format!("\n[[destinations]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\ntimeout = \"1s\"\n")
}

fn config(destinations: &[String]) -> String {
    format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n{}",
        destinations.concat()
    )
}

async fn send(base: &str, ids: &[&str]) {
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "event": "E", "userId": "u", "messageId": id}))
        .collect();
    assert_eq!(send_batch(base, KEY, &batch).await.0, 200);
}

async fn admin(base: &str, method: reqwest::Method, path: &str) -> (u16, Value) {
    testkit::admin(base, method, path, None).await
}

#[tokio::test]
async fn reload_adds_changes_and_removes_destinations_without_losing_work() {
    let db = TestDatabase::create("reload").await;
    let kept = MockServer::start().await;
    let moved = MockServer::start().await;
    let stuck = MockServer::scripted(|_, _| Reply::status(503)).await;
    let added = MockServer::start().await;
    let dir = std::env::temp_dir().join(format!("sy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(
        &path,
        config(&[
            destination("kept", &kept.url("/in")),
            destination("stuck", &stuck.url("/in")),
        ]),
    )
    .unwrap();
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    send(&base, &["r-1", "r-2", "r-3"]).await;
    assert!(
        kept.wait_until(Duration::from_secs(10), |s| s.events().len() == 3)
            .await
    );
    assert!(
        stuck
            .wait_until(Duration::from_secs(10), |s| !s.received().is_empty())
            .await
    );

    // A broken file is refused and changes nothing.
    std::fs::write(&path, "[[destinations]]\nname = 1\n").unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("switchyard.toml:2:8"),
        "{body}"
    );

    // kept moves to a new URL, stuck is removed, added is new.
    std::fs::write(
        &path,
        config(&[
            destination("kept", &moved.url("/in")),
            destination("added", &added.url("/in")),
        ]),
    )
    .unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["removed"], json!(["stuck"]));
    assert_eq!(
        body["report"]["dead_lettered"], 3,
        "stuck's queued events became dead letters"
    );
    let (_, dead) = admin(
        &base,
        reqwest::Method::GET,
        "/admin/v1/dead-letters?destination=stuck",
    )
    .await;
    let reasons: Vec<&str> = dead["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["last_error"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 3);
    assert!(reasons
        .iter()
        .all(|r| r.contains("removed from the config")));

    send(&base, &["r-4"]).await;
    assert!(
        moved
            .wait_until(Duration::from_secs(10), |s| s.message_ids() == ["r-4"])
            .await
    );
    assert!(
        added
            .wait_until(Duration::from_secs(10), |s| s.message_ids() == ["r-4"])
            .await
    );
    let (_, destinations) = admin(&base, reqwest::Method::GET, "/admin/v1/destinations").await;
    let kept_state = destinations
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "kept")
        .cloned()
        .unwrap();
    assert_eq!(kept_state["delivered"], 4, "counters carry over a reload");
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let db = TestDatabase::create("sighup").await;
    let first = MockServer::start().await;
    let second = MockServer::start().await;
    let mut sy = Process::spawn(
        env!("CARGO_BIN_EXE_switchyard"),
        &config(&[destination("hook", &first.url("/in"))]),
        &db.url,
    )
    .await;
    send(&sy.base(), &["h-1"]).await;
    assert!(
        first
            .wait_until(Duration::from_secs(10), |s| s.events().len() == 1)
            .await
    );
    std::fs::write(
        sy.config_path(),
        config(&[destination("hook", &second.url("/in"))]),
    )
    .unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &sy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut delivered = false;
    for i in 0..50 {
        send(&sy.base(), &[&format!("h-{}", i + 2)]).await;
        if second
            .wait_until(Duration::from_millis(200), |s| !s.events().is_empty())
            .await
        {
            delivered = true;
            break;
        }
    }
    assert!(
        delivered,
        "after SIGHUP, events go to the new URL:\n{}",
        sy.log()
    );
    assert!(sy.log().contains("config reloaded"));
    assert_eq!(sy.terminate(Duration::from_secs(20)).await, Some(0));
}
